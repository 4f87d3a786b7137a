"""Fixtures for ``kubectl autotek``: an API server, the broker double, and a runner.

The API server is the session's real one when ``AUTOTEK_TEST_KUBECONFIG`` is set (``KUBEBUILDER_ASSETS``:
tests/conftest.py starts it), else the API emulator in a thread of this process. The plugin is called
in-process through ``main([...])`` with ``--kubeconfig`` pointing at a kubeconfig written to the test's
tmp_path; its output is captured with capsys. On the real server every test works in namespaces of its
own, deleted at the end; credentials made here carry no test-scope label, so no operator of the
integration tier (each selects its own scope) acts on them.
"""

from __future__ import annotations

import base64
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.config
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

import controlplane
from autotek_operator import kubectl_plugin
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.dev.emulator import EmulatorThread
from autotek_operator.dev.emulator import kubeconfig as emulator_kubeconfig

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
CRDS = Path(__file__).resolve().parents[2] / "crds"
CRD_FILES = (CRDS / "autotekcredentials.autotek.io.yaml", CRDS / "clusterautotekcredentials.autotek.io.yaml")
CLUSTER_PLURAL = "clusterautotekcredentials"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Kube:
    """Direct access to an API server (as admin), for setting up credentials, Secrets and statuses."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def delete_namespace(self, name: str) -> None:
        try:
            self.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def install_crd(self) -> None:
        """Create the CRDs unless they exist (shared with other workers: never deleted) and wait for them."""
        controlplane.install_crds(self.api, [yaml.safe_load(path.read_text()) for path in CRD_FILES])

    def versions(self, ns: str) -> dict[tuple[str, str], str]:
        """(kind, name) -> resourceVersion of every credential, Secret and Event in ``ns``."""
        out = {}
        for kind, items in (
            ("AutoTekCredential", self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]),
            ("Secret", self.core.list_namespaced_secret(ns).to_dict()["items"]),
            ("Event", self.core.list_namespaced_event(ns).to_dict()["items"]),
        ):
            for item in items:
                meta = item["metadata"]
                out[(kind, meta["name"])] = meta.get("resourceVersion") or meta.get("resource_version")
        return out

    def put_secret(self, ns: str, name: str, data: dict[str, str]) -> None:
        body: Any = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        self.core.create_namespaced_secret(ns, body)

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def create_credential(
        self, ns: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: Any = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AutoTekCredential",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": spec,
        }
        return cast(dict[str, Any], self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))

    def set_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
        )

    def credential(self, ns: str, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))

    # -- ClusterAutoTekCredentials (cluster-scoped: tests give them unique names and delete them) ----------

    def create_cluster_credential(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body: Any = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterAutoTekCredential",
                     "metadata": {"name": name}, "spec": spec}
        return cast(dict[str, Any], self.custom.create_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, body))

    def set_cluster_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, CLUSTER_PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
        )

    def cluster_credential(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name))

    def delete_cluster_credential(self, name: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_labelled_namespace(self, name: str, labels: dict[str, str]) -> None:
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": name, "labels": labels}})


class Server:
    """The API server the tests talk to: the session's real one, or an emulator thread."""

    def __init__(self, admin: Path | None, emulator: EmulatorThread | None) -> None:
        self.admin, self.emulator = admin, emulator

    @property
    def real(self) -> bool:
        return self.emulator is None

    def kubeconfig_doc(self, namespace: str | None = None) -> dict[str, Any]:
        """A kubeconfig document for the server (admin), its current context in ``namespace`` if given."""
        if self.emulator is not None:
            return emulator_kubeconfig(self.emulator.url, namespace=namespace or "default")
        assert self.admin is not None
        doc: dict[str, Any] = yaml.safe_load(self.admin.read_text())
        if namespace:
            for ctx in doc["contexts"]:
                if ctx["name"] == doc["current-context"]:
                    ctx["context"]["namespace"] = namespace
        return doc

    def write_kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        path.write_text(yaml.safe_dump(self.kubeconfig_doc(namespace)))
        return path

    def writes(self, kube: Kube, ns: str) -> Callable[[], dict[Any, Any]]:
        """Start counting writes; the returned function tells what was written since. The emulator counts
        every write request; a real server shows writes as changed or new objects in ``ns``."""
        if self.emulator is not None:
            emulator = self.emulator
            emulator.reset_request_counts()
            return lambda: {k: n for k, n in emulator.request_counts.items() if k[0] in WRITE_METHODS}
        before = kube.versions(ns)
        return lambda: {key: v for key, v in kube.versions(ns).items() if before.get(key) != v}


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The real API server named by AUTOTEK_TEST_KUBECONFIG, else one emulator no operator ever watches."""
    given = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
    if given:
        Kube(Path(given)).install_crd()
        yield Server(Path(given), None)
        return
    with EmulatorThread(port=0) as emu:
        yield Server(None, emu)


@pytest.fixture
def kubeconfig(server: Server, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture(scope="session")
def kube_for() -> Callable[[Path], Kube]:
    """Direct access to an API server by kubeconfig (for the live tests' own server)."""
    return Kube


@pytest.fixture
def kube(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Kube:
    return Kube(server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig"))


@pytest.fixture
def namespaces(server: Server, kube: Kube) -> Iterator[Callable[[str], str]]:
    """Make a namespace (on a real server: created now, deleted at the end; the emulator needs none)."""
    made: list[str] = []

    def make(name: str) -> str:
        if server.real:
            kube.create_namespace(name)
            made.append(name)
        return name

    yield make
    for name in made:
        kube.delete_namespace(name)


@pytest.fixture
def ns(namespaces: Callable[[str], str]) -> str:
    """A fresh namespace."""
    return namespaces(f"kp-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def broker() -> Iterator[BrokerServer]:
    with BrokerServer(clients={}, lifetime=3599) as b:
        yield b


@dataclass
class Client:
    client_id: str
    client_secret: str


@pytest.fixture
def client(broker: BrokerServer) -> Client:
    """A client registered at the broker double."""
    c = Client(f"id-{secrets.token_hex(4)}", f"cs-{secrets.token_urlsafe(18)}")
    broker.configure(clients={c.client_id: c.client_secret})
    return c


@pytest.fixture
def run(kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run ``kubectl autotek --kubeconfig <emulator> ARGS...`` in-process."""

    def _run(*args: str) -> Result:
        capsys.readouterr()
        code = kubectl_plugin.main(["--kubeconfig", str(kubeconfig), *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return _run
