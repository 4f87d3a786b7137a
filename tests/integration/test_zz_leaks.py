"""No client secret or token may appear in the operator's logs (DEBUG), in Events or in status.

Runs last (file order): it adds a credential of its own, succeeding and failing, then scans
everything the whole session produced for every client secret and token it used.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from harness import SENSITIVE, Broker, Client, Cluster, Operator, wait_for

pytestmark = pytest.mark.integration


def test_no_secret_or_token_leaks(cluster: Cluster, broker: Broker, operator: Operator, ns: str,
                                  client: Client, workdir: Path) -> None:
    spec = {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url}
    cluster.create_credential(ns, "autotek", spec)
    wait_for("Ready", lambda: (cluster.ready(ns, "autotek") or {}).get("status") == "True")
    # A refused secret must not leak either, nor must a broker answer that echoes it back.
    cluster.put_client_secret(ns, "bad-client", {"client_id": client.client_id, "client_secret": "leak-me-" + "x" * 12})
    SENSITIVE.add("leak-me-" + "x" * 12)
    broker.control(script=[{"status": 400, "json": {"error": "invalid_client",
                                                     "error_description": "bad secret leak-me-" + "x" * 12}}])
    cluster.create_credential(ns, "refused", {"clientSecretRef": {"name": "bad-client"}, "tokenURL": broker.token_url})
    wait_for("InvalidClient", lambda: (cluster.ready(ns, "refused") or {}).get("reason") == "InvalidClient")

    tokens = broker.stats()["tokens"]
    assert tokens, "the session issued no tokens to look for"
    needles = set(SENSITIVE) | set(tokens)
    needles |= {base64.b64encode(n.encode()).decode() for n in list(needles)}

    haystacks = {"operator logs": operator.log_text(all_runs=True), **cluster.leak_haystacks()}
    # Every other operator this worker ran (e.g. those of test_cluster_credentials.py, whose cluster objects'
    # Events are in the worker's namespaces and whose statuses are in Cluster.extra_haystacks).
    haystacks.update({str(p.relative_to(workdir)): p.read_text(errors="replace")
                      for p in workdir.rglob("operator-*.log")})
    assert any(ns in where for where in haystacks), "the scan did not cover the test's namespace"
    assert len(haystacks["operator logs"]) > 1000 and "DEBUG" in haystacks["operator logs"]
    for where, text in haystacks.items():
        found = sorted(n[:6] + "…" for n in needles if n in text)
        assert not found, f"{len(found)} secret value(s) found in {where}: {found}"
