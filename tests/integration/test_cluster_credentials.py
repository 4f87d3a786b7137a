"""ClusterAutoTekCredential on an API server: one token, many namespaces (issue 16).

The real operator process, through the operator's ServiceAccount with the RBAC of ``manifests/`` (on a real
API server), behind a loopback relay that records every request path it makes (``RecordingProxy``), against
a token-endpoint double of this module's own (its request log is the count of token requests).

Scoping: cluster-scoped objects are seen by every worker's operators. Every ClusterAutoTekCredential made
here carries this module's own test scope (``autotek.io/test-scope``), which only this module's operators
select; every namespace is new and unique to its test, and a credential selects namespaces by a label value
unique to its test (``SELECT``), so no credential of another test or worker ever selects them.

The module is skipped on an API server that does not serve the kind (the emulator until it does).
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults import APIProxy, make_ca
from harness import ROOT, SENSITIVE, Broker, Client, Cluster, Operator, new_client, wait_for
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families
from rbac import SCOPE_LABEL, kubectl, new_scope

import controlplane

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL, KIND = "autotek.io", "v1alpha1", "clusterautotekcredentials", "ClusterAutoTekCredential"
CRD_FILE = ROOT / "crds" / "clusterautotekcredentials.autotek.io.yaml"
#: The namespace label a test's credentials select by (its value is unique to the test).
SELECT = "autotek.io/test-catc"
KIND_MARK = "autotek.io/credential-kind"
OUR_KEYS = {"access_token", "token_type", "authorization", "expires_at", "scope"}
THEIRS = {"theirs": "kept"}
#: The longest failedNamespaces list the status may hold.
FAILED_LIST_MAX = 20

Doc = dict[str, Any]


# -- the module's world: a broker, a recording relay, an operator ------------------------------------------------


class RecordingProxy(APIProxy):
    """An :class:`APIProxy` that remembers (time, path, query) of every request it relays."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.seen: list[tuple[float, str, str]] = []
        self._seen_lock = threading.Lock()
        super().__init__(*args, **kw)

    def verdict(self, path: str, query: str, watching: bool, listing: bool) -> tuple[int, str] | None:
        with self._seen_lock:
            self.seen.append((time.monotonic(), path, query))
        return super().verdict(path, query, watching, listing)

    def paths(self, since: float = 0.0) -> list[str]:
        with self._seen_lock:
            return [p for t, p, _ in self.seen if t >= since]


@dataclass
class World:
    cluster: Cluster
    broker: Broker
    root: Path
    scope: str
    #: The operator's own namespace: its Events for cluster objects, the allowed client Secrets.
    ops: str
    proxy: RecordingProxy
    op: Operator
    metrics_port: int
    made: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)

    # -- cluster credentials --------------------------------------------------------------------------------

    def create(self, base: str, spec: Doc) -> str:
        """Create a ClusterAutoTekCredential of this module's scope; its (unique) name."""
        name = f"{base}-{uuid.uuid4().hex[:6]}"
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": name, "labels": {SCOPE_LABEL: self.scope}}, "spec": spec}
        self.cluster.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        self.made.append(name)
        return name

    def get(self, name: str) -> Doc | None:
        try:
            doc: Doc = self.cluster.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if doc.get("status"):
            self.statuses[name] = json.dumps(doc["status"])  # kept for the leak scan
        return doc

    def status(self, name: str) -> Doc:
        return (self.get(name) or {}).get("status") or {}

    def ready(self, name: str) -> Doc:
        return next((c for c in self.status(name).get("conditions") or [] if c.get("type") == "Ready"), {})

    def patch(self, name: str, patch: Doc) -> None:
        self.cluster.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, patch,
                                                        _content_type="application/merge-patch+json")

    def delete(self, name: str) -> None:
        self.get(name)
        try:
            self.cluster.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_ready(self, name: str, status: str = "True", reason: str | None = None, timeout: float = 60) -> Doc:
        def check() -> Doc | None:
            cond = self.ready(name)
            return cond if cond.get("status") == status and reason in (None, cond.get("reason")) else None

        return self._wait(f"{name} Ready={status} {reason or ''}", name, check, timeout)

    def _wait(self, what: str, name: str, check: Callable[[], Doc | None], timeout: float) -> Doc:
        """``wait_for``, failing with the object's last status (what the lead needs to see)."""
        try:
            return wait_for(what, check, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(self.status(name))}") from None

    def wait_counts(self, name: str, selected: int, provisioned: int, failed: int, timeout: float = 60) -> Doc:
        want = {"selected": selected, "provisioned": provisioned, "failed": failed}

        def check() -> Doc | None:
            st = self.status(name)
            got = st.get("namespaces") or {}
            return st if {k: got.get(k) for k in want} == want else None

        return self._wait(f"{name} status.namespaces {want}", name, check, timeout)

    def events(self, name: str | None = None, reason: str | None = None) -> list[Doc]:
        """The Events about ``name`` (default: about any cluster object), wherever they are (``default``, with an
        empty involvedObject.namespace, is where the operator posts them and kubectl describe finds them)."""
        resp = self.cluster.core.list_event_for_all_namespaces(_preload_content=False)  # the emulator has no
        items: list[Doc] = json.loads(resp.data).get("items", [])  # field selectors on involvedObject
        return [e for e in items if (e.get("involvedObject") or {}).get("kind") == KIND
                and name in (None, (e.get("involvedObject") or {}).get("name")) and reason in (None, e.get("reason"))]

    def namespace_gauge(self, name: str) -> dict[str, float]:
        """``autotek_cluster_credential_namespaces{name=NAME}`` by state, from the operator's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {s.labels.get("state", ""): s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "autotek_cluster_credential_namespaces" and s.labels.get("name") == name}

    # -- namespaces and Secrets -----------------------------------------------------------------------------

    def namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        """A new namespace of this worker (cleaned up and leak-scanned with the others), created with ``labels``."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.cluster.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {SCOPE_LABEL: self.cluster.scope, **(labels or {})}}})
        self.cluster.namespaces.append(name)
        return name

    def label(self, ns: str, value: str | None) -> None:
        """Label a namespace into the selection ``value`` (None: out of any)."""
        self.cluster.core.patch_namespace(ns, {"metadata": {"labels": {SELECT: value}}},
                                          _content_type="application/merge-patch+json")

    def token(self, ns: str, target: str) -> str | None:
        return (self.cluster.secret_data(ns, target) or {}).get("access_token")

    def version(self, ns: str, target: str) -> str | None:
        secret = self.cluster.secret(ns, target)
        return secret["metadata"]["resourceVersion"] if secret else None

    def requests(self, client: Client) -> list[Doc]:
        return self.broker.requests_for(client.client_id)

    def client(self, ns: str | None = None, secret_name: str | None = None) -> Client:
        """A new client at the broker, its Secret in ``ns`` (default: the operator's namespace) under a name of
        its own (a Secret replaced under an earlier test's credential would get that one a new token)."""
        name = secret_name or f"client-{uuid.uuid4().hex[:6]}"
        return new_client(self.cluster, self.broker, ns or self.ops, name)

    def spec(self, client: Client, target: str = "autotek-token", *, select: str | None = None,
             namespaces: list[str] | None = None, **target_fields: Any) -> Doc:
        out: Doc = {"clientSecretRef": {"namespace": client.ns, "name": client.secret_name},
                    "tokenURL": self.broker.token_url, "target": {"name": target, **target_fields}}
        if select is not None:
            out["namespaceSelector"] = {"matchLabels": {SELECT: select}}
        if namespaces is not None:
            out["namespaces"] = namespaces
        return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _served(cluster: Cluster) -> bool:
    try:
        cluster.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _operator(cluster: Cluster, broker: Broker, root: Path, name: str, scope: str, ops: str,
              kubeconfig: Path | None = None, **env: str) -> Operator:
    (root / name).mkdir(parents=True, exist_ok=True)
    extra = {"POD_NAMESPACE": ops, "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES": ops, **env}
    if kubeconfig is not None:
        extra["KUBECONFIG"] = str(kubeconfig)
    return Operator(cluster, broker, root / name, extra_env=extra, scope=scope)


