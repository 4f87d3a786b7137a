"""Several operators in one cluster, each on its own credentials; readiness of real replicas.

Two operator processes watch the same namespace with different credential selectors (applied by
the API server). Each serves only the credentials it selects; relabelling a credential hands it
from one to the other without a new token and without either deleting its Secret.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import SCOPE_LABEL, Broker, Client, Cluster, Operator, new_scope, wait_for

pytestmark = pytest.mark.integration


def _spec(broker: Broker) -> dict[str, Any]:
    return {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url}


def _token(cluster: Cluster, ns: str, name: str) -> str | None:
    return (cluster.secret_data(ns, name) or {}).get("access_token")


def test_each_operator_serves_only_the_credentials_it_selects(
    cluster: Cluster, broker: Broker, workdir: Path, ns: str, client: Client
) -> None:
    scopes = {"blue": new_scope(), "green": new_scope()}
    ops = {c: Operator(cluster, broker, workdir / f"scope-{c}", scope=s) for c, s in scopes.items()}
    for colour, op in ops.items():
        (workdir / f"scope-{colour}").mkdir(exist_ok=True)
        op.start()
    try:
        for colour, scope in scopes.items():
            cluster.create_credential(ns, colour, _spec(broker), scope=scope)
        for colour in scopes:
            wait_for(f"{colour} Ready", lambda c=colour: (cluster.ready(ns, c) or {}).get("status") == "True")
        for colour, op in ops.items():
            other = "green" if colour == "blue" else "blue"
            text = op.log_text()
            assert f"{ns}/{colour}:" in text and f"{ns}/{other}:" not in text, f"{colour} acted on {other}"

        # Hand "blue" to the green operator: blue forgets it, green continues from its status.
        token = _token(cluster, ns, "blue")
        requests = len(broker.requests_for(client.client_id))
        cluster.custom.patch_namespaced_custom_object(
            "autotek.io", "v1alpha1", ns, "autotekcredentials", "blue",
            {"metadata": {"labels": {SCOPE_LABEL: scopes["green"]}}},
            _content_type="application/merge-patch+json",
        )
        wait_for("blue to be handed over", lambda: "no longer selected by this operator" in ops["blue"].log_text())
        wait_for("green to pick blue up", lambda: f"{ns}/blue:" in ops["green"].log_text())
        cluster.patch_credential(ns, "blue", {"metadata": {"annotations": {
            "autotek.io/refresh-requested-at": "handover"}}})
        wait_for("green to refresh blue", lambda: _token(cluster, ns, "blue") not in (token, None), timeout=30)
        assert len(broker.requests_for(client.client_id)) == requests + 1  # the refresh asked for, nothing else
        assert cluster.secret(ns, "blue") is not None
        assert f"{ns}/blue: deleted" not in ops["blue"].log_text()
    finally:
        for op in ops.values():
            op.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def test_two_replicas_are_ready_one_leading(cluster: Cluster, broker: Broker, workdir: Path, ns: str) -> None:
    scope = new_scope()
    ports, replicas = {}, {}
    for name in ("a", "b"):
        ports[name] = _free_port()
        (workdir / f"probe-{name}").mkdir(exist_ok=True)
        replicas[name] = Operator(cluster, broker, workdir / f"probe-{name}", scope=scope, extra_env={
            "AUTOTEK_LEADER_ELECTION": "true",
            "AUTOTEK_LEADER_ELECTION_NAMESPACE": ns,
            "POD_NAME": f"probe-{name}",
            "AUTOTEK_HEALTH_PORT": str(ports[name]),
        })
        replicas[name].start()
    try:
        def both_ready() -> dict[str, str] | None:
            answers = {n: _probe(p, "/readyz") for n, p in ports.items()}
            if all(a is not None and a[0] == 200 for a in answers.values()):
                return {n: a[1]["role"] for n, a in answers.items() if a is not None}
            return None

        roles = wait_for("both replicas ready", both_ready, timeout=40)
        assert sorted(roles.values()) == ["following", "leading"], roles
        for port in ports.values():
            live = _probe(port, "/healthz")
            assert live is not None and live[0] == 200
    finally:
        for op in replicas.values():
            op.stop()
