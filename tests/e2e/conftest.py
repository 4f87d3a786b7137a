"""End-to-end tests: the operator's container image on a kind cluster.

How to run
----------
    make e2e                                  # = .venv/bin/pytest -q tests/e2e --with-e2e
    .venv/bin/pytest -q tests/e2e --with-e2e  # the same
    AUTOTEK_E2E=1 .venv/bin/pytest -q tests   # the environment variable is the same switch

It needs Docker with a running engine (``docker info`` must succeed), ``kind`` and ``kubectl`` on
PATH. Without ``--with-e2e`` (or ``AUTOTEK_E2E=1``) every test marked ``e2e`` here is skipped;
with it, they are skipped with the reason when a tool is missing or ``docker info`` fails.
``test_render.py`` is not marked: it only renders the kustomize overlay and runs wherever kubectl
is installed, as part of ``make test``. A run takes about ten minutes (most of it the image build,
the cluster, and waiting for real rotations and kubelet volume syncs).

Environment
-----------
``KIND_CLUSTER=<name>``
    Use this kind cluster (created, with that name, if it does not exist) and never delete it.
    The namespace ``autotek-e2e`` is deleted before the run and at its end; the operator stays
    installed (``kubectl delete -k tests/e2e/overlay`` removes it).
``AUTOTEK_E2E_KEEP=1``
    Leave everything in place at the end (the cluster the run created, the namespace, the
    objects) for inspection; the kubeconfig path and the command that deletes the cluster are
    printed.
``AUTOTEK_E2E=1``
    Same as ``--with-e2e``.

What a run does
---------------
1. ``docker build -t autotek-operator:e2e .`` (the repository's Dockerfile; before the cluster
   exists, so a broken build fails fast);
2. ``kind create cluster --name autotek-e2e-<random> --wait 120s`` (or ``$KIND_CLUSTER``), with a
   kubeconfig file of its own (``kind get kubeconfig``) passed to every kubectl call: the user's
   kubeconfig and current context are never read or changed;
3. ``kind load docker-image autotek-operator:e2e``;
4. ``kubectl apply -k tests/e2e/overlay`` (``manifests/`` with the e2e image, the in-cluster broker
   allowed as a token URL, DEBUG logs) and ``kubectl rollout status deploy/autotek-operator``;
5. in namespace ``autotek-e2e`` (Pod Security ``restricted`` enforced): the token-endpoint double
   (``python -m autotek_operator.dev.broker`` from the same image, 30-second tokens, client secrets
   generated per run) behind Service ``autotek-broker``, reached from here only through
   ``kubectl port-forward`` on 127.0.0.1; two client Secrets; AutoTekCredentials ``autotek``
   (target ``autotek-token``) and ``autotek-retain`` (``deletionPolicy: Retain``);
6. the tests of ``test_e2e.py``, in file order (they share this state);
7. deletes the cluster it created.

A failing test's report ends with a section "e2e diagnostics": kubectl get/describe of the
operator and the test namespace, the operator's logs, Events and the broker's request counts.
Logs of the run (build, kind, port-forward, diagnostics) are in pytest's temporary directory
(``pytest-of-$USER/pytest-current/e2e0``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2ekit as kit
import pytest

SKIP_REASON = "end-to-end tests need --with-e2e (make e2e), Docker and kind"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def e2e_enabled(config: pytest.Config) -> bool:
    # getoption with a default: when this conftest is not loaded at start-up (``pytest tests``
    # collects it later) the option may not be registered; the environment variable still works.
    return bool(config.getoption("--with-e2e", default=False)) or _truthy(os.environ.get("AUTOTEK_E2E"))


def missing_prerequisites() -> str | None:
    """Why the end-to-end tests cannot run on this machine, or None when they can."""
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"end-to-end tests need `{tool}` on PATH ({SKIP_REASON})"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: is the Docker engine running?"
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        return f"`docker info` failed (is the Docker engine running?): {detail}"
    return None


def _ours(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None and Path(item.path).resolve().is_relative_to(kit.HERE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _ours(item)]
    if not ours:
        return
    reason = SKIP_REASON if not e2e_enabled(config) else missing_prerequisites()
    if reason:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and _ours(item) and kit.DIAGNOSTICS.kubectl is not None:
        text = kit.diagnostics()
        report.sections.append(("e2e diagnostics (kubectl get/describe/logs)", text))
        if kit.DIAGNOSTICS.workdir is not None:
            safe = item.name.replace("/", "_")
            (kit.DIAGNOSTICS.workdir / f"diagnostics-{safe}-{report.when}.txt").write_text(text)
    return report


def _say(config: pytest.Config, message: str) -> None:
    """A progress line on the terminal, even while output is captured (the steps take minutes)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[e2e] {message}")
    else:
        reporter.write_line(f"[e2e] {message}")


# -- the cluster and the operator ------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e")
    kit.DIAGNOSTICS.workdir = path
    return path


@pytest.fixture(scope="session")
def keep() -> bool:
    return _truthy(os.environ.get("AUTOTEK_E2E_KEEP"))


@pytest.fixture(scope="session")
def operator_image(pytestconfig: pytest.Config, e2e_workdir: Path) -> str:
    _say(pytestconfig, f"docker build -t {kit.IMAGE} {kit.ROOT}")
    kit.docker_build(e2e_workdir / "docker-build.log")
    return kit.IMAGE


