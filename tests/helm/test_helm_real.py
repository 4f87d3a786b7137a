"""The chart on a real API server: install, namespaced install, upgrade, uninstall and bad values (issue 14).

This module starts a control plane of its own (etcd, kube-apiserver and kube-controller-manager from
``KUBEBUILDER_ASSETS``, :mod:`controlplane`), not the session's: other tiers install the CRD and the
ClusterRole there, and Helm refuses to adopt objects it does not own. Without ``KUBEBUILDER_ASSETS``
the module is skipped.

There is no kubelet, so the chart's Deployment never runs a pod (``helm install`` does not wait for it).
Instead each test that needs the operator runs the real operator process here, with the environment of
the Deployment that Helm created (ports, log level and watch timeout aside), authenticated with a TokenRequest token
of the chart's ServiceAccount: the API server then allows it exactly what the chart's RBAC grants. The
token endpoint is the broker double on loopback (``autotek_operator.dev.broker``), as in the
integration tier.

Every test removes what it made (operator process, release, namespaces) in a ``finally``; the last
test checks that nothing is left, and the plane is stopped at the end of the module.

Run: ``KUBEBUILDER_ASSETS=$PWD/.cache/envtest .venv/bin/pytest -q tests/helm/test_helm_real.py``
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

import controlplane
from helm import helmkit

TESTS = Path(__file__).resolve().parents[1]
for _folder in (TESTS / "integration", TESTS / "e2e"):  # the broker process; kubectl and the 403 scan
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import e2ekit  # noqa: E402
from harness import Broker, stop_process  # noqa: E402

from autotek_operator import config as operator_config  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ASSETS_ENV = "KUBEBUILDER_ASSETS"
RELEASE, NAMESPACE = helmkit.RELEASE, helmkit.NAMESPACE
SERVICE_ACCOUNT = "autotek-operator"
OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
CRD_NAME = "autotekcredentials.autotek.io"
GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
#: The optional spec field the upgraded chart's CRD adds (absent from the chart's own CRD).
NEW_FIELD = "helmUpgradeNote"
#: Namespaces a fresh control plane has.
SYSTEM_NAMESPACES = {"default", "kube-system", "kube-public", "kube-node-lease"}
#: Kinds whose objects a refused install must leave exactly as they were (name and resourceVersion).
SNAPSHOT_KINDS = ("namespaces,customresourcedefinitions,clusterroles,clusterrolebindings,roles,rolebindings,"
                  "serviceaccounts,deployments,services,secrets,poddisruptionbudgets,networkpolicies")


# -- the control plane and the tools ------------------------------------------------------------


@dataclass
class Env:
    """This module's control plane, kubectl and Helm as its admin, and the token endpoint."""

    plane: controlplane.ControlPlane
    kubectl: e2ekit.Kubectl
    api: kubernetes.client.ApiClient
    broker: Broker
    workdir: Path
    #: Client secrets and tokens to look for in the operators' logs.
    sensitive: set[str] = field(default_factory=set)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def helm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return helmkit.helm(*args, "--kubeconfig", str(self.plane.admin_kubeconfig), timeout=timeout)

    def values_file(self, values: dict[str, Any]) -> Path:
        """The chart's values for this run: the broker as the only allowed token URL, plus ``values``."""
        doc = {"allowedTokenURLs": [self.broker.url + "/"], **values}
        path = self.workdir / f"values-{secrets.token_hex(4)}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def install(self, values: dict[str, Any], chart: Path = helmkit.CHART, verb: str = "install"
                ) -> subprocess.CompletedProcess[str]:
        """``helm install|upgrade RELEASE CHART --namespace autotek-system --create-namespace`` (no --wait:
        without a kubelet the Deployment never becomes available)."""
        args = [verb, RELEASE, str(chart), "--namespace", NAMESPACE, "--values", str(self.values_file(values)),
                "--timeout", "60s"]
        if verb == "install":
            args.append("--create-namespace")
        return self.helm(*args)

    def releases(self) -> list[dict[str, Any]]:
        # Every state (Helm 4 has no --all): a failed or pending release counts as left behind too.
        proc = self.helm("list", "--all-namespaces", "--deployed", "--failed", "--pending", "--uninstalling",
                         "--output", "json")
        assert proc.returncode == 0, proc.stderr
        found: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
        return found

    def manifest(self) -> list[dict[str, Any]]:
        """The objects of the installed release (``helm get manifest``)."""
        proc = self.helm("get", "manifest", RELEASE, "--namespace", NAMESPACE)
        assert proc.returncode == 0, f"helm get manifest failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def existing(self, docs: Sequence[dict[str, Any]]) -> list[str]:
        """Which of ``docs`` exist in the cluster (``kind/name`` as kubectl prints them)."""
        if not docs:
            return []
        doc = {"apiVersion": "v1", "kind": "List", "items": list(docs)}
        path = self.workdir / f"objects-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(doc))
        out = self.kubectl.text("get", "-f", str(path), "--ignore-not-found", "-o", "name")
        return sorted(line for line in out.splitlines() if line.strip())

    def ns_exists(self, name: str) -> bool:
        return self.kubectl.get("namespace", name) is not None

    def create_namespace(self, name: str) -> None:
        self.kubectl.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])

    def delete_namespaces(self, *names: str) -> None:
        """Delete the namespaces and wait until they are gone (the controller-manager empties them)."""
        present = [n for n in names if self.ns_exists(n)]
        if not present:
            return
        self.kubectl("delete", "namespace", *present, "--ignore-not-found", "--wait=false")
        e2ekit.wait_for(f"namespaces {present} to be deleted",
                        lambda: not any(self.ns_exists(n) for n in present), timeout=120, interval=1)

    def uninstall_if_present(self) -> None:
        if any(r.get("name") == RELEASE for r in self.releases()):
            proc = self.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--timeout", "60s")
            assert proc.returncode == 0, f"helm uninstall failed:\n{proc.stderr}"

    def clean_up(self, namespaces: Sequence[str]) -> None:
        """Back to a fresh plane: no release, no namespace of the test's, and no CRD (which the chart keeps
        on uninstall, so every test starts without one)."""
        self.uninstall_if_present()
        self.delete_namespaces(*namespaces, NAMESPACE)
        self.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true", "--timeout=60s", timeout=90)

    # -- credentials ----------------------------------------------------------------------------

    def client(self, ns: str, name: str = "autotek-client") -> str:
        """A client registered at the broker and held in Secret ``ns/name``; returns its id."""
        client_id, client_secret = f"id-{secrets.token_hex(4)}", f"cs-{secrets.token_urlsafe(18)}"
        self.sensitive.add(client_secret)
        self.broker.add_client(client_id, client_secret)
        self.kubectl.apply([{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                             "metadata": {"name": name, "namespace": ns},
                             "stringData": {"client_id": client_id, "client_secret": client_secret}}])
        return client_id

    def credential(self, ns: str, name: str = "autotek", **spec: Any) -> None:
        self.client(ns)
        self.kubectl.apply([{
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "AutoTekCredential",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": self.broker.token_url,
                     "target": {"name": f"{name}-token"}, **spec}}])

    def get_credential(self, ns: str, name: str = "autotek") -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def wait_ready(self, ns: str, name: str = "autotek", timeout: float = 60) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            cred = self.get_credential(ns, name)
            cond = self.kubectl.condition(cred, "Ready")
            return cred if cond and cond.get("status") == "True" else None

        found: dict[str, Any] = e2ekit.wait_for(f"AutoTekCredential {ns}/{name} to be Ready", ready, timeout, 0.5)
        return found

    def token_in(self, ns: str, secret: str) -> str | None:
        return (self.kubectl.secret_data(ns, secret) or {}).get("access_token")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assets = os.environ.get(ASSETS_ENV)
    if not assets:
        pytest.skip(f"the Helm tests on a real API server need {ASSETS_ENV} (kube-apiserver, etcd and "
                    f"kube-controller-manager; `make envtest` unpacks them into .cache/envtest)")
    folder = controlplane.check_assets(assets, ("kube-apiserver", "etcd", "kube-controller-manager"))
    helmkit.helm_binary()  # fails the test, naming `make helm`, when there is none
    workdir = tmp_path_factory.mktemp("helm-real")
    plane = controlplane.ControlPlane(folder, workdir / "plane", controller_manager=True, ready_timeout=90)
    plane.start()
    broker: Broker | None = None
    try:
        broker = Broker(workdir)
        api = kubernetes.config.new_client_from_config(config_file=str(plane.admin_kubeconfig))
        yield Env(plane, e2ekit.Kubectl(plane.admin_kubeconfig), api, broker, workdir)
    finally:
        if broker is not None:
            broker.stop()
        plane.stop()
        shutil.rmtree(plane.workdir / "etcd", ignore_errors=True)


