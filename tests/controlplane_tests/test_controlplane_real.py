"""The session's real control plane (only with KUBEBUILDER_ASSETS): readiness, RBAC, identities, controllers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import requests
from kubernetes.client.exceptions import ApiException

import controlplane
from controlplane import wait_for

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBEBUILDER_ASSETS"),
    reason="needs KUBEBUILDER_ASSETS (a folder with kube-apiserver, etcd, kube-controller-manager): "
    "the session starts a real control plane from it",
)




@pytest.fixture(scope="module")
def plane() -> controlplane.ControlPlane:
    return controlplane.ControlPlane.attach(Path(os.environ["AUTOTEK_TEST_CONTROLPLANE"]))


def client(kubeconfig: Path) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="module")
def admin(plane: controlplane.ControlPlane) -> kubernetes.client.ApiClient:
    return client(plane.admin_kubeconfig)


@pytest.fixture
def namespace(admin: kubernetes.client.ApiClient) -> Iterator[str]:
    core = kubernetes.client.CoreV1Api(admin)
    name = f"cp-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def whoami(api: kubernetes.client.ApiClient) -> str:
    review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return str(review.status.user_info.username)


def test_every_worker_sees_the_session_plane(plane: controlplane.ControlPlane) -> None:
    assert os.environ["AUTOTEK_TEST_KUBECONFIG"] == str(plane.admin_kubeconfig)
    assert plane.url.startswith("https://127.0.0.1:")
    assert plane.state["owner_pid"] != os.getpid() or not os.environ.get("PYTEST_XDIST_WORKER")


def test_readyz_answers_ok(plane: controlplane.ControlPlane) -> None:
    resp = requests.get(plane.url + "/readyz", verify=plane.pki / "ca.crt", timeout=10,
                        cert=(str(plane.pki / "admin.crt"), str(plane.pki / "admin.key")))
    assert (resp.status_code, resp.text) == (200, "ok")


def test_admin_is_system_masters(admin: kubernetes.client.ApiClient) -> None:
    assert whoami(admin) == "admin"
    kubernetes.client.CoreV1Api(admin).list_secret_for_all_namespaces(limit=1)


def test_a_user_without_bindings_is_forbidden(plane: controlplane.ControlPlane, namespace: str) -> None:
    user = f"nobody-{uuid.uuid4().hex[:6]}"
    api = client(plane.add_user(user, groups=["tenants"]))
    assert whoami(api) == user
    with pytest.raises(ApiException) as err:
        kubernetes.client.CoreV1Api(api).list_namespaced_config_map(namespace)
    assert err.value.status == 403


def test_a_binding_grants_exactly_its_rules(plane: controlplane.ControlPlane, admin: kubernetes.client.ApiClient,
                                            namespace: str) -> None:
    user = f"reader-{uuid.uuid4().hex[:6]}"
    rbac = kubernetes.client.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "cm-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    core = kubernetes.client.CoreV1Api(client(plane.add_user(user)))
    wait_for("the binding to apply", lambda: _allowed(lambda: core.list_namespaced_config_map(namespace)))
    with pytest.raises(ApiException) as err:
        core.list_namespaced_secret(namespace)
    assert err.value.status == 403


def _answered(call: Callable[[], Any], unless: int) -> bool:
    """Whether ``call`` succeeds: False if the API answers ``unless``; any other error is raised."""
    try:
        call()
    except ApiException as exc:
        if exc.status == unless:
            return False
        raise
    return True


def _allowed(call: Callable[[], Any]) -> bool:
    return _answered(call, unless=403)


def test_a_service_account_kubeconfig_authenticates_as_the_service_account(
        plane: controlplane.ControlPlane, namespace: str) -> None:
    api = client(plane.service_account_kubeconfig(namespace, "robot", duration=3600))
    assert whoami(api) == f"system:serviceaccount:{namespace}:robot"
    with pytest.raises(ApiException) as err:  # no role bound to it
        kubernetes.client.CoreV1Api(api).list_namespaced_secret(namespace)
    assert err.value.status == 403


def test_a_service_account_kubeconfig_creates_its_namespace_and_account(
        plane: controlplane.ControlPlane, admin: kubernetes.client.ApiClient) -> None:
    ns = f"cp-new-{uuid.uuid4().hex[:6]}"
    try:
        api = client(plane.service_account_kubeconfig(ns, "made"))
        assert whoami(api) == f"system:serviceaccount:{ns}:made"
        kubernetes.client.CoreV1Api(admin).read_namespaced_service_account("made", ns)
    finally:
        kubernetes.client.CoreV1Api(admin).delete_namespace(ns)


def test_a_token_duration_below_the_minimum_is_refused(plane: controlplane.ControlPlane) -> None:
    with pytest.raises(controlplane.ControlPlaneError, match="600"):
        plane.service_account_kubeconfig("default", "short", duration=60)


def test_the_default_service_account_exists(admin: kubernetes.client.ApiClient) -> None:
    kubernetes.client.CoreV1Api(admin).read_namespaced_service_account("default", "default")


def test_new_namespaces_get_a_default_service_account(admin: kubernetes.client.ApiClient, namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(admin)
    wait_for("the default ServiceAccount", lambda: _exists(lambda: core.read_namespaced_service_account(
        "default", namespace)))


def _exists(call: Callable[[], Any]) -> bool:
    return _answered(call, unless=404)


def test_garbage_collector_deletes_a_dependent_of_a_deleted_owner(admin: kubernetes.client.ApiClient,
                                                                  namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(admin)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"a": "1"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})
    core.delete_namespaced_config_map("owner", namespace)
    wait_for("the dependent to be collected", lambda: not _exists(
        lambda: core.read_namespaced_config_map("dependent", namespace)))
    assert _exists(lambda: core.read_namespaced_config_map("bystander", namespace))


def test_namespace_deletion_finishes(admin: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(admin)
    name = f"cp-gone-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_config_map(name, {"metadata": {"name": "content"}})
    core.delete_namespace(name)
    wait_for("the namespace to be gone", lambda: not _exists(lambda: core.read_namespace(name)))
