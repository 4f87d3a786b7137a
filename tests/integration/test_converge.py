"""Nothing owed is forgotten: what happened while no operator watched is converged on the next complete list.

- Credentials deleted while their operator was stopped, or while its watches were broken past a 410: the
  Secrets they wrote are handled by the deletion policy recorded on them (Merge: the operator's keys and
  annotations removed, everything else kept; Owner: left to garbage collection; Retain: left), never a
  Secret of another operator's scope, never one whose marks cannot be trusted.
- Rollout restarts held back by AUTOTEK_RESTART_MIN_INTERVAL: made once when the interval ends, also
  after the leader was killed in between.

Each test runs operators of its own, in a namespace of its own, with a test scope of its own (the session's
operator selects other credentials, and it never touches Secrets another scope wrote). Rows go to the fault
table (``faults.ROWS``).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from faults import APIProxy, Row, make_ca, record
from harness import Broker, Client, Cluster, Operator, new_client, wait_for
from rbac import new_scope, selector

from autotek_operator import constants as c

pytestmark = pytest.mark.integration

#: What an operator's keys, label and annotations are (for "removed exactly those").
OUR_KEYS = {"access_token", "token_type", "authorization", "expires_at", "scope", ".env"}
THEIRS = {"data": {"theirs": "kept"}, "labels": {"team": "shop"}, "annotations": {"shop.example/owner": "ops"}}
TEMPLATE = {"data": {".env": "TOKEN={{ .access_token }}"}}


def put_theirs(cluster: Cluster, ns: str, name: str) -> None:
    """A Secret someone else made, for a Merge credential to write into."""
    import base64

    cluster.core.create_namespaced_secret(ns, {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "labels": THEIRS["labels"], "annotations": THEIRS["annotations"]},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in THEIRS["data"].items()}})


def put_marked(cluster: Cluster, ns: str, name: str, annotations: dict[str, str]) -> str:
    """A Secret with the operator's marks made by hand; its resourceVersion."""
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": {c.LABEL_MANAGED_BY: c.MANAGER}, "annotations": annotations},
            "data": {"access_token": "bm90LWEtdG9rZW4="}}
    created = cluster.core.create_namespaced_secret(ns, body)
    return str(created.metadata.resource_version)


def spec(client: Client, broker: Broker, target: str, **policy: Any) -> dict[str, Any]:
    return {"clientSecretRef": {"name": client.secret_name}, "tokenURL": broker.token_url,
            "target": {"name": target, **policy}}


def has_token(cluster: Cluster, ns: str, name: str) -> bool:
    return bool((cluster.secret_data(ns, name) or {}).get("access_token"))


