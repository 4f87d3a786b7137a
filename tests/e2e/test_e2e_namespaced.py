"""Namespaced mode: ``kubectl apply -k manifests/overlays/namespaced`` (see conftest.py for how to run).

The overlay's example watches the namespace ``shop`` only and gives the operator no cluster-wide
rights: a credential in ``shop`` gets its token and its rotations, one in another namespace is left
alone, and the operator is never refused by the API server. Tests run in file order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import e2ekit as kit
import pytest
from e2ekit import CLIENT_ID, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

WATCHED = "shop"  # the overlay's example namespace (manifests/overlays/namespaced/rbac-shop.yaml)
UNWATCHED = "autotek-e2e-unwatched"
CREDENTIAL = "autotek"
TARGET = "autotek-token"
OPERATOR_SA = f"system:serviceaccount:{kit.OPERATOR_NS}:autotek-operator"


@pytest.fixture(scope="module")
def namespaced(
    kubectl: kit.Kubectl, broker: kit.BrokerAPI, clients: dict[str, str], tls: kit.TestCA, install: Any, keep: bool
) -> Iterator[kit.Kubectl]:
    # The watched namespace must exist before the overlay is applied: its Role lives there.
    kubectl.apply([kit.hardened_namespace(WATCHED), kit.hardened_namespace(UNWATCHED)])
    try:
        with install(kit.NAMESPACED_OVERLAY):
            objects = []
            for ns in (WATCHED, UNWATCHED):
                objects.append(kit.client_secret_object(ns, "autotek-client", CLIENT_ID, clients))
                objects.append(kit.credential_object(ns, CREDENTIAL, "autotek-client", {"name": TARGET}, tls.ca_pem))
            kubectl.apply(objects)
            yield kubectl
    finally:
        if not keep:
            kubectl("delete", "namespace", WATCHED, UNWATCHED, "--ignore-not-found", "--wait=false", check=False)


def _ready(kubectl: kit.Kubectl, ns: str) -> dict[str, Any]:
    kubectl("wait", "--for=condition=Ready", f"atc/{CREDENTIAL}", "-n", ns, "--timeout=120s", timeout=150)
    cred = kubectl.get("atc", CREDENTIAL, ns)
    assert cred is not None
    return cred


def test_1_watched_namespace_gets_its_token(namespaced: kit.Kubectl, broker: kit.BrokerAPI) -> None:
    cred = _ready(namespaced, WATCHED)
    cond = namespaced.condition(cred, "Ready")
    assert cond is not None and cond["reason"] == "TokenIssued", cond
    data = namespaced.secret_data(WATCHED, TARGET)
    assert data is not None and data["access_token"] in broker.stats()["tokens"]


def test_2_other_namespaces_are_left_alone(namespaced: kit.Kubectl) -> None:
    """The credential outside the watched namespaces gets no status and no Secret, however long we wait."""
    _ready(namespaced, WATCHED)
    # A first issue and a rotation of the watched credential's 30-second tokens fit in this window.
    deadline = time.monotonic() + 30
    while True:
        cred = namespaced.get("atc", CREDENTIAL, UNWATCHED)
        assert cred is not None
        assert not cred.get("status"), f"the unwatched credential got a status: {cred.get('status')}"
        assert namespaced.get("secret", TARGET, UNWATCHED) is None, "a Secret was written in the unwatched namespace"
        if time.monotonic() > deadline:
            break
        time.sleep(3)


def test_3_no_cluster_wide_rights(namespaced: kit.Kubectl) -> None:
    """The operator's ServiceAccount may touch Secrets in ``shop`` only; no ClusterRole is installed."""

    def can(verb: str, resource: str, *where: str) -> str:
        proc = namespaced("auth", "can-i", verb, resource, f"--as={OPERATOR_SA}", *where, check=False)
        return proc.stdout.strip()

    assert can("list", "secrets", "-n", WATCHED) == "yes"
    assert can("list", "secrets", "-n", UNWATCHED) == "no"
    assert can("list", "secrets", "--all-namespaces") == "no"
    assert can("patch", "autotekcredentials.autotek.io", "--subresource=status", "-n", WATCHED) == "yes"
    assert namespaced.get("clusterrole", kit.OPERATOR_DEPLOY) is None
    assert namespaced.get("clusterrolebinding", kit.OPERATOR_DEPLOY) is None


def test_4_rotation_in_the_watched_namespace(namespaced: kit.Kubectl, broker: kit.BrokerAPI) -> None:
    _ready(namespaced, WATCHED)
    first = (namespaced.secret_data(WATCHED, TARGET) or {}).get("access_token")
    rotated = wait_for(
        "a scheduled rotation in the watched namespace",
        lambda: (t := (namespaced.secret_data(WATCHED, TARGET) or {}).get("access_token")) != first and t,
        timeout=90,
        interval=2,
    )
    assert rotated in broker.stats()["tokens"]


def test_5_no_rbac_denials_and_no_restarts(namespaced: kit.Kubectl) -> None:
    kit.assert_no_denials_and_no_restarts(namespaced)
