"""Each variant of the chart, rendered by ``helm template``, passes a real API server's admission.

``kubectl apply --dry-run=server`` sends every object through decoding, strict field validation,
defaulting, OpenAPI and CEL validation and admission, without storing it. Runs only when
``AUTOTEK_TEST_KUBECONFIG`` names a cluster (the session's control plane with ``KUBEBUILDER_ASSETS``).

The API server is shared with other test workers: the release namespace and the watched namespace
are made for this module with unique names (Pod Security "restricted" enforced, and the ServiceAccount
the ``helm test`` Pod runs as, since a dry run creates none) and deleted afterwards; the CRDs the dry runs need
(AutoTekCredential, and minimal ServiceMonitor and PrometheusRule ones from tests/manifests) are
created when missing and, like there, never deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from helm import helmkit

EXAMPLES = sorted((helmkit.CHART / "examples").glob("*.yaml"))


class Namespaces:
    def __init__(self, cluster: Any) -> None:
        suffix = secrets.token_hex(3)
        self.release = f"helm-dry-{suffix}"
        self.watched = f"helm-dry-{suffix}-shop"
        self.core = kubernetes.client.CoreV1Api(cluster.api)

    def create(self) -> None:
        # Pod Security "restricted" enforced, as manifests/ labels autotek-system: the helm test Pod must pass it.
        labels = {"autotek.io/test": "helm-dry-run", "pod-security.kubernetes.io/enforce": "restricted"}
        for name in (self.release, self.watched):
            self.core.create_namespace({"metadata": {"name": name, "labels": labels}})
        # A dry run creates nothing, so the helm test Pod's ServiceAccount must exist for its admission.
        self.core.create_namespaced_service_account(self.release, {"metadata": {"name": helmkit.RELEASE}})

    def delete(self) -> None:
        for name in (self.release, self.watched):
            try:
                self.core.delete_namespace(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture(scope="module")
def cluster() -> Any:
    kubeconfig = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip("no real API server: set KUBEBUILDER_ASSETS (or AUTOTEK_TEST_KUBECONFIG) to send the chart's "
                    "renderings through kube-apiserver's admission")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the dry runs use `kubectl apply --dry-run=server`", pytrace=False)
    helmkit.import_manifest_helpers()
    import manifestcheck
    from test_admission import MONITORING_KINDS, Cluster, monitoring_crd

    c = Cluster(kubectl, Path(kubeconfig))
    for crd in manifestcheck.CRDS_DIR.glob("*.yaml"):
        if crd.name != "kustomization.yaml":
            c.ensure_crd(manifestcheck.load_yaml_documents(crd)[0])
    for plural, kind in MONITORING_KINDS:
        c.ensure_crd(monitoring_crd(plural, kind))
    return c


@pytest.fixture(scope="module")
def namespaces(cluster: Any) -> Iterator[Namespaces]:
    ns = Namespaces(cluster)
    try:
        ns.create()
        yield ns
    finally:
        ns.delete()


def render(namespaces: Namespaces, values_files: list[Path], extra: dict[str, Any] | None = None) -> list[Any]:
    """The chart in this module's namespace; a namespaced rendering watches this module's namespace."""
    set_values = dict(extra or {})
    docs = helmkit.template(values_files=values_files, namespace=namespaces.release)
    if any(d["kind"] == "Role" and d["metadata"].get("namespace") != namespaces.release for d in docs):
        set_values["watchNamespaces"] = [namespaces.watched]  # the namespace this module made, not `shop`
    return helmkit.template(values_files=values_files, set_values=set_values, namespace=namespaces.release)


@pytest.mark.parametrize("variant", list(helmkit.VARIANTS))
def test_variant_is_admitted(cluster: Any, namespaces: Namespaces, variant: str) -> None:
    docs = render(namespaces, helmkit.variant_values(variant))
    if variant == "namespaced":
        # `default`: events create only, for the Events of ClusterAutoTekCredentials (involvedObject.namespace "").
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] == "Role"} == {
            namespaces.release, namespaces.watched, "default"}
    assert any(d["kind"] == "Pod" for d in docs), "the helm test Pod is not in the rendering"
    cluster.admitted(docs, f"helm template ({variant})")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_values_are_admitted(cluster: Any, namespaces: Namespaces, example: Path) -> None:
    docs = render(namespaces, [example])
    cluster.admitted(docs, f"helm template -f {example.name}")


def test_every_optional_object_is_admitted(cluster: Any, namespaces: Namespaces) -> None:
    docs = render(namespaces, [], {
        "podDisruptionBudget.enabled": True, "networkPolicy.enabled": True, "serviceMonitor.enabled": True,
        "prometheusRule.enabled": True, "rolloutRestart.enabled": True,
        "networkPolicy.apiServer.cidrs": ["10.0.0.1/32"],
        "allowedTokenURLs": ["https://api.autograb.com.au/", "http://broker.example:8080/"],
    })
    kinds = {d["kind"] for d in docs}
    assert {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"} <= kinds
    cluster.admitted(docs, "helm template with every optional object")


def test_the_dry_run_refuses_what_the_schema_lets_through(cluster: Any, namespaces: Namespaces) -> None:
    """The dry run really checks: Kubernetes-typed values are free-form in the schema, the API server is not."""
    docs = render(namespaces, [], {"topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "Sometimes"}]})
    proc = cluster.dry_run(docs)
    assert proc.returncode != 0 and "whenUnsatisfiable" in proc.stderr, proc.stderr + proc.stdout