def unmerged(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    """The Secret once the operator's keys, label and annotations are gone (None while they are there)."""
    secret = cluster.secret(ns, name)
    if secret is None:
        return None
    meta = secret["metadata"]
    if set(secret.get("data") or {}) & OUR_KEYS or c.LABEL_MANAGED_BY in (meta.get("labels") or {}):
        return None
    if any(k.startswith("autotek.io/") for k in meta.get("annotations") or {}):
        return None
    return secret


def assert_theirs_intact(secret: dict[str, Any]) -> None:
    """Exactly what was there before the operator merged into it."""
    import base64

    meta = secret["metadata"]
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    assert data == THEIRS["data"], data
    assert meta.get("labels") == THEIRS["labels"], meta.get("labels")
    assert {k: v for k, v in (meta.get("annotations") or {}).items()
            if not k.startswith("kubectl.kubernetes.io/")} == THEIRS["annotations"], meta.get("annotations")


def assert_merged(cluster: Cluster, ns: str, name: str) -> None:
    secret = cluster.secret(ns, name)
    assert secret is not None, f"{name} is gone"
    assert {"access_token", "authorization"} <= set(secret.get("data") or {}), f"{name}: the token was removed"
    assert (secret["metadata"].get("annotations") or {}).get(c.ANN_CREDENTIAL), f"{name}: the marks were removed"


def own_operator(cluster: Cluster, broker: Broker, root: Path, name: str, ns: str, scope: str,
                 **env: str) -> Operator:
    (root / name).mkdir(parents=True, exist_ok=True)
    return Operator(cluster, broker, root / name, extra_env={"AUTOTEK_NAMESPACES": ns, **env}, scope=scope)


def in_parallel(*fns: Callable[[], Any]) -> None:
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        for future in [pool.submit(fn) for fn in fns]:
            future.result()


def log_lines(op: Operator, needle: str) -> list[str]:
    """The lines of the operator's latest run that contain ``needle``."""
    return [line for line in op.log_text().splitlines() if needle in line]


def healthy(*ops: Operator) -> None:
    for op in ops:
        assert "Traceback" not in op.log_text(all_runs=True), f"{op.workdir.name} logged a traceback"


# -- credentials deleted while the operators were stopped ---------------------------------------------------


@dataclass
class Stopped:
    cluster: Cluster
    ns: str
    a: Operator
    b: Operator
    #: resourceVersions of the hand-made Secrets with untrustworthy marks.
    bad: dict[str, str]
    cleaned_in: float


@pytest.fixture(scope="module")
def stopped(cluster: Cluster, broker: Broker, workdir: Path) -> Iterator[Stopped]:
    """Two operators of two scopes in one namespace; every credential is deleted while both are stopped;
    then operator A starts again and converges (B stays stopped until a test starts it)."""
    ns = cluster.create_namespace("conv")
    scope_a, scope_b = new_scope(), new_scope()
    root = workdir / "converge-stopped"
    a = own_operator(cluster, broker, root, "a", ns, scope_a)
    b = own_operator(cluster, broker, root, "b", ns, scope_b)
    try:
        client = new_client(cluster, broker, ns)
        for name in ("merge-a", "merge-b", "retain-a"):
            put_theirs(cluster, ns, name)
        creds = {  # credential: (target, scope, policies)
            "cred-merge": ("merge-a", scope_a, {"creationPolicy": "Merge", "template": TEMPLATE}),
            "cred-other-scope": ("merge-b", scope_b, {"creationPolicy": "Merge"}),
            "cred-retain": ("retain-a", scope_a, {"creationPolicy": "Merge", "deletionPolicy": "Retain"}),
            "cred-owner": ("owner-a", scope_a, {}),
            "cred-owner-retain": ("owner-retain-a", scope_a, {"deletionPolicy": "Retain"}),
        }
        for name, (target, scope, policy) in creds.items():
            cluster.create_credential(ns, name, spec(client, broker, target, **policy), scope=scope)
        recorded = {c.ANN_CREATION_POLICY: "Merge", c.ANN_DELETION_POLICY: "Delete",
                    c.ANN_WRITER_SELECTOR: selector(scope_a)}
        bad = {
            "bad-name": put_marked(cluster, ns, "bad-name", {c.ANN_CREDENTIAL: "Not_A_Name!", **recorded}),
            "legacy": put_marked(cluster, ns, "legacy", {c.ANN_CREDENTIAL: "gone-long-ago"}),
        }
        in_parallel(a.start, b.start)
        for target, _, _ in creds.values():
            wait_for(f"a token in {target}", lambda t=target: has_token(cluster, ns, t), timeout=40)
        in_parallel(a.stop, b.stop)
        for name in creds:
            cluster.delete_credential(ns, name)
        wait_for("the credentials to be gone", lambda: not cluster.credentials_in(ns), timeout=30)
        started = time.monotonic()
        a.start()
        wait_for("merge-a unmerged by operator A", lambda: unmerged(cluster, ns, "merge-a"), timeout=60)
        cleaned_in = time.monotonic() - started
        time.sleep(3)  # the rest of the same complete list, if it were to touch anything else
        yield Stopped(cluster, ns, a, b, bad, cleaned_in)
    finally:
        a.stop()
        b.stop()
        cluster.delete_namespace(ns)


def test_merge_secret_of_a_credential_deleted_while_stopped_is_unmerged(stopped: Stopped) -> None:
    secret = unmerged(stopped.cluster, stopped.ns, "merge-a")
    assert secret is not None
    assert_theirs_intact(secret)
    assert log_lines(stopped.a, "cred-merge: deleted while no operator watched; removed its keys")
    healthy(stopped.a)
    record(Row("operator stopped; Merge credential deleted; operator started",
               "its keys, label and annotations removed; all else kept",
               f"unmerged {stopped.cleaned_in:.1f} s after the start (incl. start-up); other keys, labels, "
               "annotations intact"))


def test_a_credential_outside_the_selector_is_not_touched(stopped: Stopped) -> None:
    """Operator A never cleans what operator B (another selector) wrote; B cleans its own once it runs."""
    assert_merged(stopped.cluster, stopped.ns, "merge-b")
    assert not log_lines(stopped.a, "cred-other-scope")
    stopped.b.start()
    try:
        secret = wait_for("merge-b unmerged by operator B", lambda: unmerged(stopped.cluster, stopped.ns, "merge-b"),
                          timeout=60)
        assert_theirs_intact(secret)
    finally:
        stopped.b.stop()
    healthy(stopped.b)
    record(Row("credential of another operator's selector deleted while both were stopped",
               "untouched by this operator; cleaned by its own", "untouched by A; unmerged by B once B ran"))


def test_retain_leaves_the_secrets(stopped: Stopped) -> None:
    assert_merged(stopped.cluster, stopped.ns, "retain-a")
    assert has_token(stopped.cluster, stopped.ns, "owner-retain-a")
    assert not [x for x in log_lines(stopped.a, "Secret retain-a") + log_lines(stopped.a, "Secret owner-retain-a")
                if "INFO" in x or "WARNING" in x]


def test_owner_is_left_to_garbage_collection(stopped: Stopped) -> None:
    if stopped.cluster.emulated:
        # The emulator has no garbage collector: the owned Secret stays, and the operator leaves it too.
        assert has_token(stopped.cluster, stopped.ns, "owner-a")
    else:
        wait_for("owner-a garbage-collected", lambda: stopped.cluster.secret(stopped.ns, "owner-a") is None,
                 timeout=60)
    assert not [x for x in log_lines(stopped.a, "owner-a") if "deleted while no operator watched" in x]


def test_malformed_marks_are_logged_once_and_left_alone(stopped: Stopped) -> None:
    for name, version in stopped.bad.items():
        secret = stopped.cluster.secret(stopped.ns, name)
        assert secret is not None and secret["metadata"]["resourceVersion"] == version, f"{name} was changed"
        lines = log_lines(stopped.a, f"Secret {stopped.ns}/{name} carries this operator's marks")
        assert len(lines) == 1, lines
    assert "not a valid name" in log_lines(stopped.a, f"{stopped.ns}/bad-name carries")[0]
    assert "older version" in log_lines(stopped.a, f"{stopped.ns}/legacy carries")[0]
    assert unmerged(stopped.cluster, stopped.ns, "merge-a")  # the list went on past them
    healthy(stopped.a)


# -- credentials deleted while the watches were broken past a 410 -------------------------------------------


def test_credential_deleted_while_the_watch_is_broken_past_a_410(cluster: Cluster, broker: Broker,
                                                                 workdir: Path) -> None:
    ns = cluster.create_namespace("conv410")
    scope = new_scope()
    root = workdir / "converge-410"
    root.mkdir(exist_ok=True)
    proxy = APIProxy(cluster.identity().kubeconfig, root / "kubeconfig-proxied", make_ca("API proxy CA"), root)
    op = own_operator(cluster, broker, root, "op", ns, scope, KUBECONFIG=str(proxy.kubeconfig))
    try:
        client = new_client(cluster, broker, ns)
        put_theirs(cluster, ns, "merge-x")
        bad = put_marked(cluster, ns, "bad", {c.ANN_CREDENTIAL: "-bad-", c.ANN_CREATION_POLICY: "Merge",
                                              c.ANN_DELETION_POLICY: "Delete", c.ANN_WRITER_SELECTOR: selector(scope)})
        cluster.create_credential(ns, "cred-x", spec(client, broker, "merge-x", creationPolicy="Merge",
                                                     template=TEMPLATE), scope=scope)
        op.start()
        wait_for("a token in merge-x", lambda: has_token(cluster, ns, "merge-x"), timeout=40)
        wait_for("the bad Secret reported", lambda: log_lines(op, f"Secret {ns}/bad carries"), timeout=20)

        proxy.cut()  # the watches end and cannot resume ...
        cluster.delete_credential(ns, "cred-x")  # ... while the credential is deleted ...
        wait_for("the deletion", lambda: cluster.credential(ns, "cred-x") is None, timeout=15)
        time.sleep(1.0)
        t = time.monotonic()
        proxy.expire()  # ... and the resourceVersions they would resume from are gone: 410, list again
        secret = wait_for("merge-x unmerged after the new list", lambda: unmerged(cluster, ns, "merge-x"), timeout=60)
        took = time.monotonic() - t
        assert_theirs_intact(secret)
        expired = proxy.expired()
        assert any(p.endswith("/secrets") for p in expired) and any(p.endswith("/autotekcredentials")
                                                                    for p in expired), expired
        assert log_lines(op, "resourceVersion too old; listing again")
        # The operator logs the cleanup right after its write: the line may trail the Secret by a moment.
        wait_for("the cleanup's log line", lambda: log_lines(op, "cred-x: deleted while no operator watched; "
                                                                 "removed its keys"), timeout=10)
        assert not log_lines(op, "cred-x: deleted; cleaned up"), "the deletion came through the watch after all"
        # The relist did not report the bad Secret again, nor touch it.
        assert len(log_lines(op, f"Secret {ns}/bad carries")) == 1
        assert (cluster.secret(ns, "bad") or {})["metadata"]["resourceVersion"] == bad
        healthy(op)
        record(Row("watches broken past a 410 (proxy: streams cut, resume answered 410); Merge credential "
                   "deleted meanwhile", "new list; its keys removed, all else kept; no DELETED event needed",
                   f"410 on {len(expired)} resumes; unmerged {took:.1f} s after the watches could list again",
                   recovery=f"{took:.1f} s"))
    finally:
        op.stop()
        proxy.stop()
        cluster.delete_namespace(ns)


# -- restarts held back by the minimum interval --------------------------------------------------------------

#: AUTOTEK_RESTART_MIN_INTERVAL in these tests: long enough for two more rotations (10 s apart at the
#: fastest, the per-credential floor) to fall inside it after the first restart.
INTERVAL = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deployment(cluster: Cluster, ns: str, name: str) -> None:
    labels = {"app": name}
    kubernetes.client.AppsV1Api(cluster.api).create_namespaced_deployment(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}}})


