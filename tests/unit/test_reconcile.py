"""The reconcile pass against in-memory fakes: decisions, writes, status and Events."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from fakes import T0, Clock, FakeKube, FakeTokens, b64, unb64

from autotek_operator import constants as c
from autotek_operator import errors
from autotek_operator.reconcile import CredentialState, Deps, cleanup_deleted, run_pass
from autotek_operator.timefmt import format_time

NS = "shop"
SECRET = "s3cr3t-value"


def body(spec: dict[str, Any] | None = None, *, generation: int = 1, status: dict[str, Any] | None = None,
         annotations: dict[str, str] | None = None, uid: str = "uid-cred") -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": "autotek", "uid": uid, "generation": generation,
                     "annotations": annotations or {}},
        "spec": spec if spec is not None else {"clientSecretRef": {"name": "autotek-client"}},
        "status": status or {},
    }


@pytest.fixture
def world() -> tuple[Clock, FakeKube, FakeTokens, Deps]:
    clock = Clock()
    kube = FakeKube()
    kube.put_secret(NS, "autotek-client", {"client_id": "my-id", "client_secret": SECRET})
    tokens = FakeTokens(clock)
    deps = Deps(kube=kube, tokens=tokens, clock=clock, rand=lambda: 0.0)  # type: ignore[arg-type]
    return clock, kube, tokens, deps


def ready(kube: FakeKube) -> dict[str, Any]:
    return kube.statuses[(NS, "autotek")]["conditions"][0]


def test_first_pass_issues_token_and_writes_everything(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)

    assert len(tokens.requests) == 1
    req = tokens.requests[0]
    assert (req.client_id, req.client_secret) == ("my-id", SECRET)
    secret = kube.secrets[(NS, "autotek")]
    data = {k: unb64(v) for k, v in secret["data"].items()}
    expires = T0 + timedelta(seconds=3600)
    assert data == {
        "access_token": "tok-1",
        "token_type": "bearer",
        "authorization": "Bearer tok-1",
        "expires_at": format_time(expires),
        "scope": "",
    }
    meta = secret["metadata"]
    assert meta["labels"][c.LABEL_MANAGED_BY] == "autotek-operator"
    assert meta["annotations"][c.ANN_CREDENTIAL] == "autotek"
    assert meta["annotations"][c.ANN_EXPIRES_AT] == format_time(expires)
    assert meta["annotations"][c.ANN_REFRESHED_AT] == format_time(T0)
    assert meta["ownerReferences"] == [
        {"apiVersion": "autotek.io/v1alpha1", "kind": "AutoTekCredential", "name": "autotek",
         "uid": "uid-cred", "controller": True}
    ]
    assert secret["type"] == "Opaque"

    status = kube.statuses[(NS, "autotek")]
    assert status["observedGeneration"] == 1
    assert status["secretName"] == "autotek"
    assert status["tokenType"] == "bearer"
    assert status["expiresAt"] == format_time(expires)
    assert status["lastRefreshTime"] == format_time(T0)
    # rand=0: no jitter, refresh at two thirds (67 %) of the lifetime.
    assert status["nextRefreshTime"] == format_time(T0 + timedelta(seconds=3600 * 0.67))
    assert status["failedAttempts"] == 0
    assert "lastFailureTime" not in status
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("True", "TokenIssued")
    assert [e["reason"] for e in kube.events] == ["TokenIssued"]
    assert st.next_refresh == T0 + timedelta(seconds=3600 * 0.67)


def test_pass_before_due_makes_no_request_and_no_write(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    kube.calls.clear()
    clock.advance(60)
    run_pass(st, deps)
    assert len(tokens.requests) == 1
    assert kube.calls == []  # not even a read: the Secret as written is known
    assert ("status", "autotek") not in kube.calls  # nothing changed: no status patch either


def test_due_pass_rotates(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    clock.advance(3600 * 0.67 + 1)
    kube.calls.clear()
    st = run_pass(st, deps)
    # The minimum: write the Secret, patch status once, record the rotation.
    assert kube.calls == [("patch", "autotek"), ("event", "TokenRotated"), ("status", "autotek")]
    assert len(tokens.requests) == 2
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-2"
    assert [e["reason"] for e in kube.events] == ["TokenIssued", "TokenRotated"]


def _content(secret: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in secret["metadata"].items() if k not in ("resourceVersion", "uid")}
    return {"type": secret.get("type"), "metadata": meta, "data": secret["data"]}


@pytest.mark.parametrize(
    "spec",
    [
        {"clientSecretRef": {"name": "autotek-client"}},
        {"clientSecretRef": {"name": "autotek-client"}, "scope": "read",
         "target": {"template": {"labels": {"team": "a"}, "annotations": {"note": "n"},
                                 "data": {"config.json": '{"token": "{{ .access_token }}"}'}}}},
        {"clientSecretRef": {"name": "autotek-client"}, "target": {"deletionPolicy": "Retain"}},
    ],
    ids=["plain", "templates", "retain"],
)
def test_rotation_patch_leaves_the_secret_as_a_full_write_would(world: Any, spec: dict[str, Any]) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body(spec)), deps)
    clock.advance(3600 * 0.67 + 1)
    patched = run_pass(st, deps)
    assert kube.calls[-3][0] == "patch"
    rotated = copy.deepcopy(kube.secrets[(NS, "autotek")])
    # The same rotation again, from a Secret whose content the pass must read (a full write).
    kube2, tokens2 = FakeKube(), FakeTokens(clock)
    kube2.secrets = copy.deepcopy({k: v for k, v in kube.secrets.items() if k != (NS, "autotek")})
    replayed = copy.deepcopy(patched)
    replayed.target_body = None
    replayed.target_version = None
    run_pass(replayed, Deps(kube=kube2, tokens=tokens2, clock=clock, rand=lambda: 0.0))  # type: ignore[arg-type]
    assert ("create", "autotek") in kube2.calls  # no token needed: the held one is written in full
    assert _content(kube2.secrets[(NS, "autotek")]) == _content(rotated)


def test_rotation_patch_drops_a_template_key_the_new_token_cannot_fill(world: Any) -> None:
    clock, kube, tokens, deps = world
    spec = {"clientSecretRef": {"name": "autotek-client"},
            "target": {"template": {"data": {"big": "{{ .access_token }}" * 40}}}}
    st = run_pass(CredentialState.from_body(body(spec)), deps)
    assert "big" in kube.secrets[(NS, "autotek")]["data"]
    clock.advance(3600 * 0.67 + 1)
    tokens.token_value = lambda n: "t" * 2000  # renders to more than 64 KiB: left out
    run_pass(st, deps)
    data = kube.secrets[(NS, "autotek")]["data"]
    assert unb64(data["access_token"]) == "t" * 2000
    assert "big" not in data


def test_rotation_of_a_secret_changed_meanwhile_reads_it_again(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    kube.secrets[(NS, "autotek")]["metadata"]["labels"]["added-by"] = "someone"  # the watch has not told us
    kube.secrets[(NS, "autotek")]["metadata"]["resourceVersion"] = "999"
    clock.advance(3600 * 0.67 + 1)
    kube.calls.clear()
    st = run_pass(st, deps)
    assert [call[0] for call in kube.calls[:3]] == ["patch", "get", "replace"]
    secret = kube.secrets[(NS, "autotek")]
    assert unb64(secret["data"]["access_token"]) == "tok-2"
    assert secret["metadata"]["labels"]["added-by"] == "someone"  # others' labels are kept


def test_rotation_of_a_secret_deleted_meanwhile_creates_it(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    del kube.secrets[(NS, "autotek")]  # the watch has not told us
    clock.advance(3600 * 0.67 + 1)
    kube.calls.clear()
    run_pass(st, deps)
    assert [call[0] for call in kube.calls[:2]] == ["patch", "create"]
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-2"


def test_rotation_of_a_taken_over_secret_stops(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    kube.secrets[(NS, "autotek")] = {"type": "Opaque", "metadata": {"name": "autotek", "namespace": NS,
                                      "resourceVersion": "998"}, "data": {"theirs": b64("x")}}
    clock.advance(3600 * 0.67 + 1)
    run_pass(st, deps)
    assert kube.secrets[(NS, "autotek")]["data"] == {"theirs": b64("x")}
    assert ready(kube)["reason"] == c.REASON_TARGET_CONFLICT


def test_deleted_target_is_restored_without_token_request(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    del kube.secrets[(NS, "autotek")]
    st.target_body = None  # what the Secret watch reports
    clock.advance(30)
    run_pass(st, deps)
    assert len(tokens.requests) == 1
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-1"
    assert kube.events[-1]["reason"] == c.EVENT_RESTORED


def test_edited_target_is_restored(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    kube.secrets[(NS, "autotek")]["data"]["access_token"] = b64("tampered")
    kube.secrets[(NS, "autotek")]["data"]["extra"] = b64("x")
    st.target_body = kube.get_secret(NS, "autotek")  # what the Secret watch reports
    kube.calls.clear()
    run_pass(st, deps)
    assert ("get", "autotek") not in kube.calls  # the watch's copy is used, not read again
    data = kube.secrets[(NS, "autotek")]["data"]
    assert unb64(data["access_token"]) == "tok-1"
    assert "extra" not in data
    assert len(tokens.requests) == 1


def test_transient_failure_keeps_valid_token_and_ready(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    clock.advance(3600 * 0.67 + 1)
    tokens.errors.append(errors.TokenEndpointUnavailable("the token endpoint failed (HTTP 503)"))
    st = run_pass(st, deps)
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-1"
    cond = ready(kube)
    assert cond["status"] == "True"
    assert "HTTP 503" in cond["message"]
    status = kube.statuses[(NS, "autotek")]
    assert status["failedAttempts"] == 1
    assert status["lastFailureTime"] == format_time(clock.now)
    assert status["lastFailureReason"] == c.REASON_TOKEN_ENDPOINT_UNAVAILABLE
    assert kube.events[-1]["event_type"] == "Warning"
    # Backoff: first retry after about 5 s, lifted to the 10 s floor.
    assert st.next_refresh == clock.now + timedelta(seconds=10)
    # Recovery clears the failure fields.
    clock.advance(10)
    run_pass(st, deps)
    status = kube.statuses[(NS, "autotek")]
    assert status["failedAttempts"] == 0
    assert "lastFailureTime" not in status
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-2"


def test_backoff_is_respected_when_other_triggers_arrive(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    clock.advance(3600 * 0.67 + 1)
    tokens.errors.extend([errors.TokenEndpointUnavailable("down")] * 3)
    st = run_pass(st, deps)
    st = run_pass(st, deps)  # e.g. a target Secret event right after: no new request
    assert len(tokens.requests) == 2


def test_outage_past_expiry_turns_expired_then_recovers(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    tokens.errors.extend([errors.TokenEndpointUnavailable("down")] * 100)
    for _ in range(60):
        assert st.next_refresh is not None
        # Never scheduled past the held token's expiry while it is valid.
        if st.token and st.token.valid(clock.now):
            assert st.next_refresh <= st.token.expires_at
        clock.now = max(clock.now, st.next_refresh)
        st = run_pass(st, deps)
        if ready(kube)["status"] == "False":
            break
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "Expired")
    assert any(e["reason"] == c.EVENT_EXPIRED for e in kube.events)
    # The expired token is left in place (nothing newer to put there).
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-1"
    tokens.errors.clear()
    clock.now = st.next_refresh or clock.now
    run_pass(st, deps)
    assert ready(kube)["status"] == "True"
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-2"


def test_invalid_client_without_token(world: Any) -> None:
    clock, kube, tokens, deps = world
    tokens.errors.append(errors.InvalidClient("the token endpoint refused the client credentials (HTTP 401)"))
    st = run_pass(CredentialState.from_body(body()), deps)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidClient")
    warning = kube.events[-1]
    assert warning["reason"] == "InvalidClient"
    assert "application/x-www-form-urlencoded" in warning["message"]  # AutoTek's checklist
    assert (NS, "autotek") not in kube.secrets
    # Credential failures back off slowly: about a minute.
    assert st.next_refresh is not None
    assert timedelta(seconds=45) <= st.next_refresh - clock.now <= timedelta(seconds=75)


def test_client_secret_missing_and_key_missing(world: Any) -> None:
    clock, kube, tokens, deps = world
    del kube.secrets[(NS, "autotek-client")]
    st = run_pass(CredentialState.from_body(body()), deps)
    assert ready(kube)["reason"] == c.REASON_CLIENT_SECRET_NOT_FOUND
    kube.put_secret(NS, "autotek-client", {"client_id": "my-id"})
    st.force_new = "the client Secret changed"
    clock.advance(60)
    st = run_pass(st, deps)
    assert ready(kube)["reason"] == c.REASON_CLIENT_SECRET_KEY_MISSING
    assert "client_secret" in ready(kube)["message"]
    assert tokens.requests == []


def test_invalid_spec(world: Any) -> None:
    clock, kube, tokens, deps = world
    run_pass(CredentialState.from_body(body({"clientSecretRef": {"name": "x"}, "clientAuthMethod": "Magic"})), deps)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "clientAuthMethod" in cond["message"]
    assert tokens.requests == []


def test_disallowed_url_makes_no_request(world: Any) -> None:
    clock, kube, tokens, deps = world
    tokens.allowed = False
    st = run_pass(CredentialState.from_body(body()), deps)
    assert ready(kube)["reason"] == c.REASON_TOKEN_URL_NOT_ALLOWED
    assert tokens.requests == []
    assert st.next_refresh is None  # only a change can help


def test_owner_conflict_never_touches_foreign_secret(world: Any) -> None:
    clock, kube, tokens, deps = world
    foreign = kube.put_secret(NS, "autotek", {"k": "v"})
    before = dict(foreign["data"])
    run_pass(CredentialState.from_body(body()), deps)
    assert ready(kube)["reason"] == c.REASON_TARGET_CONFLICT
    assert kube.secrets[(NS, "autotek")]["data"] == before
    assert tokens.requests == []


def test_second_credential_on_same_secret_conflicts(world: Any) -> None:
    clock, kube, tokens, deps = world
    run_pass(CredentialState.from_body(body()), deps)
    other = body({"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "autotek"}}, uid="uid-other")
    other["metadata"]["name"] = "other"
    run_pass(CredentialState.from_body(other), deps)
    assert kube.statuses[(NS, "other")]["conditions"][0]["reason"] == c.REASON_TARGET_CONFLICT
    assert unb64(kube.secrets[(NS, "autotek")]["data"]["access_token"]) == "tok-1"


def test_merge_keeps_foreign_keys_and_metadata(world: Any) -> None:
    clock, kube, tokens, deps = world
    kube.put_secret(NS, "app", {"other": "keep"}, labels={"team": "a"}, annotations={"note": "x"})
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "app", "creationPolicy": "Merge"}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    secret = kube.secrets[(NS, "app")]
    assert unb64(secret["data"]["other"]) == "keep"
    assert unb64(secret["data"]["access_token"]) == "tok-1"
    assert secret["metadata"]["labels"]["team"] == "a"
    assert secret["metadata"]["annotations"]["note"] == "x"
    assert "ownerReferences" not in secret["metadata"]
    assert ready(kube)["status"] == "True"


def test_merge_needs_existing_secret(world: Any) -> None:
    clock, kube, tokens, deps = world
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "app", "creationPolicy": "Merge"}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    assert ready(kube)["reason"] == c.REASON_TARGET_NOT_FOUND
    assert tokens.requests == []


def test_merge_refuses_non_opaque(world: Any) -> None:
    clock, kube, tokens, deps = world
    kube.put_secret(NS, "sa", {"token": "t"}, type="kubernetes.io/service-account-token")
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "sa", "creationPolicy": "Merge"}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    assert ready(kube)["reason"] == c.REASON_TARGET_CONFLICT
    assert kube.writes() == []


def test_retain_sets_no_owner_reference(world: Any) -> None:
    clock, kube, tokens, deps = world
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"deletionPolicy": "Retain"}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    assert "ownerReferences" not in kube.secrets[(NS, "autotek")]["metadata"]
    cleanup_deleted(body(spec), deps)
    assert (NS, "autotek") in kube.secrets


def test_delete_policy_removes_owned_secret_and_merge_keys(world: Any) -> None:
    clock, kube, tokens, deps = world
    run_pass(CredentialState.from_body(body()), deps)
    cleanup_deleted(body(), deps)
    assert (NS, "autotek") not in kube.secrets

    kube.put_secret(NS, "app", {"other": "keep"})
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "app", "creationPolicy": "Merge"}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    cleanup_deleted(body(spec), deps)
    secret = kube.secrets[(NS, "app")]
    assert set(secret["data"]) == {"other"}
    assert c.ANN_CREDENTIAL not in secret["metadata"].get("annotations", {})


def test_restart_resumes_without_token_request(world: Any) -> None:
    clock, kube, tokens, deps = world
    run_pass(CredentialState.from_body(body()), deps)
    status = dict(kube.statuses[(NS, "autotek")])
    clock.advance(120)
    # A new process: state rebuilt from the stored status and the Secret.
    st = run_pass(CredentialState.from_body(body(status=status)), deps)
    assert len(tokens.requests) == 1
    assert st.token is not None and st.token.access_token == "tok-1"
    assert st.next_refresh == T0 + timedelta(seconds=3600 * 0.67)
    assert kube.writes() == [("create", "autotek")]


def test_restart_after_due_time_refreshes(world: Any) -> None:
    clock, kube, tokens, deps = world
    run_pass(CredentialState.from_body(body()), deps)
    status = dict(kube.statuses[(NS, "autotek")])
    clock.advance(3600 * 0.7)
    run_pass(CredentialState.from_body(body(status=status)), deps)
    assert len(tokens.requests) == 2


def test_spec_change_and_refresh_annotation_force_new_token(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    clock.advance(30)
    st.generation = 2
    st = run_pass(st, deps)
    assert len(tokens.requests) == 2
    assert kube.statuses[(NS, "autotek")]["observedGeneration"] == 2
    clock.advance(30)
    st.refresh_request = "2026-11-28T04:01:00Z"
    st = run_pass(st, deps)
    assert len(tokens.requests) == 3
    assert kube.statuses[(NS, "autotek")]["lastRefreshRequest"] == "2026-11-28T04:01:00Z"
    clock.advance(30)
    run_pass(st, deps)
    assert len(tokens.requests) == 3  # the same annotation value is not a new request


def test_floor_limits_forced_requests(world: Any) -> None:
    clock, kube, tokens, deps = world
    st = run_pass(CredentialState.from_body(body()), deps)
    clock.advance(3)
    st.force_new = "a refresh was requested"
    st = run_pass(st, deps)
    assert len(tokens.requests) == 1
    assert st.next_refresh == T0 + timedelta(seconds=10)
    clock.now = st.next_refresh
    run_pass(st, deps)
    assert len(tokens.requests) == 2


def test_nothing_secret_in_status_events_or_state_repr(world: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock, kube, tokens, deps = world
    caplog.set_level("DEBUG")
    st = run_pass(CredentialState.from_body(body()), deps)
    tokens.errors.append(errors.InvalidClient("refused"))
    clock.advance(3000)
    st = run_pass(st, deps)
    text = repr(kube.statuses) + repr(kube.events) + repr(st) + caplog.text
    for needle in (SECRET, "tok-1", b64(SECRET), b64("tok-1")):
        assert needle not in text


def test_change_right_after_failure_retries_at_the_floor(world: Any) -> None:
    clock, kube, tokens, deps = world
    tokens.errors.append(errors.InvalidClient("refused"))
    st = run_pass(CredentialState.from_body(body()), deps)
    assert st.next_refresh is not None and st.next_refresh - clock.now >= timedelta(seconds=45)
    clock.advance(2)
    st.force_new = "the client Secret changed"
    st.client = None
    st = run_pass(st, deps)
    # Too soon for another request: deferred to the floor, failure record kept.
    assert len(tokens.requests) == 1
    assert st.next_refresh == T0 + timedelta(seconds=10)
    assert ready(kube)["reason"] == "InvalidClient"
    assert kube.statuses[(NS, "autotek")]["failedAttempts"] == 1
    clock.now = st.next_refresh
    run_pass(st, deps)
    assert len(tokens.requests) == 2
    assert ready(kube)["status"] == "True"


@pytest.mark.parametrize("policy", ["Owner", "Merge"])
def test_service_account_token_secret_is_never_a_target(world: Any, policy: str) -> None:
    clock, kube, tokens, deps = world
    sa = kube.put_secret(NS, "builder-token", {"token": "sa-jwt"}, type="kubernetes.io/service-account-token",
                         annotations={"kubernetes.io/service-account.name": "builder"})
    before = copy.deepcopy(sa)
    spec = {"clientSecretRef": {"name": "autotek-client"}, "target": {"name": "builder-token",
                                                                      "creationPolicy": policy}}
    run_pass(CredentialState.from_body(body(spec)), deps)
    assert ready(kube)["reason"] == c.REASON_TARGET_CONFLICT
    assert kube.secrets[(NS, "builder-token")] == before
    assert kube.writes() == [] and tokens.requests == []
