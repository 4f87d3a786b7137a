"""A throttled API server: HTTP 429 with ``Retry-After``, from API Priority and Fairness and from a proxy.

- **APF** (the real thing): a FlowSchema matches the operator's ServiceAccount (and nobody else) and
  sends its requests to a PriorityLevelConfiguration of its own with no shares, nothing borrowed and
  ``limitResponse: Reject``. Such a level still seats one request when none is executing (APF never
  starves a level completely), so the operator works at a concurrency of one and the real server
  answers the rest 429 with ``Retry-After``. A burst of new credentials must slow down, without a hot
  loop, and every credential must still become Ready with one token request each. What the operator
  sent is counted by the API server itself: APF's ``dispatched`` and ``rejected`` counters of the
  FlowSchema, which only this operator matches.
- **A closed window** (APF cannot refuse everything): a loopback TLS proxy in front of the real API
  server, with a certificate from the control plane's CA, lets the operator's watches through but answers
  every other request 429 with a long ``Retry-After`` for a window. Each credential's attempts are
  counted and timed at the proxy: no hot loop, no attempt sooner than ``Retry-After`` after the last
  one, and once the window ends every credential becomes Ready.

The operators run with a ServiceAccount of their own (bound to the ClusterRole of manifests/), their own
scope and only the test's namespace. The emulator has no APF (and no TLS): there the module is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes
import pytest
import yaml
from harness import CLUSTER_ROLE, Broker, Client, Cluster, Operator, new_client, new_scope, wait_for
from kubernetes.client.exceptions import ApiException
from rbac import Identity, bare, companion_roles, one

import controlplane

pytestmark = pytest.mark.integration

FLOWCONTROL = "flowcontrol.apiserver.k8s.io/v1"
SERVICE_ACCOUNT = "autotek-throttled"
#: Seconds the proxy refuses the operator while credentials wait, and the Retry-After it sends.
CLOSED_WINDOW = 45.0
RETRY_AFTER = 30


@pytest.fixture(autouse=True)
def _real_server_only(cluster: Cluster) -> None:
    if not cluster.real:
        pytest.skip("the emulator has no API Priority and Fairness: throttling is tested on a real API server "
                    "(KUBEBUILDER_ASSETS or AUTOTEK_TEST_KUBECONFIG)")


# -- APF objects and counters -------------------------------------------------------------------------


def _metrics(cluster: Cluster) -> str:
    cfg = cluster.api.configuration
    headers = {}
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if token:
        headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
    resp = cluster.api.rest_client.pool_manager.request("GET", cfg.host + "/metrics", headers=headers,
                                                        preload_content=True, timeout=20)
    assert resp.status == 200, f"GET /metrics: {resp.status}"
    return str(resp.data.decode())


def apf_counts(cluster: Cluster, flow_schema: str) -> dict[str, int]:
    """The APF counters of one FlowSchema: requests dispatched (let through) and rejected (429)."""
    out = {"dispatched": 0, "rejected": 0}
    pattern = re.compile(r'^apiserver_flowcontrol_(dispatched|rejected)_requests_total\{(.*)\} ([0-9.e+]+)$')
    for line in _metrics(cluster).splitlines():
        m = pattern.match(line)
        if m and f'flow_schema="{flow_schema}"' in m[2]:
            out[m[1]] += int(float(m[3]))
    return out


class Throttle:
    """A FlowSchema that sends every request of one ServiceAccount to a level of its own."""

    def __init__(self, cluster: Cluster, identity: Identity, name: str) -> None:
        assert identity.service_account is not None
        self.cluster, self.identity, self.name = cluster, identity, name
        self.api = kubernetes.client.FlowcontrolApiserverV1Api(cluster.api)

    def level(self, shares: int) -> None:
        """Create or replace the level: ``shares`` nominal concurrency shares, nothing lent or borrowed,
        no queue (what the level cannot seat at once is rejected with 429)."""
        body = {"apiVersion": FLOWCONTROL, "kind": "PriorityLevelConfiguration", "metadata": {"name": self.name},
                "spec": {"type": "Limited", "limited": {
                    "nominalConcurrencyShares": shares, "lendablePercent": 0, "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"}}}}
        try:
            current = self.api.read_priority_level_configuration(self.name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            self.api.replace_priority_level_configuration(self.name, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.api.create_priority_level_configuration(body)

    def on(self) -> None:
        ns, sa = self.identity.service_account  # type: ignore[misc]
        body = {"apiVersion": FLOWCONTROL, "kind": "FlowSchema", "metadata": {"name": self.name},
                "spec": {"priorityLevelConfiguration": {"name": self.name}, "matchingPrecedence": 1000,
                         "distinguisherMethod": {"type": "ByUser"},
                         "rules": [{"subjects": [{"kind": "ServiceAccount",
                                                  "serviceAccount": {"name": sa, "namespace": ns}}],
                                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                       "namespaces": ["*"], "clusterScope": True}],
                                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}}
        try:
            self.api.create_flow_schema(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def off(self) -> None:
        try:
            self.api.delete_flow_schema(self.name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def remove(self) -> None:
        self.off()
        try:
            self.api.delete_priority_level_configuration(self.name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def probe(self, ns: str) -> tuple[int, str | None]:
        """One request as the operator's ServiceAccount: (HTTP status, Retry-After)."""
        api = kubernetes.config.new_client_from_config(config_file=str(self.identity.kubeconfig))
        api.configuration.retries = False
        try:
            kubernetes.client.CoreV1Api(api).read_namespaced_secret("autotek-client", ns, _preload_content=False)
            return 200, None
        except ApiException as exc:
            return exc.status, (exc.headers or {}).get("Retry-After")
        finally:
            api.close()

    def counts(self) -> dict[str, int]:
        return apf_counts(self.cluster, self.name)


