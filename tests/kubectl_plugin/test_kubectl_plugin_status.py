"""``kubectl autotek status``, global flags, API errors and the command line as a process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from autotek_operator.dev.emulator import write_kubeconfig

SPEC = {"clientSecretRef": {"name": "client"}}


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def rows(out: str) -> list[list[str]]:
    """The table split into cells (cells are three or more spaces apart; none holds three spaces)."""
    return [re.split(r"\s{3,}", line.strip()) for line in out.strip().splitlines()]


def seed(kube: Any, ns: str) -> None:
    """Four credentials: ready, refused, expired and never seen by the operator."""
    kube.create_credential(ns, "alpha", SPEC)
    kube.set_status(
        ns,
        "alpha",
        {
            "conditions": [{"type": "Ready", "status": "True", "reason": "TokenIssued", "message": "ok"}],
            "secretName": "alpha",
            "expiresAt": at(41 * 60 + 30),
            "nextRefreshTime": at(23 * 60 + 30),
            "lastRefreshTime": at(-20 * 60),
            "failedAttempts": 0,
        },
    )
    kube.create_credential(ns, "beta", SPEC)
    kube.set_status(
        ns,
        "beta",
        {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "InvalidClient", "message": "refused (HTTP 401)"}
            ],
            "secretName": "beta-token",
            "nextRefreshTime": at(4 * 3600 + 90),
            "failedAttempts": 3,
            "lastFailureReason": "InvalidClient",
            "lastFailureTime": at(-60),
        },
    )
    kube.create_credential(ns, "gamma", SPEC)
    kube.set_status(
        ns,
        "gamma",
        {
            "conditions": [{"type": "Ready", "status": "False", "reason": "Expired", "message": "expired"}],
            "secretName": "gamma",
            "expiresAt": at(-15 * 60 - 20),
            "nextRefreshTime": at(-12 * 60 - 20),
            "failedAttempts": 12,
            "lastFailureReason": "TokenEndpointUnavailable",
        },
    )
    kube.create_credential(ns, "delta", SPEC)  # no status: the operator has not seen it


def test_status_table(run: Any, kube: Any, ns: str) -> None:
    seed(kube, ns)
    r = run("-n", ns, "status")
    assert r.code == 0, r.err
    table = rows(r.out)
    assert table[0] == ["NAME", "READY", "REASON", "SECRET", "EXPIRES IN", "NEXT REFRESH", "FAILURES"]
    assert table[1:] == [
        ["alpha", "True", "TokenIssued", "alpha", "41m", "in 23m", "0"],
        ["beta", "False", "InvalidClient", "beta-token", "-", "in 4h1m", "3 (InvalidClient)"],
        ["delta", "-", "-", "-", "-", "-", "0"],
        ["gamma", "False", "Expired", "gamma", "expired 15m ago", "12m ago", "12 (TokenEndpointUnavailable)"],
    ]
    assert r.err == ""


def test_status_namespace_after_the_subcommand_and_empty(run: Any, kube: Any, ns: str) -> None:
    seed(kube, ns)
    r = run("status", "--namespace", ns)
    assert r.code == 0
    assert [row[0] for row in rows(r.out)] == ["NAME", "alpha", "beta", "delta", "gamma"]

    r = run("status", "-n", ns + "-nothing")
    assert r.code == 0
    assert r.out.startswith("No AutoTekCredentials found")


def test_status_defaults_to_the_context_namespace(
    kube: Any, ns: str, server: Any, tmp_path: Path, capsys: Any
) -> None:
    from autotek_operator import kubectl_plugin

    seed(kube, ns)
    doc = server.kubeconfig_doc(namespace=ns)
    current = next(c for c in doc["contexts"] if c["name"] == doc["current-context"])["context"]
    doc["contexts"].append({"name": "other", "context": {"cluster": current["cluster"], "user": current["user"]}})
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(doc))

    assert kubectl_plugin.main(["--kubeconfig", str(path), "status"]) == 0
    assert "alpha" in capsys.readouterr().out

    # The context "other" has no namespace: "default", where there is nothing.
    assert kubectl_plugin.main(["--kubeconfig", str(path), "--context", "other", "status"]) == 0
    assert "No AutoTekCredentials found in namespace default" in capsys.readouterr().out

    assert kubectl_plugin.main(["--kubeconfig", str(path), "--context", "nope", "status"]) == 3
    assert 'context "nope" not found' in capsys.readouterr().err


def test_status_all_namespaces(run: Any, kube: Any, ns: str, namespaces: Any) -> None:
    seed(kube, ns)
    other = namespaces(ns + "-b")
    kube.create_credential(other, "aardvark", SPEC)
    r = run("status", "-A")
    assert r.code == 0
    table = rows(r.out)
    assert table[0][:3] == ["NAMESPACE", "NAME", "READY"]
    mine = [row[:2] for row in table[1:] if row[0] in (ns, other)]
    assert mine == [[ns, "alpha"], [ns, "beta"], [ns, "delta"], [ns, "gamma"], [other, "aardvark"]]
    keys = [(row[0], row[1]) for row in table[1:]]
    assert keys == sorted(keys)


def test_status_when_the_api_server_is_unreachable(tmp_path: Path, capsys: Any) -> None:
    from autotek_operator import kubectl_plugin

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_kubeconfig(f"http://127.0.0.1:{port}", tmp_path / "kubeconfig")
    assert kubectl_plugin.main(["--kubeconfig", str(path), "status"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "cannot reach the API server" in captured.err

    assert kubectl_plugin.main(["--kubeconfig", str(tmp_path / "missing"), "status"]) == 3
    assert "no kubeconfig found" in capsys.readouterr().err


def test_missing_credential_is_a_failure(run: Any, ns: str) -> None:
    for args in (("refresh", "ghost", "--no-wait"), ("check", "ghost")):
        r = run("-n", ns, *args)
        assert r.code == 1
        assert f'AutoTekCredential "ghost" not found in namespace "{ns}"' in r.err


def test_as_a_process(kubeconfig: Path, kube: Any, ns: str) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "autotek_operator.kubectl_plugin", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0
    for word in ("status", "refresh", "check", "--kubeconfig", "--context", "--namespace"):
        assert word in proc.stdout

    seed(kube, ns)
    proc = subprocess.run(
        [sys.executable, "-m", "autotek_operator.kubectl_plugin", "--kubeconfig", str(kubeconfig), "status", "-A"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^{ns}\s+alpha\s+True\s+TokenIssued", proc.stdout, re.M)
    assert "\033[" not in proc.stdout
