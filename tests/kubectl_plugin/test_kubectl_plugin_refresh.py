"""``kubectl autotek refresh`` against the real operator process, an API server and the broker double.

The API server is the session's real one (``AUTOTEK_TEST_KUBECONFIG``) or an emulator in a thread of
the test process; the broker double runs in another thread. Both serve on 127.0.0.1, which the
operator (a child process) reaches like any API server and token endpoint. Credentials are created
up front, so that the operator's 10 s floor between token requests per credential runs down for all
of them at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autotek_operator import constants as c
from autotek_operator import kubectl_plugin
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.dev.emulator import EmulatorThread

NS = "live"
GOOD_ID, GOOD_SECRET = "live-client", "live-secret-Qx7pL2"
BAD_SECRET = "not-the-live-secret"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Live:
    kube: Any
    broker: BrokerServer
    kubeconfig: Path
    log: Path
    ns: str
    catc: str = ""  # a ClusterAutoTekCredential selecting ``ns``, with its client Secret there

    def status(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.kube.credential(self.ns, name).get("status") or {}
        return result

    def ready(self, name: str) -> dict[str, Any]:
        return next((x for x in self.status(name).get("conditions") or [] if x["type"] == "Ready"), {})

    def cluster_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.kube.cluster_credential(self.catc).get("status") or {}
        return result

    def cluster_ready(self) -> dict[str, Any]:
        return next((x for x in self.cluster_status().get("conditions") or [] if x["type"] == "Ready"), {})


def integration_module(name: str) -> Any:
    """A helper module of tests/integration (``rbac``: the operator's RBAC identity), shared with this tier."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "integration" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass
class Access:
    kube: Any  # admin access for the test's own writes
    kubeconfig: Path  # admin kubeconfig, for the plugin
    ns: str
    env: dict[str, str]  # the operator's kubeconfig and selection
    labels: dict[str, str]  # what the operator selects credentials by


@contextlib.contextmanager
def operator_access(server: Any, workdir: Path, kube_for: Callable[[Path], Any]) -> Iterator[Access]:
    """Where the live tests' operator runs, and as whom.

    Emulator: one of the module's own, which only this module's operator watches. Real server: a namespace
    of the module's own; the operator authenticates as a ServiceAccount bound to the ClusterRole of
    manifests/ and is limited to the namespace and to credentials labelled with a scope of its own.
    """
    if not server.real:
        with EmulatorThread(port=0) as emu:
            kubeconfig = emu.write_kubeconfig(workdir / "kubeconfig")
            kube = kube_for(kubeconfig)
            kube.create_namespace(NS)  # a cluster credential selects only namespaces that exist
            env = {"KUBECONFIG": str(kubeconfig), "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES": NS}
            yield Access(kube, kubeconfig, NS, env, {})
        return
    rbac = integration_module("rbac")
    kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
    kube = kube_for(kubeconfig)
    ns, scope = f"{NS}-{uuid.uuid4().hex[:8]}", rbac.new_scope()
    kube.create_namespace(ns)
    access = rbac.Rbac(kubeconfig, kube.api, scope, workdir)
    try:
        roles = [rbac.bare(rbac.one(access.rendered(), "ClusterRole", name))
                 for name in ("autotek-operator", "autotek-operator-cluster-credentials")]
        identity = access.service_account("autotek-operator", shared_cluster_roles=roles)
        env = {"KUBECONFIG": str(identity.kubeconfig), "AUTOTEK_NAMESPACES": ns,
               "AUTOTEK_CREDENTIAL_SELECTOR": rbac.selector(scope), "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES": ns}
        yield Access(kube, kubeconfig, ns, env, {rbac.SCOPE_LABEL: scope})
    finally:
        access.close()
        kube.delete_namespace(ns)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, server: Any, kube_for: Callable[[Path], Any]) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("kubectl-plugin-live")
    with (
        operator_access(server, workdir, kube_for) as access,
        BrokerServer(clients={GOOD_ID: GOOD_SECRET}, lifetime=3600) as broker,
    ):
        log = workdir / "operator.log"
        env = {
            **os.environ,
            "AUTOTEK_ALLOWED_TOKEN_URLS": broker.url + "/",
            "AUTOTEK_LOG_LEVEL": "DEBUG",
            "AUTOTEK_HEALTH_PORT": "0",
            "AUTOTEK_METRICS_PORT": "0",
            "AUTOTEK_WATCH_TIMEOUT": "10",
            **access.env,
        }
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autotek_operator", "run"], stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        try:
            wait_for("the operator to start", lambda: "Activity 'startup' succeeded" in log.read_text(), 30)
            kube, ns, labels = access.kube, access.ns, access.labels
            kube.put_secret(ns, "good-client", {"client_id": GOOD_ID, "client_secret": GOOD_SECRET})
            kube.put_secret(ns, "bad-client", {"client_id": GOOD_ID, "client_secret": BAD_SECRET})
            kube.create_credential(
                ns, "good", {"clientSecretRef": {"name": "good-client"}, "tokenURL": broker.token_url}, labels
            )
            kube.create_credential(
                ns, "bad", {"clientSecretRef": {"name": "bad-client"}, "tokenURL": broker.token_url}, labels
            )
            kube.create_credential(
                ns,
                "blocked",
                {"clientSecretRef": {"name": "good-client"}, "tokenURL": "https://auth.example.com/token"},
                labels,
            )
            catc = f"live-{uuid.uuid4().hex[:8]}"
            body = {"apiVersion": f"{c.GROUP}/{c.VERSION}", "kind": c.CLUSTER_KIND,
                    "metadata": {"name": catc, "labels": labels},
                    "spec": {"clientSecretRef": {"namespace": ns, "name": "good-client"}, "namespaces": [ns],
                             "tokenURL": broker.token_url}}
            kube.custom.create_cluster_custom_object(c.GROUP, c.VERSION, c.CLUSTER_PLURAL, body)
            state = Live(kube, broker, access.kubeconfig, log, ns, catc)
            wait_for("the first token", lambda: state.ready("good").get("status") == "True")
            wait_for("the cluster credential's first token",
                     lambda: state.cluster_ready().get("status") == "True", timeout=30)
            wait_for("the first refusal", lambda: state.status("bad").get("lastFailureReason") == "InvalidClient")
            wait_for("the URL refusal", lambda: state.ready("blocked").get("reason") == "TokenURLNotAllowed")
            try:
                yield state
            finally:
                kube.delete_cluster_credential(catc)
            assert proc.poll() is None, "the operator died"
            text = log.read_text()
            assert "Traceback" not in text
            for secret in (GOOD_SECRET, BAD_SECRET, *broker.tokens):
                assert secret not in text
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def plugin(live: Live, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = kubectl_plugin.main(["--kubeconfig", str(live.kubeconfig), "-n", live.ns, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_refresh_blocked_before_any_request_fails_at_once(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, out, err = plugin(live, capsys, "refresh", "blocked", "--timeout", "15")
    assert code == 1, out + err
    assert time.monotonic() - started < 10
    assert f"refresh failed for {live.ns}/blocked: TokenURLNotAllowed" in out
    assert "is not allowed" in out
    assert "what to do: use an allowed token URL" in out


def test_refresh_gets_a_new_token(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    before = live.kube.secret_data(live.ns, "good")["access_token"]
    code, out, err = plugin(live, capsys, "refresh", "good", "--timeout", "30")
    assert code == 0, out + err
    assert out.startswith(f"token refreshed for {live.ns}/good; valid until ")
    after = live.kube.secret_data(live.ns, "good")
    assert after["access_token"] != before
    assert after["access_token"] not in out + err
    assert after["authorization"] == "Bearer " + after["access_token"]
    status = live.status("good")
    annotation = live.kube.credential(live.ns, "good")["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT]
    assert status["lastRefreshRequest"] == annotation
    assert status["lastRefreshTime"] >= annotation
    assert status["expiresAt"] in out


def test_refresh_a_cluster_credential(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    """catc/NAME: the annotation on the cluster object, a new token in the selected namespace."""
    before = live.kube.secret_data(live.ns, live.catc)["access_token"]
    code, out, err = plugin(live, capsys, "refresh", f"catc/{live.catc}", "--timeout", "30")
    assert code == 0, out + err
    assert out.startswith(f"token refreshed for catc/{live.catc}; valid until ")
    assert f"in Secret {live.catc} in 1/1 selected namespaces" in out
    after = live.kube.secret_data(live.ns, live.catc)
    assert after["access_token"] != before
    assert after["access_token"] not in out + err
    status = live.cluster_status()
    annotation = live.kube.cluster_credential(live.catc)["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT]
    assert status["lastRefreshRequest"] == annotation
    assert status["namespaces"]["provisioned"] == status["namespaces"]["selected"] == 1

    code, out, err = plugin(live, capsys, "status", "--cluster", live.catc)
    assert code == 0, err
    assert "Namespaces: 1 selected, 1 provisioned, 0 failed" in out


def test_refresh_refused_by_the_broker(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    attempts = live.status("bad")["failedAttempts"]
    code, out, err = plugin(live, capsys, "refresh", "bad", "--timeout", "30")
    assert code == 1, out + err
    assert f"refresh failed for {live.ns}/bad: InvalidClient" in out
    assert "HTTP 401" in out
    for i, hint in enumerate(c.TROUBLESHOOTING_HINTS, 1):
        assert f"{i}. {hint}" in out
    assert live.status("bad")["failedAttempts"] > attempts
    assert BAD_SECRET not in out + err


def test_refresh_no_wait(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, out, err = plugin(live, capsys, "refresh", "good", "--no-wait")
    assert code == 0, err
    assert time.monotonic() - started < 3
    value = live.kube.credential(live.ns, "good")["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT]
    assert out.strip() == f"refresh requested for {live.ns}/good ({c.ANN_REFRESH_REQUESTED_AT}={value})"


def test_refresh_times_out_without_an_operator(run: Any, kube: Any, ns: str) -> None:
    # No operator acts on it: the directory's emulator has none; on a real server every operator of the
    # tests selects credentials by a label this one lacks.
    kube.create_credential(ns, "lonely", {"clientSecretRef": {"name": "client"}})
    started = time.monotonic()
    r = run("-n", ns, "refresh", "lonely", "--timeout", "2")
    elapsed = time.monotonic() - started
    assert r.code == 2
    assert 2 <= elapsed < 5
    assert r.out == ""
    assert f"timed out after 2s waiting for the operator to refresh {ns}/lonely" in r.err
    assert kube.credential(ns, "lonely")["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT]