# -- a proxy that throttles -----------------------------------------------------------------------------


class ThrottlingProxy:
    """A loopback HTTPS front of the API server. Passing, it pipes each connection to the API server
    (TLS on both sides, the client's own bearer token goes through). Throttling, it closes every piped
    connection but the watches' (established watches go on, as under APF) and answers each new request
    429 with ``Retry-After`` on a kept-alive connection, except new watches (``watch=true``), which it
    pipes: the operator keeps hearing about new credentials. Every refused request is recorded as
    (monotonic time, method, path)."""

    def __init__(self, upstream: str, ca: Path, cert: Path, key: Path, retry_after: int) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 443)
        self.retry_after = retry_after
        self.client_ctx = ssl.create_default_context(cafile=str(ca))
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(cert), str(key))
        self.throttling = False
        self.refused: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._piped: dict[socket.socket, bool] = {}  # socket -> carries a watch
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, name="throttling-proxy", daemon=True).start()

    def throttle(self, on: bool) -> None:
        with self._lock:
            self.throttling = on
            piped = [sock for sock, watch in self._piped.items() if not watch]
        if on:
            for sock in piped:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            piped, self._piped = list(self._piped), {}
        for sock in piped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.server_ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                length = int(headers.get("content-length") or 0)
                while len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    rest += chunk
                body, buf = rest[:length], rest[length:]
                watch = re.search(r"[?&]watch=(1|true)(&|$)", target) is not None
                with self._lock:
                    refuse = self.throttling and not watch
                    if refuse:
                        self.refused.append((time.monotonic(), method, target.split("?")[0]))
                if refuse:
                    doc = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "TooManyRequests", "code": 429,
                                      "message": "throttled by the test's proxy"}).encode()
                    conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                                 + f"Retry-After: {self.retry_after}\r\nContent-Length: {len(doc)}\r\n\r\n".encode()
                                 + doc)
                    continue
                self._pipe(conn, head + b"\r\n\r\n" + body + buf, watch)
                return
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _pipe(self, conn: ssl.SSLSocket, first: bytes, watch: bool) -> None:
        up = self.client_ctx.wrap_socket(socket.create_connection(self.upstream, timeout=10),
                                         server_hostname=self.upstream[0])
        up.settimeout(None)
        with self._lock:
            self._piped.update({conn: watch, up: watch})
        up.sendall(first)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except (OSError, ssl.SSLError):
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(up, conn), daemon=True)
        back.start()
        pump(conn, up)
        back.join(5)
        with self._lock:
            self._piped.pop(conn, None)
            self._piped.pop(up, None)
        up.close()


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def identity(cluster: Cluster) -> Identity:
    """A ServiceAccount of its own, bound to the ClusterRole of manifests/, that only this module's
    FlowSchemas match."""
    assert cluster.rbac is not None
    docs = cluster.rbac.rendered()
    role = one(docs, "ClusterRole", CLUSTER_ROLE)
    return cluster.rbac.service_account(SERVICE_ACCOUNT,
                                        shared_cluster_roles=[bare(role, name=CLUSTER_ROLE), *companion_roles(docs)])


