"""The operator's image installed with ``helm install`` instead of kustomize (see conftest.py for how to run).

The chart (``charts/autotek-operator``) is installed as the README says, into ``autotek-system`` (made
first with Pod Security ``restricted``, as ``manifests/`` makes it), with the image the suite built and
the in-cluster broker as the only allowed token URL (what ``overlays/settings`` changes for kustomize).
Two replicas become Ready and exactly one holds the Lease and leads; a pod reads the token from the
Secret; no operator log has a 403 and no container restarted; ``helm uninstall`` then leaves what
docs/operations.md promises: the CRD, the credentials and their Secrets stay, the operator's objects go.
Tests run in file order.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2ekit as kit
import pytest
import yaml
from e2ekit import CLIENT_ID, wait_for

from helm import helmkit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NS = "autotek-e2e-helm"
CREDENTIAL = "autotek"
TARGET = "autotek-token"
READER = "autotek-helm-reader"
RELEASE, RELEASE_NS = helmkit.RELEASE, helmkit.NAMESPACE
#: The objects a release of the chart's default values holds besides the CRD (manifests/ has the same).
OPERATOR_OBJECTS = [
    ("deployment", kit.OPERATOR_DEPLOY, RELEASE_NS),
    ("service", kit.OPERATOR_DEPLOY, RELEASE_NS),
    ("serviceaccount", kit.OPERATOR_DEPLOY, RELEASE_NS),
    ("role", "autotek-operator-leader-election", RELEASE_NS),
    ("rolebinding", "autotek-operator-leader-election", RELEASE_NS),
    ("clusterrole", kit.OPERATOR_DEPLOY, None),
    ("clusterrolebinding", kit.OPERATOR_DEPLOY, None),
]


class Helm:
    """Helm bound to the suite's kubeconfig; a failing command raises with its output."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        proc = helmkit.helm(*args, "--kubeconfig", str(self.kubeconfig), timeout=timeout)
        if check and proc.returncode != 0:
            raise kit.CommandError(f"`helm {' '.join(args)}` exited with {proc.returncode}:\n{proc.stderr.strip()}")
        return proc.stdout

    def release_present(self) -> bool:
        """Whether the release exists in any state (deployed, failed, pending...)."""
        proc = helmkit.helm("status", RELEASE, "--namespace", RELEASE_NS, "--kubeconfig", str(self.kubeconfig))
        return proc.returncode == 0

    def uninstall(self) -> None:
        if self.release_present():
            self("uninstall", RELEASE, "--namespace", RELEASE_NS, "--timeout", "120s")


def values(workdir: Path) -> Path:
    """The suite's values: its image (loaded into the node, never pulled) and the in-cluster broker."""
    repository, _, tag = kit.IMAGE.partition(":")
    doc = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "replicaCount": 2,
        "allowedTokenURLs": [kit.ALLOWED_TOKEN_URLS],
    }
    path = workdir / "helm-values.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _remove_leftovers(kubectl: kit.Kubectl, helm: Helm) -> None:
    """What an earlier scenario or run left: a kustomize install, a release, a CRD Helm does not own."""
    helm.uninstall()
    if kit.operator_present(kubectl):
        kit.uninstall(kubectl, kit.OVERLAY)
    for name in kit.CRD_NAMES:
        crd = kubectl.get("crd", name)
        owner = ((crd or {}).get("metadata", {}).get("annotations") or {}).get("meta.helm.sh/release-name")
        if crd is not None and owner != RELEASE:  # Helm would refuse to adopt it
            kubectl("delete", "crd", name, "--wait=true", "--timeout=120s", timeout=150)


def _cleanup(kubectl: kit.Kubectl, helm: Helm) -> None:
    """Release, namespaces and the kept CRD removed, so that the kustomize scenarios start from nothing."""
    helm.uninstall()
    kubectl("delete", "namespace", NS, RELEASE_NS, "--ignore-not-found", "--wait=true", "--timeout=180s", timeout=210)
    kubectl("delete", "crd", *kit.CRD_NAMES, "--ignore-not-found", "--wait=true", "--timeout=120s", timeout=150)


@pytest.fixture(scope="module")
def helm_env(
    cluster: kit.Cluster,
    kubectl: kit.Kubectl,
    broker: kit.BrokerAPI,
    clients: dict[str, str],
    tls: kit.TestCA,
    e2e_workdir: Path,
    keep: bool,
) -> Iterator[kit.Env]:
    helm = Helm(kubectl.kubeconfig)
    _remove_leftovers(kubectl, helm)
    kubectl.apply([kit.hardened_namespace(RELEASE_NS), kit.hardened_namespace(NS)])
    try:
        helm("install", RELEASE, str(helmkit.CHART), "--namespace", RELEASE_NS, "--create-namespace",
             "--values", str(values(e2e_workdir)), "--timeout", "120s")
        kubectl("wait", "--for=condition=Established", f"crd/{kit.CRD_NAME}", "--timeout=60s", timeout=90)
        kubectl("rollout", "status", "-n", RELEASE_NS, f"deploy/{kit.OPERATOR_DEPLOY}", "--timeout=180s", timeout=200)
        kubectl.apply([
            kit.client_secret_object(NS, "autotek-client", CLIENT_ID, clients),
            kit.credential_object(NS, CREDENTIAL, "autotek-client", {"name": TARGET}, tls.ca_pem),
        ])
        env = kit.Env(cluster=cluster, kubectl=kubectl, broker=broker, clients=clients, workdir=e2e_workdir, tls=tls)
        env.notes["helm"] = helm
        yield env
    finally:
        if not keep:
            _cleanup(kubectl, helm)


