"""Operator experience against the real process: metrics on the metrics port, rollout restarts."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SENSITIVE, Broker, Client, Cluster, Operator, new_client, wait_for

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def featured(operator: Operator, cluster: Cluster, broker: Broker, workdir: Path) -> Iterator[tuple[Operator, int]]:
    """An operator of its own with metrics on a port and rollout restarts switched on; on a real server it
    holds the RBAC of manifests/overlays/rollout-restart (the base's ClusterRole cannot patch workloads)."""
    operator.stop()
    port = free_port()
    (workdir / "featured").mkdir(exist_ok=True)
    op = Operator(cluster, broker, workdir / "featured", extra_env={
        "AUTOTEK_METRICS_PORT": str(port), "AUTOTEK_ROLLOUT_RESTART": "true", "AUTOTEK_RESTART_MIN_INTERVAL": "0",
    }, identity=cluster.identity("rollout-restart"))
    op.start()
    yield op, port
    op.stop()
    broker.control(lifetime=3600)
    operator.start()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, metric: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_during_a_burst(cluster: Cluster, broker: Broker, ns: str, featured: tuple[Operator, int]) -> None:
    op, port = featured
    clients = [new_client(cluster, broker, ns, secret_name=f"client-{i}") for i in range(12)]
    scrapes: list[str] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrapes.append(scrape(port))
            except OSError as exc:
                scrapes.append(f"ERROR {exc}")
            stop.wait(0.05)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        wait_for("a first scrape", lambda: scrapes, timeout=10)
        for i in range(12):
            cluster.create_credential(ns, f"c{i}", {"clientSecretRef": {"name": f"client-{i}"},
                                                    "tokenURL": broker.token_url})
        wait_for("12 Ready", lambda: all((cluster.ready(ns, f"c{i}") or {}).get("status") == "True"
                                         for i in range(12)), timeout=40)
        wait_for("two more scrapes", lambda: len(scrapes) >= 3, timeout=10)  # the burst may be over already
    finally:
        stop.set()
        thread.join()
    assert len(scrapes) >= 3 and not any(s.startswith("ERROR") for s in scrapes)
    text = scrape(port)
    expires = (cluster.credential(ns, "c0") or {})["status"]["expiresAt"]
    value = sample(text, "autotek_token_expiration_timestamp_seconds", namespace=ns, name="c0")
    assert value is not None
    from datetime import datetime

    assert abs(value - datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()) <= 1
    assert sample(text, "autotek_token_next_refresh_timestamp_seconds", namespace=ns, name="c0")
    assert sample(text, "autotek_credential_ready_status", namespace=ns, name="c0", condition="True") == 1.0
    assert sample(text, "autotek_credential_ready_status", namespace=ns, name="c0", condition="False") == 0.0
    assert (sample(text, "autotek_token_requests_total", result="success") or 0) >= 12
    assert (sample(text, "autotek_secret_writes_total", operation="create") or 0) >= 12
    assert "autotek_token_request_duration_seconds_bucket" in text
    secrets = {c.client_secret for c in clients} | set(broker.stats()["tokens"]) | SENSITIVE
    assert not [s for s in secrets if s in "".join(scrapes)], "a secret or token appeared in the metrics"
    # A deleted credential's series go away.
    cluster.delete_credential(ns, "c0")
    wait_for("c0's series to go", lambda: sample(scrape(port), "autotek_token_expiration_timestamp_seconds",
                                                 namespace=ns, name="c0") is None)


def _deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": "busybox"}]}}}}


def _restarted_at(cluster: Cluster, ns: str, name: str) -> str | None:
    import kubernetes

    apps = kubernetes.client.AppsV1Api(cluster.api)
    raw = apps.read_namespaced_deployment(name, ns, _preload_content=False)
    import json

    doc = json.loads(raw.data)
    annotations = doc["spec"]["template"]["metadata"].get("annotations") or {}
    return annotations.get("kubectl.kubernetes.io/restartedAt")


def test_rollout_restart_after_rotation(cluster: Cluster, broker: Broker, ns: str, client: Client,
                                        featured: tuple[Operator, int]) -> None:
    import kubernetes

    kubernetes.client.AppsV1Api(cluster.api).create_namespaced_deployment(ns, _deployment("web"))
    broker.control(lifetime=20)
    cluster.create_credential(ns, "autotek", {
        "clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url,
        "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"}, {"kind": "Deployment", "name": "gone"}],
    })
    wait_for("Ready", lambda: (cluster.ready(ns, "autotek") or {}).get("status") == "True")
    assert _restarted_at(cluster, ns, "web") is None  # the first issue restarts nothing
    wait_for("a restart after the rotation", lambda: _restarted_at(cluster, ns, "web"), timeout=40)
    # The pass restarts the workload first and writes the status after it: wait for the status.

    def rollout_condition() -> dict[str, Any] | None:
        cred = cluster.credential(ns, "autotek") or {}
        found = [x for x in (cred.get("status") or {}).get("conditions") or [] if x["type"] == "RolloutRestart"]
        return found[0] if found and found[0]["reason"] != "WaitingForRotation" else None

    rollout = wait_for("the RolloutRestart condition after the restart", rollout_condition, timeout=30)
    assert (rollout["status"], rollout["reason"]) == ("False", "RestartTargetNotFound")
    assert "Deployment gone" in rollout["message"]
    assert (cluster.ready(ns, "autotek") or {}).get("status") == "True"
    # Events are posted in the background: one may trail the status by a moment.
    wanted = {"RolloutRestarted", "RestartTargetNotFound"}
    wait_for("the RolloutRestarted and RestartTargetNotFound Events",
             lambda: wanted <= {e["reason"] for e in cluster.events(ns)}, timeout=10)