@pytest.fixture
def throttle(cluster: Cluster, identity: Identity) -> Iterator[Throttle]:
    t = Throttle(cluster, identity, f"autotek-throttle-{cluster.scope}")
    yield t
    t.remove()


@pytest.fixture
def throttled_operator(cluster: Cluster, broker: Broker, identity: Identity, ns: str, workdir: Path
                       ) -> Iterator[Operator]:
    """An operator of its own (its identity, its scope, only ``ns``), at DEBUG."""
    folder = workdir / f"throttled-{ns}"
    folder.mkdir()
    op = Operator(cluster, broker, folder, {"AUTOTEK_NAMESPACES": ns}, identity=identity, scope=new_scope())
    op.start()
    yield op
    op.stop()
    assert "Traceback" not in op.log_text(all_runs=True), "the throttled operator logged a traceback"


def _spec(broker: Broker, secret: str) -> dict[str, Any]:
    return {"clientSecretRef": {"name": secret}, "tokenURL": broker.token_url}


def _ready(cluster: Cluster, ns: str, names: list[str]) -> list[str]:
    """The names among ``names`` whose Ready condition is True."""
    out = []
    for name in names:
        cond = cluster.ready(ns, name)
        if cond and cond.get("status") == "True":
            out.append(name)
    return out


def _clients(cluster: Cluster, broker: Broker, ns: str, k: int) -> list[Client]:
    return [new_client(cluster, broker, ns, secret_name=f"client-{i}") for i in range(k)]


def _gaps(times: list[float]) -> list[float]:
    """Seconds between one credential's attempts (requests less than 0.5 s apart are one attempt)."""
    ts = sorted(times)
    return [round(b - a, 1) for a, b in itertools.pairwise(ts) if b - a > 0.5]


def _kind(path: str) -> str:
    """The resource (and subresource) a request path is about."""
    parts = path.strip("/").split("/")
    if parts[-1] == "status":
        return f"{parts[-3]}/status"
    return parts[-1] if parts[-1] in ("secrets", "events", "autotekcredentials") else parts[-2]


def _token_requests(broker: Broker, clients: list[Client]) -> dict[str, int]:
    counts = collections.Counter(r.get("client_id") for r in broker.stats()["requests"])
    return {c.client_id: counts.get(c.client_id, 0) for c in clients}


# -- tests ----------------------------------------------------------------------------------------------


def test_apf_level_of_one_slows_the_operator_and_loses_no_credential(
    cluster: Cluster, broker: Broker, ns: str, throttle: Throttle, throttled_operator: Operator
) -> None:
    op = throttled_operator
    # No shares, nothing borrowed, no queue: one request at a time, the rest 429 from the real server.
    throttle.level(0)
    throttle.on()
    wait_for("the FlowSchema to take the operator's requests", lambda: throttle.counts()["dispatched"] > 0
             if throttle.probe(ns)[0] in (200, 404, 429) else None, timeout=30)
    k = 40
    clients = _clients(cluster, broker, ns, k)
    names = [f"narrow-{i}" for i in range(k)]
    before = throttle.counts()
    started = time.monotonic()
    for name, client in zip(names, clients, strict=True):
        cluster.create_credential(ns, name, _spec(broker, client.secret_name), scope=op.scope)
    wait_for(f"all {k} credentials to be Ready through the level", lambda: len(_ready(cluster, ns, names)) == k or None,
             timeout=180, interval=1.0)
    took = time.monotonic() - started
    after = throttle.counts()
    rejected = after["rejected"] - before["rejected"]
    dispatched = after["dispatched"] - before["dispatched"]
    tokens = _token_requests(broker, clients)
    histogram = dict(collections.Counter(tokens.values()))
    print(f"\nAPF level of one seat: {k} credentials Ready after {took:.1f} s; the operator's requests: {dispatched} "
          f"let through, {rejected} rejected (429); token requests per client: {histogram}")
    # No hot loop: per credential at most one pass every 4 s (the transient backoff: 5 s, 10 s ... with
    # jitter), a few calls each (the call refused, then the status patch and Event that report it), plus
    # the two watches' renewals (backoff from 1 s). A hot loop makes hundreds of requests per second.
    assert rejected <= 4 * k * (took / 4.0 + 1) + 2 * (took + 1), (rejected, took)
    # Nothing lost, and no token fetched twice for a 429 at the API server: the held token is written later.
    assert all(n == 1 for n in tokens.values()), tokens
    assert op.alive()