# -- the operator, as the chart's ServiceAccount ------------------------------------------------


class LocalOperator:
    """``autotek-operator run`` here, configured like the chart's Deployment, as the chart's ServiceAccount."""

    def __init__(self, env: Env, name: str) -> None:
        self.env = env
        self.log_path = env.workdir / f"operator-{name}.log"
        self.pod_name = f"{RELEASE}-{name}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kubeconfig: Path | None = None

    def deployment_env(self) -> dict[str, str]:
        """The operator container's environment in the Deployment Helm created (fieldRefs resolved)."""
        deploy = self.env.kubectl.get("deployment", RELEASE, NAMESPACE)
        assert deploy is not None, f"the release has no Deployment {NAMESPACE}/{RELEASE}"
        containers = deploy["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, [c["name"] for c in containers]
        found: dict[str, str] = {}
        fields = {"metadata.name": self.pod_name, "metadata.namespace": NAMESPACE}
        for var in containers[0].get("env") or []:
            if "value" in var:
                found[var["name"]] = str(var["value"])
            elif (ref := (var.get("valueFrom") or {}).get("fieldRef")) and ref.get("fieldPath") in fields:
                found[var["name"]] = fields[ref["fieldPath"]]
        return found

    def start(self) -> None:
        sa = self.env.kubectl.get("serviceaccount", SERVICE_ACCOUNT, NAMESPACE)
        assert sa is not None, f"the chart made no ServiceAccount {NAMESPACE}/{SERVICE_ACCOUNT}"
        # The ServiceAccount exists, so this only asks for a token (TokenRequest) and writes a kubeconfig.
        self.kubeconfig = self.env.plane.service_account_kubeconfig(NAMESPACE, SERVICE_ACCOUNT)
        base = {k: v for k, v in os.environ.items()
                if k != "KUBECONFIG" and k not in operator_config.ENV.values()}
        run_env = {
            **base,
            **self.deployment_env(),
            "KUBECONFIG": str(self.kubeconfig),
            # Not the chart's: several operators may run on this machine, and DEBUG shows every call.
            "AUTOTEK_HEALTH_PORT": "0",
            "AUTOTEK_METRICS_PORT": "0",
            "AUTOTEK_LOG_LEVEL": "DEBUG",
            "AUTOTEK_WATCH_TIMEOUT": "10",
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "autotek_operator", "run"], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=run_env, preexec_fn=controlplane.die_with_parent(os.getpid()),
            )
        e2ekit.wait_for("the operator to start", self._started, timeout=30, interval=0.25)

    def _started(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return "Activity 'startup' succeeded" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def check_log(self) -> None:
        """No 403/Forbidden, no traceback, and no client secret or token in the operator's log."""
        text = self.log()
        denials = e2ekit.rbac_denials(text)
        assert not denials, "the operator was refused by the API server (RBAC):\n" + "\n".join(denials[:20])
        assert "Traceback" not in text, f"the operator logged a traceback ({self.log_path})"
        needles = {n for n in self.env.sensitive | set(self.env.broker.stats()["tokens"]) if n}
        assert not [n for n in needles if n in text], f"a client secret or token is in {self.log_path}"

    def api(self) -> kubernetes.client.ApiClient:
        assert self.kubeconfig is not None
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))


