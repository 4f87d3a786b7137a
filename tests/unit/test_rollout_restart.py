"""spec.rolloutRestartTargets: workloads restarted after a rotation, once, with a minimum gap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fakes import Clock, FakeKube, FakeTokens

from autotek_operator import errors
from autotek_operator.reconcile import CredentialState, Deps, run_pass
from autotek_operator.scheduling import OwedRestart, next_due, restart_decision
from autotek_operator.timefmt import format_time

NS = "shop"


def setup(enabled: bool = True) -> tuple[Clock, FakeKube, Deps, CredentialState]:
    clock = Clock()
    kube = FakeKube()
    kube.workloads = {("Deployment", NS, "web"): {"spec": {"template": {"metadata": {}}}},
                      ("StatefulSet", NS, "db"): {"spec": {"template": {"metadata": {}}}}}
    kube.put_secret(NS, "client", {"client_id": "id", "client_secret": "s"})
    deps = Deps(kube=kube, tokens=FakeTokens(clock, lifetime=600), clock=clock,  # type: ignore[arg-type]
                rand=lambda: 0.0, rollout_restart=enabled, restart_min_interval=300)
    body: dict[str, Any] = {
        "metadata": {"namespace": NS, "name": "c", "uid": "u", "generation": 1},
        "spec": {"clientSecretRef": {"name": "client"},
                 "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"},
                                           {"kind": "StatefulSet", "name": "db"}]},
    }
    return clock, kube, deps, CredentialState.from_body(body)


def condition(kube: FakeKube, kind: str) -> dict[str, Any]:
    return next(x for x in kube.statuses[(NS, "c")]["conditions"] if x["type"] == kind)


def restarts(kube: FakeKube) -> list[tuple[str, str]]:
    return [x for x in kube.calls if x[0].startswith("restart-")]


def test_first_issue_restarts_nothing_rotation_restarts_each_once() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    assert restarts(kube) == []
    assert condition(kube, "RolloutRestart")["reason"] == "WaitingForRotation"
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    assert restarts(kube) == [("restart-Deployment", "web"), ("restart-StatefulSet", "db")]
    assert condition(kube, "RolloutRestart")["status"] == "True"
    assert "RolloutRestarted" in [e["reason"] for e in kube.events]
    # A pass without a rotation restarts nothing and keeps the condition.
    clock.advance(30)
    run_pass(st, deps)
    assert len(restarts(kube)) == 2
    assert condition(kube, "RolloutRestart")["reason"] == "Restarted"


def events(kube: FakeKube, reason: str) -> list[str]:
    return [e["message"] for e in kube.events if e["reason"] == reason]


def test_a_restart_held_back_by_the_interval_is_made_once_when_it_ends() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)  # first rotation: restarted
    restarted_at = clock.now.replace(microsecond=0)
    assert len(restarts(kube)) == 2
    # Two more rotations inside the 300 s interval: one restart owed per workload, not two.
    for gap in (60, 60):
        st.force_new = "a refresh was requested"
        clock.advance(gap)
        st = run_pass(st, deps)
    assert len(restarts(kube)) == 2
    due = restarted_at + timedelta(seconds=300)
    owed = kube.statuses[(NS, "c")]["pendingRestarts"]
    assert [(o["kind"], o["name"], o["dueAt"]) for o in owed] == [
        ("Deployment", "web", format_time(due)), ("StatefulSet", "db", format_time(due))]
    assert owed[0]["since"] == format_time(restarted_at + timedelta(seconds=60))
    assert st.next_due() == due  # the next pass comes when the interval ends, before the next refresh
    assert condition(kube, "RolloutRestart")["reason"] == "RestartDeferred"
    deferred = events(kube, "RolloutRestartDeferred")
    assert len(deferred) == 1 and f"until {format_time(due)}" in deferred[0], deferred
    # A pass before the due time makes no restart.
    clock.advance(10)
    st = run_pass(st, deps)
    assert len(restarts(kube)) == 2
    # At the due time: restarted, without a token request.
    requests = len(deps.tokens.requests)  # type: ignore[attr-defined]
    clock.now = due
    st = run_pass(st, deps)
    assert restarts(kube)[2:] == [("restart-Deployment", "web"), ("restart-StatefulSet", "db")]
    assert len(deps.tokens.requests) == requests  # type: ignore[attr-defined]
    assert "pendingRestarts" not in kube.statuses[(NS, "c")]
    assert condition(kube, "RolloutRestart")["reason"] == "Restarted"
    made = events(kube, "RolloutRestarted")
    assert len(made) == 2 and "deferred since" in made[-1], made
    assert st.pending_restarts == () and st.next_due() == st.next_refresh
    # And only once.
    clock.advance(30)
    run_pass(st, deps)
    assert len(restarts(kube)) == 4


def test_an_owed_restart_survives_a_restart_of_the_operator() -> None:
    """The debt is in the status: a new state resumed from it (a restart, a new leader) pays it."""
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    st.force_new = "a refresh was requested"
    clock.advance(60)
    run_pass(st, deps)
    body: dict[str, Any] = {
        "metadata": {"namespace": NS, "name": "c", "uid": "u", "generation": 1},
        "spec": st.spec,
        "status": kube.statuses[(NS, "c")],
    }
    resumed = CredentialState.from_body(body)
    assert [o.name for o in resumed.pending_restarts] == ["web", "db"]
    assert resumed.next_due() == resumed.pending_restarts[0].due_at
    clock.now = resumed.pending_restarts[0].due_at
    run_pass(resumed, deps)
    assert len(restarts(kube)) == 4


def test_a_workload_restarted_by_someone_else_meanwhile_owes_nothing() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    st.force_new = "a refresh was requested"
    clock.advance(60)
    st = run_pass(st, deps)
    clock.advance(5)
    for key in (("Deployment", NS, "web"), ("StatefulSet", NS, "db")):  # kubectl rollout restart
        kube.workloads[key]["spec"]["template"]["metadata"]["annotations"][
            "kubectl.kubernetes.io/restartedAt"] = format_time(clock.now)
    clock.now = st.pending_restarts[0].due_at
    st = run_pass(st, deps)
    assert len(restarts(kube)) == 2 and st.pending_restarts == ()


def test_a_target_no_longer_listed_is_owed_nothing() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    st.force_new = "a refresh was requested"
    clock.advance(60)
    st = run_pass(st, deps)
    st.spec = {"clientSecretRef": {"name": "client"}, "rolloutRestartTargets": [{"kind": "StatefulSet", "name": "db"}]}
    clock.now = st.pending_restarts[0].due_at
    st = run_pass(st, deps)
    assert restarts(kube)[2:] == [("restart-StatefulSet", "db")] and st.pending_restarts == ()


def test_a_failed_owed_restart_is_retried_later_not_in_a_loop() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    st.force_new = "a refresh was requested"
    clock.advance(60)
    st = run_pass(st, deps)
    real = kube.restart_workload

    def broken(*a: Any) -> Any:
        raise errors.KubernetesAPIError("Kubernetes API patch deployments failed: HTTP 500")

    kube.restart_workload = broken  # type: ignore[method-assign]
    clock.now = st.pending_restarts[0].due_at
    st = run_pass(st, deps)
    assert condition(kube, "RolloutRestart")["reason"] == "RestartFailed"
    assert [o.due_at for o in st.pending_restarts] == [clock.now + timedelta(seconds=30)] * 2
    kube.restart_workload = real  # type: ignore[method-assign]
    clock.advance(30)
    st = run_pass(st, deps)
    assert len(restarts(kube)) == 4 and st.pending_restarts == ()


def test_missing_target_is_a_condition_and_rotation_goes_on() -> None:
    clock, kube, deps, st = setup()
    del kube.workloads[("StatefulSet", NS, "db")]
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    run_pass(st, deps)
    cond = condition(kube, "RolloutRestart")
    assert (cond["status"], cond["reason"]) == ("False", "RestartTargetNotFound")
    assert "StatefulSet db" in cond["message"]
    assert condition(kube, "Ready")["status"] == "True"
    assert restarts(kube) == [("restart-Deployment", "web")]


def test_disabled_feature_says_so() -> None:
    clock, kube, deps, st = setup(enabled=False)
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    run_pass(st, deps)
    assert condition(kube, "RolloutRestart")["reason"] == "RolloutRestartDisabled"
    assert restarts(kube) == []


def test_api_failure_on_restart_does_not_stop_rotation() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)

    def broken(*a: Any) -> Any:
        raise errors.KubernetesAPIError("Kubernetes API get deployments failed: HTTP 500")

    kube.get_workload = broken  # type: ignore[method-assign]
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    assert condition(kube, "RolloutRestart")["reason"] == "RestartFailed"
    assert condition(kube, "Ready")["status"] == "True"
    assert st.token is not None and st.token.access_token == "tok-2"


@pytest.mark.parametrize("targets", [[], None])
def test_no_targets_no_condition(targets: Any) -> None:
    clock, kube, deps, st = setup()
    st.spec = {"clientSecretRef": {"name": "client"}, "rolloutRestartTargets": targets}
    run_pass(st, deps)
    assert [x["type"] for x in kube.statuses[(NS, "c")]["conditions"]] == ["Ready"]


# -- the pure decision, as a table (time injected) -----------------------------------------------

_T = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else _T + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("last", "owed_since", "now", "interval", "decision", "due"),
    [
        (None, None, 0, 300, "now", None),  # never restarted
        (-300, None, 0, 300, "now", None),  # exactly the interval ago
        (-301, None, 0, 300, "now", None),
        (-60, None, 0, 300, "defer", 240),  # 60 s ago: due when the interval ends
        (-1, None, 0, 300, "defer", 299),
        (-60, None, 0, 0, "now", None),  # no minimum interval
        (-60, -30, 0, 300, "defer", 240),  # owed since a rotation after the last restart
        (-300, -30, 0, 300, "now", None),  # owed and the interval is over: now
        (-10, -30, 0, 300, "paid", None),  # restarted (by anyone) after the rotation it is owed for
        (-30, -30, 0, 300, "defer", 270),  # in the same second: not proof enough, still owed
        (None, -30, 0, 300, "now", None),
    ],
)
def test_restart_decision(last: float | None, owed_since: float | None, now: float, interval: float,
                          decision: str, due: float | None) -> None:
    assert restart_decision(_at(last), _at(owed_since), _T + timedelta(seconds=now), interval) == (decision, _at(due))


@pytest.mark.parametrize(
    ("next_refresh", "owed", "expected"),
    [
        (None, (), None),
        (100, (), 100),
        (100, (40,), 40),
        (100, (400, 200), 100),
        (None, (400, 200), 200),
    ],
)
def test_next_due_is_the_refresh_or_the_earliest_owed_restart(next_refresh: float | None, owed: tuple[float, ...],
                                                                 expected: float | None) -> None:
    debts = tuple(OwedRestart("Deployment", f"w{i}", _T, _T + timedelta(seconds=s)) for i, s in enumerate(owed))
    assert next_due(_at(next_refresh), debts) == _at(expected)


async def test_the_runtime_schedules_the_next_pass_at_the_owed_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The credential's next pass is min(nextRefreshTime, earliest dueAt), not the refresh alone."""
    from fakes import real_now, running_runtime, settle

    from autotek_operator import scheduling

    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS) as (runtime, kube, _):
        runtime.deps.rollout_restart = True
        recent = format_time(real_now())
        kube.workloads = {("Deployment", NS, "web"): {
            "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": recent}}}}}}
        body: dict[str, Any] = {"metadata": {"namespace": NS, "name": "c", "uid": "u", "generation": 1},
                                "spec": {"clientSecretRef": {"name": "client"},
                                         "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"}]}}
        runtime.on_credential_event(None, body)
        await settle(runtime)
        body["metadata"]["annotations"] = {"autotek.io/refresh-requested-at": "now"}  # a rotation
        runtime.on_credential_event("MODIFIED", body)
        await settle(runtime)
        st = runtime.states[(NS, "c")]
        assert [o.name for o in st.pending_restarts] == ["web"]
        due = runtime.due_at((NS, "c"))
        assert st.next_refresh is not None and due is not None and due < st.next_refresh
        assert due == st.pending_restarts[0].due_at
