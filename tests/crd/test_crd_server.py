"""The CRD's tables against a real API server: Kubernetes evaluates the schema and the CEL rules.

The same invalid resources as ``test_crd.py`` (``INVALID``) are created with ``dryRun=All`` and
``fieldValidation=Strict`` (what ``kubectl create --dry-run=server`` sends) and each must be refused
with the error Kubernetes gives for the expected problem; the valid variants, the status example and
the example credentials must be accepted. Runs only when ``AUTOTEK_TEST_KUBECONFIG`` names a cluster
(the session's control plane with ``KUBEBUILDER_ASSETS``).
"""

from __future__ import annotations

import copy
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
from test_crd import EXAMPLES, INVALID, STATUS, VALID, Case, minimal, resource

import controlplane
from autotek_operator import constants as c

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"


class Server:
    """The admin client of the cluster and a namespace of this module's own."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.namespace = f"crd-{uuid.uuid4().hex[:8]}"

    def install_crd(self) -> None:
        """Create the CRD unless it exists (other workers share it; it is never deleted) and wait for it."""
        controlplane.install_crds(self.api, [crdcheck.load_crd()])

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create ``doc`` in this module's namespace, dry run, strict field validation; the stored object."""
        body = copy.deepcopy(doc)
        body["metadata"]["namespace"] = self.namespace
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
        return result

    def refusal(self, doc: dict[str, Any]) -> str:
        """The API server's message refusing ``doc``; fails if it was accepted."""
        try:
            self.create(doc)
        except ApiException as exc:
            assert exc.status in (400, 422), f"unexpected HTTP {exc.status}: {exc.body}"
            message: str = json.loads(exc.body)["message"]
            return message
        raise AssertionError(f"the API server accepted {doc['spec']!r}")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    kubeconfig = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip(
            "no real API server: set KUBEBUILDER_ASSETS (or AUTOTEK_TEST_KUBECONFIG) to run the CRD "
            "tables against kube-apiserver"
        )
    s = Server(Path(kubeconfig))
    s.install_crd()
    s.core.create_namespace({"metadata": {"name": s.namespace}})
    yield s
    s.core.delete_namespace(s.namespace)


# -- what Kubernetes says for each kind of problem in the table --------------------------------------


def _rule_message(schema: dict[str, Any], path: str, text: str) -> str:
    """The ``message`` of the CEL rule on ``path`` (or its nearest ancestor with one) that contains ``text``:
    Kubernetes reports a rule's message as written."""
    for node in sorted({p for p, _ in crdcheck.all_rules(schema)}, key=len, reverse=True):
        if path == node or path.startswith(node + "."):
            found = [r["message"] for p, r in crdcheck.all_rules(schema) if p == node and text in r.get("message", "")]
            if found:
                assert len(found) == 1, f"several rules at {node} mention {text!r}: {found}"
                return found[0]
    raise AssertionError(f"no rule at {path} or above has a message containing {text!r}")


def server_phrase(schema: dict[str, Any], path: str, kind: str, text: str) -> str:
    """The text kube-apiserver's error contains for the problem (path, kind, text) of ``INVALID``."""
    if kind == "required":
        return f"{path}.{text.strip(chr(39))}: Required value"
    if kind == "unknown":
        return f'unknown field "{path}"'
    if kind == "enum":
        return f"{path}: Unsupported value"
    if kind == "minimum":
        return f"{path} in body should be greater than or equal to"
    if kind == "maximum":
        return f"{path} in body should be less than or equal to"
    if kind == "type":
        return f"{path} in body must be of type {text}".rstrip()
    if kind == "pattern":
        return f"{path} in body should match"
    if kind == "maxLength":
        return f"{path}: Too long: may not be more than"
    if kind in ("maxProperties", "maxItems"):
        return f"{path}: Too many:"
    if kind == "rule":
        return _rule_message(schema, path, text)
    raise AssertionError(f"no server phrase for the problem kind {kind!r}")


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
    phrases = []
    for path, kind, text in SERVER_EXPECT.get(case.id, case.expect):
        phrases.append(text if kind == "conversion" else server_phrase(schema, path, kind, text))
    return phrases


def test_server_expectations_name_only_known_cases() -> None:
    assert set(SERVER_EXPECT) <= {case.id for case in INVALID}


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_api_server_rejects_invalid_resource_with_reason(server: Server, schema: dict[str, Any], case: Case) -> None:
    message = server.refusal(resource(copy.deepcopy(case.spec)))
    for phrase in expected_phrases(schema, case):
        assert phrase in message, f"{case.id}: expected {phrase!r} in the API server's error:\n{message}"


@pytest.mark.parametrize(("label", "spec"), VALID, ids=[label for label, _ in VALID])
def test_api_server_admits_valid_variant(server: Server, label: str, spec: dict[str, Any]) -> None:
    stored = server.create(resource(copy.deepcopy(spec)))
    # What the API server stores is what crdcheck predicts (defaults, pruning).
    predicted = crdcheck.admit(resource(copy.deepcopy(spec)), crdcheck.openapi_schema(crdcheck.load_crd()))
    assert stored["spec"] == predicted.stored["spec"]


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_api_server_admits_example_credential(server: Server, filename: str, doc: dict[str, Any]) -> None:
    assert doc["kind"] == c.KIND
    stored = server.create(doc)
    assert stored["spec"]["clientSecretRef"] == {
        **{"clientIdKey": "client_id", "clientSecretKey": "client_secret"},
        **doc["spec"]["clientSecretRef"],
    }


def test_api_server_prunes_what_crdcheck_prunes(server: Server) -> None:
    """Without strict field validation an unknown field is dropped, as crdcheck's lenient mode does."""
    body = resource({"clientSecretRef": {"name": "autotek-client", "namespace": "other"}})
    body["metadata"]["namespace"] = server.namespace
    stored = server.custom.create_namespaced_custom_object(
        GROUP, VERSION, server.namespace, PLURAL, body, dry_run="All", field_validation="Ignore"
    )
    assert stored["spec"]["clientSecretRef"] == {
        "name": "autotek-client",
        "clientIdKey": "client_id",
        "clientSecretKey": "client_secret",
    }


def test_api_server_admits_the_status_example(server: Server) -> None:
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