def call_status(call: Callable[..., Any], *args: Any) -> int:
    """The HTTP status of one list call of the kubernetes client (200, or the refusal's code)."""
    try:
        call(*args, _preload_content=False)
    except ApiException as exc:
        return int(exc.status)
    return 200


def who_am_i(api: kubernetes.client.ApiClient) -> str:
    review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return str(review.status.user_info.username)


@contextlib.contextmanager
def release(env: Env, values: dict[str, Any], namespaces: Sequence[str] = ()) -> Iterator[list[LocalOperator]]:
    """The chart installed with ``values`` (``namespaces`` created first); yields a list to put operators in.
    At the end: operators stopped, then :meth:`Env.clean_up`."""
    operators: list[LocalOperator] = []
    try:
        for ns in namespaces:
            env.create_namespace(ns)
        proc = env.install(values)
        assert proc.returncode == 0, f"helm install failed ({proc.returncode}):\n{proc.stderr}"
        yield operators
    finally:
        for op in operators:
            op.stop()
        env.clean_up(namespaces)


def start_operator(env: Env, operators: list[LocalOperator], name: str) -> LocalOperator:
    op = LocalOperator(env, name)
    operators.append(op)
    op.start()
    return op


# -- 1: bad values ----------------------------------------------------------------------------------

