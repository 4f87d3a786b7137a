"""Rollout restart: ``kubectl apply -k manifests/overlays/rollout-restart`` (see conftest.py for how to run).

A Deployment that reads the token only at start (an environment variable from the Secret) is
listed in the credential's ``rolloutRestartTargets``: the first token restarts nothing, a rotation
restarts it the way ``kubectl rollout restart`` does, and its new pod starts with the new token.
Tests run in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import e2ekit as kit
import pytest
from e2ekit import CLIENT_ID, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NS = "autotek-e2e-restart"
CREDENTIAL = "legacy"
TARGET = "legacy-token"
APP = "legacy-client"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
#: Long enough that no scheduled rotation comes before the test asks for one.
LONG_LIFETIME = 600


def app_deployment() -> dict[str, Any]:
    """An application that reads the token once, at start, from an environment variable."""
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": "autotek-e2e"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP, "namespace": NS, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": kit.pod_security_context(),
                    "containers": [
                        {
                            "name": "app",
                            "image": kit.IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"],
                            "env": [
                                {
                                    "name": "AUTOTEK_TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": TARGET, "key": "access_token"}},
                                }
                            ],
                            "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
                            "securityContext": kit.container_security_context(),
                        }
                    ],
                },
            },
        },
    }


@pytest.fixture(scope="module")
def restart_env(
    kubectl: kit.Kubectl, broker: kit.BrokerAPI, clients: dict[str, str], tls: kit.TestCA, install: Any, keep: bool
) -> Iterator[kit.Kubectl]:
    kubectl.apply([kit.hardened_namespace(NS)])
    broker.control(lifetime=LONG_LIFETIME)
    try:
        with install(kit.ROLLOUT_RESTART_OVERLAY):
            targets = [{"kind": "Deployment", "name": APP}]
            kubectl.apply(
                [
                    kit.client_secret_object(NS, "autotek-client", CLIENT_ID, clients),
                    kit.credential_object(
                        NS, CREDENTIAL, "autotek-client", {"name": TARGET}, tls.ca_pem, rolloutRestartTargets=targets
                    ),
                ]
            )
            kubectl("wait", "--for=condition=Ready", f"atc/{CREDENTIAL}", "-n", NS, "--timeout=120s", timeout=150)
            kubectl.apply([app_deployment()])
            kubectl("rollout", "status", "-n", NS, f"deploy/{APP}", "--timeout=120s", timeout=150)
            yield kubectl
    finally:
        broker.control(lifetime=kit.BROKER_LIFETIME)
        if not keep:
            kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=false", check=False)


def _app_pods(k: kit.Kubectl) -> list[dict[str, Any]]:
    doc = k.json("get", "pods", "-n", NS, "-l", f"app.kubernetes.io/name={APP}")
    return [p for p in (doc or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")]


def _env_token(k: kit.Kubectl, pod: str) -> str:
    return k.text("exec", "-n", NS, pod, "--", "printenv", "AUTOTEK_TOKEN").strip()


def test_1_first_token_restarts_nothing(restart_env: kit.Kubectl) -> None:
    k = restart_env
    cred = k.get("atc", CREDENTIAL, NS)
    cond = k.condition(cred, "RolloutRestart")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "WaitingForRotation", cond
    deploy = k.get("deploy", APP, NS)
    assert deploy is not None
    assert RESTARTED_AT not in (deploy["spec"]["template"]["metadata"].get("annotations") or {})
    pods = _app_pods(k)
    assert len(pods) == 1
    token = (k.secret_data(NS, TARGET) or {})["access_token"]
    assert _env_token(k, pods[0]["metadata"]["name"]) == token


def test_2_a_rotation_restarts_the_deployment(restart_env: kit.Kubectl, broker: kit.BrokerAPI) -> None:
    """A refresh replaces the held token: the Deployment is restarted and its new pod has the new token."""
    k = restart_env
    old_pod = _app_pods(k)[0]
    old_token = (k.secret_data(NS, TARGET) or {})["access_token"]
    broker.control(lifetime=kit.BROKER_LIFETIME)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    k("annotate", "atc", CREDENTIAL, "-n", NS, f"autotek.io/refresh-requested-at={stamp}", "--overwrite")

    def restarted() -> str | None:
        deploy = k.get("deploy", APP, NS) or {}
        return ((deploy.get("spec") or {}).get("template", {}).get("metadata", {}).get("annotations") or {}).get(
            RESTARTED_AT
        )

    wait_for(f"the operator to set {RESTARTED_AT} on deploy/{APP}", restarted, timeout=90, interval=2)
    k("rollout", "status", "-n", NS, f"deploy/{APP}", "--timeout=120s", timeout=150)

    def new_pod() -> dict[str, Any] | None:
        pods = [p for p in _app_pods(k) if p["metadata"]["uid"] != old_pod["metadata"]["uid"] and kit.pod_ready(p)]
        return pods[0] if pods else None

    pod = wait_for("the restarted Deployment's new pod", new_pod, timeout=120, interval=2)
    token = _env_token(k, pod["metadata"]["name"])
    assert token and token != old_token, "the new pod started with the token from before the rotation"
    assert token in broker.stats()["tokens"]

    cred = k.get("atc", CREDENTIAL, NS)
    cond = k.condition(cred, "RolloutRestart")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "Restarted", cond
    events = k.json("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={CREDENTIAL}")
    reasons = {e.get("reason") for e in (events or {}).get("items", [])}
    assert "RolloutRestarted" in reasons, reasons


def test_3_no_rbac_denials_and_no_restarts(restart_env: kit.Kubectl) -> None:
    kit.assert_no_denials_and_no_restarts(restart_env)