def _ready(k: kit.Kubectl) -> dict[str, Any]:
    k("wait", "--for=condition=Ready", f"atc/{CREDENTIAL}", "-n", NS, "--timeout=90s", timeout=120)
    cred = k.get("atc", CREDENTIAL, NS)
    assert cred is not None
    return cred


def test_1_two_replicas_ready_and_exactly_one_leads(helm_env: kit.Env) -> None:
    k = helm_env.kubectl
    deploy = k.get("deploy", kit.OPERATOR_DEPLOY, RELEASE_NS)
    assert deploy is not None
    assert deploy["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "Helm", deploy["metadata"]["labels"]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == kit.IMAGE

    def two_ready() -> list[str] | None:
        ready = [str(p["metadata"]["name"]) for p in k.operator_pods() if kit.pod_ready(p)]
        return ready if len(ready) == 2 else None

    pods = wait_for("two operator pods Ready", two_ready, timeout=120, interval=2)

    def holder() -> str | None:
        lease = k.get("lease", kit.OPERATOR_DEPLOY, RELEASE_NS) or {}
        name = (lease.get("spec") or {}).get("holderIdentity")
        return str(name) if name in pods else None

    leader = wait_for("the Lease to name a Ready operator pod", holder, timeout=60, interval=2)

    def states() -> dict[str, str | None] | None:
        found = {}
        for name in pods:
            said = re.findall(r"\b(leading|following): (?:running passes|another replica)",
                              k.logs("-n", RELEASE_NS, f"pod/{name}"))
            found[name] = said[-1] if said else None
        return found if found.get(leader) == "leading" else None

    found = wait_for(f"the Lease holder {leader} to log that it leads", states, timeout=60, interval=2)
    assert sorted(n for n, s in found.items() if s == "leading") == [leader], f"{found}, Lease holder {leader}"


def test_2_a_pod_reads_the_token(helm_env: kit.Env) -> None:
    k = helm_env.kubectl
    cred = _ready(k)
    cond = k.condition(cred, "Ready")
    assert cond is not None and cond["reason"] == "TokenIssued", cond
    pod = copy.deepcopy(kit.reader_pod_object())
    pod["metadata"].update(name=READER, namespace=NS)
    k.apply([pod])
    k("wait", "--for=condition=Ready", f"pod/{READER}", "-n", NS, "--timeout=120s", timeout=150)

    def agree() -> str | None:
        before = (k.secret_data(NS, TARGET) or {}).get("access_token")
        in_file = k.exec_cat(NS, READER, f"{kit.MOUNT_PATH}/access_token")
        after = (k.secret_data(NS, TARGET) or {}).get("access_token")
        return in_file if in_file and in_file in (before, after) else None

    # The volume holds the Secret as it was at the pod's start; a rotation may land in between.
    token = wait_for("the mounted access_token to equal the Secret's", agree, timeout=150, interval=2)
    assert token in helm_env.broker.stats()["tokens"], "the pod read a token the broker never issued"


def test_3_no_rbac_denials_and_no_restarts(helm_env: kit.Env) -> None:
    kit.assert_no_denials_and_no_restarts(helm_env.kubectl)


def test_3b_helm_test_passes(helm_env: kit.Env) -> None:
    """``helm test``: the chart's test Pod finds the CRD served and the operator ready through its Service."""
    helm: Helm = helm_env.notes["helm"]
    out = helm("test", RELEASE, "--namespace", RELEASE_NS, "--timeout", "120s", "--logs", timeout=180)
    assert re.search(r"Phase:\s+Succeeded", out), out
    assert "operator ready:" in out, out


def test_4_uninstall_keeps_the_crd_and_credentials(helm_env: kit.Env) -> None:
    """``helm uninstall``, as docs/operations.md ("Uninstall with Helm") describes it: the Deployment, Service,
    ServiceAccount and RBAC go, and the pods with them; the CRD (``helm.sh/resource-policy: keep``), the
    credential, its Secret and the namespace made for the release stay."""
    k = helm_env.kubectl
    helm: Helm = helm_env.notes["helm"]
    cred = _ready(k)
    manifest = [d for d in yaml.safe_load_all(helm("get", "manifest", RELEASE, "--namespace", RELEASE_NS)) if d]
    kinds = {(d["kind"].lower(), d["metadata"]["name"]) for d in manifest}
    assert {(kind, name) for kind, name, _ in OPERATOR_OBJECTS} <= kinds, sorted(kinds)

    helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--timeout", "120s")

    def gone() -> bool:
        left = [f"{kind}/{name}" for kind, name, ns in OPERATOR_OBJECTS if k.get(kind, name, ns) is not None]
        return not left and not k.operator_pods()

    wait_for("the operator's objects and pods to be deleted", gone, timeout=90, interval=2)
    assert not helm.release_present(), "the release is still listed"
    for name in kit.CRD_NAMES:
        crd = k.get("crd", name)
        assert crd is not None, f"helm uninstall deleted the CRD {name} (and with it every credential of its kind)"
        assert (crd["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep", name
    kept = k.get("atc", CREDENTIAL, NS)
    assert kept is not None and kept["metadata"]["uid"] == cred["metadata"]["uid"], "the credential is gone"
    assert (k.secret_data(NS, TARGET) or {}).get("access_token"), "the credential's Secret lost its token"
    assert k.get("namespace", RELEASE_NS) is not None, "helm uninstall deleted the release namespace"