#: (values, the field Helm's error must name); each is refused by values.schema.json.
BAD_VALUES = [
    pytest.param({"replicaCount": "two"}, "replicaCount", id="wrong-type"),
    pytest.param({"watchNamespaces": "shop"}, "watchNamespaces", id="string-not-list"),
    pytest.param({"logFormat": "xml"}, "logFormat", id="bad-enum"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="bad-enum-nested"),
    pytest.param({"replicaCuont": 2}, "replicaCuont", id="unknown-key"),
]


def snapshot(env: Env) -> set[tuple[str, str, str, str]]:
    """Every object of :data:`SNAPSHOT_KINDS`: (kind, namespace, name, resourceVersion)."""
    doc = env.kubectl.json("get", SNAPSHOT_KINDS, "--all-namespaces")
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"], o["metadata"]["resourceVersion"])
            for o in (doc or {}).get("items", [])}


@pytest.mark.parametrize(("values", "named"), BAD_VALUES)
def test_1_bad_values_are_refused_before_anything_is_applied(env: Env, values: dict[str, Any], named: str) -> None:
    """``helm install --create-namespace`` with a bad value fails, names the field, and changes nothing:
    no release, no namespace, no object created or modified."""
    assert not env.ns_exists(NAMESPACE), f"namespace {NAMESPACE} is left from an earlier test"
    before = snapshot(env)
    try:
        proc = env.install(values)
        assert proc.returncode != 0, f"helm install accepted {values}:\n{proc.stdout}"
        assert named in proc.stderr, f"Helm's error does not name {named}:\n{proc.stderr}"
        assert "schema" in proc.stderr.lower(), f"not refused by the values schema:\n{proc.stderr}"
        assert env.releases() == [], "a release was recorded"
        assert not env.ns_exists(NAMESPACE), f"namespace {NAMESPACE} was created"
        after = snapshot(env)
        assert after == before, f"objects created {sorted(after - before)}, changed or deleted {sorted(before - after)}"
    finally:
        env.clean_up([])


# -- 2: install, cluster-wide ------------------------------------------------------------------------


def test_2_install_then_the_operator_runs_with_only_the_charts_rbac(env: Env) -> None:
    """``helm install``; the operator, as the chart's ServiceAccount, makes a credential Ready; no 403."""
    app = "helm-app"
    with release(env, {}, namespaces=[app]) as operators:
        crd = env.kubectl.get("crd", CRD_NAME)
        assert crd is not None, "the chart installed no CRD"
        env.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
        kinds = {d["kind"] for d in env.manifest()}
        assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                "RoleBinding", "Deployment", "Service"} <= kinds, kinds

        op = start_operator(env, operators, "clusterwide")
        api = op.api()
        assert who_am_i(api) == OPERATOR_USER
        core = kubernetes.client.CoreV1Api(api)
        # The identity is not admin: what the chart does not grant is refused.
        assert call_status(core.list_namespaced_config_map, app) == 403
        assert call_status(core.list_config_map_for_all_namespaces) == 403
        assert call_status(core.list_namespace) == 200  # ClusterAutoTekCredentials' namespace selectors
        assert call_status(core.list_secret_for_all_namespaces) == 200

        env.credential(app)
        env.wait_ready(app)
        token = env.token_in(app, "autotek-token")
        assert token and token in env.broker.stats()["tokens"], "the Secret holds no token the broker issued"
        e2ekit.wait_for("the operator to lead (a Lease through the chart's leader-election Role)",
                        lambda: "leading: running passes" in op.log(), timeout=30, interval=0.5)
        lease = env.kubectl.get("lease", "autotek-operator", NAMESPACE)
        assert lease is not None and lease["spec"]["holderIdentity"] == op.pod_name, lease
        assert op.alive(), "the operator died"
        op.check_log()


