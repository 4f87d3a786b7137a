"""converge.py: what happens to Secrets the operator wrote, given the live credentials (a table), and the
runtime carrying it out on a complete list (confirm with a read, then unmerge or leave)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes import FakeKube, FakeTokens, running_runtime, settle

from autotek_operator import constants as c
from autotek_operator import converge, scheduling
from autotek_operator.converge import BAD_INPUT, DELETE, LEAVE, UNMERGE, Mark, decide, mark_of
from autotek_operator.runtime import Runtime

NS = "shop"
SEL = "team=a"


def mark(credential: str = "cred", creation: str | None = "Merge", deletion: str | None = "Delete",
         selector: str | None = SEL, owned: bool = False) -> Mark:
    return Mark(credential, creation, deletion, selector, owned)


LIVE = {(NS, "cred"): frozenset({NS})}
#: A credential that still exists but no longer wants its Secret in NS (a cluster credential whose
#: selection left the namespace: the rule the next kind reuses).
MOVED = {(NS, "cred"): frozenset({"elsewhere"})}


@pytest.mark.parametrize(
    ("case", "m", "wanted", "action"),
    [
        ("merge, credential gone", mark(), {}, UNMERGE),
        ("merge, credential alive", mark(), LIVE, LEAVE),
        ("merge, retain", mark(deletion="Retain"), {}, LEAVE),
        ("owner with owner reference: garbage collection", mark(creation="Owner", owned=True), {}, LEAVE),
        ("owner, retain", mark(creation="Owner", deletion="Retain"), {}, LEAVE),
        ("owner without an owner reference", mark(creation="Owner"), {}, DELETE),
        ("owner, the namespace left the credential's selection", mark(creation="Owner", owned=True), MOVED, DELETE),
        ("merge, the namespace left the credential's selection", mark(), MOVED, UNMERGE),
        ("another operator's scope", mark(selector="team=b"), {}, LEAVE),
        ("an operator without a selector wrote it", mark(selector=""), {}, LEAVE),
        ("older version: no policies recorded", mark(creation=None, deletion=None, selector=None), {}, BAD_INPUT),
        ("older version, credential alive: nothing to say", mark(creation=None, deletion=None, selector=None), LIVE,
         LEAVE),
        ("older version: no selector recorded", mark(selector=None), {}, BAD_INPUT),
        ("credential annotation not a name", mark(credential="Not_A_Name"), {}, BAD_INPUT),
        ("not a name, another operator's scope: not ours to report", mark(credential="Not_A_Name", selector="x"), {},
         LEAVE),
        ("not a name, older version", mark(credential="Not_A_Name", selector=None), {}, BAD_INPUT),
        ("credential annotation empty", mark(credential=""), {}, BAD_INPUT),
        ("credential annotation too long", mark(credential="a" * 254), {}, BAD_INPUT),
        ("unknown policy recorded", mark(deletion="Orphan"), {}, BAD_INPUT),
        ("unknown creation policy recorded", mark(creation="Adopt"), {}, BAD_INPUT),
    ],
)
def test_decide(case: str, m: Mark, wanted: dict[tuple[str, str], frozenset[str]], action: str) -> None:
    assert decide((NS, "target"), m, wanted, SEL).action == action, case


def test_an_operator_without_a_selector_cleans_what_one_without_a_selector_wrote() -> None:
    assert decide((NS, "t"), mark(selector=""), {}, "").action == UNMERGE
    assert decide((NS, "t"), mark(selector=SEL), {}, "").action == LEAVE


def test_converge_lists_only_what_needs_doing_in_the_namespace_asked_for() -> None:
    marked = {(NS, "a"): mark("gone"), (NS, "b"): mark("cred"), ("other", "c"): mark("gone"),
              (NS, "d"): mark("Bad!")}
    actions = converge.converge(marked, LIVE, SEL, NS)
    assert [(a.secret, a.action, a.credential) for a in actions] == [
        ((NS, "a"), UNMERGE, (NS, "gone")), ((NS, "d"), BAD_INPUT, None)]
    assert len(converge.converge(marked, LIVE, SEL, None)) == 3


def _secret(labels: dict[str, str] | None = None, annotations: dict[str, Any] | None = None,
            refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": labels, "annotations": annotations, "ownerReferences": refs}}


OURS = {c.LABEL_MANAGED_BY: c.MANAGER}


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (_secret(), None),
        (_secret(OURS), None),  # no credential annotation
        (_secret({c.LABEL_MANAGED_BY: "helm"}, {c.ANN_CREDENTIAL: "x"}), None),
        (_secret(OURS, {c.ANN_CREDENTIAL: "x"}), Mark("x", None, None, None, False)),
        (_secret(OURS, {c.ANN_CREDENTIAL: "x", c.ANN_CREATION_POLICY: "Owner", c.ANN_DELETION_POLICY: "Delete",
                        c.ANN_WRITER_SELECTOR: ""},
                 [{"apiVersion": "autotek.io/v1alpha1", "kind": "AutoTekCredential", "name": "x", "uid": "u"}]),
         Mark("x", "Owner", "Delete", "", True)),
        (_secret(OURS, {c.ANN_CREDENTIAL: 7}), Mark("7", None, None, None, False)),  # not a string: never a name
        ({"metadata": {"labels": "nonsense", "annotations": []}}, None),
    ],
)
def test_mark_of(secret: dict[str, Any], expected: Mark | None) -> None:
    assert mark_of(secret) == expected


# -- the runtime: on a complete list ----------------------------------------------------------------


def _marked_secret(kube: FakeKube, name: str, credential: str, **annotations: str) -> None:
    ann = {c.ANN_CREDENTIAL: credential, c.ANN_EXPIRES_AT: "2026-11-28T05:00:00Z",
           c.ANN_REFRESHED_AT: "2026-11-28T04:00:00Z", c.ANN_CREATION_POLICY: "Merge",
           c.ANN_DELETION_POLICY: "Delete", c.ANN_WRITER_SELECTOR: "", c.ANN_TEMPLATE_KEYS: ".env",
           "their": "annotation", **annotations}
    kube.put_secret(NS, name, {"access_token": "t", "authorization": "Bearer t", "token_type": "bearer",
                               "expires_at": "x", ".env": "TOKEN=t", "theirs": "kept"},
                    labels={**OURS, "their": "label"}, annotations=ann)


@pytest.fixture
async def rt(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS) as world:
        world[1].credentials = {}
        yield world


def _list(runtime: Runtime, kube: FakeKube) -> None:
    """Both watches complete a list of NS: every Secret, no credential."""
    runtime.on_secret_events([(None, s) for s in kube.secrets.values()])
    runtime.on_secrets_listed(NS, set(kube.secrets))
    runtime.on_credentials_listed(NS, set())


async def test_a_complete_list_unmerges_what_a_gone_credential_wrote(rt: Any) -> None:
    runtime, kube, _ = rt
    _marked_secret(kube, "target", "gone")
    _list(runtime, kube)
    await settle(runtime)
    secret = kube.secrets[(NS, "target")]
    assert sorted(secret["data"]) == ["theirs"]
    assert secret["metadata"]["labels"] == {"their": "label"}
    assert secret["metadata"]["annotations"] == {"their": "annotation"}
    assert ("get-credential", "gone") in kube.calls


async def test_a_credential_that_exists_after_all_is_left_alone(rt: Any) -> None:
    runtime, kube, _ = rt
    _marked_secret(kube, "target", "gone")
    kube.credentials[(NS, "gone")] = {"metadata": {"name": "gone"}}  # e.g. no longer selected: not ours
    _list(runtime, kube)
    await settle(runtime)
    assert sorted(kube.secrets[(NS, "target")]["data"]) == [
        ".env", "access_token", "authorization", "expires_at", "theirs", "token_type"]
    assert not [x for x in kube.writes() if x[1] == "target"]


async def test_nothing_is_done_before_both_watches_listed(rt: Any) -> None:
    runtime, kube, _ = rt
    _marked_secret(kube, "target", "gone")
    runtime.on_secret_events([(None, s) for s in kube.secrets.values()])
    runtime.on_secrets_listed(NS, set(kube.secrets))
    await settle(runtime)
    assert ("get-credential", "gone") not in kube.calls
    runtime.on_credentials_listed(NS, set())
    await settle(runtime)
    assert ("get-credential", "gone") in kube.calls


async def test_a_follower_converges_nothing_until_it_leads(rt: Any) -> None:
    runtime, kube, _ = rt
    runtime.active = False
    _marked_secret(kube, "target", "gone")
    _list(runtime, kube)
    await settle(runtime)
    assert ("get-credential", "gone") not in kube.calls
    runtime.set_active(True)
    await settle(runtime)
    assert sorted(kube.secrets[(NS, "target")]["data"]) == ["theirs"]


async def test_bad_marks_are_logged_once_and_left_alone(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    runtime, kube, _ = rt
    _marked_secret(kube, "bad-name", "Not_A_Name")
    kube.put_secret(NS, "old", {"access_token": "t"}, labels=OURS, annotations={c.ANN_CREDENTIAL: "gone"})
    _marked_secret(kube, "good", "gone")
    caplog.set_level(logging.WARNING, logger="autotek_operator")
    _list(runtime, kube)
    await settle(runtime)
    _list(runtime, kube)  # a second complete list: no second warning
    await settle(runtime)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("shop/bad-name" in w and "not a valid name" in w for w in warnings)
    assert any("shop/old" in w and "older version" in w for w in warnings)
    assert "access_token" in kube.secrets[(NS, "bad-name")]["data"]
    assert "access_token" in kube.secrets[(NS, "old")]["data"]
    assert ("get-credential", "Not_A_Name") not in kube.calls
    assert sorted(kube.secrets[(NS, "good")]["data"]) == ["theirs"]  # the list went on


async def test_only_secrets_with_marks_are_remembered(rt: Any) -> None:
    runtime, kube, _ = rt
    kube.put_secret(NS, "plain", {"a": "b"})
    _marked_secret(kube, "target", "gone")
    runtime.on_secret_events([(None, s) for s in kube.secrets.values()])
    assert set(runtime.marked) == {(NS, "target")}
    runtime.on_secret_event("DELETED", kube.secrets[(NS, "target")])
    assert runtime.marked == {}


# -- what every write records on the Secret -----------------------------------------------------------------


def _world(selector: str = SEL) -> tuple[Any, FakeKube, Any]:
    from fakes import Clock

    from autotek_operator.reconcile import Deps

    clock = Clock()
    kube = FakeKube()
    kube.put_secret(NS, "client", {"client_id": "id", "client_secret": "s"})
    deps = Deps(kube=kube, tokens=FakeTokens(clock), clock=clock, rand=lambda: 0.0,  # type: ignore[arg-type]
                selector=selector)
    return clock, kube, deps


def _cred(target: dict[str, Any]) -> Any:
    from autotek_operator.reconcile import CredentialState

    return CredentialState.from_body({"metadata": {"namespace": NS, "name": "cred", "uid": "u", "generation": 1},
                                      "spec": {"clientSecretRef": {"name": "client"}, "target": target}})


def _recorded(kube: FakeKube, name: str) -> dict[str, str]:
    annotations = kube.secrets[(NS, name)]["metadata"]["annotations"]
    return {k: v for k, v in annotations.items()
            if k in (c.ANN_CREATION_POLICY, c.ANN_DELETION_POLICY, c.ANN_WRITER_SELECTOR, c.ANN_TEMPLATE_KEYS)}


@pytest.mark.parametrize(
    ("target", "recorded"),
    [
        ({"name": "t"}, {c.ANN_CREATION_POLICY: "Owner", c.ANN_DELETION_POLICY: "Delete", c.ANN_WRITER_SELECTOR: SEL}),
        ({"name": "t", "deletionPolicy": "Retain"},
         {c.ANN_CREATION_POLICY: "Owner", c.ANN_DELETION_POLICY: "Retain", c.ANN_WRITER_SELECTOR: SEL}),
        ({"name": "t", "creationPolicy": "Merge",
          "template": {"data": {"b.env": "x", "a.env": "y", "access_token": "z"}}},
         {c.ANN_CREATION_POLICY: "Merge", c.ANN_DELETION_POLICY: "Delete", c.ANN_WRITER_SELECTOR: SEL,
          c.ANN_TEMPLATE_KEYS: "a.env,b.env"}),
        ({"name": "t", "creationPolicy": "Merge"},
         {c.ANN_CREATION_POLICY: "Merge", c.ANN_DELETION_POLICY: "Delete", c.ANN_WRITER_SELECTOR: SEL,
          c.ANN_TEMPLATE_KEYS: ""}),
    ],
)
def test_every_write_records_the_policies_and_scope_and_rotations_keep_them(target: dict[str, Any],
                                                                             recorded: dict[str, str]) -> None:
    from autotek_operator.reconcile import run_pass

    clock, kube, deps = _world()
    if target.get("creationPolicy") == "Merge":
        kube.put_secret(NS, "t", {"theirs": "x"})
    st = run_pass(_cred(target), deps)
    assert _recorded(kube, "t") == recorded
    clock.advance(3600 * 0.67 + 1)
    st = run_pass(st, deps)  # a rotation (a merge patch)
    assert st.token is not None and st.token.access_token == "tok-2"
    assert _recorded(kube, "t") == recorded


def test_a_secret_written_before_the_marks_were_recorded_gets_them_on_its_next_pass() -> None:
    from autotek_operator.reconcile import run_pass

    clock, kube, deps = _world()
    run_pass(_cred({"name": "t"}), deps)
    annotations = kube.secrets[(NS, "t")]["metadata"]["annotations"]
    for key in (c.ANN_CREATION_POLICY, c.ANN_DELETION_POLICY, c.ANN_WRITER_SELECTOR):
        del annotations[key]  # as an older version wrote it
    resumed = _cred({"name": "t"})
    resumed.status = dict(kube.statuses[(NS, "cred")])
    resumed = type(resumed).from_body({"metadata": {"namespace": NS, "name": "cred", "uid": "u", "generation": 1},
                                       "spec": resumed.spec, "status": resumed.status})
    clock.advance(60)
    run_pass(resumed, deps)
    assert deps.tokens.count == 1  # type: ignore[attr-defined]  # no new token: only the marks were written
    assert _recorded(kube, "t")[c.ANN_WRITER_SELECTOR] == SEL


def test_unmerge_without_the_spec_removes_the_recorded_template_keys() -> None:
    from autotek_operator.target import unmerge_patch

    secret = {"metadata": {"resourceVersion": "7", "annotations": {c.ANN_TEMPLATE_KEYS: "a.env,b.env"}},
              "data": {"a.env": "x", "b.env": "y", "access_token": "t", "theirs": "z"}}
    patch = unmerge_patch(secret)
    assert patch["data"] == {"a.env": None, "access_token": None, "b.env": None}
    assert patch["metadata"]["resourceVersion"] == "7"
    assert set(patch["metadata"]["annotations"]) >= {c.ANN_CREDENTIAL, c.ANN_WRITER_SELECTOR, c.ANN_TEMPLATE_KEYS}
    assert patch["metadata"]["labels"] == {c.LABEL_MANAGED_BY: None}