def _workload(cluster: Cluster, ns: str, name: str) -> tuple[str | None, int]:
    raw = kubernetes.client.AppsV1Api(cluster.api).read_namespaced_deployment(name, ns, _preload_content=False)
    doc = json.loads(raw.data)
    annotations = doc["spec"]["template"]["metadata"].get("annotations") or {}
    return annotations.get(c.ANN_RESTARTED_AT), int(doc["metadata"]["generation"])


def _parse(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _events(cluster: Cluster, ns: str, reason: str) -> list[dict[str, Any]]:
    return sorted((e for e in cluster.events(ns) if e.get("reason") == reason), key=lambda e: e["firstTimestamp"])


def _rotate(cluster: Cluster, ns: str, name: str, n: int) -> str:
    """Ask for a new token (the refresh annotation) and wait until the Secret holds it."""
    before = (cluster.secret_data(ns, name) or {}).get("access_token")
    cluster.patch_credential(ns, name, {"metadata": {"annotations": {c.ANN_REFRESH_REQUESTED_AT: f"rotation-{n}"}}})
    token: str = wait_for(f"rotation {n}", lambda: (t := (cluster.secret_data(ns, name) or {}).get("access_token"))
                          and t != before and t, timeout=40)
    return token


def _credential(cluster: Cluster, broker: Broker, ns: str, scope: str) -> None:
    client = new_client(cluster, broker, ns)
    _deployment(cluster, ns, "web")
    cluster.create_credential(ns, "autotek", {
        "clientSecretRef": {"name": client.secret_name}, "tokenURL": broker.token_url,
        "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"}]}, scope=scope)
    wait_for("the first token", lambda: has_token(cluster, ns, "autotek"), timeout=40)


