"""The ClusterAutoTekCredential CRD's tables against a real API server (its schema and CEL rules).

Every invalid resource of ``test_cluster_crd.INVALID`` (the cluster kind's own cases and the
namespaced kind's, moved into a cluster spec) is created with ``dryRun=All`` and
``fieldValidation=Strict`` and must be refused with the error Kubernetes gives for the expected
problem: a CEL rule's own message, a pattern, a required field. The valid variants, the examples and
a full status must be accepted, and unknown fields pruned. Runs only when ``AUTOTEK_TEST_KUBECONFIG``
names a cluster (the session's control plane with ``KUBEBUILDER_ASSETS``).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import crdcheck
import crdkit
import kubernetes
import pytest
from crdkit import Case
from kubernetes.client.exceptions import ApiException
from test_cluster_crd import EXAMPLES, INVALID, STATUS, VALID, minimal, resource
from test_crd_server import SERVER_EXPECT

import controlplane
from autotek_operator import constants as c

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.CLUSTER_PLURAL


@pytest.fixture(scope="module")
def server() -> crdkit.Server:
    """The admin client of the cluster, creating cluster-scoped objects."""
    s = crdkit.Server(crdkit.kubeconfig_or_skip("cluster CRD"), GROUP, VERSION, PLURAL)
    # Both CRDs are created unless they exist (other workers share them; never deleted).
    controlplane.install_crds(s.api, [crdcheck.load_crd(), crdcheck.load_crd(crdcheck.CLUSTER_CRD_PATH)])
    return s


@pytest.fixture()
def created(server: crdkit.Server) -> Iterator[list[str]]:
    """Names of objects a test really created; deleted afterwards (cluster-scoped: nobody else would)."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            server.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise


# -- what Kubernetes says for each problem (crdkit.server_phrase) ---------------------------------


def phrases(schema: dict[str, Any], case: Case) -> list[str]:
    """What kube-apiserver's error must contain for ``case``."""
    return crdkit.server_phrases(schema, SERVER_EXPECT.get(case.id.removeprefix("namespaced: "), case.expect))


def test_every_case_has_server_phrases(cluster_schema: dict[str, Any]) -> None:
    """Offline: each case maps to phrases, and each rule case to exactly one rule's message."""
    for case in INVALID:
        assert phrases(cluster_schema, case), case.id


def test_the_cluster_rules_are_all_exercised(cluster_schema: dict[str, Any]) -> None:
    """Every CEL rule of the cluster CRD is the expected refusal of at least one case."""
    expected = {p for case in INVALID for p in phrases(cluster_schema, case)}
    messages = {rule["message"] for _, rule in crdcheck.all_rules(cluster_schema)}
    assert messages <= expected, f"rules no case triggers: {sorted(messages - expected)}"


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_api_server_rejects_invalid_resource_with_reason(
    server: crdkit.Server, cluster_schema: dict[str, Any], case: Case
) -> None:
    message = server.refusal(resource(copy.deepcopy(case.spec), name=f"bad-{uuid.uuid4().hex[:8]}"))
    for phrase in phrases(cluster_schema, case):
        assert phrase in message, f"{case.id}: expected {phrase!r} in the API server's error:\n{message}"


@pytest.mark.parametrize(("label", "spec"), VALID, ids=[label for label, _ in VALID])
def test_api_server_admits_valid_variant(
    server: crdkit.Server, cluster_schema: dict[str, Any], label: str, spec: dict[str, Any]
) -> None:
    stored = server.create(resource(copy.deepcopy(spec)))
    # What the API server stores is what crdcheck predicts (defaults, pruning).
    assert stored["spec"] == crdcheck.admit(resource(copy.deepcopy(spec)), cluster_schema).stored["spec"]


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_api_server_admits_example(server: crdkit.Server, filename: str, doc: dict[str, Any]) -> None:
    assert doc["kind"] == c.CLUSTER_KIND
    stored = server.create(doc)
    assert stored["spec"]["clientSecretRef"]["namespace"] == doc["spec"]["clientSecretRef"]["namespace"]


def test_api_server_prunes_unknown_fields(server: crdkit.Server) -> None:
    """Without strict field validation unknown fields are dropped, rolloutRestartTargets among them."""
    spec = minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": "web"}], junk=1)
    spec["clientSecretRef"]["extra"] = "x"
    spec["namespaceSelector"] = {"matchLabels": {"a": "b"}, "namespaces": ["x"]}
    stored = server.create(resource(spec), strict=False)
    assert set(stored["spec"]) == {
        "clientSecretRef",
        "namespaces",
        "namespaceSelector",
        "tokenURL",
        "clientAuthMethod",
        "target",
        "refresh",
    }
    assert stored["spec"]["clientSecretRef"] == {
        "namespace": "autotek-system",
        "name": "autotek-client",
        "clientIdKey": "client_id",
        "clientSecretKey": "client_secret",
    }
    assert stored["spec"]["namespaceSelector"] == {"matchLabels": {"a": "b"}}


def test_api_server_serves_the_kind_cluster_scoped(server: crdkit.Server, created: list[str]) -> None:
    """Created without a namespace; listed by its short name's resource; a namespaced path does not exist."""
    name = f"scope-{uuid.uuid4().hex[:6]}"
    obj = server.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, resource(minimal(), name=name))
    created.append(name)
    assert "namespace" not in obj["metadata"]
    with pytest.raises(ApiException) as exc:
        server.custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, resource(minimal(), name=f"{name}-ns")
        )
    assert exc.value.status == 404
    resources = kubernetes.client.CustomObjectsApi(server.api).get_api_resources(GROUP, VERSION)
    (entry,) = [r for r in resources.resources if r.name == PLURAL]
    assert (entry.kind, entry.namespaced, entry.short_names, entry.categories) == (
        c.CLUSTER_KIND,
        False,
        ["catc"],
        ["autotek"],
    )


def test_api_server_admits_the_status_example(server: crdkit.Server, created: list[str]) -> None:
    """The status subresource is written by the operator; its schema must accept a full status."""
    name = f"status-{uuid.uuid4().hex[:6]}"
    server.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, resource(minimal(), name=name))
    created.append(name)
    patched = server.custom.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": STATUS}, dry_run="All", _content_type="application/merge-patch+json"
    )
    assert patched["status"] == STATUS


def test_api_server_bounds_failed_namespaces(server: crdkit.Server, created: list[str]) -> None:
    name = f"bound-{uuid.uuid4().hex[:6]}"
    server.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, resource(minimal(), name=name))
    created.append(name)
    too_many = [{"namespace": f"n{i:02d}", "reason": "TargetConflict"} for i in range(c.MAX_FAILED_NAMESPACES + 1)]
    with pytest.raises(ApiException) as exc:
        server.custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            PLURAL,
            name,
            {"status": {"failedNamespaces": too_many}},
            dry_run="All",
            _content_type="application/merge-patch+json",
        )
    assert "status.failedNamespaces: Too many" in json.loads(exc.value.body)["message"]