def chart_copy(workdir: Path, name: str) -> Path:
    """A fresh copy of the chart in ``workdir`` (to edit for one test)."""
    copy = workdir / name / helmkit.CHART.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(helmkit.CHART, copy)
    return copy


def rendered(chart: Path, *args: str) -> list[dict[str, Any]]:
    proc = helmkit.helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, f"helm template {chart} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_2b_a_rule_missing_from_the_charts_rbac_fails(env: Env) -> None:
    """A test of the test above: from a copy of the chart whose rules lack ``create`` on Secrets, the operator is
    refused (HTTP 403), the credential never becomes Ready, and the log check of test 2 fails."""
    app = "helm-app"
    crippled = chart_copy(env.workdir, "chart-without-secret-create")
    helpers = crippled / "templates" / "_helpers.tpl"
    text, count = re.subn(r'(resources: \["secrets"\]\n\s*verbs: \[[^\]\n]*?)"create", ', r"\1", helpers.read_text())
    assert count == 1, f"{helpers}: expected one `verbs` line for Secrets with create, found {count}"
    helpers.write_text(text)
    role = next(d for d in rendered(crippled) if d["kind"] == "ClusterRole")
    assert not [r for r in role["rules"] if "secrets" in r["resources"] and "create" in r["verbs"]], role["rules"]

    operators: list[LocalOperator] = []
    try:
        env.create_namespace(app)
        proc = env.install({}, chart=crippled)
        assert proc.returncode == 0, f"helm install failed ({proc.returncode}):\n{proc.stderr}"
        op = start_operator(env, operators, "without-secret-create")
        env.credential(app)
        e2ekit.wait_for("the operator to log a 403", lambda: e2ekit.rbac_denials(op.log()), timeout=30, interval=0.5)
        assert "create secrets failed: HTTP 403 Forbidden" in op.log()
        cond = env.kubectl.condition(env.get_credential(app), "Ready")
        assert cond is None or cond["status"] != "True", cond
        assert env.kubectl.get("secret", "autotek-token", app) is None
        with pytest.raises(AssertionError, match="refused by the API server"):
            op.check_log()
    finally:
        for op in operators:
            op.stop()
        env.clean_up([app])


# -- 3: install, namespaced ------------------------------------------------------------------------------


def test_3_namespaced_values_only_the_charts_roles(env: Env) -> None:
    """``watchNamespaces: [helm-a, helm-b]``: credentials there become Ready with only the chart's Roles; a
    credential in helm-c is left alone, and the operator's identity cannot read Secrets outside the list."""
    watched, unwatched = ["helm-a", "helm-b"], "helm-c"
    with release(env, {"watchNamespaces": watched}, namespaces=[*watched, unwatched]) as operators:
        docs = env.manifest()
        # The one cluster-wide grant: read ClusterAutoTekCredentials (and patch their status) and namespaces.
        cluster_rbac = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
                        if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
                        and d["metadata"]["name"] != "autotek-operator-cluster-credentials"]
        assert not cluster_rbac, f"namespaced mode installed cluster-wide RBAC: {cluster_rbac}"
        roles = {d["metadata"].get("namespace") for d in docs if d["kind"] == "Role"}
        assert set(watched) <= roles, f"Roles in {roles}"

        op = start_operator(env, operators, "namespaced")
        for ns in [*watched, unwatched]:
            env.credential(ns)
        for ns in watched:
            env.wait_ready(ns)
            token = env.token_in(ns, "autotek-token")
            assert token and token in env.broker.stats()["tokens"]
        e2ekit.wait_for("the operator to lead", lambda: "leading: running passes" in op.log(), timeout=30)

        api = op.api()
        assert who_am_i(api) == OPERATOR_USER
        core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
        for ns in watched:
            assert call_status(core.list_namespaced_secret, ns) == 200
        # The RBAC is namespaced: Secrets elsewhere, or everywhere, are refused.
        assert call_status(core.list_namespaced_secret, unwatched) == 403
        assert call_status(core.list_secret_for_all_namespaces) == 403
        assert call_status(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL) == 403

        time.sleep(3)  # the watched credentials are Ready: the unwatched one would have been seen by now
        other = env.get_credential(unwatched) or {}
        assert not other.get("status"), f"the credential in {unwatched} got a status: {other.get('status')}"
        assert env.kubectl.get("secret", "autotek-token", unwatched) is None
        assert op.alive(), "the operator died"
        op.check_log()