def _first_restart_then_deferral(cluster: Cluster, ns: str) -> tuple[float, float]:
    """Rotation 1 restarts the workload; rotation 2, inside the interval, defers. (first restart, due)."""
    _rotate(cluster, ns, "autotek", 1)
    first = wait_for("the first restart", lambda: _workload(cluster, ns, "web")[0], timeout=30)
    _rotate(cluster, ns, "autotek", 2)
    deferred = wait_for("a RolloutRestartDeferred Event", lambda: _events(cluster, ns, "RolloutRestartDeferred"),
                        timeout=30)
    owed = wait_for("status.pendingRestarts", lambda: ((cluster.credential(ns, "autotek") or {}).get("status")
                                                       or {}).get("pendingRestarts"), timeout=30)
    due = _parse(first) + INTERVAL
    assert [(o["kind"], o["name"]) for o in owed] == [("Deployment", "web")], owed
    assert _parse(owed[0]["dueAt"]) == due, (owed, first)
    assert f"until {owed[0]['dueAt']}" in deferred[0]["message"], deferred[0]["message"]
    return _parse(first), due


def _made_once(cluster: Cluster, ns: str, first: float, due: float) -> float:
    """Wait for the owed restart; check it came when the interval ended, once. When it came."""
    second = wait_for("the owed restart", lambda: (r := _workload(cluster, ns, "web")[0]) and _parse(r) != first
                      and r, timeout=due - time.time() + 40)
    made = _parse(second)
    assert due <= made <= due + 20, f"the owed restart came {made - due:+.1f} s after the interval ended"
    time.sleep(4)  # a second restart would come right away, if at all
    restarted = _events(cluster, ns, "RolloutRestarted")
    assert len(restarted) == 2, [e["message"] for e in restarted]
    assert "deferred since" in restarted[-1]["message"], restarted[-1]["message"]
    assert _workload(cluster, ns, "web") == (second, 3), "more than one restart for the rotations in the interval"
    status = (cluster.credential(ns, "autotek") or {}).get("status") or {}
    assert "pendingRestarts" not in status, status
    rollout = next(x for x in status["conditions"] if x["type"] == "RolloutRestart")
    assert rollout["reason"] == "Restarted", rollout
    return made


