"""Processes and helpers for integration tests: the real operator, a token endpoint, an API server.

The API server is the cluster named by ``AUTOTEK_TEST_KUBECONFIG`` when that is set (the session's
control plane, kind or any other cluster), else the embedded emulator started as its own process. The
token endpoint is the broker double, also its own process. Everything talks real HTTP on 127.0.0.1.

Several pytest-xdist workers share one real API server, each with operators of its own. A worker's
:class:`Cluster` draws a random *scope*: every credential it creates carries the label
``autotek.io/test-scope=<scope>`` and every operator it starts gets ``AUTOTEK_CREDENTIAL_SELECTOR`` for
that label, so that no operator acts on another worker's credentials. On a real server the operators
authenticate as a ServiceAccount bound to the RBAC rendered from ``manifests/`` (see ``rbac.py``); the
tests themselves use the admin kubeconfig.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException
from rbac import MANIFESTS, SCOPE_LABEL, Identity, Rbac, bare, companion_roles, new_scope, one, selector

import controlplane

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "autotekcredentials.autotek.io.yaml"
GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
#: The ClusterRole of manifests/ that the operator's ServiceAccount is bound to.
CLUSTER_ROLE = "autotek-operator"

T = TypeVar("T")

#: Every client secret and token the session used, for the leak scan.
SENSITIVE: set[str] = set()


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.25) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except ApiException as exc:
            last = f"ApiException {exc.status}"
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _start_with_ready_line(cmd: list[str], marker: str, log_path: Path, env: dict[str, str] | None = None,
                           timeout: float = 30.0) -> tuple[subprocess.Popen[str], str]:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(marker):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{cmd!r} did not become ready; see {log_path}")


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Broker:
    """The token-endpoint double as a process, driven through its control API."""

    def __init__(self, workdir: Path) -> None:
        self.proc, self.url = _start_with_ready_line(
            [sys.executable, "-m", "autotek_operator.dev.broker", "--port", "0"],
            "BROKER READY", workdir / "broker.log",
        )
        self.token_url = self.url + "/auth-broker/request-token"
        self.clients: dict[str, str] = {}

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def control(self, **changes: Any) -> None:
        self._call("POST", "/_control", changes)

    def add_client(self, client_id: str, secret: str) -> None:
        self.clients[client_id] = secret
        self.control(clients=self.clients)

    def remove_client(self, client_id: str) -> None:
        self.clients.pop(client_id, None)
        self.control(clients=self.clients)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_stats")
        return result

    def requests_for(self, client_id: str) -> list[dict[str, Any]]:
        return [r for r in self.stats()["requests"] if r.get("client_id") == client_id]

    def stop(self) -> None:
        stop_process(self.proc)


class Cluster:
    """An API server: a given cluster, or the emulator as a child process; one worker's view of it."""

    def __init__(self, workdir: Path) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.workdir = workdir
        #: This worker's label value (see the module docstring).
        self.scope = new_scope()
        #: The namespaces this worker created, and what the leak scan needs of those already deleted.
        self.namespaces: list[str] = []
        self.archive: dict[str, str] = {}
        #: Further text for the leak scan, by where it came from (e.g. cluster-scoped objects' statuses).
        self.extra_haystacks: dict[str, str] = {}
        given = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
        if given:
            self.kubeconfig = Path(given)
            self.emulated = False
        else:
            self.kubeconfig = workdir / "kubeconfig"
            self.proc, self.url = _start_with_ready_line(
                [sys.executable, "-m", "autotek_operator.dev.emulator", "--port", "0",
                 "--kubeconfig", str(self.kubeconfig)],
                "EMULATOR READY", workdir / "emulator.log",
            )
            self.emulated = True
        self.api = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        #: The worker's ServiceAccounts and bindings (None on the emulator, which has no RBAC).
        self.rbac = None if self.emulated else Rbac(self.kubeconfig, self.api, self.scope, workdir)
        if not self.emulated:
            self._install_crd()

    def _install_crd(self) -> None:
        controlplane.install_crds(self.api, [yaml.safe_load(CRD_FILE.read_text())])

    def stop(self) -> None:
        if self.rbac is not None:
            for name in [n for n in self.namespaces if n not in self.archive]:
                self.delete_namespace(name)
            self.rbac.close()
        if self.proc is not None:
            stop_process(self.proc)

    # -- identities -------------------------------------------------------------------------

    @property
    def real(self) -> bool:
        """True on a real API server (RBAC, admission, a controller-manager); False on the emulator."""
        return not self.emulated

    def identity(self, variant: str = "base") -> Identity:
        """Whom an operator authenticates as: on a real server, a ServiceAccount bound to the ClusterRole of
        ``manifests/`` (``variant`` "base") or of ``manifests/overlays/<variant>`` (applied under the name
        ``autotek-operator-<variant>``, since its rules differ from the base's); admin on the emulator."""
        if self.rbac is None:
            return Identity(self.kubeconfig)
        directory = MANIFESTS if variant == "base" else MANIFESTS / "overlays" / variant
        docs = self.rbac.rendered(directory)
        role = one(docs, "ClusterRole", CLUSTER_ROLE)
        name = CLUSTER_ROLE if variant == "base" else f"{CLUSTER_ROLE}-{variant}"
        # Also the rendering's other ClusterRoles (autotek-operator-cluster-credentials: the cluster kind and
        # namespaces), under their own names: their rules are the same in every overlay.
        return self.rbac.service_account(name, shared_cluster_roles=[bare(role, name=name), *companion_roles(docs)],
                                         source=directory)

    def allow_leases(self, identity: Identity, namespace: str) -> None:
        """Copy the leader-election Role of the identity's rendering into ``namespace``; bind it to ``identity``."""
        if self.rbac is not None:
            self.rbac.allow_leases(identity, namespace)

    # -- objects ----------------------------------------------------------------------------

    def create_namespace(self, prefix: str = "it") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": name, "labels": {SCOPE_LABEL: self.scope}}})
        self.namespaces.append(name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace (the controller-manager finishes it); its Events and credential statuses are
        kept for the leak scan. The emulator has no namespace cascade: there it stays."""
        if self.emulated or name in self.archive:
            return
        self.archive[name] = self._leak_text(name)
        try:
            self.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _leak_text(self, ns: str) -> str:
        events = self.core.list_namespaced_event(ns, _preload_content=False).data.decode()
        return events + json.dumps([c.get("status") for c in self.credentials_in(ns)])

    def leak_haystacks(self) -> dict[str, str]:
        """The Events and credential statuses of every namespace this worker made (deleted ones as they were)."""
        out = {f"events and status in {ns}": text for ns, text in self.archive.items()}
        out.update(self.extra_haystacks)
        for ns in self.namespaces:
            if ns not in self.archive:
                out[f"events and status in {ns}"] = self._leak_text(ns)
        return out

    def put_client_secret(self, ns: str, name: str, data: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        try:
            self.core.create_namespaced_secret(ns, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(name, ns, body)

    def secret(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self.core.read_namespaced_secret(name, ns, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        doc: dict[str, Any] = json.loads(resp.data)
        return doc

    def secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        s = self.secret(ns, name)
        if s is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}

    def create_credential(self, ns: str, name: str, spec: dict[str, Any], scope: str | None = None
                          ) -> dict[str, Any]:
        """Create a credential labelled for ``scope`` (default: this worker's operators)."""
        labels = {SCOPE_LABEL: scope or self.scope}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AutoTekCredential",
                "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec}
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        return result

    def credential(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_credential(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.api_client.call_api  # noqa: B018 - keep the client warm
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch,
                                                   _content_type="application/merge-patch+json")

    def delete_credential(self, ns: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_credentials(self, scope: str | None = None) -> list[dict[str, Any]]:
        """The credentials of ``scope`` (default: this worker's) in every namespace; never another worker's."""
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                        label_selector=selector(scope or self.scope))
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    def credentials_in(self, ns: str) -> list[dict[str, Any]]:
        """Every credential in a namespace (whatever its labels)."""
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    def events(self, ns: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_event(ns, _preload_content=False)
        items: list[dict[str, Any]] = json.loads(resp.data).get("items", [])
        return items

    def ready(self, ns: str, name: str) -> dict[str, Any] | None:
        obj = self.credential(ns, name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return dict(cond)
        return None


class Operator:
    """``autotek-operator run`` as a child process, logging at DEBUG into a file.

    It acts on the credentials of ``scope`` (default: the worker's) and authenticates as ``identity``
    (default: the worker's ServiceAccount bound to the RBAC of manifests/; admin on the emulator). With
    leader election on, the leader-election Role is copied into the Lease's namespace first.
    """

    def __init__(self, cluster: Cluster, broker: Broker, workdir: Path, extra_env: dict[str, str] | None = None,
                 *, identity: Identity | None = None, scope: str | None = None,
                 prefix: tuple[str, ...] = (), unset_env: tuple[str, ...] = ()):
        self.cluster, self.broker, self.workdir = cluster, broker, workdir
        #: A command the operator runs under (e.g. ``unshare ...``) and variables it must not inherit.
        self.prefix, self.unset_env = prefix, unset_env
        self.extra_env = extra_env or {}
        self.identity = identity
        self.scope = scope or cluster.scope
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log_path = self.workdir / f"operator-{len(self.logs)}.log"
        self.logs.append(log_path)
        if self.identity is None:
            self.identity = self.cluster.identity()
        if self.extra_env.get("AUTOTEK_LEADER_ELECTION", "").lower() in ("true", "1", "yes"):
            lease_ns = self.extra_env.get("AUTOTEK_LEADER_ELECTION_NAMESPACE") or self.extra_env.get(
                "POD_NAMESPACE") or "autotek-system"
            self.cluster.allow_leases(self.identity, lease_ns)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.identity.kubeconfig),
            "AUTOTEK_CREDENTIAL_SELECTOR": selector(self.scope),
            "AUTOTEK_ALLOWED_TOKEN_URLS": self.broker.url + "/",
            "AUTOTEK_LOG_LEVEL": "DEBUG",
            "AUTOTEK_HEALTH_PORT": "0",
            "AUTOTEK_METRICS_PORT": "0",
            "AUTOTEK_WATCH_TIMEOUT": "10",
            **self.extra_env,
        }
        for name in self.unset_env:
            env.pop(name, None)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "autotek_operator", "run"], stdout=log, stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for("the operator to start watching", lambda: "Activity 'startup' succeeded" in self.log_text(),
                 timeout=30)
        time.sleep(1.0)  # the watches open right after the startup activity

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self, all_runs: bool = False) -> str:
        paths = self.logs if all_runs else self.logs[-1:]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Client:
    ns: str
    secret_name: str
    client_id: str
    client_secret: str


def new_client(cluster: Cluster, broker: Broker, ns: str, secret_name: str = "autotek-client") -> Client:
    """Register a fresh client at the token endpoint and store it in a Secret in ``ns``."""
    client = Client(ns, secret_name, f"id-{secrets.token_hex(4)}", f"cs-{secrets.token_urlsafe(18)}")
    SENSITIVE.add(client.client_secret)
    broker.add_client(client.client_id, client.client_secret)
    cluster.put_client_secret(ns, secret_name, {"client_id": client.client_id, "client_secret": client.client_secret})
    return client
