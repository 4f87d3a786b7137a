"""What the CRD tests of both kinds share: the table of invalid resources and how it is checked.

AutoTekCredential (``test_crd.py``, ``test_crd_server.py``) and ClusterAutoTekCredential
(``test_cluster_crd.py``, ``test_cluster_crd_server.py``) are tested the same way: each invalid
resource of a table must be refused with its expected problems by ``crdcheck.admit`` (offline) and
by kube-apiserver (a dry-run create), and its spec must be refused by the operator's own parser
too, unless the schema alone enforces the limit or a known disagreement is recorded with the case.
This module holds the case type, the resources and examples of a kind, those checks, the client
for the real API server and the phrases its errors must contain.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crdcheck
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from autotek_operator.errors import InvalidSpec
from autotek_operator.spec import parse_spec

# ============================================================================================
# Tables of invalid resources


@dataclass(frozen=True)
class Case:
    id: str
    spec: Any
    expect: tuple[tuple[str, str, str], ...]  # (path, kind, text in the message), all must appear
    # "reject": the operator's parser must raise InvalidSpec too; "schema-only": a size limit only
    # the schema enforces (for the CEL cost budget); anything else: a known spec.py disagreement.
    operator: str = "reject"


def resource(kind: str, spec: Any, name: str, namespace: str | None = None) -> dict[str, Any]:
    """A resource of ``kind`` with ``spec``; namespaced when ``namespace`` is given."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"apiVersion": "autotek.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}


def examples(kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every resource of ``kind`` in examples/."""
    out = []
    for path in sorted(crdcheck.EXAMPLES_DIR.glob("*.yaml")):
        for doc in crdcheck.load_documents(path):
            if doc.get("kind") == kind:
                out.append((path.name, doc))
    return out


def operator_rejects(spec: Any, name: str = "autotek", *, cluster: bool = False) -> bool:
    """Whether the operator's parser refuses ``spec`` (as a cluster spec with ``cluster``)."""
    try:
        parse_spec(spec, name=name, cluster=cluster)
    except InvalidSpec:
        return True
    return False


def assert_refused_with_reason(doc: dict[str, Any], schema: dict[str, Any], case: Case) -> None:
    """``crdcheck.admit`` refuses ``doc`` with every problem ``case`` expects."""
    result = crdcheck.admit(doc, schema)
    assert not result.allowed
    for path, kind, text in case.expect:
        assert any(p.path == path and p.kind == kind and text in p.message for p in result.problems), (
            f"expected {kind} at {path} ({text!r}); got:\n{result.explain()}"
        )


def operator_params(cases: Iterable[Case]) -> list[Any]:
    """The cases the operator's parser must refuse too, as parameters: all but the schema-only ones. A
    case with a known disagreement is a strict xfail, so the run fails once the parser refuses it."""
    out = []
    for case in cases:
        if case.operator == "schema-only":
            continue
        if case.operator == "reject":
            out.append(pytest.param(case, id=case.id))
        else:
            out.append(pytest.param(case, id=case.id, marks=pytest.mark.xfail(reason=case.operator, strict=True)))
    return out


# ============================================================================================
# A real API server


def kubeconfig_or_skip(tables: str) -> Path:
    """The admin kubeconfig of the cluster the ``tables`` run against; skips when there is none."""
    kubeconfig = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip(
            f"no real API server: set KUBEBUILDER_ASSETS (or AUTOTEK_TEST_KUBECONFIG) to run the {tables} "
            "tables against kube-apiserver"
        )
    return Path(kubeconfig)


class Server:
    """The admin client of the cluster, creating ``group/version/plural`` objects: in ``namespace``, or
    cluster-scoped when it is None."""

    def __init__(self, kubeconfig: Path, group: str, version: str, plural: str, namespace: str | None = None) -> None:
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.group, self.version, self.plural, self.namespace = group, version, plural, namespace

    def create(self, doc: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """Create ``doc`` (dry run; strict field validation unless told otherwise); the stored object."""
        body = copy.deepcopy(doc)
        validation = "Strict" if strict else "Ignore"
        result: dict[str, Any]
        if self.namespace is None:
            result = self.custom.create_cluster_custom_object(
                self.group, self.version, self.plural, body, dry_run="All", field_validation=validation
            )
        else:
            body["metadata"]["namespace"] = self.namespace
            result = self.custom.create_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, body, dry_run="All", field_validation=validation
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


# -- what Kubernetes says for each kind of problem in a table ----------------------------------------


def rule_message(schema: dict[str, Any], path: str, text: str) -> str:
    """The ``message`` of the one CEL rule on the node of ``path`` (list indices as ``[]``) that contains
    ``text``: Kubernetes reports a rule's message as written."""
    node_path = re.sub(r"\[\d+\]", "[]", path)
    found = [r["message"] for p, r in crdcheck.all_rules(schema) if p == node_path and text in r["message"]]
    assert len(found) == 1, f"rules at {node_path} mentioning {text!r}: {found}"
    return found[0]


def server_phrase(schema: dict[str, Any], path: str, kind: str, text: str) -> str:
    """The text kube-apiserver's error contains for the problem (path, kind, text) of a case.

    ``conversion`` is a problem only a real server reports (its ``text`` is the phrase)."""
    if kind == "conversion":
        return text
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
    if kind == "duplicate":
        return f"{path}: Duplicate value"
    if kind == "rule":
        return rule_message(schema, path, text)
    raise AssertionError(f"no server phrase for the problem kind {kind!r}")


def server_phrases(schema: dict[str, Any], expect: Iterable[tuple[str, str, str]]) -> list[str]:
    """What kube-apiserver's error must contain for the problems ``expect``."""
    return [server_phrase(schema, path, kind, text) for path, kind, text in expect]
