"""The RBAC manifests grant exactly the API calls the operator makes: nothing missing, nothing extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autotek_operator import handlers, kube

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "base" / "rbac.yaml"
LEASES = ("coordination.k8s.io", "leases")
#: Cluster-scoped reads for ClusterAutoTekCredentials: their own ClusterRole, kept in namespaced mode.
CLUSTER_CREDENTIALS = {
    ("autotek.io", "clusterautotekcredentials"),
    ("autotek.io", "clusterautotekcredentials/status"),
    ("", "namespaces"),
}

Triple = tuple[str, str, str]


def code_calls() -> tuple[set[Triple], set[Triple]]:
    """(cluster-wide calls, calls in the operator's own namespace), from the code itself."""
    calls = set(kube.API_CALLS)
    for group, _version, plural in handlers.WATCHED:
        calls |= {(group, plural, "list"), (group, plural, "watch")}
    own_namespace = {c for c in calls if (c[0], c[1]) == LEASES}
    return calls - own_namespace, own_namespace


def granted(rules: list[dict[str, Any]]) -> set[Triple]:
    out: set[Triple] = set()
    for rule in rules:
        assert "*" not in rule.get("verbs", []) and "*" not in rule.get("resources", []), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def test_code_declares_calls() -> None:
    cluster, own = code_calls()
    # Guards against the registry silently emptying (e.g. decorators no longer registering).
    assert ("", "secrets", "get") in cluster
    assert ("autotek.io", "autotekcredentials/status", "patch") in cluster
    assert own == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def cluster_role(name: str) -> dict[str, Any]:
    (role,) = [d for d in by_kind("ClusterRole") if d["metadata"]["name"] == name]
    return role


def test_cluster_role_matches_code_exactly() -> None:
    cluster, _ = code_calls()
    cluster = {c for c in cluster if (c[0], c[1]) not in CLUSTER_CREDENTIALS}
    have = granted(cluster_role("autotek-operator")["rules"])
    assert sorted(cluster - have) == [], "calls the ClusterRole does not grant"
    assert sorted(have - cluster) == [], "grants the code never uses"


def test_cluster_credentials_role_matches_code_exactly() -> None:
    cluster, _ = code_calls()
    want = {c for c in cluster if (c[0], c[1]) in CLUSTER_CREDENTIALS}
    assert ("", "namespaces", "watch") in want and ("autotek.io", "clusterautotekcredentials/status", "patch") in want
    assert granted(cluster_role("autotek-operator-cluster-credentials")["rules"]) == want


def test_leader_election_role_matches_code_exactly() -> None:
    _, own = code_calls()
    (role,) = by_kind("Role")
    assert role["metadata"]["namespace"] == "autotek-system"
    assert granted(role["rules"]) == own


def test_bindings_point_at_the_service_account() -> None:
    for binding in by_kind("ClusterRoleBinding") + by_kind("RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "autotek-operator", "namespace": "autotek-system"}
        ]
    names = {d["metadata"]["name"] for d in by_kind("ClusterRole") + by_kind("Role")}
    refs = {d["roleRef"]["name"] for d in by_kind("ClusterRoleBinding") + by_kind("RoleBinding")}
    assert refs == names


def test_rollout_restart_component_adds_exactly_its_calls() -> None:
    import shutil
    import subprocess

    import pytest

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlay")
    root = RBAC.parents[2]
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(root / "manifests" / "overlays" / "rollout-restart")],
        check=True, capture_output=True, text=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "autotek-operator"]
    cluster, _ = code_calls()
    cluster = {c for c in cluster if (c[0], c[1]) not in CLUSTER_CREDENTIALS}
    assert granted(role["rules"]) == cluster | kube.OPTIONAL_API_CALLS["rollout-restart"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AUTOTEK_ROLLOUT_RESTART"] == "true"


def test_optional_calls_are_not_in_the_base_role() -> None:
    role = cluster_role("autotek-operator")
    assert not granted(role["rules"]) & kube.OPTIONAL_API_CALLS["rollout-restart"]
