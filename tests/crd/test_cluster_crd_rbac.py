"""Only cluster-scoped RBAC can create a ClusterAutoTekCredential; the example roles are right.

On the real API server (``AUTOTEK_TEST_KUBECONFIG`` and ``AUTOTEK_TEST_CONTROLPLANE``), a user who
is a namespace's ``admin`` and holds, through RoleBindings in that namespace, even every verb on the
kind cannot create one; a ClusterRoleBinding to ``autotek-cluster-credentials-admin`` of
``examples/cluster-credential-rbac.yaml`` can. Offline: the example's roles are never aggregated
into ``edit`` or ``admin``, the view role only reads, and the roles name only the cluster kind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crdcheck
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from test_cluster_crd import minimal, resource

import controlplane
from autotek_operator import constants as c

EXAMPLE = crdcheck.EXAMPLES_DIR / "cluster-credential-rbac.yaml"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def example_docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in crdcheck.load_documents(EXAMPLE)}


# -- offline ---------------------------------------------------------------------------------------------


def test_example_roles_are_not_aggregated_into_namespaced_roles() -> None:
    docs = example_docs()
    roles = {name: doc for (kind, name), doc in docs.items() if kind == "ClusterRole"}
    assert set(roles) == {"autotek-cluster-credentials-admin", "autotek-cluster-credentials-view"}
    for name, role in roles.items():
        labels = role["metadata"].get("labels") or {}
        aggregated = {
            key.removeprefix(AGGREGATE)
            for key, value in labels.items()
            if key.startswith(AGGREGATE) and value == "true"
        }
        assert not aggregated & {"edit", "admin"}, f"{name} would give namespace owners the cluster kind"
        for rule in role["rules"]:
            assert rule["apiGroups"] == [c.GROUP] and rule["resources"] == [c.CLUSTER_PLURAL], name
    assert not WRITE_VERBS & {v for r in roles["autotek-cluster-credentials-view"]["rules"] for v in r["verbs"]}
    assert "aggregate-to-view" in "".join(roles["autotek-cluster-credentials-view"]["metadata"]["labels"])
    assert not roles["autotek-cluster-credentials-admin"]["metadata"].get("labels")
    binding = docs[("ClusterRoleBinding", "autotek-cluster-credentials-platform-team")]
    assert binding["roleRef"]["name"] == "autotek-cluster-credentials-admin"


# -- on the real API server ------------------------------------------------------------------------------


class Plane:
    def __init__(self, kubeconfig: Path, state: Path) -> None:
        self.admin = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(self.admin)
        self.core = kubernetes.client.CoreV1Api(self.admin)
        self.plane = controlplane.ControlPlane.attach(state)
        self.made: list[tuple[str, str, str | None]] = []

    def user(self, name: str) -> Any:
        return kubernetes.client.CustomObjectsApi(
            kubernetes.config.new_client_from_config(config_file=str(self.plane.add_user(name)))
        )

    def cluster_role(self, doc: dict[str, Any], suffix: str) -> str:
        body = json.loads(json.dumps(doc))
        body["metadata"]["name"] += f"-{suffix}"
        self.rbac.create_cluster_role(body)
        self.made.append(("ClusterRole", body["metadata"]["name"], None))
        return str(body["metadata"]["name"])

    def bind(self, role: str, user: str, namespace: str | None = None) -> None:
        name = f"{role}-{user}"
        body = {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        if namespace is None:
            self.rbac.create_cluster_role_binding(body)
            self.made.append(("ClusterRoleBinding", name, None))
        else:
            self.rbac.create_namespaced_role_binding(namespace, body)

    def close(self) -> None:
        for kind, name, _ in reversed(self.made):
            try:
                if kind == "ClusterRole":
                    self.rbac.delete_cluster_role(name)
                else:
                    self.rbac.delete_cluster_role_binding(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    kubeconfig, state = os.environ.get("AUTOTEK_TEST_KUBECONFIG"), os.environ.get("AUTOTEK_TEST_CONTROLPLANE")
    if not kubeconfig or not state:
        pytest.skip("no real API server: set KUBEBUILDER_ASSETS to check RBAC for the cluster kind on kube-apiserver")
    p = Plane(Path(kubeconfig), Path(state))
    controlplane.install_crds(p.admin, [crdcheck.load_crd(crdcheck.CLUSTER_CRD_PATH)])
    yield p
    p.close()


def _create(api: Any, name: str) -> int:
    """HTTP status of a dry-run create of a ClusterAutoTekCredential as ``api``'s user (201: allowed)."""
    try:
        api.create_cluster_custom_object(
            c.GROUP, c.VERSION, c.CLUSTER_PLURAL, resource(minimal(), name=name), dry_run="All"
        )
    except ApiException as exc:
        return int(exc.status)
    return 201


def test_namespaced_rbac_cannot_create_the_cluster_kind(plane: Plane) -> None:
    uid = uuid.uuid4().hex[:8]
    ns, user = f"tenant-{uid}", f"tenant-{uid}"
    plane.core.create_namespace({"metadata": {"name": ns}})
    try:
        docs = example_docs()
        admin_role = plane.cluster_role(docs[("ClusterRole", "autotek-cluster-credentials-admin")], uid)
        api = plane.user(user)
        # The namespace's admin, and even the cluster kind's every verb bound in the namespace: refused.
        plane.bind("admin", user, ns)
        plane.bind(admin_role, user, ns)
        assert _create(api, f"tenant-{uid}") == 403
        # The same ClusterRole bound cluster-wide: allowed.
        plane.bind(admin_role, user)
        assert controlplane.wait_for(
            "the ClusterRoleBinding to apply", lambda: _create(api, f"tenant-{uid}") == 201, timeout=10
        )
    finally:
        plane.core.delete_namespace(ns)


def test_the_view_role_reads_but_does_not_write(plane: Plane) -> None:
    uid = uuid.uuid4().hex[:8]
    user = f"viewer-{uid}"
    view_role = plane.cluster_role(example_docs()[("ClusterRole", "autotek-cluster-credentials-view")], uid)
    plane.bind(view_role, user)
    api = plane.user(user)
    listed = controlplane.wait_for("the view role to apply", lambda: _list(api), timeout=10)
    assert listed["kind"] == f"{c.CLUSTER_KIND}List"
    assert _create(api, f"viewer-{uid}") == 403


def _list(api: Any) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = api.list_cluster_custom_object(c.GROUP, c.VERSION, c.CLUSTER_PLURAL)
    except ApiException:
        return None
    return result