# -- 4: upgrade with a changed CRD ---------------------------------------------------------------------


def chart_with_new_crd_field(workdir: Path) -> Path:
    """A copy of the chart whose CRD has one more optional spec field, :data:`NEW_FIELD`."""
    copy = chart_copy(workdir, "chart-upgraded")
    pattern = re.compile(r"^(?P<indent> +)clientSecretRef:\s*$", re.MULTILINE)
    edited = []
    for path in sorted(copy.rglob("*.yaml")):
        text = path.read_text()
        if f"name: {CRD_NAME}" not in text or "openAPIV3Schema" not in text:
            continue
        match = pattern.search(text)
        assert match, f"{path}: no `clientSecretRef:` property to put {NEW_FIELD} beside"
        indent = match.group("indent")
        field_text = (f"{indent}{NEW_FIELD}:\n{indent}  type: string\n"
                      f"{indent}  description: A field only the upgraded chart of tests/helm/test_helm_real.py has.\n")
        path.write_text(text[: match.start()] + field_text + text[match.start():])
        edited.append(path)
    assert len(edited) == 1, f"expected one CRD template for {CRD_NAME} in the chart, edited {edited}"
    return copy


def crd_spec_properties(env: Env) -> dict[str, Any]:
    crd = env.kubectl.get("crd", CRD_NAME)
    assert crd is not None
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    props: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return props


def test_4_upgrade_applies_a_changed_crd(env: Env) -> None:
    """``helm upgrade`` to a chart whose CRD has a new optional field: the field is served afterwards.

    Before the upgrade the real API server prunes the unknown field from a credential; after it, the
    field is stored and read back, and the credential made before the upgrade is still there."""
    app = "helm-app"
    upgraded = chart_with_new_crd_field(env.workdir)
    crds = [d for d in rendered(upgraded, "--include-crds") if d["kind"] == "CustomResourceDefinition"]
    assert any(NEW_FIELD in json.dumps(d) for d in crds), "the edited chart does not render the new field"
    patch = json.dumps({"spec": {NEW_FIELD: "kept"}})
    with release(env, {}, namespaces=[app]):
        env.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
        assert NEW_FIELD not in crd_spec_properties(env), "the chart's own CRD already has the field"
        env.credential(app)
        env.kubectl("patch", "atc", "autotek", "-n", app, "--type=merge", "-p", patch)
        before = env.get_credential(app) or {}
        assert NEW_FIELD not in before.get("spec", {}), "the API server kept a field the CRD does not have"

        proc = env.install({}, chart=upgraded, verb="upgrade")
        assert proc.returncode == 0, f"helm upgrade failed ({proc.returncode}):\n{proc.stderr}"
        assert NEW_FIELD in crd_spec_properties(env), "helm upgrade did not apply the changed CRD"
        assert [r["revision"] for r in env.releases() if r["name"] == RELEASE] == ["2"]
        env.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")

        def served() -> bool:
            env.kubectl("patch", "atc", "autotek", "-n", app, "--type=merge", "-p", patch)
            return (env.get_credential(app) or {}).get("spec", {}).get(NEW_FIELD) == "kept"

        # The API server picks up a new schema within moments of the CRD's update.
        e2ekit.wait_for(f"spec.{NEW_FIELD} to be stored after the upgrade", served, timeout=30, interval=1)
        after = env.get_credential(app) or {}
        assert after["metadata"]["uid"] == before["metadata"]["uid"], "the credential was replaced"