def test_closed_window_honours_retry_after_and_loses_no_credential(
    cluster: Cluster, broker: Broker, identity: Identity, ns: str, workdir: Path
) -> None:
    state = os.environ.get("AUTOTEK_TEST_CONTROLPLANE")
    if not state:
        pytest.skip("the proxy's certificate comes from the session's control plane (KUBEBUILDER_ASSETS)")
    plane = controlplane.ControlPlane.attach(Path(state))
    cert, key = controlplane.PKI(plane.pki).issue(f"throttle-proxy-{uuid.uuid4().hex[:8]}", "throttle-proxy",
                                                   sans=["IP:127.0.0.1"], server=True)
    proxy = ThrottlingProxy(plane.url, plane.pki / "ca.crt", cert, key, RETRY_AFTER)
    doc = yaml.safe_load(identity.kubeconfig.read_text())
    for entry in doc["clusters"]:
        entry["cluster"]["server"] = proxy.url
    kubeconfig = workdir / f"throttled-{ns}.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(doc))
    kubeconfig.chmod(0o600)
    folder = workdir / f"proxied-{ns}"
    folder.mkdir()
    op = Operator(cluster, broker, folder, {"AUTOTEK_NAMESPACES": ns},
                  identity=Identity(kubeconfig, identity.service_account, identity.source), scope=new_scope())
    try:
        op.start()
        warm = new_client(cluster, broker, ns, secret_name="autotek-client")
        cluster.create_credential(ns, "warm", _spec(broker, warm.secret_name), scope=op.scope)
        wait_for("the warm-up credential to be Ready", lambda: _ready(cluster, ns, ["warm"]), timeout=60)

        k = 5
        clients = _clients(cluster, broker, ns, k)
        names = [f"closed-{i}" for i in range(k)]
        # The client Secrets reach the operator first: a client Secret that changes (or arrives) during a
        # pass rightly cuts its wait short (a new token at once, only the 10 s floor applies). Closing the
        # piped connections also ends the watches that share them with a list; they come back through the
        # proxy (watches pass) and list again: the credentials are created once they have.
        time.sleep(2.0)
        resumed = f"in namespace {ns} again"  # "watching Secrets in namespace NS again"
        again = op.log_text().count(resumed)
        proxy.throttle(True)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and op.log_text().count(resumed) < again + 2:
            time.sleep(0.5)
        time.sleep(1.0)
        started = time.monotonic()
        for name, client in zip(names, clients, strict=True):
            cluster.create_credential(ns, name, _spec(broker, client.secret_name), scope=op.scope)
        time.sleep(CLOSED_WINDOW)
        proxy.throttle(False)
        window = time.monotonic() - started
        refused = list(proxy.refused)
        tokens_during = _token_requests(broker, clients)

        # Attempts per credential: the refused requests that name it (its status) or its client Secret; the
        # target Secret's create and the Event are POSTs to collections, counted in the total only.
        attempts: dict[str, list[float]] = {}
        for when, _, path in refused:
            for i, name in enumerate(names):
                if path.endswith((f"/{name}", f"/{name}/status", f"/secrets/client-{i}")):
                    attempts.setdefault(name, []).append(when)
        gaps = {name: _gaps(ts) for name, ts in attempts.items()}
        by_kind = collections.Counter(f"{method} {_kind(path)}" for _, method, path in refused)
        print(f"\nproxy, {window:.0f} s of 429 with Retry-After {RETRY_AFTER}: {len(refused)} requests refused "
              f"({dict(by_kind)}); gaps between a credential's attempts (s): {gaps}; "
              f"token requests {tokens_during}")

        # No hot loop: a handful of requests per credential per attempt, a few attempts in the window.
        assert len(refused) <= k * 4 * (window / 4.0 + 1) + 2 * (window + 1), len(refused)
        untried = sorted(set(names) - set(attempts))
        assert not untried, f"credentials never tried while throttled: {untried}"

        # Every credential created while refused becomes Ready once the window ends.
        wait_for("every credential created during the window to be Ready",
                 lambda: sorted(_ready(cluster, ns, names)) == sorted(names) or None, timeout=RETRY_AFTER * 4,
                 interval=1.0)
        tokens = _token_requests(broker, clients)
        assert all(n >= 1 for n in tokens.values()), tokens
        assert op.alive()
        assert "Traceback" not in op.log_text(all_runs=True)
        # Retry-After: no credential tried again sooner than the server asked.
        assert all(g >= RETRY_AFTER * 0.95 for gs in gaps.values() for g in gs), gaps
    finally:
        op.stop()
        proxy.close()
