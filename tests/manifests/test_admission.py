"""Every kustomize rendering and every example passes a real API server's admission.

``kubectl apply --dry-run=server -f -`` runs each object through the API server's decoding, strict
field validation, defaulting, OpenAPI and CEL validation and admission plugins, without storing it.
Renderings: ``manifests/`` (the base), every overlay in ``manifests/overlays/``, and every component in
``manifests/components/`` applied on top of the base through a temporary kustomization.

Runs only when ``AUTOTEK_TEST_KUBECONFIG`` names a cluster (the session's control plane with
``KUBEBUILDER_ASSETS``). The cluster gets what dry runs cannot create for themselves: the CRD, minimal
CRDs for the Prometheus Operator's ServiceMonitor and PrometheusRule (their schemas keep every field;
the real ones are not needed to show that our objects decode), and the namespaces the files name.
Those are shared by every test worker and never deleted.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import manifestcheck as mc
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

OVERLAYS = sorted(p for p in (mc.BASE_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p for p in (mc.BASE_DIR / "components").iterdir() if (p / "kustomization.yaml").exists())
EXAMPLES = sorted(mc.EXAMPLES_DIR.glob("*.yaml"))
#: The Prometheus Operator's kinds the monitoring component uses: (plural, kind).
MONITORING_KINDS = [("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")]


def monitoring_crd(plural: str, kind: str) -> dict[str, Any]:
    """A minimal monitoring.coreos.com/v1 CRD for ``kind`` whose schema keeps every field."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


class Cluster:
    def __init__(self, kubectl: str, kubeconfig: Path) -> None:
        self.kubectl, self.kubeconfig = kubectl, kubeconfig
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))

    def ensure_crd(self, crd: dict[str, Any]) -> None:
        ext = kubernetes.client.ApiextensionsV1Api(self.api)
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._wait(f"CRD {crd['metadata']['name']} Established", lambda: any(
            x.type == "Established" and x.status == "True"
            for x in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []))

    def ensure_namespace(self, name: str) -> None:
        core = kubernetes.client.CoreV1Api(self.api)
        try:
            core.create_namespace({"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise

        def has_default_account() -> bool:  # a Pod without serviceAccountName needs it (admission)
            try:
                core.read_namespaced_service_account("default", name)
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        self._wait(f"the default ServiceAccount in {name}", has_default_account)

    @staticmethod
    def _wait(what: str, fn: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if fn():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def dry_run(self, docs: list[mc.Doc]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), "apply", "--dry-run=server", "-f", "-"],
            input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120, check=False,
        )

    def admitted(self, docs: list[mc.Doc], what: str) -> None:
        """Every object of ``docs`` passes admission; each one is reported by kubectl."""
        assert docs, f"{what}: nothing to apply"
        proc = self.dry_run(docs)
        assert proc.returncode == 0, f"{what} was refused by the API server:\n{proc.stderr}{proc.stdout}"
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(lines) == len(docs) and all(line.endswith("(server dry run)") for line in lines), proc.stdout


def namespaces_named(docs: list[mc.Doc]) -> set[str]:
    return {d["metadata"]["namespace"] for d in docs if d.get("metadata", {}).get("namespace")}


@pytest.fixture(scope="module")
def cluster(kubectl: str) -> Iterator[Cluster]:
    kubeconfig = os.environ.get("AUTOTEK_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip("no real API server: set KUBEBUILDER_ASSETS (or AUTOTEK_TEST_KUBECONFIG) to run the "
                    "manifests and examples through kube-apiserver's admission")
    c = Cluster(kubectl, Path(kubeconfig))
    for path in sorted(mc.CRDS_DIR.glob("*.yaml")):
        for doc in mc.load_yaml_documents(path):
            if doc.get("kind") == "CustomResourceDefinition":
                c.ensure_crd(doc)
    for plural, kind in MONITORING_KINDS:
        c.ensure_crd(monitoring_crd(plural, kind))
    yield c


def prepared(cluster: Cluster, docs: list[mc.Doc]) -> list[mc.Doc]:
    for ns in sorted(namespaces_named(docs)):
        cluster.ensure_namespace(ns)
    return docs


def with_component(kubectl: str, component: Path, workdir: Path) -> list[mc.Doc]:
    """The base with one component on top, rendered through a temporary kustomization."""
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731 - kustomize wants relative paths
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(mc.BASE_DIR / "base")], "components": [rel(component)],
    }))
    return mc.kustomize(kubectl, workdir)


def test_there_is_something_to_admit() -> None:
    assert [p.name for p in OVERLAYS] and [p.name for p in COMPONENTS] and EXAMPLES


def test_base_is_admitted(cluster: Cluster, base_docs: list[mc.Doc]) -> None:
    cluster.admitted(prepared(cluster, base_docs), "kubectl kustomize manifests/")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_is_admitted(cluster: Cluster, kubectl: str, overlay: Path) -> None:
    docs = mc.kustomize(kubectl, overlay)
    cluster.admitted(prepared(cluster, docs), f"overlay {overlay.name}")


@pytest.mark.parametrize("component", COMPONENTS, ids=[p.name for p in COMPONENTS])
def test_component_on_the_base_is_admitted(cluster: Cluster, kubectl: str, component: Path, tmp_path: Path) -> None:
    docs = with_component(kubectl, component, tmp_path)
    base = {mc.ident(d) for d in mc.kustomize(kubectl, mc.BASE_DIR)}
    assert {mc.ident(d) for d in docs} >= base
    cluster.admitted(prepared(cluster, docs), f"the base with component {component.name}")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_admitted(cluster: Cluster, example: Path) -> None:
    docs = mc.load_yaml_documents(example)
    cluster.admitted(prepared(cluster, docs), f"examples/{example.name}")


@pytest.mark.parametrize(("what", "change", "expected"), [
    ("an unknown field", lambda d: d["spec"]["template"]["spec"].update(priority_class="x"),
     'unknown field "spec.template.spec.priority_class"'),
    ("a wrong type", lambda d: d["spec"].update(replicas="two"), "replicas"),
])
def test_a_broken_deployment_is_refused(cluster: Cluster, base_docs: list[mc.Doc], what: str, change: Any,
                                        expected: str) -> None:
    """The dry run really checks: the base's Deployment with a mistake is refused."""
    import copy

    docs = copy.deepcopy(prepared(cluster, base_docs))
    change(mc.only(docs, "Deployment"))
    proc = cluster.dry_run(docs)
    assert proc.returncode != 0, f"{what} was admitted:\n{proc.stdout}"
    assert expected in proc.stderr, proc.stderr
