"""The Helm chart offline: lint, versions, the generated CRD templates, the schema, and what values render.

Everything here runs ``helm lint`` or ``helm template`` (no cluster). The Helm binary comes from
``make helm``; without one the tests fail and say so.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from autotek_operator import __version__
from helm import chart_sync, helmkit
from helm.helmkit import CHART, template

Doc = dict[str, Any]
EXAMPLE_VALUES = sorted((CHART / "examples").glob("*.yaml"))
LINT_CASES = [None, *sorted(helmkit.CI_VALUES.glob("*.yaml")), *EXAMPLE_VALUES]


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[(d['kind'], d['metadata']) for d in found]}"
    return found[0]


def kinds(docs: list[Doc]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def env_of(docs: list[Doc]) -> dict[str, str]:
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


# -- lint and versions -------------------------------------------------------------------------------


def test_the_variants_have_values_files() -> None:
    for variant, path in helmkit.VARIANTS.items():
        assert path is None or path.is_file(), f"variant {variant}: {path} is missing"
    assert EXAMPLE_VALUES, "no example values in charts/autotek-operator/examples/"


@pytest.mark.parametrize("values", LINT_CASES, ids=lambda p: "defaults" if p is None else f"{p.parent.name}/{p.name}")
def test_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + ([] if values is None else ["--values", str(values)])
    proc = helmkit.helm(*args)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_lint_strict_finds_a_broken_chart(tmp_path: Path) -> None:
    """The lint really checks: a template that renders an object without a name fails --strict."""
    chart = tmp_path / "autotek-operator"
    shutil.copytree(CHART, chart)
    broken = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Values.nope.x }}\n"
    (chart / "templates" / "broken.yaml").write_text(broken)
    proc = helmkit.helm("lint", "--strict", str(chart))
    assert proc.returncode != 0, proc.stdout


def test_chart_versions_follow_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((helmkit.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == project == __version__, (chart, project, __version__)
    images = yaml.safe_load((helmkit.REPO / "manifests" / "base" / "kustomization.yaml").read_text())["images"]
    assert [i["newTag"] for i in images] == [project], "manifests/ and the chart install different image tags"


# -- the CRD templates come from crds/ ---------------------------------------------------------------


def test_crd_templates_are_generated_from_crds() -> None:
    problems = chart_sync.stale()
    assert not problems, "the chart's CRD templates differ from crds/:\n" + "\n".join(problems) + (
        "\nrun `make chart-sync` and commit the result"
    )


def test_chart_sync_handles_every_crd_file_and_notices_changes(tmp_path: Path) -> None:
    crds, target = tmp_path / "crds", tmp_path / "charts" / "autotek-operator" / "templates" / "crds"
    shutil.copytree(chart_sync.CRDS_DIR, crds)
    second = yaml.safe_load((crds / "autotekcredentials.autotek.io.yaml").read_text())
    second["metadata"]["name"] = "clusterautotekcredentials.autotek.io"
    second["metadata"]["annotations"] = {"example.com/note": "{{ not a template }}"}
    second["spec"]["names"] = {"kind": "ClusterAutoTekCredential", "plural": "clusterautotekcredentials",
                               "singular": "clusterautotekcredential", "listKind": "ClusterAutoTekCredentialList"}
    (crds / "clusterautotekcredentials.autotek.io.yaml").write_text(yaml.safe_dump(second))
    assert len(chart_sync.stale(crds, target)) == 2  # both missing
    chart_sync.write(crds, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in chart_sync.sources(crds))
    assert chart_sync.stale(crds, target) == []
    (crds / "autotekcredentials.autotek.io.yaml").write_text(
        (crds / "autotekcredentials.autotek.io.yaml").read_text().replace("served: true", "served: false"))
    (target / "gone.yaml").write_text("# no source\n")
    problems = chart_sync.stale(crds, target)
    assert any("autotekcredentials.autotek.io.yaml is out of date" in p for p in problems), problems
    assert any("gone.yaml has no source" in p for p in problems), problems
    assert chart_sync.main(["chart_sync", "--check"]) == 0  # the repository's own copy is current


def test_crd_rendered_by_the_chart_is_the_one_in_crds() -> None:
    for source in chart_sync.sources():
        want = yaml.safe_load(source.read_text())
        got = only(template(), "CustomResourceDefinition", want["metadata"]["name"])
        assert got["spec"] == want["spec"], f"{source.name}: the chart renders another spec"
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


@pytest.mark.parametrize(("values", "present", "kept"), [
    ({}, True, True),
    ({"crds.keep": False}, True, False),
    ({"crds.enabled": False}, False, False),
])
def test_crd_switches(values: dict[str, Any], present: bool, kept: bool) -> None:
    crds = [d for d in template(set_values=values) if d["kind"] == "CustomResourceDefinition"]
    assert bool(crds) == present
    for crd in crds:
        assert (crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep") == kept


# -- the schema refuses bad values, naming the field --------------------------------------------------


BAD_VALUES = [
    # (what, values, what helm's error must contain)
    ("unknown top-level key", {"replicas": 2}, "'replicas' not allowed"),
    ("unknown nested key", {"image.name": "x"}, "/image"),
    ("unknown deeply nested key", {"networkPolicy.apiServer.cidr": "10.0.0.1/32"}, "/networkPolicy/apiServer"),
    ("log format xml", {"logFormat": "xml"}, "/logFormat"),
    ("log level LOUD", {"logLevel": "LOUD"}, "/logLevel"),
    ("pull policy", {"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
    ("negative replicaCount", {"replicaCount": -1}, "/replicaCount"),
    ("replicaCount as text", {"replicaCount": "two"}, "/replicaCount"),
    ("leader election flag as text", {"leaderElection.enabled": "yes"}, "/leaderElection/enabled"),
    ("zero lease duration", {"leaderElection.leaseDuration": 0}, "/leaderElection/leaseDuration"),
    ("watchNamespaces as text", {"watchNamespaces": "shop"}, "/watchNamespaces"),
    ("invalid namespace name", {"watchNamespaces": ["Shop_1"]}, "/watchNamespaces/0"),
    ("invalid client Secret namespace", {"clusterCredentialNamespaces": ["Ops_1"]}, "/clusterCredentialNamespaces/0"),
    ("token URL without scheme", {"allowedTokenURLs": ["api.autograb.com.au"]}, "/allowedTokenURLs/0"),
    ("no token URL", {"allowedTokenURLs": []}, "/allowedTokenURLs"),
    ("http timeout too long", {"httpTimeout": 301}, "/httpTimeout"),
    ("workers zero", {"workers": 0}, "/workers"),
    ("metrics port out of range", {"metrics.port": 70000}, "/metrics/port"),
    ("crds.keep as text", {"crds.keep": "true"}, "/crds/keep"),
    ("resources with a typo", {"resources.limit": {"memory": "1Gi"}}, "/resources"),
    ("image digest malformed", {"image.digest": "latest"}, "/image/digest"),
    ("PDB minAvailable malformed", {"podDisruptionBudget.minAvailable": "half"}, "/podDisruptionBudget/minAvailable"),
    ("NetworkPolicy CIDR malformed", {"networkPolicy.apiServer.cidrs": ["kubernetes"]},
     "/networkPolicy/apiServer/cidrs/0"),
    ("extraEnv without a name", {"extraEnv": [{"value": "x"}]}, "/extraEnv/0"),
]


@pytest.mark.parametrize(("what", "values", "needle"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_schema_refuses_bad_values(what: str, values: dict[str, Any], needle: str) -> None:
    proc = helmkit.helm("template", *helmkit.template_args(set_values=values))
    assert proc.returncode != 0, f"{what}: accepted:\n{proc.stdout[:2000]}"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert needle in proc.stderr, f"{what}: helm's error does not name {needle!r}:\n{proc.stderr}"


@pytest.mark.parametrize(("values", "needle"), [
    ({"leaderElection.enabled": False}, "replicaCount"),
    ({"leaderElection.renewDeadline": 30}, "leaderElection.renewDeadline"),
    ({"leaderElection.retryPeriod": 20}, "leaderElection.retryPeriod"),
    ({"serviceMonitor.enabled": True, "metrics.service.enabled": False}, "metrics.service.enabled"),
])
def test_inconsistent_values_are_refused(values: dict[str, Any], needle: str) -> None:
    proc = helmkit.helm("template", *helmkit.template_args(set_values=values))
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


def test_values_the_schema_accepts_render() -> None:
    docs = template(set_values={"leaderElection.enabled": False, "replicaCount": 1, "logFormat": "text",
                                "logLevel": "DEBUG", "httpTimeout": 2.5, "podDisruptionBudget.enabled": True,
                                "podDisruptionBudget.maxUnavailable": "50%"})
    env = env_of(docs)
    assert (env["AUTOTEK_LEADER_ELECTION"], env["AUTOTEK_LOG_FORMAT"], env["AUTOTEK_HTTP_TIMEOUT"]) == (
        "false", "text", "2.5")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-leader-election")]
    assert only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == "50%"


# -- what the values render -----------------------------------------------------------------------------


def test_the_settings_reach_the_operator() -> None:
    """Every operator setting the chart sets is one the operator reads, with a value it accepts."""
    from autotek_operator import config

    env = env_of(template(values_files=helmkit.variant_values("namespaced"), set_values={
        "credentialSelector": "team=a", "workers": 4, "leaderElection.leaseDuration": 60,
        "clusterCredentialNamespaces": ["autotek-system", "platform-secrets"],
        "allowedTokenURLs": ["https://a.example/", "http://b.example:8080/"]}))
    unknown = {k for k in env if k.startswith("AUTOTEK_")} - set(config.ENV.values())
    assert not unknown, f"the chart sets variables the operator does not read: {unknown}"
    s = config.from_env(env)
    assert s.namespaces == ("shop",) and s.credential_selector == "team=a" and s.workers == 4
    assert s.leader_election and s.leader_election_lease_duration == 60
    assert s.allowed_token_urls == ("https://a.example/", "http://b.example:8080/")
    assert s.cluster_credential_namespaces == ("autotek-system", "platform-secrets")


def test_namespaced_mode_has_no_cluster_wide_permissions() -> None:
    """No cluster-wide permission on Secrets: only the read-only ClusterRole for cluster credentials
    and namespaces (and their status) stays."""
    docs = template(set_values={"watchNamespaces": ["shop", "billing"]})
    clusterwide_docs = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"]["name"] for d in clusterwide_docs} == {"autotek-operator-cluster-credentials"}
    small = only(docs, "ClusterRole", "autotek-operator-cluster-credentials")
    assert {r for rule in small["rules"] for r in rule["resources"]} == {
        "clusterautotekcredentials", "clusterautotekcredentials/status", "namespaces"}
    roles = {d["metadata"]["namespace"]: d for d in docs
             if d["kind"] == "Role" and d["metadata"]["name"] == "autotek-operator"}
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"
                and d["metadata"]["name"] == "autotek-operator"}
    assert set(roles) == bindings == {"shop", "billing"}
    clusterwide = only(template(), "ClusterRole", "autotek-operator")
    assert all(role["rules"] == clusterwide["rules"] for role in roles.values())
    assert env_of(docs)["AUTOTEK_NAMESPACES"] == "shop,billing"


def test_rollout_restart_rbac_follows_the_switch() -> None:
    rule = {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets"],
            "verbs": ["get", "patch"]}
    assert rule not in only(template(), "ClusterRole", "autotek-operator")["rules"]
    docs = template(values_files=helmkit.variant_values("rollout-restart"))
    assert rule in only(docs, "ClusterRole", "autotek-operator")["rules"]
    assert env_of(docs)["AUTOTEK_ROLLOUT_RESTART"] == "true"
    namespaced = template(set_values={"rolloutRestart.enabled": True, "watchNamespaces": ["shop"]})
    assert rule in only(namespaced, "Role", "autotek-operator")["rules"]


@pytest.mark.parametrize(("image", "expected"), [
    ({}, "autotek-operator:0.1.0"),
    ({"image.repository": "registry.example/x", "image.tag": "1.2.3"}, "registry.example/x:1.2.3"),
    ({"image.digest": "sha256:" + "a" * 64}, "autotek-operator:0.1.0@sha256:" + "a" * 64),
])
def test_image(image: dict[str, Any], expected: str) -> None:
    container = only(template(set_values=image), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == expected


def test_pod_values_render() -> None:
    docs = template(set_values={
        "nodeSelector": {"kubernetes.io/os": "linux"}, "tolerations": [{"key": "x", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "podAnnotations": {"a": "b"},
        "podLabels": {"team": "platform"}, "imagePullSecrets": [{"name": "regcred"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
        "extraEnv": [{"name": "EXTRA", "value": "1"}], "serviceAccount.name": "robot",
        "serviceAccount.annotations": {"iam": "role"}, "resources.limits": {"memory": "1Gi"},
    })
    pod = only(docs, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"} and spec["tolerations"][0]["key"] == "x"
    assert spec["affinity"] == {"nodeAffinity": {}} and spec["priorityClassName"] == "high"
    assert pod["metadata"]["annotations"] == {"a": "b"} and pod["metadata"]["labels"]["team"] == "platform"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["topologySpreadConstraints"][0]["maxSkew"] == 1
    assert env_of(docs)["EXTRA"] == "1" and spec["containers"][0]["resources"]["limits"] == {"memory": "1Gi"}
    account = only(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"] == "robot"
    assert account["metadata"]["annotations"] == {"iam": "role"}
    assert only(docs, "ClusterRoleBinding", "autotek-operator")["subjects"][0]["name"] == "robot"


def test_the_pod_meets_pod_security_restricted() -> None:
    helmkit.import_manifest_helpers()
    import manifestcheck

    for variant in helmkit.VARIANTS:
        pod = only(template(values_files=helmkit.variant_values(variant)), "Deployment")["spec"]["template"]
        assert manifestcheck.restricted_violations(pod["spec"], pod["metadata"].get("annotations")) == [], variant


def test_two_releases_do_not_share_names() -> None:
    a, b = template(release="team-a"), template(release="team-b")
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    names_a = {(d["kind"], d["metadata"]["name"]) for d in a if d["kind"] in cluster_scoped}
    names_b = {(d["kind"], d["metadata"]["name"]) for d in b if d["kind"] in cluster_scoped}
    assert names_a and not names_a & names_b
    assert env_of(a)["AUTOTEK_LEADER_ELECTION_ID"] != env_of(b)["AUTOTEK_LEADER_ELECTION_ID"]
    selector = only(a, "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "team-a"
    assert only(a, "Service")["spec"]["selector"] == selector


def test_optional_objects_are_off_by_default() -> None:
    assert not {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"} & set(kinds(template()))
    monitoring = template(values_files=helmkit.variant_values("monitoring"), set_values={"serviceMonitor.labels": {
        "release": "prometheus"}})
    assert only(monitoring, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    rule = only(monitoring, "PrometheusRule")["spec"]["groups"][0]["rules"][0]
    assert "{{ $labels.namespace }}" in rule["annotations"]["summary"]  # Prometheus's template, passed through


def test_network_policy() -> None:
    docs = template(set_values={
        "networkPolicy.enabled": True,
        "allowedTokenURLs": ["https://a.example/", "http://b.example:8080/x", "http://c.example/", "https://d.example/"],
        "networkPolicy.apiServer.cidrs": ["10.0.0.1/32"], "networkPolicy.tokenEndpoints.extraPorts": [8443],
        "networkPolicy.ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    })
    policy = only(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert sorted(p["port"] for p in ingress["ports"]) == [8080, 9090]
    assert ingress["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    dns, api, tokens = policy["egress"]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)} and "to" not in dns
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}] and [p["port"] for p in api["ports"]] == [443, 6443]
    assert sorted(p["port"] for p in tokens["ports"]) == [80, 443, 8080, 8443] and "to" not in tokens
    no_dns = only(template(set_values={"networkPolicy.enabled": True, "networkPolicy.dns.enabled": False}),
                  "NetworkPolicy")["spec"]
    assert all(p["port"] != 53 for rule in no_dns["egress"] for p in rule["ports"])


def test_helm_test_hook() -> None:
    helmkit.import_manifest_helpers()
    import manifestcheck

    docs = template(set_values={"health.port": 8081})
    pod = only(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    selector = only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items(), "the Service/PDB/NetworkPolicy would select it"
    assert pod["spec"]["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    script = container["args"][0]
    compile(script, "helm-test", "exec")
    assert "/apis/autotek.io/v1alpha1" in script and "autotekcredentials" in script
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["READYZ_URL"] == "http://autotek-operator.autotek-system.svc:8081/readyz"
    assert manifestcheck.restricted_violations(pod["spec"], pod["metadata"].get("annotations")) == []
    assert "Pod" not in kinds(template(set_values={"helmTest.enabled": False}))
    assert "Pod" not in kinds(template(set_values={"metrics.service.enabled": False}))
    assert "Pod" not in kinds(template(skip_tests=True))


def test_helm_package(tmp_path: Path) -> None:
    proc = helmkit.helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [package] = list(tmp_path.glob("*.tgz"))
    assert package.name == f"autotek-operator-{__version__}.tgz"
    import tarfile

    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    for needed in ("values.schema.json", "values.yaml", "README.md", "templates/tests/test-ready.yaml",
                   *(f"templates/crds/{p.name}" for p in chart_sync.sources())):
        assert f"autotek-operator/{needed}" in names, f"{needed} is not in the package"
