"""Broker protection: a global bound on concurrent token requests; identical clients share requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Broker, Client, Cluster, Operator, new_client, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def bounded_operator(operator: Operator, cluster: Cluster, broker: Broker, workdir: Path) -> Iterator[Operator]:
    """An operator of its own with AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS=3 (the session's is stopped)."""
    operator.stop()
    (workdir / "bounded").mkdir(exist_ok=True)
    op = Operator(cluster, broker, workdir / "bounded", extra_env={"AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS": "3"})
    op.start()
    yield op
    op.stop()
    broker.control(delay=0)
    operator.start()


def ready_count(cluster: Cluster, ns: str) -> int:
    return sum(
        1 for item in cluster.list_credentials()
        if item["metadata"]["namespace"] == ns
        and any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (item.get("status") or {}).get("conditions") or [])
    )


def test_burst_respects_the_concurrency_bound(cluster: Cluster, broker: Broker, ns: str,
                                              bounded_operator: Operator) -> None:
    n = 24
    clients = [new_client(cluster, broker, ns, secret_name=f"client-{i}") for i in range(n)]
    broker.control(delay=0.5)
    broker._call("POST", "/_stats/reset")
    for i in range(n):
        cluster.create_credential(ns, f"c{i}", {"clientSecretRef": {"name": f"client-{i}"},
                                                "tokenURL": broker.token_url})
    wait_for(f"{n} credentials Ready", lambda: ready_count(cluster, ns) == n, timeout=60)
    stats = broker.stats()
    assert stats["max_concurrency"] == 3, f"peak concurrency at the token endpoint: {stats['max_concurrency']}"
    assert all(stats["by_client"].get(c.client_id) == 1 for c in clients)


def test_identical_clients_share_one_request(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    for i in range(8):
        cluster.create_credential(ns, f"same-{i}", {"clientSecretRef": {"name": "autotek-client"},
                                                    "tokenURL": broker.token_url})
    wait_for("8 credentials Ready", lambda: ready_count(cluster, ns) == 8, timeout=40)
    assert len(broker.requests_for(client.client_id)) == 1
    tokens = {(cluster.secret_data(ns, f"same-{i}") or {}).get("access_token") for i in range(8)}
    assert len(tokens) == 1