@pytest.fixture(scope="module")
def world(cluster: Cluster, workdir: Path) -> Iterator[World]:
    if cluster.real:
        assert CRD_FILE.exists(), f"{CRD_FILE.relative_to(ROOT)} is missing"
        controlplane.install_crds(cluster.api, [yaml.safe_load(CRD_FILE.read_text())])
    elif not _served(cluster):
        pytest.skip("the API emulator (autotek_operator/dev/emulator.py) does not serve "
                    f"{GROUP}/{VERSION} {PLURAL}: ClusterAutoTekCredential runs on the real API server tier only")
    root = workdir / "catc"
    root.mkdir(exist_ok=True)
    broker = Broker(root)  # a token endpoint of the module's own: its lifetime is ours to change
    scope = new_scope()
    ops = cluster.create_namespace("catc-ops")
    proxy = RecordingProxy(cluster.identity().kubeconfig, root / "kubeconfig-proxied", make_ca("catc API relay"), root)
    port = _free_port()
    op = _operator(cluster, broker, root, "op", scope, ops, proxy.kubeconfig, AUTOTEK_METRICS_PORT=str(port))
    w = World(cluster, broker, root, scope, ops, proxy, op, port)
    try:
        op.start()
        yield w
    finally:
        for name in w.made:
            w.delete(name)
        op.stop()
        proxy.stop()
        SENSITIVE.update(broker.stats()["tokens"])
        _archive_statuses(cluster, w)
        broker.stop()


def _archive_statuses(cluster: Cluster, w: World) -> None:
    """Hand the cluster objects' statuses to the session's leak scan (``Cluster.leak_haystacks``)."""
    extra = getattr(cluster, "extra_haystacks", None)
    if isinstance(extra, dict):
        for name, text in w.statuses.items():
            extra[f"status of {KIND} {name}"] = text


@pytest.fixture(autouse=True)
def _operator_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "world" in request.fixturenames:
        w: World = request.getfixturevalue("world")
        assert w.op.alive(), "the module's operator died during the test"
        assert "Traceback" not in w.op.log_text(all_runs=True), "the module's operator logged a traceback"


