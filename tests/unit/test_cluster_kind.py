"""ClusterAutoTekCredential (issue 16): the cluster spec and its selector (tables), one pass serving N
namespaces (one token request, one write per namespace, a failing namespace on its own, status
aggregated and bounded, a restart that requests and writes nothing), the older-keeps-it rule, and the
runtime's namespace events (a namespace labelled in gets a write-only pass, labelled out is converged)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from fakes import T0, Clock, FakeKube, FakeTokens, b64, real_now, settle

from autotek_operator import constants as c
from autotek_operator import converge, errors
from autotek_operator.reconcile import Deps, run_pass
from autotek_operator.runtime import Runtime
from autotek_operator.spec import NamespaceSelection, Requirement, parse_spec
from autotek_operator.state import CredentialState

OPS = "autotek-system"
URL = "https://api.autograb.com.au/auth-broker/request-token"


def cluster_spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"clientSecretRef": {"namespace": OPS, "name": "client"}, "target": {"name": "tok"}}
    spec.update(extra)
    return spec


# -- the spec and its selector ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (cluster_spec(), "spec.namespaceSelector or spec.namespaces is required"),
        ({"clientSecretRef": {"name": "client"}, "namespaces": ["a"]}, "spec.clientSecretRef.namespace is required"),
        (cluster_spec(namespaces=["a"], clientSecretRef={"namespace": "Bad_NS", "name": "c"}), "not a valid namespace"),
        (cluster_spec(namespaces=["ok", "Not-OK"]), "spec.namespaces[1] 'Not-OK' is not a valid namespace name"),
        (cluster_spec(namespaces="a"), "spec.namespaces must be a list"),
        (cluster_spec(namespaceSelector={"matchLabels": {"bad key!": "x"}}), "is not a valid label key"),
        (cluster_spec(namespaceSelector={"matchLabels": {"k": "bad value!"}}), "is not a valid label value"),
        (cluster_spec(namespaceSelector={"matchExpressions": [{"key": "k", "operator": "In"}]}),
         "operator In needs at least one value"),
        (cluster_spec(namespaceSelector={"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["x"]}]}),
         "operator Exists takes no values"),
        (cluster_spec(namespaceSelector={"matchExpressions": [{"key": "k", "operator": "Like", "values": ["x"]}]}),
         "must be one of In, NotIn, Exists, DoesNotExist"),
        (cluster_spec(namespaceSelector={"matchExpressions": "k in (a)"}), "matchExpressions must be a list"),
        (cluster_spec(namespaceSelector={"matchLabels": {}, "matchFields": []}), "unknown field(s) matchFields"),
        (cluster_spec(namespaces=["a"], rolloutRestartTargets=[{"kind": "Deployment", "name": "x"}]),
         "not supported by ClusterAutoTekCredential"),
    ],
)
def test_invalid_cluster_specs(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidSpec) as caught:
        parse_spec(spec, name="cc", cluster=True)
    assert message in caught.value.message


def test_namespaced_kind_still_refuses_a_client_namespace() -> None:
    with pytest.raises(errors.InvalidSpec, match="no namespace field"):
        parse_spec({"clientSecretRef": {"name": "c", "namespace": OPS}}, name="x")


def test_cluster_spec_parsed() -> None:
    spec = parse_spec(
        cluster_spec(
            namespaces=["b", "a"],
            namespaceSelector={
                "matchLabels": {"team": "shop"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}],
            },
        ),
        name="cc",
        cluster=True,
    )
    assert spec.client_secret_ref.namespace == OPS
    assert spec.namespaces == NamespaceSelection(
        match_labels=(("team", "shop"),),
        expressions=(Requirement("tier", "In", frozenset({"web", "api"})),),
        has_selector=True,
        names=frozenset({"a", "b"}),
    )


SHOP = {"team": "shop", "tier": "web"}


@pytest.mark.parametrize(
    ("selection", "namespace", "labels", "selected"),
    [
        ({"namespaces": ["a"]}, "a", {}, True),
        ({"namespaces": ["a"]}, "b", SHOP, False),
        ({"namespaceSelector": {}}, "any", {}, True),  # an empty selector selects every namespace
        ({"namespaceSelector": {"matchLabels": {"team": "shop"}}}, "x", SHOP, True),
        ({"namespaceSelector": {"matchLabels": {"team": "shop"}}}, "x", {"team": "bank"}, False),
        ({"namespaceSelector": {"matchLabels": {"team": "shop", "tier": "db"}}}, "x", SHOP, False),
        ({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]}},
         "x", SHOP, True),
        ({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}},
         "x", SHOP, False),
        ({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}},
         "x", SHOP, True),
        ({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}},
         "x", {}, True),  # NotIn matches a namespace without the label, as in Kubernetes
        ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}, "x", SHOP, True),
        ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}, "x", {}, False),
        ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}, "x", SHOP,
         False),
        ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}, "x", {}, True),
        # Both: the union (listed, or matching the selector).
        ({"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"team": "shop"}}}, "a", {}, True),
        ({"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"team": "shop"}}}, "x", SHOP, True),
        ({"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"team": "shop"}}}, "x", {}, False),
    ],
)
def test_selection(selection: dict[str, Any], namespace: str, labels: dict[str, str], selected: bool) -> None:
    spec = parse_spec(cluster_spec(**selection), name="cc", cluster=True)
    assert spec.namespaces is not None
    assert spec.namespaces.selects(namespace, labels) is selected


# -- one pass, N namespaces -----------------------------------------------------------------------------


class World:
    def __init__(self, allowed: frozenset[str] = frozenset({OPS})) -> None:
        self.clock = Clock()
        self.kube = FakeKube()
        self.kube.put_secret(OPS, "client", {"client_id": "id", "client_secret": "s"})
        self.tokens = FakeTokens(self.clock)
        self.pool = ThreadPoolExecutor(4)
        self.deps = Deps(
            kube=self.kube,  # type: ignore[arg-type]
            tokens=self.tokens,
            clock=self.clock,
            rand=lambda: 0.0,
            cluster_client_namespaces=allowed,
            fan_out=self.pool,
        )

    def state(self, namespaces: list[str], name: str = "cc", **spec: Any) -> CredentialState:
        body = {
            "kind": c.CLUSTER_KIND,
            "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": cluster_spec(namespaces=namespaces, **spec),
        }
        st = CredentialState.from_body(body)
        st.selected = frozenset(namespaces)
        return st

    def status(self, name: str = "cc") -> dict[str, Any]:
        return self.kube.statuses[("", name)]

    def fail_creates_in(self, namespace: str, exc: errors.AutoTekError) -> None:
        """Creating a Secret in ``namespace`` raises ``exc``; elsewhere it works."""
        create = self.kube.create_secret

        def failing(ns: str, body: dict[str, Any]) -> dict[str, Any]:
            if ns == namespace:
                raise exc
            return create(ns, body)

        self.kube.create_secret = failing  # type: ignore[method-assign]


NAMESPACES = [f"ns-{i:02d}" for i in range(12)]


def test_one_token_request_and_one_write_per_namespace() -> None:
    w = World()
    st = run_pass(w.state(NAMESPACES), w.deps)
    assert len(w.tokens.requests) == 1
    assert sorted(w.kube.writes()) == [("create", "tok")] * len(NAMESPACES)
    for ns in NAMESPACES:
        secret = w.kube.secrets[(ns, "tok")]
        assert secret["metadata"]["namespace"] == ns
        assert secret["metadata"]["annotations"][c.ANN_CREDENTIAL_KIND] == c.CLUSTER_KIND
        (ref,) = secret["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == (c.CLUSTER_KIND, "cc", "uid-cc")
    status = w.status()
    assert status["namespaces"] == {"selected": 12, "provisioned": 12, "failed": 0, "summary": "12/12"}
    assert "failedNamespaces" not in status
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("True", c.REASON_TOKEN_ISSUED)
    # Events go to `default` (as a Node's: kubectl describe catc finds them there), about the cluster object.
    assert [(e["namespace"], e["kind"], e["reason"]) for e in w.kube.events] == [
        (c.CLUSTER_EVENT_NAMESPACE, c.CLUSTER_KIND, "TokenIssued")]

    # The next pass has nothing to do: no call at all.
    w.kube.calls.clear()
    w.clock.advance(60)
    run_pass(st, w.deps)
    assert w.kube.calls == [] and len(w.tokens.requests) == 1

    # A rotation: one token request, one patch per namespace, one status patch.
    w.clock.advance(3600)
    run_pass(st, w.deps)
    assert len(w.tokens.requests) == 2
    assert sorted(w.kube.writes()) == [("patch", "tok")] * len(NAMESPACES)
    assert [x for x in w.kube.calls if x[0] == "status"] == [("status", "cc")]
    assert {w.kube.secrets[(ns, "tok")]["data"]["access_token"] for ns in NAMESPACES} == {"dG9rLTI="}


def test_a_foreign_secret_fails_only_its_namespace_which_backs_off_alone() -> None:
    w = World()
    w.kube.put_secret("ns-03", "tok", {"mine": "x"})  # someone else's
    st = run_pass(w.state(NAMESPACES), w.deps)
    assert w.kube.secrets[("ns-03", "tok")]["data"] == {"mine": "eA=="}, "a Secret not ours was touched"
    assert len(w.tokens.requests) == 1
    status = w.status()
    assert status["namespaces"] == {"selected": 12, "provisioned": 11, "failed": 1, "summary": "11/12"}
    (failed,) = status["failedNamespaces"]
    assert (failed["namespace"], failed["reason"]) == ("ns-03", c.REASON_TARGET_CONFLICT)
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", c.REASON_NAMESPACES_NOT_PROVISIONED)
    assert ready["message"].startswith("1 of 12 selected namespaces not provisioned: ns-03 (TargetConflict)")
    assert [e["reason"] for e in w.kube.events] == ["TokenIssued", c.REASON_NAMESPACES_NOT_PROVISIONED]
    # That namespace retries on its own backoff, well before the token's refresh.
    retry = st.targets["ns-03"].retry_at
    assert retry is not None and st.next_due() == retry and st.next_refresh is not None and retry < st.next_refresh
    # Before it: the other namespaces are left alone, nothing is read.
    w.kube.calls.clear()
    run_pass(st, w.deps)
    assert w.kube.calls == []
    # At it: only that namespace is looked at; no token request; the same failure is not re-announced.
    w.clock.now = retry
    w.kube.calls.clear()
    run_pass(st, w.deps)
    assert w.kube.calls == [] or set(w.kube.calls) <= {("get", "tok")}
    assert len(w.tokens.requests) == 1 and [e["reason"] for e in w.kube.events].count("NamespacesNotProvisioned") == 1
    # The foreign Secret goes: the namespace gets the held token, Ready.
    del w.kube.secrets[("ns-03", "tok")]
    st.targets["ns-03"].body = None  # what the Secret watch reports
    st.targets["ns-03"].retry_at = w.clock.now
    run_pass(st, w.deps)
    assert len(w.tokens.requests) == 1
    assert w.status()["namespaces"]["provisioned"] == 12 and w.status()["conditions"][0]["status"] == "True"
    assert w.status().get("failedNamespaces") is None


def test_failed_namespaces_are_bounded_and_sorted() -> None:
    w = World()
    names = [f"x-{i:03d}" for i in range(30)]
    for ns in names[5:]:
        w.kube.put_secret(ns, "tok", {"mine": "x"})
    run_pass(w.state(names), w.deps)
    status = w.status()
    assert status["namespaces"] == {"selected": 30, "provisioned": 5, "failed": 25, "summary": "5/30"}
    listed = [f["namespace"] for f in status["failedNamespaces"]]
    assert listed == names[5:25] and len(listed) == c.MAX_FAILED_NAMESPACES
    assert "25 of 30 selected namespaces not provisioned" in status["conditions"][0]["message"]


def test_a_write_error_in_one_namespace_is_reported_as_kubernetes_api_error() -> None:
    w = World()
    w.fail_creates_in("a", errors.KubernetesAPIError("Kubernetes API create secrets failed: HTTP 500"))
    st = w.state(["a", "b"])
    for ns in ("a", "b"):
        st.target(ns).body = None  # known absent: straight to create
    st = run_pass(st, w.deps)
    status = w.status()
    assert status["namespaces"]["provisioned"] == 1
    assert status["failedNamespaces"][0]["namespace"] == "a"
    assert status["failedNamespaces"][0]["reason"] == c.REASON_WRITE_FAILED
    retry = st.targets["a"].retry_at
    # A transient failure: 5 s, raised to the 10 s floor.
    assert retry is not None and (retry - w.clock()).total_seconds() == pytest.approx(10, abs=1)
    assert ready_reason(w) == c.REASON_NAMESPACES_NOT_PROVISIONED


def test_a_namespace_the_api_server_calls_gone_is_skipped_quietly() -> None:
    """A write refused because the namespace is deleted or Terminating (the namespace watch has not
    said so yet) is neither a failure nor selected: no failedNamespaces, Ready stays True, no Warning;
    that namespace is looked at again after NAMESPACE_GONE_RECHECK_SECONDS, unless dropped first."""
    w = World()
    create = w.kube.create_secret
    w.fail_creates_in("leaving", errors.NamespaceGone("Kubernetes API create secrets failed: HTTP 403: ..."))
    st = run_pass(w.state(["a", "leaving", "b"]), w.deps)
    status = w.status()
    assert status["namespaces"] == {"selected": 2, "provisioned": 2, "failed": 0, "summary": "2/2"}
    assert "failedNamespaces" not in status
    assert ready_reason(w) == c.REASON_TOKEN_ISSUED and status["conditions"][0]["status"] == "True"
    assert [e["reason"] for e in w.kube.events] == ["TokenIssued"]
    t = st.targets["leaving"]
    assert t.gone and not t.failed()
    assert t.retry_at == w.clock() + timedelta(seconds=c.NAMESPACE_GONE_RECHECK_SECONDS)
    # Before the recheck: nothing is called for it.
    w.kube.calls.clear()
    w.clock.advance(10)
    run_pass(st, w.deps)
    assert w.kube.calls == []
    # The namespace watch drops it: the record goes with it.
    st.selected = frozenset({"a", "b"})
    run_pass(st, w.deps)
    assert "leaving" not in st.targets and w.kube.calls == []
    # A namespace that was not gone after all (the same name again): written at the recheck.
    st.selected = frozenset({"a", "b", "leaving"})
    st.target("leaving").gone, st.targets["leaving"].retry_at = True, w.clock()
    w.kube.create_secret = create  # type: ignore[method-assign]
    run_pass(st, w.deps)
    assert w.status()["namespaces"]["summary"] == "3/3" and not st.targets["leaving"].gone


def ready_reason(w: World) -> str:
    return str(w.status()["conditions"][0]["reason"])


def test_restart_requests_no_token_and_rewrites_nothing() -> None:
    w = World()
    run_pass(w.state(NAMESPACES), w.deps)
    stored = w.status()
    # A new process: the state comes from the stored status, the Secrets from the watch (or a read).
    body = {
        "kind": c.CLUSTER_KIND,
        "metadata": {"name": "cc", "uid": "uid-cc", "generation": 1},
        "spec": cluster_spec(namespaces=NAMESPACES),
        "status": stored,
    }
    st = CredentialState.from_body(body)
    st.selected = frozenset(NAMESPACES)
    w.kube.calls.clear()
    w.clock.advance(120)
    run_pass(st, w.deps)
    assert len(w.tokens.requests) == 1, "a restart asked for a token"
    assert w.kube.writes() == [] and not [x for x in w.kube.calls if x[0] == "status"]
    assert st.token is not None and st.token.access_token == "tok-1"


def test_nothing_selected_requests_no_token() -> None:
    w = World()
    st = run_pass(w.state([]), w.deps)
    assert w.tokens.requests == [] and w.kube.writes() == []
    ready = w.status()["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", c.REASON_NO_NAMESPACES_SELECTED)
    assert st.next_due() is None  # no pass until a namespace is selected
    st.selected = frozenset({"a"})
    run_pass(st, w.deps)
    assert len(w.tokens.requests) == 1 and ("a", "tok") in w.kube.secrets


def test_client_secret_namespace_not_allowed_is_never_read() -> None:
    w = World(allowed=frozenset({"elsewhere"}))
    st = run_pass(w.state(["a"]), w.deps)
    assert ("get", "client") not in w.kube.calls and w.tokens.requests == []
    ready = w.status()["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED)
    assert st.next_refresh is None  # permanent: only a change retries
    assert [e["reason"] for e in w.kube.events] == [c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED]


def test_invalid_selector_is_invalid_spec() -> None:
    w = World()
    st = w.state(["a"], namespaceSelector={"matchExpressions": [{"key": "k", "operator": "In"}]})
    run_pass(st, w.deps)
    assert w.tokens.requests == [] and w.status()["conditions"][0]["reason"] == c.REASON_INVALID_SPEC


def test_a_yielded_namespace_is_never_touched() -> None:
    w = World()
    st = w.state(["a", "b"])
    st.yielded = {"b": "older"}
    run_pass(st, w.deps)
    assert ("b", "tok") not in w.kube.secrets and ("a", "tok") in w.kube.secrets
    (failed,) = w.status()["failedNamespaces"]
    assert failed["namespace"] == "b" and failed["reason"] == c.REASON_TARGET_CONFLICT
    assert "older ClusterAutoTekCredential older" in failed["message"]


def test_a_secret_owned_by_a_namespaced_credential_is_a_conflict() -> None:
    w = World()
    w.kube.put_secret("a", "tok", {"access_token": "x"}, labels={c.LABEL_MANAGED_BY: c.MANAGER},
                      annotations={c.ANN_CREDENTIAL: "cc"})  # written for AutoTekCredential a/cc
    run_pass(w.state(["a"]), w.deps)
    (failed,) = w.status()["failedNamespaces"]
    assert failed["reason"] == c.REASON_TARGET_CONFLICT and "AutoTekCredential cc" in failed["message"]


# -- converge.py with the cluster kind's marks ------------------------------------------------------


def cluster_mark(**kw: Any) -> converge.Mark:
    base: dict[str, Any] = {"credential": "cc", "creation_policy": "Owner", "deletion_policy": "Delete",
                            "selector": "", "has_owner_reference": True, "kind": c.CLUSTER_KIND}
    base.update(kw)
    return converge.Mark(**base)


@pytest.mark.parametrize(
    ("case", "m", "wanted", "action"),
    [
        ("still selected", cluster_mark(), {("", "cc"): frozenset({"a"})}, converge.LEAVE),
        ("labelled out, owned", cluster_mark(), {("", "cc"): frozenset({"b"})}, converge.DELETE),
        ("labelled out, merged", cluster_mark(creation_policy="Merge", has_owner_reference=False),
         {("", "cc"): frozenset()}, converge.UNMERGE),
        ("labelled out, retain", cluster_mark(deletion_policy="Retain"), {("", "cc"): frozenset()}, converge.LEAVE),
        ("deleted, owned: garbage collection", cluster_mark(), {}, converge.LEAVE),
        ("deleted, merged", cluster_mark(creation_policy="Merge", has_owner_reference=False), {}, converge.UNMERGE),
        ("a namespaced credential of that name is not it", cluster_mark(), {("a", "cc"): frozenset({"a"})},
         converge.LEAVE),
    ],
)
def test_converge_rule_for_cluster_marks(case: str, m: converge.Mark, wanted: Any, action: str) -> None:
    got = converge.decide(("a", "tok"), m, wanted, "")
    assert got.action == action, case
    if action != converge.LEAVE:
        assert got.credential == ("", "cc")


def test_mark_of_reads_the_kind() -> None:
    w = World()
    run_pass(w.state(["a"]), w.deps)
    mark = converge.mark_of(w.kube.secrets[("a", "tok")])
    assert mark is not None and mark.kind == c.CLUSTER_KIND and mark.has_owner_reference
    assert mark.credential_key("a") == ("", "cc")


# -- the runtime: namespace events, yields -----------------------------------------------------------


def ns_body(name: str, labels: dict[str, str] | None = None, phase: str = "Active") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "status": {"phase": phase}}


def cc_body(name: str, created: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1, "creationTimestamp": created},
        "spec": cluster_spec(**spec),
    }


@pytest.fixture
async def rt() -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    kube = FakeKube()
    kube.put_secret(OPS, "client", {"client_id": "id", "client_secret": "s"})
    tokens = FakeTokens(real_now)  # type: ignore[arg-type]
    deps = Deps(kube=kube, tokens=tokens, clock=real_now, rand=lambda: 0.0,  # type: ignore[arg-type]
                cluster_client_namespaces=frozenset({OPS}))
    runtime = Runtime(deps, workers=2)
    runtime.cluster_kind = True
    runtime.secret_scopes = {None}
    runtime.start()
    try:
        yield runtime, kube, tokens
    finally:
        await runtime.stop(grace=2)


def listed(runtime: Runtime, namespaces: list[dict[str, Any]]) -> None:
    runtime.on_secrets_listed(None, set())
    runtime.on_credentials_listed(None, set())
    runtime.on_namespace_events([(None, n) for n in namespaces])
    runtime.on_namespaces_listed(None, {("", n["metadata"]["name"]) for n in namespaces})


async def test_namespaces_labelled_in_and_out(rt: Any) -> None:
    runtime, kube, tokens = rt
    sel = {"namespaceSelector": {"matchLabels": {"autotek": "yes"}}}
    terminating = ns_body("gone", {"autotek": "yes"}, "Terminating")
    listed(runtime, [ns_body("a", {"autotek": "yes"}), ns_body("b"), terminating])
    runtime.on_cluster_credential_events([(None, cc_body("cc", "2026-01-01T00:00:00Z", **sel))])
    runtime.on_cluster_credentials_listed(None, {("", "cc")})
    await settle(runtime)
    assert ("a", "tok") in kube.secrets and ("gone", "tok") not in kube.secrets, "a Terminating namespace was written"
    assert len(tokens.requests) == 1 and runtime.watches_listed()
    # Labelled in: a pass that only writes (no token request).
    runtime.on_namespace_events([("MODIFIED", ns_body("b", {"autotek": "yes"}))])
    await settle(runtime)
    assert ("b", "tok") in kube.secrets and len(tokens.requests) == 1
    assert kube.statuses[("", "cc")]["namespaces"]["summary"] == "2/2"
    # Labelled out: its Secret goes by the deletion policy (Owner + Delete: deleted), once the
    # credential is confirmed to exist and no longer want it; the other namespace keeps its token.
    for ns in ("a", "b"):
        runtime.on_secret_event("ADDED", kube.secrets[(ns, "tok")])
    kube.cluster_credentials = {"cc": cc_body("cc", "2026-01-01T00:00:00Z", **sel)}
    runtime.on_namespace_events([("MODIFIED", ns_body("b", {}))])
    await settle(runtime)
    assert ("b", "tok") not in kube.secrets and ("a", "tok") in kube.secrets
    assert len(tokens.requests) == 1
    await settle(runtime)
    assert kube.statuses[("", "cc")]["namespaces"]["summary"] == "1/1"


async def test_two_cluster_credentials_the_older_keeps_the_secret(rt: Any) -> None:
    runtime, kube, tokens = rt
    listed(runtime, [ns_body("a"), ns_body("b")])
    runtime.on_cluster_credential_events([
        (None, cc_body("young", "2026-02-01T00:00:00Z", namespaces=["a", "b"])),
        (None, cc_body("old", "2026-01-01T00:00:00Z", namespaces=["a"])),
    ])
    runtime.on_cluster_credentials_listed(None, {("", "young"), ("", "old")})
    await settle(runtime)
    secret = kube.secrets[("a", "tok")]
    assert secret["metadata"]["annotations"][c.ANN_CREDENTIAL] == "old"
    assert kube.secrets[("b", "tok")]["metadata"]["annotations"][c.ANN_CREDENTIAL] == "young"
    young = kube.statuses[("", "young")]
    assert young["namespaces"] == {"selected": 2, "provisioned": 1, "failed": 1, "summary": "1/2"}
    assert young["failedNamespaces"][0]["reason"] == c.REASON_TARGET_CONFLICT
    assert kube.statuses[("", "old")]["conditions"][0]["status"] == "True"
    # No ping-pong: more passes change nothing.
    writes = len(kube.writes())
    for key in (("", "young"), ("", "old")):
        runtime.schedule(key)
    await settle(runtime)
    assert len(kube.writes()) == writes
    # The older one goes: the younger takes the namespace over.
    runtime.on_cluster_credential_events([("DELETED", cc_body("old", "2026-01-01T00:00:00Z", namespaces=["a"]))])
    del kube.secrets[("a", "tok")]  # garbage collection (owned)
    runtime.on_secret_event("DELETED", {"metadata": {"namespace": "a", "name": "tok"}})
    await settle(runtime)
    assert kube.secrets[("a", "tok")]["metadata"]["annotations"][c.ANN_CREDENTIAL] == "young"
    assert kube.statuses[("", "young")]["namespaces"]["summary"] == "2/2"


async def test_cluster_passes_wait_for_the_namespace_list(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_cluster_credential_events([(None, cc_body("cc", "2026-01-01T00:00:00Z", namespaces=["a"]))])
    await settle(runtime, 0.3)
    assert kube.statuses == {} and not runtime.watches_listed()
    listed(runtime, [ns_body("a")])
    runtime.on_cluster_credentials_listed(None, {("", "cc")})
    await settle(runtime)
    assert ("a", "tok") in kube.secrets and runtime.watches_listed()


async def test_namespaced_mode_writes_only_into_watched_namespaces(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes = {"a", OPS}
    for scope in ("a", OPS):
        runtime.on_secrets_listed(scope, set())
        runtime.on_credentials_listed(scope, set())
    runtime.on_namespace_events([(None, ns_body("a")), (None, ns_body("b"))])
    runtime.on_namespaces_listed(None, {("", "a"), ("", "b")})
    runtime.on_cluster_credential_events([(None, cc_body("cc", "2026-01-01T00:00:00Z", namespaces=["a", "b"]))])
    runtime.on_cluster_credentials_listed(None, {("", "cc")})
    await settle(runtime)
    assert ("a", "tok") in kube.secrets and ("b", "tok") not in kube.secrets
    assert kube.statuses[("", "cc")]["namespaces"]["summary"] == "1/1"
    await asyncio.sleep(0)


def test_clock_is_injected() -> None:
    assert World().clock() == T0


async def test_a_secret_reported_after_its_namespace_left_the_selection_is_converged(rt: Any) -> None:
    """The Secret watch and the namespace watch are not ordered: a namespace labelled out before the Secret
    watch reported the Secret (so the convergence then saw nothing to do) is converged when it does."""
    runtime, kube, tokens = rt
    sel = {"namespaceSelector": {"matchLabels": {"autotek": "yes"}}}
    listed(runtime, [ns_body("a", {"autotek": "yes"}), ns_body("b", {"autotek": "yes"})])
    runtime.on_cluster_credential_events([(None, cc_body("cc", "2026-01-01T00:00:00Z", **sel))])
    runtime.on_cluster_credentials_listed(None, {("", "cc")})
    await settle(runtime)
    assert ("a", "tok") in kube.secrets and ("b", "tok") in kube.secrets
    kube.cluster_credentials = {"cc": cc_body("cc", "2026-01-01T00:00:00Z", **sel)}
    runtime.on_secret_event("ADDED", kube.secrets[("a", "tok")])
    # Labelled out while the Secret watch has not reported b's Secret yet: nothing known to clean up.
    runtime.on_namespace_events([("MODIFIED", ns_body("b", {}))])
    await settle(runtime)
    assert ("b", "tok") in kube.secrets
    # The Secret watch catches up: the Secret goes by the deletion policy (Owner + Delete).
    runtime.on_secret_event("ADDED", kube.secrets[("b", "tok")])
    await settle(runtime)
    assert ("b", "tok") not in kube.secrets and ("a", "tok") in kube.secrets
    # A Secret the credential still wants is left alone.
    runtime.on_secret_event("MODIFIED", kube.secrets[("a", "tok")])
    await settle(runtime)
    assert ("a", "tok") in kube.secrets and len(tokens.requests) == 1


async def test_a_secret_asked_about_during_its_cleanup_is_looked_at_again(rt: Any) -> None:
    """The Secret and credential watches are not ordered: a convergence asked for while the Secret's
    cleanup is running (which may have read it before the latest change) runs once more after it."""
    runtime, kube, tokens = rt
    listed(runtime, [ns_body("a")])
    merge = {"namespaces": ["a"], "target": {"name": "tok", "creationPolicy": "Merge"}}
    kube.put_secret("a", "tok", {"theirs": "kept"})
    runtime.on_cluster_credential_events([(None, cc_body("cc", "2026-01-01T00:00:00Z", **merge))])
    runtime.on_cluster_credentials_listed(None, {("", "cc")})
    await settle(runtime)
    assert "access_token" in kube.secrets[("a", "tok")]["data"]
    runtime.on_secret_event("MODIFIED", kube.secrets[("a", "tok")])
    # The first cleanup's read of the credential blocks until released.
    entered, release = threading.Event(), threading.Event()
    get_cc = kube.get_cluster_credential

    def slow(name: str) -> dict[str, Any] | None:
        entered.set()
        release.wait(5)
        return get_cc(name)

    kube.get_cluster_credential = slow  # type: ignore[method-assign]
    runtime.on_cluster_credential_events([("DELETED", cc_body("cc", "2026-01-01T00:00:00Z", **merge))])
    assert await asyncio.to_thread(entered.wait, 5)
    runtime.converge_scope("a")  # asked again while it runs (e.g. the Secret's event)
    assert ("a", "tok") in runtime._converge_again
    release.set()
    await settle(runtime)
    assert kube.secrets[("a", "tok")]["data"] == {"theirs": b64("kept")}, "not unmerged"
    assert [x for x in kube.calls if x[0] == "get-cluster-credential"] == [("get-cluster-credential", "cc")] * 2
    assert not runtime._converge_again and not runtime._converging
