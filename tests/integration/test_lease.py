"""Leader election's Lease calls on the API server, as the operator's own identity.

On a real API server a Lease's ``renewTime`` and ``acquireTime`` must carry six fractional digits;
a body that lost them is refused with HTTP 400, and no replica can ever lead. This drives the
operator's LeaderElector through its own API calls (kube.Kube), authenticated as the operator's
ServiceAccount with the leader-election Role of manifests/ (admin on the emulator), with a clock
on whole seconds: the case where the fraction was lost.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import kubernetes
import pytest
from harness import Cluster

from autotek_operator import kube
from autotek_operator.leader import FOLLOWING, LEADING, LeaderElector

pytestmark = pytest.mark.integration


def test_lease_create_renew_take_over_and_release(cluster: Cluster, ns: str) -> None:
    identity = cluster.identity()
    cluster.allow_leases(identity, ns)
    api = kube.Kube(kubernetes.config.new_client_from_config(config_file=str(identity.kubeconfig)))
    now = [datetime(2026, 12, 4, 21, 53, 24, tzinfo=UTC)]
    mono = [1000.0]

    def elector(name: str) -> LeaderElector:
        return LeaderElector(api=api, namespace=ns, name="autotek-operator", identity=name,
                             clock=lambda: now[0], monotonic=lambda: mono[0], lease_duration=15)

    a, b = elector("replica-a"), elector("replica-b")
    assert a.try_acquire_or_renew() == LEADING, "the Lease could not be created"
    lease = api.get_lease(ns, "autotek-operator")
    assert lease is not None
    assert lease["spec"]["renewTime"] == lease["spec"]["acquireTime"] == "2026-12-04T21:53:24.000000Z"
    assert b.try_acquire_or_renew() == FOLLOWING

    now[0] += timedelta(seconds=5)
    mono[0] += 5
    assert a.try_acquire_or_renew() == LEADING, "the Lease could not be renewed"
    renewed = api.get_lease(ns, "autotek-operator")
    assert renewed is not None and renewed["spec"]["renewTime"] == "2026-12-04T21:53:29.000000Z"

    # replica-a stops renewing: replica-b sees the record unchanged for the Lease's duration.
    assert b.try_acquire_or_renew() == FOLLOWING
    mono[0] += 16
    now[0] += timedelta(seconds=16)
    assert b.try_acquire_or_renew() == LEADING, "the expired Lease could not be taken over"
    taken = api.get_lease(ns, "autotek-operator")
    assert taken is not None
    assert (taken["spec"]["holderIdentity"], taken["spec"]["leaseTransitions"]) == ("replica-b", 1)
    assert a.try_acquire_or_renew() == FOLLOWING

    b.release()
    released = api.get_lease(ns, "autotek-operator")
    assert released is not None and not released["spec"].get("holderIdentity")
    assert a.try_acquire_or_renew() == LEADING
