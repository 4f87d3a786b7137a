"""Real authorization: the operator holds exactly the RBAC of manifests/, and a missing rule fails a test.

On a real API server every operator of the tier authenticates as a ServiceAccount bound to the roles
rendered from ``manifests/`` (``rbac.py``). These tests check that identity, run the namespaced overlay
with nothing but its Roles, and show that a ClusterRole lacking one rule makes the operator fail with
HTTP 403 (so the tier would catch a rule dropped from the manifests). The emulator has no RBAC: there
they are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import rbac
from harness import CLUSTER_ROLE, Broker, Client, Cluster, Operator, new_scope, wait_for
from rbac import MANIFESTS, Identity

pytestmark = pytest.mark.integration

NAMESPACED = MANIFESTS / "overlays" / "namespaced"


@pytest.fixture(autouse=True)
def _real_server_only(cluster: Cluster) -> None:
    if not cluster.real:
        pytest.skip("the emulator has no RBAC: authorization is tested on a real API server "
                    "(KUBEBUILDER_ASSETS or AUTOTEK_TEST_KUBECONFIG)")


def _spec(broker: Broker, **extra: Any) -> dict[str, Any]:
    return {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url, **extra}


def who_am_i(identity: Identity) -> str:
    """The user name the API server sees for a kubeconfig (SelfSubjectReview)."""
    api = kubernetes.config.new_client_from_config(config_file=str(identity.kubeconfig))
    review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return str(review.status.user_info.username)


def can(cluster: Cluster, identity: Identity, verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
    """Whether the API server's authorizer allows ``identity`` a request (SubjectAccessReview, as admin);
    ``resource`` may name a subresource (``autotekcredentials/status``)."""
    plural, _, sub = resource.partition("/")
    review = kubernetes.client.AuthorizationV1Api(cluster.api).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": identity.user, "groups": ["system:serviceaccounts", "system:authenticated"],
                 "resourceAttributes": {"verb": verb, "resource": plural, "subresource": sub, "group": group,
                                        "namespace": namespace}}})
    return bool(review.status.allowed)


def test_the_operator_is_its_service_account_not_admin(cluster: Cluster, operator: Operator, ns: str) -> None:
    identity = operator.identity
    assert cluster.rbac is not None and identity is not None and identity.service_account is not None
    assert who_am_i(identity) == identity.user == f"system:serviceaccount:{cluster.rbac.namespace}:autotek-operator"
    # What the ClusterRole of manifests/ grants, in any namespace ...
    assert can(cluster, identity, "watch", "autotekcredentials", ns, "autotek.io")
    assert can(cluster, identity, "create", "secrets", ns)
    # ClusterAutoTekCredentials and the namespaces they select: read only (no finalizer on a namespace) ...
    assert can(cluster, identity, "watch", "clusterautotekcredentials", group="autotek.io")
    assert can(cluster, identity, "patch", "clusterautotekcredentials/status", group="autotek.io")
    assert can(cluster, identity, "watch", "namespaces")
    assert not can(cluster, identity, "update", "namespaces")
    assert not can(cluster, identity, "create", "clusterautotekcredentials", group="autotek.io")
    # ... and nothing an admin has.
    assert not can(cluster, identity, "delete", "autotekcredentials", ns, "autotek.io")
    assert not can(cluster, identity, "delete", "namespaces")
    assert not can(cluster, identity, "patch", "deployments", ns, "apps")
    assert not can(cluster, identity, "create", "clusterrolebindings", group="rbac.authorization.k8s.io")


@pytest.fixture
def own_operators(operator: Operator) -> Iterator[list[Operator]]:
    """Operators a test starts (with their own identity and scope); stopped at the end."""
    ops: list[Operator] = []
    yield ops
    for op in ops:
        op.stop()


def test_namespaced_overlay_roles_are_enough(cluster: Cluster, broker: Broker, workdir: Path, ns: str,
                                             client: Client, own_operators: list[Operator]) -> None:
    """manifests/overlays/namespaced: its Roles (moved into the test's namespace) and, cluster-wide, only the
    ClusterRole of the cluster kind and namespaces (no Secrets)."""
    assert cluster.rbac is not None
    docs = cluster.rbac.rendered(NAMESPACED)
    companions = rbac.companion_roles(docs)
    assert [r["metadata"]["name"] for r in rbac.pick(docs, "ClusterRole")] == [
        f"{CLUSTER_ROLE}-cluster-credentials"], rbac.pick(docs, "ClusterRole")
    assert not [r for c in companions for r in c["rules"] if "secrets" in r.get("resources", [])], companions
    watched = rbac.one(docs, "Role", CLUSTER_ROLE)  # the overlay's Role for its example namespace
    identity = cluster.rbac.service_account("autotek-operator-namespaced", source=NAMESPACED,
                                            roles=[rbac.bare(watched, namespace=ns)], shared_cluster_roles=companions)
    assert not can(cluster, identity, "list", "secrets")  # cluster-wide: no
    assert not can(cluster, identity, "list", "autotekcredentials", group="autotek.io")
    assert can(cluster, identity, "list", "secrets", ns)
    scope = new_scope()
    (workdir / "namespaced").mkdir(exist_ok=True)
    op = Operator(cluster, broker, workdir / "namespaced", identity=identity, scope=scope, extra_env={
        "AUTOTEK_NAMESPACES": ns, "AUTOTEK_LEADER_ELECTION": "true", "AUTOTEK_LEADER_ELECTION_NAMESPACE": ns,
        "AUTOTEK_LEADER_ELECTION_ID": f"autotek-operator-{scope}", "POD_NAME": "namespaced-0"})
    own_operators.append(op)
    op.start()
    cluster.create_credential(ns, "autotek", _spec(broker), scope=scope)
    wait_for("Ready", lambda: (cluster.ready(ns, "autotek") or {}).get("status") == "True", timeout=30)
    data = cluster.secret_data(ns, "autotek") or {}
    assert data.get("access_token") in broker.stats()["tokens"]
    assert "leading: running passes" in op.log_text()
    assert " 403" not in op.log_text() and "Forbidden" not in op.log_text()


#: One rule dropped from a copy of the ClusterRole: (api group, resource, verb).
MISSING = [("", "secrets", "create"), ("autotek.io", "autotekcredentials/status", "patch")]


@pytest.mark.parametrize(("group", "resource", "verb"), MISSING, ids=[f"{v} {r}" for _, r, v in MISSING])
def test_a_missing_rule_fails(cluster: Cluster, broker: Broker, workdir: Path, ns: str, client: Client,
                              own_operators: list[Operator], group: str, resource: str, verb: str) -> None:
    """A test of the tests: with one verb removed from the ClusterRole the credential does not become Ready
    and the operator logs HTTP 403, so the tier fails when manifests/ lose a rule the operator needs."""
    assert cluster.rbac is not None
    base = rbac.one(cluster.rbac.rendered(), "ClusterRole", CLUSTER_ROLE)
    label = f"{verb}-{resource.replace('/', '-')}"
    crippled = rbac.without_verb(base, group, resource, verb, f"{CLUSTER_ROLE}-without-{label}-{cluster.scope}")
    identity = cluster.rbac.service_account(f"autotek-operator-without-{label}", cluster_roles=[crippled],
                                            shared_cluster_roles=rbac.companion_roles(cluster.rbac.rendered()))
    assert can(cluster, cluster.identity(), verb, resource, ns, group)  # the base grants it
    assert not can(cluster, identity, verb, resource, ns, group)
    scope = new_scope()
    (workdir / label).mkdir(exist_ok=True)
    op = Operator(cluster, broker, workdir / label, identity=identity, scope=scope)
    own_operators.append(op)
    op.start()
    cluster.create_credential(ns, "autotek", _spec(broker), scope=scope)
    refusal = f"{verb} {resource} failed: HTTP 403 Forbidden"
    wait_for(f"'{refusal}' in the operator's log", lambda: refusal in op.log_text(), timeout=30)
    ready = cluster.ready(ns, "autotek")
    assert ready is None or ready["status"] != "True", ready
    if resource == "secrets":
        assert cluster.secret(ns, "autotek") is None
    else:  # the token was written, but the credential cannot say so
        assert ready is None and (cluster.credential(ns, "autotek") or {}).get("status") is None
    assert op.alive(), "the operator died instead of reporting the refusal"
