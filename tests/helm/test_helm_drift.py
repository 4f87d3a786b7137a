"""The chart and manifests/ install the same objects, for each variant (one source of truth, checked).

For default, namespaced, rollout-restart and monitoring, ``helm template autotek-operator -n
autotek-system`` (with the variant's ci/ values file) and ``kubectl kustomize`` of the matching
kustomization must give the same objects. The documented differences, and only those, are removed
before the comparison:

- the Namespace object of manifests/ (``helm install --create-namespace`` makes the namespace), and
  the chart's ``helm test`` Pod (a hook that only ``helm test`` creates; rendered with ``--skip-tests``);
- the labels Helm adds: ``helm.sh/chart``, ``app.kubernetes.io/managed-by``, ``app.kubernetes.io/version``
  and ``app.kubernetes.io/instance`` (the last also in the selectors: two releases may share a namespace);
- the CRD's ``helm.sh/resource-policy: keep`` annotation;
- the chart's labels ``app.kubernetes.io/name`` and ``part-of`` on the ServiceMonitor and PrometheusRule
  (manifests' monitoring component carries none);
- in the operator container's environment: the order of the variables, and every ``AUTOTEK_*``
  variable that only the chart sets and whose value is the operator's own default (the chart spells
  out every setting; the operator reads it back to the same value, checked with ``config.from_env``).

Anything else that differs fails, with a diff of the object.
"""

from __future__ import annotations

import copy
import difflib
import shutil
from typing import Any

import pytest
import yaml

from autotek_operator import config
from helm import helmkit

Doc = dict[str, Any]
#: The kustomization for each variant of helmkit.VARIANTS.
KUSTOMIZATIONS = {
    "default": helmkit.REPO / "manifests",
    "namespaced": helmkit.REPO / "manifests" / "overlays" / "namespaced",
    "rollout-restart": helmkit.REPO / "manifests" / "overlays" / "rollout-restart",
    "monitoring": helmkit.REPO / "manifests" / "overlays" / "monitoring",
}
HELM_LABELS = (
    "helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version", "app.kubernetes.io/instance")
UNLABELLED_IN_MANIFESTS = {"ServiceMonitor", "PrometheusRule"}
KEEP = "helm.sh/resource-policy"


def kustomize(directory: Any) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: cannot render manifests/ with `kubectl kustomize`", pytrace=False)
    helmkit.import_manifest_helpers()
    import manifestcheck

    return manifestcheck.kustomize(kubectl, directory)


def _strip_labels(labels: dict[str, str] | None, keys: tuple[str, ...]) -> None:
    for key in keys:
        (labels or {}).pop(key, None)


def _drop_empty(meta: Doc, key: str) -> None:
    if key in meta and not meta[key]:
        del meta[key]