def test_a_restart_held_back_by_the_interval_is_made_once_when_it_ends(cluster: Cluster, broker: Broker,
                                                                     workdir: Path) -> None:
    ns = cluster.create_namespace("owed")
    scope = new_scope()
    port = _free_port()
    op = own_operator(cluster, broker, workdir / "converge-restart", "op", ns, scope,
                      AUTOTEK_ROLLOUT_RESTART="true", AUTOTEK_RESTART_MIN_INTERVAL=str(INTERVAL),
                      AUTOTEK_METRICS_PORT=str(port))
    op.identity = cluster.identity("rollout-restart")
    try:
        op.start()
        _credential(cluster, broker, ns, scope)
        first, due = _first_restart_then_deferral(cluster, ns)
        _rotate(cluster, ns, "autotek", 3)  # a third rotation inside the interval: still one restart owed
        assert time.time() < due, "the third rotation came after the interval ended: the test is too slow here"
        assert len(_events(cluster, ns, "RolloutRestartDeferred")) == 1
        made = _made_once(cluster, ns, first, due)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for result in ("made", "deferred", "made_after_deferral"):
            assert re.search(rf'^autotek_rollout_restarts_total\{{result="{result}"\}} 1\.0$', text, re.M), result
        assert log_lines(op, "made the deferred restart of Deployment web")
        healthy(op)
        record(Row("3 rotations within AUTOTEK_RESTART_MIN_INTERVAL (40 s) of a restart",
                   "one restart, when the interval ends; Events deferred + made",
                   f"restart made {made - due:+.0f} s from the end of the interval, once (2 restarts in all)"))
    finally:
        op.stop()
        cluster.delete_namespace(ns)