def quiet_window(seconds: float, check: Callable[[], Any]) -> None:
    """Call ``check`` (which asserts) every half second for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(0.5)
    check()


def assert_layout(w: World, ns: str, target: str, owner: Doc, token: str, *, owned: bool = True) -> None:
    """The Secret in ``ns`` holds ``token`` in the documented layout, marked (and owned) as ``owner``'s."""
    secret = w.cluster.secret(ns, target)
    assert secret is not None, f"no Secret {ns}/{target}"
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    assert data["access_token"] == token, f"{ns}: another token"
    assert data["authorization"] == f"Bearer {token}" and data["token_type"] == "bearer"
    meta = secret["metadata"]
    marks = {**(meta.get("labels") or {}), **(meta.get("annotations") or {})}
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "autotek-operator"
    assert marks["autotek.io/credential"] == owner["metadata"]["name"]
    assert marks.get(KIND_MARK) == KIND, f"{ns}/{target}: {KIND_MARK} is {marks.get(KIND_MARK)!r}"
    assert meta["annotations"]["autotek.io/expires-at"] == data["expires_at"]
    refs = meta.get("ownerReferences") or []
    if owned:
        assert [(r["apiVersion"], r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
            (f"{GROUP}/{VERSION}", KIND, owner["metadata"]["name"], owner["metadata"]["uid"], True)], refs
    else:
        assert not refs, refs


def held_by(w: World, ns: str, target: str) -> tuple[str | None, str | None]:
    """(credential-kind mark, owner uid) of the Secret in ``ns``."""
    secret = w.cluster.secret(ns, target) or {"metadata": {}}
    meta = secret["metadata"]
    marks = {**(meta.get("labels") or {}), **(meta.get("annotations") or {})}
    refs = meta.get("ownerReferences") or [{}]
    return marks.get(KIND_MARK), refs[0].get("uid")


def put_foreign(w: World, ns: str, name: str) -> str:
    """A Secret of someone else's; its resourceVersion."""
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in THEIRS.items()}}
    return str(w.cluster.core.create_namespaced_secret(ns, body).metadata.resource_version)


def unmerged(w: World, ns: str, name: str) -> Doc | None:
    """The Secret once the operator's keys, label and annotations are gone (None while they are there)."""
    secret = w.cluster.secret(ns, name)
    if secret is None:
        return None
    meta = secret["metadata"]
    if set(secret.get("data") or {}) & OUR_KEYS or "app.kubernetes.io/managed-by" in (meta.get("labels") or {}):
        return None
    if any(k.startswith("autotek.io/") for k in meta.get("annotations") or {}):
        return None
    return secret


def theirs_intact(secret: Doc) -> None:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    assert data == THEIRS, data


def gone(w: World, ns: str, target: str) -> bool:
    return w.cluster.secret(ns, target) is None


# -- namespaces come and go ----------------------------------------------------------------------------------