def _selectors(doc: Doc) -> list[dict[str, str]]:
    """Every label selector of an object in which the chart adds app.kubernetes.io/instance."""
    spec = doc.get("spec") or {}
    found: list[dict[str, str]] = []
    if doc["kind"] == "Service":
        found.append(spec.get("selector") or {})
    if doc["kind"] in ("Deployment", "ServiceMonitor", "PodDisruptionBudget"):
        found.append((spec.get("selector") or {}).get("matchLabels") or {})
    if doc["kind"] == "NetworkPolicy":
        found.append((spec.get("podSelector") or {}).get("matchLabels") or {})
    if doc["kind"] == "Deployment":
        pod = spec["template"]
        found.append(pod["metadata"].get("labels") or {})
        affinity = pod["spec"].get("affinity") or {}
        for term in (affinity.get("podAntiAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution", []):
            found.append(term["podAffinityTerm"]["labelSelector"].get("matchLabels") or {})
    return found


def _is_default(name: str, value: str) -> bool:
    """True when the operator reads ``name=value`` as its default for that setting."""
    fields = {env: field for field, env in config.ENV.items()}
    if name not in fields:
        return False
    try:
        settings = config.from_env({name: value})
    except config.ConfigError:
        return False
    return bool(getattr(settings, fields[name]) == getattr(config.Settings(), fields[name]))


def normalise_chart(docs: list[Doc], manifests: dict[tuple[str, str, str], Doc]) -> list[Doc]:
    out = []
    for doc in copy.deepcopy(docs):
        meta = doc["metadata"]
        _strip_labels(meta.get("labels"), HELM_LABELS)
        if doc["kind"] in UNLABELLED_IN_MANIFESTS:
            _strip_labels(meta.get("labels"), ("app.kubernetes.io/name", "app.kubernetes.io/part-of"))
        _drop_empty(meta, "labels")
        if doc["kind"] == "CustomResourceDefinition":
            (meta.get("annotations") or {}).pop(KEEP, None)
            _drop_empty(meta, "annotations")
        for selector in _selectors(doc):
            _strip_labels(selector, ("app.kubernetes.io/instance",))
        if doc["kind"] == "Deployment":
            theirs = manifests.get(key(doc))
            their_env = {e["name"] for c in _containers(theirs) for e in c.get("env", [])} if theirs else set()
            for container in _containers(doc):
                container["env"] = [
                    e for e in container.get("env", [])
                    if e["name"] in their_env or "value" not in e or not _is_default(e["name"], e["value"])
                ]
        out.append(doc)
    return out


def _containers(doc: Doc) -> list[Doc]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def normalise_both(doc: Doc) -> Doc:
    """Differences of form, not content: environment variable order."""
    if doc["kind"] == "Deployment":
        for container in _containers(doc):
            container["env"] = sorted(container.get("env", []), key=lambda e: e["name"])
    return doc


def key(doc: Doc) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def compare(chart_docs: list[Doc], manifest_docs: list[Doc]) -> list[str]:
    """Readable differences between two renderings (empty: the same objects)."""
    theirs = {key(d): d for d in manifest_docs if d["kind"] != "Namespace"}
    ours = {key(d): normalise_both(d) for d in normalise_chart(chart_docs, theirs)}
    theirs = {k: normalise_both(copy.deepcopy(d)) for k, d in theirs.items()}
    problems = [f"only in the chart: {k}" for k in sorted(set(ours) - set(theirs))]
    problems += [f"only in manifests/: {k}" for k in sorted(set(theirs) - set(ours))]
    for k in sorted(set(ours) & set(theirs)):
        if ours[k] != theirs[k]:
            diff = difflib.unified_diff(
                yaml.safe_dump(theirs[k], sort_keys=True).splitlines(),
                yaml.safe_dump(ours[k], sort_keys=True).splitlines(),
                "manifests/", "chart", lineterm="", n=2,
            )
            problems.append(f"{k} differs:\n" + "\n".join(diff))
    return problems


@pytest.mark.parametrize("variant", list(helmkit.VARIANTS))
def test_chart_renders_what_manifests_install(variant: str) -> None:
    chart = helmkit.template(values_files=helmkit.variant_values(variant), skip_tests=True)
    manifests = kustomize(KUSTOMIZATIONS[variant])
    problems = compare(chart, manifests)
    assert not problems, f"variant {variant}: the chart and manifests/ differ\n" + "\n\n".join(problems)


@pytest.mark.parametrize(("what", "change"), [
    ("a changed probe", lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(
        periodSeconds=21)),
    ("a setting that is not the default", lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AUTOTEK_WORKERS", "value": "9"})),
    ("a changed value", lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AUTOTEK_LOG_LEVEL", "value": "DEBUG"})),
    ("an extra label", lambda d: d["metadata"]["labels"].update(team="x")),
])
def test_the_comparison_notices_a_difference(what: str, change: Any) -> None:
    """The comparison really compares: one change to the chart's Deployment is reported."""
    chart = helmkit.template(skip_tests=True)
    manifests = kustomize(KUSTOMIZATIONS["default"])
    deployment = next(d for d in chart if d["kind"] == "Deployment")
    if what == "a changed value":
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        env[:] = [e for e in env if e["name"] != "AUTOTEK_LOG_LEVEL"]
    change(deployment)
    problems = compare(chart, manifests)
    assert len(problems) == 1 and "Deployment" in problems[0], f"{what}: {problems}"


def test_the_comparison_notices_a_missing_object() -> None:
    chart = [d for d in helmkit.template(skip_tests=True) if d["kind"] != "Service"]
    assert compare(chart, kustomize(KUSTOMIZATIONS["default"])) == [
        "only in manifests/: ('Service', 'autotek-system', 'autotek-operator')"]
