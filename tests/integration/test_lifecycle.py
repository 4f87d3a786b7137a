"""Operator lifecycle: two replicas with leader election, failover, graceful shutdown."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Broker, Client, Cluster, Operator, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def solo(operator: Operator) -> Iterator[None]:
    """Stop the session's operator for the test (it would also act on the test's credentials)."""
    operator.stop()
    yield
    operator.start()


@pytest.fixture(autouse=True)
def _broker_defaults(broker: Broker) -> Iterator[None]:
    broker.control(lifetime=3600, fail=None, script=[], delay=0)
    yield
    broker.control(lifetime=3600, fail=None, script=[], delay=0)


def _spec(broker: Broker) -> dict[str, Any]:
    return {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url}


def _token(cluster: Cluster, ns: str) -> str | None:
    data = cluster.secret_data(ns, "autotek")
    return data.get("access_token") if data else None


def test_two_replicas_one_leader_failover(cluster: Cluster, broker: Broker, workdir: Path, ns: str,
                                          client: Client, solo: None) -> None:
    replicas = {}
    for name in ("a", "b"):
        replicas[name] = Operator(cluster, broker, workdir / name, extra_env={
            "AUTOTEK_LEADER_ELECTION": "true",
            "AUTOTEK_LEADER_ELECTION_NAMESPACE": ns,
            "POD_NAME": f"replica-{name}",
        })
        (workdir / name).mkdir(exist_ok=True)
        replicas[name].start()
    try:
        leader_name = wait_for("a leader", lambda: next(
            (n for n, op in replicas.items() if "leading: running passes" in op.log_text()), None), timeout=30)
        follower_name = "b" if leader_name == "a" else "a"
        broker.control(lifetime=20)
        cluster.create_credential(ns, "autotek", _spec(broker))
        wait_for("Ready", lambda: (cluster.ready(ns, "autotek") or {}).get("status") == "True")
        first = _token(cluster, ns)
        wait_for("a rotation", lambda: _token(cluster, ns) not in (first, None), timeout=40)
        assert "requesting a token" not in replicas[follower_name].log_text()

        # The leader dies without a chance to release its Lease.
        killed_at = time.monotonic()
        replicas[leader_name].stop(signal.SIGKILL)
        wait_for("the follower to take over", lambda: "leading: running passes" in
                 replicas[follower_name].log_text(), timeout=60)
        failover = time.monotonic() - killed_at
        assert failover < 60, f"failover took {failover:.0f}s"
        current = _token(cluster, ns)
        wait_for("a rotation by the new leader", lambda: _token(cluster, ns) not in (current, None), timeout=60)
        assert "requesting a token" in replicas[follower_name].log_text()

        reqs = broker.requests_for(client.client_id)
        gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(reqs)]
        assert all(g >= 5 for g in gaps), f"two token requests for one refresh: gaps {gaps}"
        assert all(r["status"] == 200 for r in reqs)
        assert (cluster.ready(ns, "autotek") or {}).get("status") == "True"
    finally:
        for op in replicas.values():
            op.stop()


def test_graceful_shutdown_finishes_the_refresh_in_flight(cluster: Cluster, broker: Broker, workdir: Path,
                                                          ns: str, client: Client, solo: None) -> None:
    op = Operator(cluster, broker, workdir / "graceful")
    (workdir / "graceful").mkdir(exist_ok=True)
    op.start()
    try:
        broker.control(delay=4)
        cluster.create_credential(ns, "autotek", _spec(broker))
        wait_for("the token request to be in flight", lambda: broker.stats()["in_flight"] >= 1, timeout=15)
        started = time.monotonic()
        op.stop(signal.SIGTERM)
        assert time.monotonic() - started < 25, "shutdown took longer than the grace period"
        # The request in flight was allowed to finish, and its token written whole.
        data = cluster.secret_data(ns, "autotek")
        assert data is not None, "the refresh in flight was abandoned"
        assert data["authorization"] == f"Bearer {data['access_token']}"
        assert data["access_token"] in broker.stats()["tokens"]
    finally:
        op.stop()