@pytest.fixture(scope="session")
def kind_cluster(
    pytestconfig: pytest.Config, e2e_workdir: Path, operator_image: str, keep: bool
) -> Iterator[kit.KindCluster]:
    kubeconfig = e2e_workdir / "kubeconfig"
    given = os.environ.get("KIND_CLUSTER", "").strip()
    created = not given
    name = given or f"autotek-e2e-{secrets.token_hex(3)}"
    delete_at_end = created and not keep
    try:
        if created or name not in kit.kind_clusters():
            _say(pytestconfig, f"kind create cluster --name {name} --wait 120s")
            kit.kind_create(name, kubeconfig, e2e_workdir / "kind-create.log")
        else:
            _say(pytestconfig, f"using the existing kind cluster {name} (KIND_CLUSTER)")
        kit.kind_kubeconfig(name, kubeconfig)
        _say(pytestconfig, f"kind load docker-image {operator_image} --name {name}")
        kit.kind_load(name)
    except BaseException:
        if delete_at_end:
            kit.kind_delete(name, kubeconfig)
        raise
    kit.DIAGNOSTICS.kubectl = kit.Kubectl(kubeconfig)
    yield kit.KindCluster(name, kubeconfig, created)
    kit.DIAGNOSTICS.kubectl = None
    if delete_at_end:
        _say(pytestconfig, f"kind delete cluster --name {name}")
        kit.kind_delete(name, kubeconfig)
    elif keep:
        _say(
            pytestconfig,
            f"AUTOTEK_E2E_KEEP=1: kind cluster {name} kept; kubeconfig {kubeconfig} "
            f"(or `kind get kubeconfig --name {name}`); delete it with `kind delete cluster --name {name}`",
        )


@pytest.fixture(scope="session")
def kubectl(kind_cluster: kit.KindCluster) -> kit.Kubectl:
    return kit.Kubectl(kind_cluster.kubeconfig)


@pytest.fixture(scope="session")
def operator_installed(pytestconfig: pytest.Config, kind_cluster: kit.KindCluster, kubectl: kit.Kubectl) -> None:
    _say(pytestconfig, f"kubectl apply -k {kit.OVERLAY.relative_to(kit.ROOT)}")
    kubectl("apply", "-k", str(kit.OVERLAY), timeout=120)
    kubectl("wait", "--for=condition=Established", f"crd/{kit.CRD_NAME}", "--timeout=60s", timeout=90)
    if not kind_cluster.created:
        # A cluster from an earlier run may be running an older build under the same tag.
        kubectl("rollout", "restart", "-n", kit.OPERATOR_NS, f"deploy/{kit.OPERATOR_DEPLOY}")
    kubectl("rollout", "status", "-n", kit.OPERATOR_NS, f"deploy/{kit.OPERATOR_DEPLOY}", "--timeout=180s", timeout=200)


# -- the test namespace, the broker, the credentials --------------------------------------------


@pytest.fixture(scope="session")
def e2e_namespace(
    kind_cluster: kit.KindCluster, kubectl: kit.Kubectl, operator_installed: None, keep: bool
) -> Iterator[str]:
    # Whatever an earlier run left (KIND_CLUSTER, AUTOTEK_E2E_KEEP) goes first: every run starts fresh.
    kubectl("delete", "namespace", kit.NS, "--ignore-not-found", "--wait=true", "--timeout=180s", timeout=200)
    kubectl.apply([kit.namespace_object()])
    yield kit.NS
    if not kind_cluster.created and not keep:
        kubectl("delete", "namespace", kit.NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def clients() -> dict[str, str]:
    """Client id -> client secret, generated per run, known to the broker and held in the client Secrets."""
    return {kit.CLIENT_ID: f"cs-{secrets.token_urlsafe(24)}", kit.RETAIN_CLIENT_ID: f"cs-{secrets.token_urlsafe(24)}"}


@pytest.fixture(scope="session")
def broker(
    pytestconfig: pytest.Config, kubectl: kit.Kubectl, e2e_namespace: str, e2e_workdir: Path, clients: dict[str, str]
) -> Iterator[kit.BrokerAPI]:
    _say(pytestconfig, f"deploying the token-endpoint double in namespace {e2e_namespace}")
    kubectl.apply(kit.broker_objects(clients))
    kubectl("rollout", "status", "-n", e2e_namespace, f"deploy/{kit.BROKER}", "--timeout=120s", timeout=150)
    api = kit.BrokerAPI(kubectl, e2e_workdir / "port-forward.log")
    api.start()
    kit.DIAGNOSTICS.broker = api
    yield api
    kit.DIAGNOSTICS.broker = None
    api.stop()


@pytest.fixture(scope="session")
def e2e(
    kind_cluster: kit.KindCluster,
    kubectl: kit.Kubectl,
    broker: kit.BrokerAPI,
    clients: dict[str, str],
    e2e_workdir: Path,
) -> kit.Env:
    """Everything the tests share: the cluster, kubectl, the broker, and the two credentials applied."""
    kubectl.apply(kit.credential_objects(clients))
    return kit.Env(cluster=kind_cluster, kubectl=kubectl, broker=broker, clients=clients, workdir=e2e_workdir)


@pytest.fixture(scope="session")
def reader_pod(e2e: kit.Env) -> str:
    """A pod mounting Secret autotek-token at /var/run/autotek, Ready."""
    e2e.wait_ready(kit.CREDENTIAL)
    e2e.kubectl.apply([kit.reader_pod_object()])
    e2e.kubectl("wait", "--for=condition=Ready", f"pod/{kit.READER_POD}", "-n", kit.NS, "--timeout=120s", timeout=150)
    return kit.READER_POD