def test_namespaces_created_and_labelled_into_and_out_of_the_selection(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    a, b = w.namespace("cc-a", {SELECT: sel}), w.namespace("cc-b", {SELECT: sel})
    client = w.client()
    name = w.create("come-go", w.spec(client, select=sel))
    st = w.wait_counts(name, 2, 2, 0)
    assert st["namespaces"]["summary"] == "2/2", st["namespaces"]
    cond = w.wait_ready(name, reason="TokenIssued")
    assert st.get("failedNamespaces") in (None, []), st
    obj = w.get(name)
    assert obj is not None
    token = w.token(a, "autotek-token")
    assert token and token in w.broker.stats()["tokens"]
    for ns in (a, b):
        assert_layout(w, ns, "autotek-token", obj, token)
    assert token not in json.dumps(obj) and client.client_secret not in json.dumps(obj)
    assert st["secretName"] == "autotek-token" and st.get("expiresAt") and st.get("nextRefreshTime"), st
    assert cond["message"], cond
    # Events are posted in the background: one may trail the status by a moment.
    wait_for("a TokenIssued Event in the operator's namespace", lambda: w.events(name, "TokenIssued"), timeout=10)

    # Created into the selection: provisioned within seconds, through the namespace watch, with the held token.
    c = w.namespace("cc-c", {SELECT: sel})
    wait_for(f"the Secret in the new namespace {c}", lambda: w.token(c, "autotek-token") == token, timeout=20)
    # Labelled into it.
    d = w.namespace("cc-d")
    time.sleep(2)
    assert gone(w, d, "autotek-token"), "a Secret in a namespace that was never selected"
    w.label(d, sel)
    wait_for(f"the Secret in {d}, labelled in", lambda: w.token(d, "autotek-token") == token, timeout=20)
    w.wait_counts(name, 4, 4, 0)

    # Labelled out: deletionPolicy Delete, creationPolicy Owner -> the operator deletes it (the owner is alive,
    # so garbage collection would not).
    w.label(b, None)
    wait_for(f"the Secret in {b} deleted once labelled out", lambda: gone(w, b, "autotek-token"), timeout=30)
    w.wait_counts(name, 3, 3, 0)
    assert all(w.token(ns, "autotek-token") == token for ns in (a, c, d)), "a selected namespace lost its token"

    assert len(w.requests(client)) == 1, "more than one token request for one token"
    assert w.ready(name)["status"] == "True"


def test_a_deleted_or_terminating_namespace_is_skipped_quietly(world: World) -> None:
    """From the moment of the deletion on: never a failed namespace, never Ready=False, never an Event about it;
    a Terminating namespace (held by a finalizer on another object) is not counted and gets no Secret."""
    w = world
    if not w.cluster.real:
        pytest.skip("the emulator deletes no namespace (no namespace controller): a real API server's tier only")
    sel = uuid.uuid4().hex[:8]
    a, c, d = (w.namespace(p, {SELECT: sel}) for p in ("cc-stay", "cc-del", "cc-term"))
    client = w.client()
    name = w.create("leaving", w.spec(client, select=sel))
    w.wait_counts(name, 3, 3, 0)
    w.wait_ready(name, reason="TokenIssued")

    def quietly(leaving: str) -> Callable[[], None]:
        def check() -> None:
            failed = w.status(name).get("failedNamespaces") or []
            assert not [f for f in failed if f["namespace"] == leaving], f"{leaving} reported failed: {failed}"
            assert w.ready(name).get("status") == "True", w.ready(name)
        return check

    seen = {e["metadata"]["name"] for e in w.events(name)}
    try:
        w.cluster.delete_namespace(c)
        quiet_window(10, quietly(c))
        w.wait_counts(name, 2, 2, 0, timeout=90)
        w.cluster.core.create_namespaced_config_map(d, {"metadata": {"name": "hold",
                                                                    "finalizers": ["autotek.io/test-hold"]}})
        w.cluster.delete_namespace(d)
        quiet_window(12, quietly(d))
        wait_for(f"{d} Terminating with its Secret gone", lambda: gone(w, d, "autotek-token") and (
            w.cluster.core.read_namespace(d).status.phase == "Terminating"), timeout=60)
        quiet_window(4, quietly(d))
        w.wait_counts(name, 1, 1, 0)
        assert gone(w, d, "autotek-token"), "a Secret written into a Terminating namespace"
        noisy = [f"{e['reason']}: {e.get('message')}" for e in w.events(name) if e["metadata"]["name"] not in seen
                 and (c in e.get("message", "") or d in e.get("message", ""))]
        assert not noisy, f"Events about a deleted or Terminating namespace: {noisy}"
        assert w.token(a, "autotek-token") and len(w.requests(client)) == 1
    finally:
        with contextlib.suppress(ApiException):
            w.cluster.core.patch_namespaced_config_map("hold", d, {"metadata": {"finalizers": None}},
                                                       _content_type="application/merge-patch+json")


# -- one exchange, many Secrets ------------------------------------------------------------------------------


def test_one_token_request_for_many_namespaces_and_one_per_rotation(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    by_label = [w.namespace("cc-n", {SELECT: sel}) for _ in range(4)]
    listed = [w.namespace("cc-l") for _ in range(3)]
    everyone = by_label + listed
    client = w.client()
    w.broker.control(lifetime=24)  # the first token rotates by itself (about 16 s)
    try:
        name = w.create("many", w.spec(client, select=sel, namespaces=listed))  # the union of both
        w.wait_counts(name, 7, 7, 0)
    finally:
        w.broker.control(lifetime=3600)

    def same_token_everywhere(previous: set[str]) -> str | None:
        tokens = {w.token(ns, "autotek-token") for ns in everyone}
        return next(iter(tokens)) if len(tokens) == 1 and not tokens & (previous | {None}) else None

    first = wait_for("one token in all seven", lambda: same_token_everywhere(set()), timeout=30)
    assert len(w.requests(client)) == 1, [r["time"] for r in w.requests(client)]
    second = wait_for("the rotated token in all seven", lambda: same_token_everywhere({first}), timeout=60)
    assert len(w.requests(client)) == 2, "a rotation made more than one token request"
    # A rotation asked for (the refresh-now annotation).
    w.patch(name, {"metadata": {"annotations": {"autotek.io/refresh-requested-at": "now-1"}}})
    wait_for("the requested token in all seven", lambda: same_token_everywhere({first, second}), timeout=40)
    time.sleep(3)
    assert len(w.requests(client)) == 3, "a rotation made more than one token request"
    assert all(r["status"] == 200 for r in w.requests(client))
    w.wait_counts(name, 7, 7, 0)
    w.wait_ready(name, reason="TokenIssued")


# -- conflicts -----------------------------------------------------------------------------------------------


def test_a_foreign_secret_is_never_touched_and_fails_only_its_namespace(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    x, y, z = (w.namespace(p, {SELECT: sel}) for p in ("cc-x", "cc-y", "cc-z"))
    foreign = put_foreign(w, y, "autotek-token")
    client = w.client()
    name = w.create("foreign", w.spec(client, select=sel))
    st = w.wait_counts(name, 3, 2, 1)
    assert st["namespaces"]["summary"] == "2/3", st["namespaces"]
    failed = st.get("failedNamespaces") or []
    assert [(f["namespace"], f["reason"]) for f in failed] == [(y, "TargetConflict")], failed
    assert failed[0].get("message"), failed
    cond = w.wait_ready(name, "False", "NamespacesNotProvisioned")
    assert "1" in cond["message"] and y in cond["message"], cond["message"]
    token = w.token(x, "autotek-token")
    assert token and w.token(z, "autotek-token") == token
    assert wait_for("a TargetConflict Event", lambda: w.events(name, "TargetConflict") or [
        e for e in w.events(name) if y in e.get("message", "")], timeout=20)

    def untouched() -> None:
        assert w.version(y, "autotek-token") == foreign, "the foreign Secret was written"

    quiet_window(6, untouched)
    assert len(w.requests(client)) == 1
    gauge = wait_for("the namespaces gauge", lambda: (g := w.namespace_gauge(name)) and g.get("failed") == 1 and g,
                     timeout=20)
    assert gauge == {"selected": 3, "provisioned": 2, "failed": 1}, gauge

    # The conflict resolved by its owner: that namespace alone is retried and provisioned, with the same token.
    w.cluster.core.delete_namespaced_secret("autotek-token", y)
    wait_for(f"{y} provisioned once the foreign Secret is gone", lambda: w.token(y, "autotek-token") == token,
             timeout=90)
    w.wait_counts(name, 3, 3, 0)
    w.wait_ready(name, reason="TokenIssued")
    assert not w.status(name).get("failedNamespaces")
    assert len(w.requests(client)) == 1


def test_two_cluster_credentials_on_one_secret_the_older_keeps_it(world: World) -> None:
    w = world
    shared, only_a, only_b = w.namespace("cc-shared"), w.namespace("cc-oa"), w.namespace("cc-ob")
    client_a, client_b = w.client(), w.client()
    older = w.create("older", w.spec(client_a, "same-token", namespaces=[shared, only_a]))
    w.wait_counts(older, 2, 2, 0)
    time.sleep(1.1)  # a later creationTimestamp (second resolution)
    newer = w.create("newer", w.spec(client_b, "same-token", namespaces=[shared, only_b]))
    st = w.wait_counts(newer, 2, 1, 1)
    assert [(f["namespace"], f["reason"]) for f in st["failedNamespaces"]] == [(shared, "TargetConflict")], st
    w.wait_ready(newer, "False", "NamespacesNotProvisioned")
    older_obj = w.get(older)
    assert older_obj is not None
    token_a = w.token(only_a, "same-token")
    assert token_a
    assert_layout(w, shared, "same-token", older_obj, token_a)
    assert w.token(only_b, "same-token") not in (None, token_a)
    version = w.version(shared, "same-token")

    def no_ping_pong() -> None:
        assert w.version(shared, "same-token") == version, "the shared Secret was rewritten"
        assert held_by(w, shared, "same-token") == (KIND, older_obj["metadata"]["uid"])

    quiet_window(10, no_ping_pong)
    assert w.ready(older)["status"] == "True"
    # Each credential rotates on its own: the newer's rotation still leaves the shared Secret alone.
    w.patch(newer, {"metadata": {"annotations": {"autotek.io/refresh-requested-at": "again"}}})
    wait_for("the newer credential's rotation", lambda: len(w.requests(client_b)) == 2, timeout=30)
    quiet_window(4, no_ping_pong)
    assert len(w.requests(client_a)) == 1


def test_a_secret_a_namespaced_credential_owns_is_left_to_it(world: World) -> None:
    w = world
    p, q = w.namespace("cc-p"), w.namespace("cc-q")
    local = new_client(w.cluster, w.broker, p)
    w.cluster.create_credential(p, "local", {"clientSecretRef": {"name": local.secret_name},
                                             "tokenURL": w.broker.token_url, "target": {"name": "app-token"}},
                                scope=w.scope)
    wait_for("the namespaced credential's token", lambda: w.token(p, "app-token"), timeout=40)
    local_token = w.token(p, "app-token")
    version = w.version(p, "app-token")
    client = w.client()
    name = w.create("beside", w.spec(client, "app-token", namespaces=[p, q]))
    st = w.wait_counts(name, 2, 1, 1)
    assert [(f["namespace"], f["reason"]) for f in st["failedNamespaces"]] == [(p, "TargetConflict")], st
    w.wait_ready(name, "False", "NamespacesNotProvisioned")
    assert w.token(q, "app-token") not in (None, local_token)

    def left_alone() -> None:
        assert w.version(p, "app-token") == version, "the namespaced credential's Secret was rewritten"
        assert w.token(p, "app-token") == local_token
        assert held_by(w, p, "app-token")[0] in (None, "AutoTekCredential")

    quiet_window(6, left_alone)
    assert (w.cluster.ready(p, "local") or {}).get("status") == "True", w.cluster.ready(p, "local")
    assert len(w.requests(local)) == 1 and len(w.requests(client)) == 1


# -- trust: the client Secret's namespace ---------------------------------------------------------------------


def test_a_client_secret_in_a_namespace_not_allowed_is_never_read(world: World) -> None:
    w = world
    elsewhere = w.namespace("cc-deny")
    target = w.namespace("cc-t")
    client = w.client(elsewhere, "central-client")
    since = time.monotonic()
    name = w.create("deny", w.spec(client, namespaces=[target]))
    cond = w.wait_ready(name, "False", "ClientSecretNamespaceNotAllowed")
    assert elsewhere in cond["message"], cond["message"]
    wait_for("a ClientSecretNamespaceNotAllowed Event", lambda: w.events(name, "ClientSecretNamespaceNotAllowed"),
             timeout=20)
    time.sleep(15)  # long enough for a retry loop to show
    secret_path = f"/api/v1/namespaces/{elsewhere}/secrets/central-client"
    paths = w.proxy.paths(since)
    assert secret_path not in paths, "the operator read a client Secret from a namespace it may not"
    assert not w.requests(client), "a token request with a client Secret from a namespace not allowed"
    assert gone(w, target, "autotek-token")
    status_path = f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}/status"
    patches = paths.count(status_path)
    assert 1 <= patches <= 3, f"{patches} status writes in 15 s: a retry loop"
    assert len(w.events(name, "ClientSecretNamespaceNotAllowed")) <= 2
    assert w.status(name).get("failedAttempts", 0) <= 3, w.status(name)
    assert any("/api/v1/" in p for p in paths), "the relay recorded nothing: the check above cannot fail"

    # Moved to an allowed namespace: a token within seconds.
    moved = w.client()
    w.patch(name, {"spec": {"clientSecretRef": {"namespace": w.ops, "name": moved.secret_name}}})
    w.wait_ready(name, reason="TokenIssued", timeout=30)
    assert w.token(target, "autotek-token") and len(w.requests(moved)) == 1
    assert secret_path not in w.proxy.paths(since)


# -- deletion policies: labelled out, then the credential deleted ---------------------------------------------


@dataclass
class Policies:
    names: dict[str, str]
    nss: dict[str, list[str]]
    tokens: dict[str, str | None]


def _three_policies(w: World) -> Policies:
    """Three cluster credentials (Owner/Delete, Merge/Delete, Owner/Retain), each selecting three namespaces by a
    label, the Merge one also a listed namespace without the Secret (TargetNotFound there)."""
    cases = {"owner": {}, "merge": {"creationPolicy": "Merge"}, "retain": {"deletionPolicy": "Retain"}}
    nss: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    clients: dict[str, Client] = {}
    for case, policy in cases.items():
        sel = uuid.uuid4().hex[:8]
        nss[case] = [w.namespace(f"cc-{case}", {SELECT: sel}) for _ in range(3)]
        if case == "merge":
            for ns in nss[case]:
                put_foreign(w, ns, "autotek-token")
        clients[case] = w.client()
        names[case] = w.create(case, w.spec(clients[case], select=sel, **policy))
    # Merge into a namespace where the Secret does not exist: that namespace fails, TargetNotFound.
    missing = w.namespace("cc-merge-missing")
    w.patch(names["merge"], {"spec": {"namespaces": [missing]}})
    st = w.wait_counts(names["merge"], 4, 3, 1)
    assert [(f["namespace"], f["reason"]) for f in st["failedNamespaces"]] == [(missing, "TargetNotFound")], st
    assert gone(w, missing, "autotek-token"), "Merge created a Secret"
    for case in ("owner", "retain"):
        w.wait_counts(names[case], 3, 3, 0)
    tokens = {case: w.token(nss[case][0], "autotek-token") for case in cases}
    for case in cases:
        assert tokens[case] and all(w.token(ns, "autotek-token") == tokens[case] for ns in nss[case]), case
        assert len(w.requests(clients[case])) == 1, case
    retain_obj = w.get(names["retain"])
    assert retain_obj is not None
    assert_layout(w, nss["retain"][0], "autotek-token", retain_obj, tokens["retain"], owned=False)
    merged = w.cluster.secret_data(nss["merge"][0], "autotek-token") or {}
    assert merged.get("theirs") == "kept" and merged.get("access_token") == tokens["merge"], sorted(merged)

    return Policies(names, nss, tokens)


def test_deletion_policies_when_the_credential_is_deleted(world: World) -> None:
    w = world
    p = _three_policies(w)
    cases, names, nss, tokens = ("owner", "merge", "retain"), p.names, p.nss, p.tokens
    # The credentials deleted.
    owner_uids = {case: (w.get(names[case]) or {"metadata": {}})["metadata"].get("uid") for case in cases}
    for case in cases:
        w.delete(names[case])
    for ns in nss["owner"]:
        if w.cluster.emulated:  # no garbage collector: the Secret stays, owned by the deleted credential
            assert held_by(w, ns, "autotek-token") == (KIND, owner_uids["owner"]), f"Owner: {ns} was changed"
        else:
            wait_for(f"Owner: {ns} garbage-collected with the credential", lambda n=ns: gone(w, n, "autotek-token"),
                     timeout=90)
    for ns in nss["merge"]:
        theirs_intact(wait_for(f"Merge: {ns} unmerged", lambda n=ns: unmerged(w, n, "autotek-token"), timeout=60))
    time.sleep(3)
    for ns in nss["retain"]:
        assert w.token(ns, "autotek-token") == tokens["retain"], f"Retain: {ns} lost its Secret"
    for ns in nss["merge"]:
        assert w.cluster.secret(ns, "autotek-token") is not None, "Merge: a Secret was deleted"


def test_deletion_policies_when_labelled_out(world: World) -> None:
    w = world
    p = _three_policies(w)
    cases, names, nss, tokens = ("owner", "merge", "retain"), p.names, p.nss, p.tokens
    # Labelled out.
    for case in cases:
        w.label(nss[case][2], None)
    wait_for("Owner: deleted when labelled out", lambda: gone(w, nss["owner"][2], "autotek-token"), timeout=30)
    theirs_intact(wait_for("Merge: unmerged when labelled out", lambda: unmerged(w, nss["merge"][2],
                                                                                 "autotek-token"), timeout=30))
    w.wait_counts(names["retain"], 2, 2, 0)
    w.wait_counts(names["owner"], 2, 2, 0)
    w.wait_counts(names["merge"], 3, 2, 1)
    assert w.token(nss["retain"][2], "autotek-token") == tokens["retain"], "Retain: removed when labelled out"


# -- restarts, failover and convergence ----------------------------------------------------------------------


def _stable(w: World, nss: list[str], target: str = "autotek-token") -> dict[str, str | None]:
    return {ns: w.version(ns, target) for ns in nss}


def test_a_restart_makes_no_token_request_and_rewrites_nothing_current(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    nss = [w.namespace("cc-r", {SELECT: sel}) for _ in range(3)]
    client = w.client()
    name = w.create("restart", w.spec(client, select=sel))
    w.wait_counts(name, 3, 3, 0)
    w.wait_ready(name)
    before = _stable(w, nss)
    refreshed = w.status(name).get("lastRefreshTime")
    w.op.restart()
    # Evidence that the new process acts on the credential: a namespace labelled in gets the held token.
    late = w.namespace("cc-r-late", {SELECT: sel})
    wait_for("the restarted operator to provision a new namespace", lambda: w.token(late, "autotek-token"),
             timeout=40)
    w.wait_counts(name, 4, 4, 0)
    assert w.token(late, "autotek-token") == w.token(nss[0], "autotek-token")
    time.sleep(3)
    assert len(w.requests(client)) == 1, "the restart made a token request"
    assert _stable(w, nss) == before, "the restart rewrote a current Secret"
    assert w.status(name).get("lastRefreshTime") == refreshed


def test_leaving_the_selection_while_the_operator_is_down_is_cleaned_on_the_next_list(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    owner_ns = [w.namespace("cc-down-o", {SELECT: sel}) for _ in range(2)]
    merge_ns = [w.namespace("cc-down-m", {SELECT: sel + "m"}) for _ in range(2)]
    for ns in merge_ns:
        put_foreign(w, ns, "merged-token")
    client, other = w.client(), w.client()
    owner = w.create("down-owner", w.spec(client, select=sel))
    merge = w.create("down-merge", w.spec(other, "merged-token", select=sel + "m", creationPolicy="Merge"))
    w.wait_counts(owner, 2, 2, 0)
    w.wait_counts(merge, 2, 2, 0)
    w.op.stop()
    try:
        w.label(owner_ns[1], None)
        w.label(merge_ns[1], None)
        time.sleep(1)
    finally:
        w.op.start()
    wait_for("Owner: the Secret of a namespace that left while down deleted",
             lambda: gone(w, owner_ns[1], "autotek-token"), timeout=60)
    theirs_intact(wait_for("Merge: unmerged", lambda: unmerged(w, merge_ns[1], "merged-token"), timeout=60))
    w.wait_counts(owner, 1, 1, 0)
    w.wait_counts(merge, 1, 1, 0)
    assert w.token(owner_ns[0], "autotek-token") and w.token(merge_ns[0], "merged-token")
    assert len(w.requests(client)) == 1 and len(w.requests(other)) == 1, "the restart made a token request"


def test_a_leader_failover_makes_no_token_request(world: World, cluster: Cluster) -> None:
    w = world
    scope = new_scope()
    sel = uuid.uuid4().hex[:8]
    nss = [w.namespace("cc-ha", {SELECT: sel}) for _ in range(2)]
    lease_env = {"AUTOTEK_LEADER_ELECTION": "true", "AUTOTEK_LEADER_ELECTION_NAMESPACE": w.ops,
                 "AUTOTEK_LEADER_ELECTION_ID": f"catc-{scope}", "AUTOTEK_LEADER_ELECTION_LEASE_DURATION": "10",
                 "AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE": "6", "AUTOTEK_LEADER_ELECTION_RETRY_PERIOD": "2"}
    replicas = {n: _operator(cluster, w.broker, w.root, f"ha-{n}", scope, w.ops, POD_NAME=f"replica-{n}", **lease_env)
                for n in ("a", "b")}
    client = w.client()
    spec = w.spec(client, select=sel)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": f"ha-{scope}", "labels": {SCOPE_LABEL: scope}}, "spec": spec}
    try:
        for op in replicas.values():
            op.start()
        leader = wait_for("a leader", lambda: next(
            (n for n, op in replicas.items() if "leading: running passes" in op.log_text()), None), timeout=40)
        follower = "b" if leader == "a" else "a"
        cluster.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        w.made.append(body["metadata"]["name"])
        name = body["metadata"]["name"]
        w.wait_counts(name, 2, 2, 0)
        before = _stable(w, nss)
        replicas[leader].stop(signal.SIGKILL)
        wait_for("the follower to lead", lambda: "leading: running passes" in replicas[follower].log_text(),
                 timeout=60)
        late = w.namespace("cc-ha-late", {SELECT: sel})
        wait_for("the new leader to provision a new namespace", lambda: w.token(late, "autotek-token"), timeout=40)
        w.wait_counts(name, 3, 3, 0)
        time.sleep(2)
        assert len(w.requests(client)) == 1, "the failover made a token request"
        assert _stable(w, nss) == before, "the failover rewrote a current Secret"
        assert "requesting a token" not in replicas[follower].log_text()
    finally:
        for op in replicas.values():
            op.stop()
    for op in replicas.values():
        assert "Traceback" not in op.log_text(all_runs=True)


# -- status a person can act on -------------------------------------------------------------------------------


def test_status_counts_and_a_bounded_list_of_failed_namespaces(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    bad = [w.namespace("cc-f", {SELECT: sel}) for _ in range(25)]
    good = [w.namespace("cc-g", {SELECT: sel}) for _ in range(2)]
    for ns in bad:
        put_foreign(w, ns, "autotek-token")
    client = w.client()
    name = w.create("bounded", w.spec(client, select=sel))
    st = w.wait_counts(name, 27, 2, 25, timeout=90)
    assert st["namespaces"]["summary"] == "2/27", st["namespaces"]
    failed = st["failedNamespaces"]
    assert len(failed) == FAILED_LIST_MAX, len(failed)
    assert [f["namespace"] for f in failed] == sorted(bad)[:FAILED_LIST_MAX], "not the first 20 by name"
    assert {f["reason"] for f in failed} == {"TargetConflict"}
    cond = w.wait_ready(name, "False", "NamespacesNotProvisioned")
    assert "25" in cond["message"], cond["message"]
    assert len(json.dumps(st)) < 8000, "the status grows with the number of namespaces"
    assert all(w.token(ns, "autotek-token") for ns in good)
    assert len(w.requests(client)) == 1


def test_nothing_selected_requests_no_token_until_a_namespace_is(world: World) -> None:
    w = world
    sel = uuid.uuid4().hex[:8]
    client = w.client()
    name = w.create("none", w.spec(client, select=sel))
    cond = w.wait_ready(name, "False", "NoNamespacesSelected")
    assert cond["message"], cond
    w.wait_counts(name, 0, 0, 0)
    time.sleep(5)
    assert not w.requests(client), "a token request for no namespace at all"
    ns = w.namespace("cc-first", {SELECT: sel})
    wait_for("the first selected namespace's Secret", lambda: w.token(ns, "autotek-token"), timeout=30)
    w.wait_ready(name, reason="TokenIssued")
    w.wait_counts(name, 1, 1, 0)
    assert len(w.requests(client)) == 1


# -- bad input -----------------------------------------------------------------------------------------------


BAD_SPECS = {
    "label key with a space": {"namespaceSelector": {"matchLabels": {"not a key": "x"}}},
    "label value too long": {"namespaceSelector": {"matchLabels": {SELECT: "v" * 70}}},
    # Passes the CRD's pattern, but a label key's prefix is a DNS subdomain of at most 253 characters.
    "label key prefix longer than 253": {"namespaceSelector": {"matchLabels": {("a" * 63 + ".") * 4 + "b/x": "y"}}},
    "Exists with values": {"namespaceSelector": {"matchExpressions": [
        {"key": SELECT, "operator": "Exists", "values": ["x"]}]}},
    "In without values": {"namespaceSelector": {"matchExpressions": [{"key": SELECT, "operator": "In"}]}},
    "namespace name not a DNS label": {"namespaces": ["Not_A_Namespace"]},
}


def test_bad_input_is_refused_or_reported_without_a_hot_loop(world: World) -> None:
    """Each malformed selection is refused by the server (a CEL rule; tests/crd has the table) or reported
    InvalidSpec with an Event, never asked a token for, never retried in a loop."""
    w = world
    client = w.client()
    accepted: dict[str, str] = {}
    refused: list[str] = []
    for what, selection in BAD_SPECS.items():
        spec = {"clientSecretRef": {"namespace": w.ops, "name": client.secret_name},
                "tokenURL": w.broker.token_url, "target": {"name": "autotek-token"}, **selection}
        try:
            accepted[what] = w.create("bad", spec)
        except ApiException as exc:
            assert exc.status == 422, (what, exc.status, exc.body)
            refused.append(what)
    since = time.monotonic()
    for what, name in accepted.items():
        cond = w.wait_ready(name, "False", "InvalidSpec", timeout=30)
        assert cond["message"], (what, cond)
        wait_for(f"an InvalidSpec Event ({what})", lambda n=name: w.events(n, "InvalidSpec"), timeout=20)
    # A missing client Secret: ClientSecretNotFound, an Event, then a token once it exists.
    ns = w.namespace("cc-bad")
    not_yet = Client(w.ops, "not-yet", client.client_id, client.client_secret)
    missing = w.create("missing", w.spec(not_yet, namespaces=[ns]))
    w.wait_ready(missing, "False", "ClientSecretNotFound")
    wait_for("a ClientSecretNotFound Event", lambda: w.events(missing, "ClientSecretNotFound"), timeout=20)
    time.sleep(15)
    paths = w.proxy.paths(since)
    for what, name in {**accepted, "missing client Secret": missing}.items():
        writes = paths.count(f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}/status")
        assert writes <= 3, f"{what}: {writes} status writes in about 15 s: a retry loop"
    reads = paths.count(f"/api/v1/namespaces/{w.ops}/secrets/not-yet")
    assert reads <= 4, f"{reads} reads of the missing client Secret in about 15 s: a retry loop"
    assert not w.requests(client), "a token request for a spec that cannot work"
    w.cluster.put_client_secret(w.ops, "not-yet", {"client_id": client.client_id,
                                                   "client_secret": client.client_secret})
    w.wait_ready(missing, reason="TokenIssued", timeout=30)
    assert w.token(ns, "autotek-token")
    print(f"bad selections refused by the server: {refused}; reported InvalidSpec: {sorted(accepted)}")


def test_kubectl_describe_shows_a_cluster_credentials_events(world: World) -> None:
    """docs/operations.md ("Cluster credentials"): ``kubectl describe catc NAME`` shows its Events."""
    w = world
    if not w.cluster.real:
        pytest.skip("the emulator has no field selectors on involvedObject: a real API server's tier only")
    ns = w.namespace("cc-describe")
    name = w.create("describe", w.spec(w.client(), namespaces=[ns]))
    w.wait_ready(name, reason="TokenIssued")
    wait_for("the TokenIssued Event", lambda: w.events(name, "TokenIssued"), timeout=20)
    out = subprocess.run([kubectl(), "--kubeconfig", str(w.cluster.kubeconfig), "describe", "catc", name],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = out.rsplit("Events:", 1)[-1]
    assert "TokenIssued" in events, f"kubectl describe catc {name} shows no Events:{events}"


# -- the leak scan --------------------------------------------------------------------------------------------


def test_zz_no_secret_or_token_in_logs_events_or_status(world: World, cluster: Cluster, workdir: Path) -> None:
    """This module's operators (DEBUG logs), the Events in its namespaces (``default`` holds those of
    the cluster objects) and the cluster objects' statuses (failedNamespaces, messages) hold no client secret
    and no token. The session's scan covers them too (``Cluster.extra_haystacks``)."""
    w = world
    for name in w.made:
        w.get(name)  # the latest status of those still there
    tokens = w.broker.stats()["tokens"]
    assert tokens
    needles = set(SENSITIVE) | set(tokens)
    needles |= {base64.b64encode(n.encode()).decode() for n in list(needles)}
    haystacks = {str(p.relative_to(workdir)): p.read_text(errors="replace")
                 for p in (workdir / "catc").glob("**/operator-*.log")}
    assert haystacks and all("DEBUG" in text for text in haystacks.values()), sorted(haystacks)
    events_in_ops = json.dumps(w.events())
    assert KIND in events_in_ops, "no Event of a cluster object to scan"
    haystacks["Events of the cluster objects"] = events_in_ops
    haystacks.update({f"status of {n}": text for n, text in w.statuses.items()})
    assert any('"namespaces"' in t for t in w.statuses.values()), "no status.namespaces was scanned"
    haystacks.update({k: v for k, v in cluster.leak_haystacks().items() if " cc-" in k or "catc-ops" in k})
    found = sorted(f"{where}: {n[:6]}…" for where, text in haystacks.items() for n in needles if n and n in text)
    assert not found, found
