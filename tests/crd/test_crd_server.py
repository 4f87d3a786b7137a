"""The CRD's tables against a real API server: Kubernetes evaluates the schema and the CEL rules.

The same invalid resources as ``test_crd.py`` (``INVALID``) are created with ``dryRun=All`` and
``fieldValidation=Strict`` (what ``kubectl create --dry-run=server`` sends) and each must be refused
with the error Kubernetes gives for the expected problem; the valid variants, the status example and
the example credentials must be accepted. Runs only when ``AUTOTEK_TEST_KUBECONFIG`` names a cluster
(the session's control plane with ``KUBEBUILDER_ASSETS``).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import crdcheck
import crdkit
import pytest
from crdkit import Case
from test_crd import EXAMPLES, INVALID, STATUS, VALID, minimal, resource

import controlplane
from autotek_operator import constants as c

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"


@pytest.fixture(scope="module")
def server() -> Iterator[crdkit.Server]:
    """The admin client of the cluster, creating in a namespace of this module's own."""
    s = crdkit.Server(crdkit.kubeconfig_or_skip("CRD"), GROUP, VERSION, PLURAL, namespace=f"crd-{uuid.uuid4().hex[:8]}")
    # The CRD is created unless it exists (other workers share it; it is never deleted).
    controlplane.install_crds(s.api, [crdcheck.load_crd()])
    s.core.create_namespace({"metadata": {"name": s.namespace}})
    yield s
    s.core.delete_namespace(s.namespace)


# -- what Kubernetes says for each kind of problem in the table (crdkit.server_phrase) ---------------


#: Where cel-python and Kubernetes word a problem differently: the case's expectation on a real server.
SERVER_EXPECT: dict[str, tuple[tuple[str, str, str], ...]] = {
    # cel-python reports the failed conversion as an evaluation error; Kubernetes names the conversion
    # error and the rule it was evaluating (its message).
    "renewBefore too large for Kubernetes": (
        ("spec.refresh.renewBefore", "rule", "longer than zero"),
        ("spec.refresh.renewBefore", "conversion", "type conversion error"),
    ),
}


def expected_phrases(schema: dict[str, Any], case: Case) -> list[str]:
    return crdkit.server_phrases(schema, SERVER_EXPECT.get(case.id, case.expect))


def test_server_expectations_name_only_known_cases() -> None:
    assert set(SERVER_EXPECT) <= {case.id for case in INVALID}


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_api_server_rejects_invalid_resource_with_reason(
    server: crdkit.Server, schema: dict[str, Any], case: Case
) -> None:
    message = server.refusal(resource(copy.deepcopy(case.spec)))
    for phrase in expected_phrases(schema, case):
        assert phrase in message, f"{case.id}: expected {phrase!r} in the API server's error:\n{message}"


@pytest.mark.parametrize(("label", "spec"), VALID, ids=[label for label, _ in VALID])
def test_api_server_admits_valid_variant(server: crdkit.Server, label: str, spec: dict[str, Any]) -> None:
    stored = server.create(resource(copy.deepcopy(spec)))
    # What the API server stores is what crdcheck predicts (defaults, pruning).
    predicted = crdcheck.admit(resource(copy.deepcopy(spec)), crdcheck.openapi_schema(crdcheck.load_crd()))
    assert stored["spec"] == predicted.stored["spec"]


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_api_server_admits_example_credential(server: crdkit.Server, filename: str, doc: dict[str, Any]) -> None:
    assert doc["kind"] == c.KIND
    stored = server.create(doc)
    assert stored["spec"]["clientSecretRef"] == {
        **{"clientIdKey": "client_id", "clientSecretKey": "client_secret"},
        **doc["spec"]["clientSecretRef"],
    }


def test_api_server_prunes_what_crdcheck_prunes(server: crdkit.Server) -> None:
    """Without strict field validation an unknown field is dropped, as crdcheck's lenient mode does."""
    stored = server.create(
        resource({"clientSecretRef": {"name": "autotek-client", "namespace": "other"}}), strict=False
    )
    assert stored["spec"]["clientSecretRef"] == {
        "name": "autotek-client",
        "clientIdKey": "client_id",
        "clientSecretKey": "client_secret",
    }


def test_api_server_admits_the_status_example(server: crdkit.Server) -> None:
    """The status subresource is written by the operator; its schema must accept a full status."""
    name = f"status-{uuid.uuid4().hex[:6]}"
    body = resource(minimal(), name=name)
    body["metadata"]["namespace"] = server.namespace
    server.custom.create_namespaced_custom_object(GROUP, VERSION, server.namespace, PLURAL, body)
    patched = server.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        server.namespace,
        PLURAL,
        name,
        {"status": STATUS},
        dry_run="All",
        _content_type="application/merge-patch+json",
    )
    assert patched["status"] == STATUS
