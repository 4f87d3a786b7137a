"""The operator's identity on a real API server: a ServiceAccount bound to exactly the RBAC in manifests/.

The roles come from rendering a kustomization (``kubectl kustomize``), never from a copy kept here, so
that a rule missing from ``manifests/`` fails the tests that need it. Cluster-scoped objects that keep
the manifest's name (the ClusterRole ``autotek-operator``) are shared by every pytest-xdist worker:
they are applied idempotently (server-side apply, one field manager) and never deleted while a worker
may use them. Bindings, ServiceAccounts and roles made only for one test carry the worker's scope in
their names and are deleted by their owner.

The operator authenticates with a ServiceAccount token (the TokenRequest API), never as admin; the
tests' own fixtures (credentials, client Secrets) keep the admin kubeconfig.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
FIELD_MANAGER = "autotek-tests"
#: The manifest's name of the leader-election Role (copied into every namespace a test keeps its Lease in).
LEADER_ELECTION_ROLE = "autotek-operator-leader-election"
#: Labels every object made here carries, so that a look at the cluster tells whose it is.
TEST_LABELS = {"app.kubernetes.io/managed-by": "autotek-tests"}
#: The label that ties a credential to the operators of one test scope (a pytest-xdist worker, or a test).
SCOPE_LABEL = "autotek.io/test-scope"

Doc = dict[str, Any]


def new_scope() -> str:
    """A random label value that separates one worker's (or one test's) credentials from all others."""
    return uuid.uuid4().hex[:10]


def selector(scope: str) -> str:
    """The AUTOTEK_CREDENTIAL_SELECTOR of operators that act on the credentials of ``scope``."""
    return f"{SCOPE_LABEL}={scope}"


class RbacError(RuntimeError):
    """Rendering or applying the RBAC failed; the message names the command and its output."""


def kubectl() -> str:
    return os.environ.get("KUBECTL", "kubectl")


def render(directory: Path) -> list[Doc]:
    """``kubectl kustomize DIRECTORY``: the documents of a kustomization."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                          check=False)
    if proc.returncode != 0:
        raise RbacError(f"kubectl kustomize {directory} failed ({proc.returncode}): {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def pick(docs: Iterable[Doc], kind: str, name: str | None = None, namespace: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: Iterable[Doc], kind: str, name: str | None = None, namespace: str | None = None) -> Doc:
    found = pick(docs, kind, name, namespace)
    if len(found) != 1:
        raise RbacError(f"expected one {kind} {name or ''} in the rendering, found {len(found)}")
    return found[0]


def bare(doc: Doc, *, name: str | None = None, namespace: str | None = None) -> Doc:
    """A copy of a rendered object to apply: only apiVersion, kind, name, namespace, labels and rules."""
    meta = doc["metadata"]
    out: Doc = {"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                "metadata": {"name": name or meta["name"], "labels": {**(meta.get("labels") or {}), **TEST_LABELS}}}
    ns = namespace if namespace is not None else meta.get("namespace")
    if ns and doc["kind"] in ("Role", "RoleBinding"):
        out["metadata"]["namespace"] = ns
    for key in ("rules", "roleRef", "subjects", "aggregationRule"):
        if key in doc:
            out[key] = copy.deepcopy(doc[key])
    return out


def companion_roles(docs: Iterable[Doc], main: str = "autotek-operator") -> list[Doc]:
    """The ClusterRoles of a rendering other than ``main``, as they are applied (under their own names), e.g.
    ``autotek-operator-cluster-credentials``: the operator needs them whatever a test does to ``main``."""
    return [bare(d) for d in pick(docs, "ClusterRole") if d["metadata"]["name"] != main]


def without_verb(cluster_role: Doc, group: str, plural: str, verb: str, name: str) -> Doc:
    """A copy of a ClusterRole named ``name`` that lacks one verb on one resource (``group`` "" is core)."""
    out = bare(cluster_role, name=name)
    removed = False
    rules = []
    for rule in out["rules"]:
        if group in rule.get("apiGroups", []) and plural in rule.get("resources", []) and verb in rule["verbs"]:
            removed = True
            others = [r for r in rule["resources"] if r != plural]
            if others:
                rules.append({**rule, "resources": others})
            verbs = [v for v in rule["verbs"] if v != verb]
            if verbs:
                rules.append({**rule, "resources": [plural], "verbs": verbs})
        else:
            rules.append(rule)
    if not removed:
        role = cluster_role["metadata"]["name"]
        raise RbacError(f"ClusterRole {role} grants no {verb} on {group or 'core'}/{plural}")
    out["rules"] = rules
    return out


def apply(kubeconfig: Path, docs: Sequence[Doc]) -> None:
    """Server-side apply (idempotent: several workers may apply the same shared object at once)."""
    if not docs:
        return
    stream = yaml.safe_dump_all(list(docs))
    proc = subprocess.run(
        [kubectl(), "--kubeconfig", str(kubeconfig), "apply", "--server-side", "--force-conflicts",
         f"--field-manager={FIELD_MANAGER}", "-f", "-"],
        input=stream, capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise RbacError(f"kubectl apply --server-side failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass(frozen=True)
class Identity:
    """Whom an operator process authenticates as: a ServiceAccount's kubeconfig, or admin on the emulator."""

    kubeconfig: Path
    service_account: tuple[str, str] | None = None  # (namespace, name); None: no RBAC (the emulator)
    #: The kustomization its roles were rendered from (its leader-election Role comes from there too).
    source: Path = MANIFESTS

    @property
    def user(self) -> str:
        if self.service_account is None:
            return "admin"
        ns, name = self.service_account
        return f"system:serviceaccount:{ns}:{name}"


def _token_kubeconfig(admin: Path, api: kubernetes.client.ApiClient, namespace: str, name: str, dst: Path,
                      duration: int = 7200) -> Path:
    """A kubeconfig with a TokenRequest token for a ServiceAccount (for clusters the tests did not start)."""
    core = kubernetes.client.CoreV1Api(api)
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": name, "labels": TEST_LABELS}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    resp = core.create_namespaced_service_account_token(name, namespace, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": duration}})
    doc = yaml.safe_load(admin.read_text())
    context = next(c for c in doc["contexts"] if c["name"] == doc["current-context"])["context"]
    cluster = next(c for c in doc["clusters"] if c["name"] == context["cluster"])
    dst.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": name, "user": {"token": resp.status.token}}],
        "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": name,
    }))
    dst.chmod(0o600)
    return dst


