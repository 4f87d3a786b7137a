"""spec.rolloutRestartTargets: workloads restarted after a rotation, once, with a minimum gap."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import Clock, FakeKube, FakeTokens

from autotek_operator import errors
from autotek_operator.reconcile import CredentialState, Deps, run_pass

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


def test_minimum_gap_between_restarts() -> None:
    clock, kube, deps, st = setup()
    st = run_pass(st, deps)
    clock.advance(600 * 0.67 + 1)
    st = run_pass(st, deps)
    st.force_new = "a refresh was requested"  # a second rotation 60 s later
    clock.advance(60)
    run_pass(st, deps)
    assert len(restarts(kube)) == 2
    assert "RolloutRestartSkipped" in [e["reason"] for e in kube.events]


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