def test_an_owed_restart_survives_a_leader_failover(cluster: Cluster, broker: Broker, workdir: Path) -> None:
    ns = cluster.create_namespace("owedha")
    scope = new_scope()
    replicas = {}
    for name in ("a", "b"):
        replicas[name] = own_operator(
            cluster, broker, workdir / "converge-failover", name, ns, scope,
            AUTOTEK_ROLLOUT_RESTART="true", AUTOTEK_RESTART_MIN_INTERVAL=str(INTERVAL),
            AUTOTEK_LEADER_ELECTION="true", AUTOTEK_LEADER_ELECTION_NAMESPACE=ns, POD_NAME=f"replica-{name}",
            AUTOTEK_LEADER_ELECTION_LEASE_DURATION="10", AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE="6",
            AUTOTEK_LEADER_ELECTION_RETRY_PERIOD="2")
        replicas[name].identity = cluster.identity("rollout-restart")
    try:
        in_parallel(*[op.start for op in replicas.values()])
        leader = wait_for("a leader", lambda: next(
            (n for n, op in replicas.items() if "leading: running passes" in op.log_text()), None), timeout=40)
        follower = "b" if leader == "a" else "a"
        _credential(cluster, broker, ns, scope)
        first, due = _first_restart_then_deferral(cluster, ns)
        replicas[leader].stop(signal.SIGKILL)  # the debt is in the status only now
        wait_for("the follower to lead", lambda: "leading: running passes" in replicas[follower].log_text(),
                 timeout=40)
        assert time.time() < due, "the failover ended after the interval: the test is too slow here"
        made = _made_once(cluster, ns, first, due)
        assert log_lines(replicas[follower], "made the deferred restart of Deployment web")
        healthy(replicas[follower])
        record(Row("leader SIGKILLed while a rollout restart is owed", "the new leader makes it when the interval "
                   "ends, once", f"made by the new leader {made - due:+.0f} s from the end of the interval, once"))
    finally:
        for op in replicas.values():
            op.stop()
        cluster.delete_namespace(ns)


def test_zz_no_secret_or_token_in_these_operators_logs_events_or_status(cluster: Cluster, broker: Broker,
                                                                          workdir: Path) -> None:
    """The session's scan covers the operators of this file only when its worker also ran the session
    operator: scan them here (DEBUG logs, and the Events and statuses of this file's namespaces, with the
    new deferral Events and status.pendingRestarts)."""
    import base64

    from harness import SENSITIVE

    needles = set(SENSITIVE) | set(broker.stats()["tokens"])
    needles |= {base64.b64encode(n.encode()).decode() for n in list(needles)}
    haystacks = {str(p.relative_to(workdir)): p.read_text(errors="replace")
                 for p in workdir.glob("converge-*/**/operator-*.log")}
    assert haystacks and all("DEBUG" in text for text in haystacks.values()), sorted(haystacks)
    haystacks.update({k: v for k, v in cluster.leak_haystacks().items()
                      if any(f" {p}-" in k for p in ("conv", "conv410", "owed", "owedha"))})
    assert any(k.startswith("events and status") for k in haystacks), "no namespace of this file was scanned"
    found = sorted(f"{where}: {n[:6]}…" for where, text in haystacks.items() for n in needles if n and n in text)
    assert not found, found