# -- 5: uninstall -------------------------------------------------------------------------------------------

UNINSTALL_VARIANTS = [
    pytest.param({"rolloutRestart": {"enabled": True}, "podDisruptionBudget": {"enabled": True},
                  "networkPolicy": {"enabled": True}}, [], id="clusterwide-all-options"),
    pytest.param({"watchNamespaces": ["helm-a"]}, ["helm-a"], id="namespaced"),
]


CRD_PREFIX = "customresourcedefinition.apiextensions.k8s.io/"


@pytest.mark.parametrize(("values", "watched"), UNINSTALL_VARIANTS)
def test_5_uninstall_keeps_the_crd_and_credentials_and_removes_the_rest(
    env: Env, values: dict[str, Any], watched: list[str]
) -> None:
    """``helm uninstall``: the CRD, the credentials and their Secrets stay; every other object of the release
    (Deployment, Service, ServiceAccount, ClusterRole(Binding), Roles, bindings...) and the release are gone."""
    app = watched[0] if watched else "helm-app"
    crd_ref = f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}"
    with release(env, values, namespaces=watched or [app]) as operators:
        docs = env.manifest()
        names = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
        assert len(docs) >= 8, names
        op = start_operator(env, operators, "uninstall")
        env.credential(app)
        cred = env.wait_ready(app)
        op.stop()
        op.check_log()
        assert len(env.existing(docs)) == len(docs), f"not all of {names} exist"

        proc = env.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--timeout", "60s")
        assert proc.returncode == 0, f"helm uninstall failed:\n{proc.stderr}"

        left: list[str] = []

        def nothing_left() -> bool:
            workloads = env.kubectl.json("get", "replicasets,pods", "-n", NAMESPACE) or {}
            # The CRDs stay (both kinds: crds.keep), the credentials with them.
            left[:] = [n for n in env.existing(docs) if n != crd_ref and not n.startswith(CRD_PREFIX)]
            left.extend(f"{o['kind']}/{o['metadata']['name']}" for o in workloads.get("items", []))
            return not left

        try:
            e2ekit.wait_for("the release's objects, ReplicaSets and pods to be deleted", nothing_left, 60, 1)
        except AssertionError:
            raise AssertionError(f"left after helm uninstall: {left}") from None
        assert env.releases() == [], "the release is still recorded"
        labelled = env.kubectl.text(
            "get", "all,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,networkpolicies,"
            "poddisruptionbudgets,configmaps,secrets", "--all-namespaces",
            "-l", "app.kubernetes.io/managed-by=Helm", "-o", "name").split()
        assert labelled == [], f"objects labelled managed-by=Helm remain: {labelled}"

        assert crd_ref in env.existing(docs), "helm uninstall deleted the CRD, and with it every credential"
        env.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=10s")
        kept = env.get_credential(app)
        assert kept is not None, "the credential was deleted with the release"
        assert kept["metadata"]["uid"] == cred["metadata"]["uid"]
        assert env.kubectl.condition(kept, "Ready") is not None, "the credential lost its status"
        assert env.token_in(app, "autotek-token"), "the credential's Secret lost its token"


# -- 6: nothing left behind ---------------------------------------------------------------------------------


def test_6_nothing_is_left_behind(env: Env) -> None:
    """After the tests above: no release, no namespace but the plane's own, no credential, CRD or RBAC of ours."""
    assert env.releases() == []
    namespaces = {n["metadata"]["name"] for n in (env.kubectl.json("get", "namespaces") or {}).get("items", [])}
    assert namespaces == SYSTEM_NAMESPACES, f"namespaces left: {sorted(namespaces - SYSTEM_NAMESPACES)}"
    assert env.kubectl.get("crd", CRD_NAME) is None
    ours = env.kubectl.text("get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/managed-by=Helm",
                            "-o", "name").split()
    assert ours == []
