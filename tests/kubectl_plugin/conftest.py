"""Fixtures for ``kubectl autotek``: the API emulator in a thread, the broker double, and a runner.

The plugin is called in-process through ``main([...])`` with ``--kubeconfig`` pointing at a
kubeconfig for the emulator written to the test's tmp_path; its output is captured with capsys.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import pytest

from autotek_operator import kubectl_plugin
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.dev.emulator import EmulatorThread

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Kube:
    """Direct access to the emulator, for setting up credentials, Secrets and statuses."""

    def __init__(self, url: str) -> None:
        self.api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url))
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

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

    def create_credential(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body: Any = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AutoTekCredential",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        return cast(dict[str, Any], self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))

    def set_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
        )

    def credential(self, ns: str, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorThread]:
    """One emulator for the directory's in-process tests; no operator ever watches it."""
    with EmulatorThread(port=0) as emu:
        yield emu


@pytest.fixture
def kubeconfig(emulator: EmulatorThread, tmp_path: Path) -> Path:
    return emulator.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture(scope="session")
def kube_for() -> Callable[[str], Kube]:
    """Direct access to an API server by URL (for the live tests' own emulator)."""
    return Kube


@pytest.fixture
def kube(emulator: EmulatorThread) -> Kube:
    return Kube(emulator.url)


@pytest.fixture
def ns() -> str:
    """A fresh namespace name (the emulator does not require namespaces to exist)."""
    return f"kp-{uuid.uuid4().hex[:8]}"


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
