"""Lease-based leader election against an in-memory Lease API, with a hand-driven clock."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from fakes import Clock

from autotek_operator import errors
from autotek_operator.kube import Conflict
from autotek_operator.leader import FOLLOWING, LEADING, UNKNOWN, LeaderElector


class FakeLeases:
    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = itertools.count(1)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise errors.KubernetesAPIError("Kubernetes API get leases failed: ConnectionRefusedError")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        lease = self.leases.get((namespace, name))
        return copy.deepcopy(lease) if lease else None

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        key = (namespace, body["metadata"]["name"])
        if key in self.leases:
            raise Conflict("exists")
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        self.leases[key] = obj
        return obj

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        cur = self.leases[(namespace, name)]
        if body["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]:
            raise Conflict("stale")
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        self.leases[(namespace, name)] = obj
        return obj


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env() -> tuple[FakeLeases, Clock, Mono]:
    return FakeLeases(), Clock(), Mono()


def elector(env: tuple[FakeLeases, Clock, Mono], identity: str) -> LeaderElector:
    api, clock, mono = env
    return LeaderElector(api=api, namespace="autotek-system", name="autotek-operator", identity=identity,
                         clock=clock, monotonic=mono)


def holder(env: tuple[FakeLeases, Clock, Mono]) -> str:
    return env[0].leases[("autotek-system", "autotek-operator")]["spec"]["holderIdentity"]


def test_first_replica_leads_second_follows(env: Any) -> None:
    a, b = elector(env, "a"), elector(env, "b")
    assert a.try_acquire_or_renew() == LEADING
    assert b.try_acquire_or_renew() == FOLLOWING
    assert holder(env) == "a"
    assert env[0].leases[("autotek-system", "autotek-operator")]["spec"]["leaseDurationSeconds"] == 30


def test_leader_renews_and_keeps_leading(env: Any) -> None:
    api, clock, mono = env
    a, b = elector(env, "a"), elector(env, "b")
    a.try_acquire_or_renew()
    for _ in range(20):
        mono.t += 5
        assert a.try_acquire_or_renew() == LEADING
        assert b.try_acquire_or_renew() == FOLLOWING


def test_takeover_only_after_the_lease_went_unrenewed_for_its_duration(env: Any) -> None:
    api, clock, mono = env
    a, b = elector(env, "a"), elector(env, "b")
    a.try_acquire_or_renew()
    assert b.try_acquire_or_renew() == FOLLOWING  # b first sees the record now
    mono.t += 29
    assert b.try_acquire_or_renew() == FOLLOWING
    mono.t += 2
    assert b.try_acquire_or_renew() == LEADING
    assert holder(env) == "b"
    assert env[0].leases[("autotek-system", "autotek-operator")]["spec"]["leaseTransitions"] == 1
    # The old leader, if it comes back, finds it lost the Lease.
    assert a.try_acquire_or_renew() == FOLLOWING
    assert a.still_leading(FOLLOWING) is False


def test_skewed_clock_of_the_holder_does_not_matter(env: Any) -> None:
    api, clock, mono = env
    a, b = elector(env, "a"), elector(env, "b")
    clock.advance(-3600)  # a writes renewTime an hour in the past
    a.try_acquire_or_renew()
    clock.advance(3600)
    assert b.try_acquire_or_renew() == FOLLOWING  # judged by b's own observation, not the timestamp


def test_leader_steps_down_before_anyone_may_take_over(env: Any) -> None:
    api, clock, mono = env
    a = elector(env, "a")
    assert a.try_acquire_or_renew() == LEADING
    api.down = True
    mono.t += 10
    result = a.try_acquire_or_renew()
    assert result == UNKNOWN
    assert a.still_leading(result) is True  # a passing API error: keep going until the deadline
    mono.t += 11
    assert a.still_leading(a.try_acquire_or_renew()) is False  # 21 s > renew deadline (20 s) < lease (30 s)


def test_simultaneous_acquire_only_one_wins(env: Any) -> None:
    a, b = elector(env, "a"), elector(env, "b")
    api = env[0]
    real_get = api.get_lease
    # Both read "no lease" before either creates it.
    api.get_lease = lambda ns, name: None  # type: ignore[method-assign]
    assert a.try_acquire_or_renew() == LEADING
    assert b.try_acquire_or_renew() == FOLLOWING  # create conflicts
    api.get_lease = real_get  # type: ignore[method-assign]
    assert holder(env) == "a"


def test_release_lets_the_other_take_over_at_once(env: Any) -> None:
    api, clock, mono = env
    a, b = elector(env, "a"), elector(env, "b")
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    a.release()
    assert holder(env) == ""
    assert b.try_acquire_or_renew() == LEADING


def test_release_by_a_non_holder_changes_nothing(env: Any) -> None:
    a, b = elector(env, "a"), elector(env, "b")
    a.try_acquire_or_renew()
    b.release()
    assert holder(env) == "a"


def test_deadline_passed_is_judged_without_a_renewal_call(env: Any) -> None:
    api, clock, mono = env
    a = elector(env, "a")
    assert a.deadline_passed()  # never renewed
    a.try_acquire_or_renew()
    mono.t += 19
    assert not a.deadline_passed()
    mono.t += 1
    assert a.deadline_passed()