@dataclass
class Rbac:
    """One pytest worker's ServiceAccounts and bindings on a real API server (``scope`` names them)."""

    admin: Path
    api: kubernetes.client.ApiClient
    scope: str
    workdir: Path
    #: The namespace the worker's ServiceAccounts live in (created on first use, deleted by :meth:`close`).
    namespace: str = ""
    _identities: dict[str, Identity] = field(default_factory=dict)
    _renders: dict[Path, list[Doc]] = field(default_factory=dict)
    _cluster_bindings: list[str] = field(default_factory=list)
    _cluster_roles: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.namespace = self.namespace or f"autotek-it-{self.scope}"

    def rendered(self, directory: Path = MANIFESTS) -> list[Doc]:
        if directory not in self._renders:
            self._renders[directory] = render(directory)
        return self._renders[directory]

    def _ensure_namespace(self) -> None:
        core = kubernetes.client.CoreV1Api(self.api)
        try:
            core.create_namespace({"metadata": {"name": self.namespace, "labels": TEST_LABELS}})
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _kubeconfig(self, name: str) -> Path:
        state = os.environ.get("AUTOTEK_TEST_CONTROLPLANE")
        if state:
            tests = str(ROOT / "tests")
            if tests not in sys.path:
                sys.path.insert(0, tests)
            import controlplane  # the session's control plane (tests/controlplane.py)

            path: Path = controlplane.ControlPlane.attach(Path(state)).service_account_kubeconfig(self.namespace, name)
            return path
        return _token_kubeconfig(self.admin, self.api, self.namespace, name, self.workdir / f"sa-{name}.kubeconfig")

    def service_account(self, name: str, *, cluster_roles: Sequence[Doc] = (), roles: Sequence[Doc] = (),
                        shared_cluster_roles: Sequence[Doc] = (), source: Path = MANIFESTS) -> Identity:
        """A ServiceAccount ``name`` bound to ``shared_cluster_roles`` (applied under their own names, never
        deleted), ``cluster_roles`` (this worker's own, deleted by :meth:`close`) and the namespaced ``roles``,
        all rendered from ``source``."""
        with self._lock:  # operators are started from several threads at once
            if name not in self._identities:
                self._identities[name] = self._bind(name, cluster_roles, roles, shared_cluster_roles, source)
            return self._identities[name]

    def _bind(self, name: str, cluster_roles: Sequence[Doc], roles: Sequence[Doc],
              shared_cluster_roles: Sequence[Doc], source: Path) -> Identity:
        self._ensure_namespace()
        subject = [{"kind": "ServiceAccount", "name": name, "namespace": self.namespace}]
        docs: list[Doc] = []
        for role in [*shared_cluster_roles, *cluster_roles]:
            docs.append(bare(role))
            binding = f"{role['metadata']['name']}-{name}-{self.scope}"
            docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                         "metadata": {"name": binding, "labels": TEST_LABELS},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                     "name": role["metadata"]["name"]},
                         "subjects": subject})
            self._cluster_bindings.append(binding)
        self._cluster_roles.extend(r["metadata"]["name"] for r in cluster_roles)
        for role in roles:
            docs.extend(self._role_and_binding(role, name))
        apply(self.admin, docs)
        return Identity(self._kubeconfig(name), (self.namespace, name), source)

    def _role_and_binding(self, role: Doc, sa: str) -> list[Doc]:
        ns = role["metadata"]["namespace"]
        return [bare(role), {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{role['metadata']['name']}-{sa}-{self.scope}", "namespace": ns,
                         "labels": TEST_LABELS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": self.namespace}],
        }]

    def grant_roles(self, identity: Identity, roles: Sequence[Doc]) -> None:
        """Bind more namespaced Roles to an identity (e.g. leader election in a test's namespace)."""
        if identity.service_account is None:
            return
        apply(self.admin, [d for role in roles for d in self._role_and_binding(role, identity.service_account[1])])

    def allow_leases(self, identity: Identity, namespace: str) -> None:
        """Copy the leader-election Role of the identity's rendering into ``namespace`` (where a test keeps its
        Lease) and bind it to the identity."""
        role = one(self.rendered(identity.source), "Role", LEADER_ELECTION_ROLE)
        self.grant_roles(identity, [bare(role, namespace=namespace)])

    def close(self) -> None:
        """Delete this worker's bindings, its own ClusterRoles and its ServiceAccounts' namespace."""
        rbac = kubernetes.client.RbacAuthorizationV1Api(self.api)
        core = kubernetes.client.CoreV1Api(self.api)
        calls = [(rbac.delete_cluster_role_binding, n) for n in self._cluster_bindings]
        calls += [(rbac.delete_cluster_role, n) for n in self._cluster_roles]
        calls += [(core.delete_namespace, self.namespace)] if self._identities else []
        for delete, name in calls:
            try:
                delete(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        self._identities.clear()
