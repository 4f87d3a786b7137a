"""End-to-end tests: the operator's container image on a real cluster, kind or a local node.

How to run
----------
    make e2e                                                   # kind (Docker + kind)
    .venv/bin/pytest -q tests/e2e --with-e2e                   # the same
    .venv/bin/pytest -q tests/e2e --with-e2e --e2e-cluster=local
                                          # a node on this machine (root, Debian; see node/localnode.py)
    AUTOTEK_E2E=1 AUTOTEK_E2E_CLUSTER=local .venv/bin/pytest -q tests/e2e   # the same, by environment

Without ``--with-e2e`` (or ``AUTOTEK_E2E=1``) every test marked ``e2e`` here is skipped.

``--e2e-cluster=kind`` (the default) needs Docker with a running engine, ``kind`` and ``kubectl``;
without them the tests are skipped with the reason. ``--e2e-cluster=local`` needs root on a
Debian machine, ``kubectl`` and the Kubernetes binaries in ``KUBEBUILDER_ASSETS`` or ``.cache/envtest``
(``make envtest``); the Debian packages it needs are installed when missing. A problem there fails
the run, naming the step and showing the tail of that component's log.

``test_render.py`` is not marked: it only renders the kustomize overlays and runs wherever kubectl
is installed, as part of ``make test``.

Environment
-----------
``AUTOTEK_E2E_CLUSTER=kind|local``
    Same as ``--e2e-cluster``.
``KIND_CLUSTER=<name>``
    (kind) Use this kind cluster (created, with that name, if it does not exist) and never delete it.
``AUTOTEK_E2E_KEEP=1``
    Leave everything in place at the end (the kind cluster the run created, the namespaces, the
    operator) for inspection. A local node started by the run itself stops with it; to keep one,
    start it first with ``localnode.py up`` (the run then uses it and leaves it running).
``AUTOTEK_E2E_BASE_IMAGE=local``
    (local) Make the Dockerfile's base image with debootstrap even when a registry answers.

What a run does
---------------
1. The image: ``docker build -t autotek-operator:e2e -t autotek-operator:0.1.0 .`` (kind; the second
   name is the one ``manifests/`` installs), or on the local node ``podman build --network host
   --pull=never`` of the same Dockerfile (its base image pulled, or made from Debian packages when no
   registry is reachable; cached under ``.cache/localnode``);
2. the cluster: ``kind create cluster`` + ``kind load docker-image``; or the local node
   (``node/localnode.py``: control plane, containerd, kubelet, kube-proxy, kube-scheduler) +
   ``podman save | ctr images import``; a node already started with ``localnode.py up`` is used as is;
3. in namespace ``autotek-e2e`` (Pod Security ``restricted``): the token-endpoint double
   (``python -m autotek_operator.dev.broker`` from the same image, https with a certificate from a
   CA made for the run, 30-second tokens, client secrets generated per run) behind a Service with
   the fixed address ``10.96.203.17``, reached from here through ``kubectl port-forward``;
4. the scenarios, each installing the operator with ``kubectl apply -k tests/e2e/overlays/<name>``
   (the repository's kustomization plus ``overlays/settings``, which changes one thing: the broker is
   the only allowed token URL) and removing it at its end: ``test_e2e.py`` (``manifests/``:
   rotation, pods reading the token, leader hand-over, deletion policies, logs, and the uninstall
   that docs/operations.md describes), ``test_e2e_namespaced.py``, ``test_e2e_rollout_restart.py``;
   and ``test_e2e_helm.py``, which installs the chart (``charts/autotek-operator``) with ``helm install``
   instead (Helm from ``make helm``) and ends with ``helm uninstall``;
5. deletes the cluster it created (kind) or stops the node (local).

A failing test's report ends with a section "e2e diagnostics": kubectl get/describe of the
operator and the test namespace, the operator's logs, Events and the broker's request counts.
Logs of the run are in pytest's temporary directory (``pytest-of-$USER/pytest-current/e2e0``), the
local node's under ``.cache/localnode/logs``. The run ends with how long each stage took.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import e2ekit as kit
import pytest

sys.path.insert(0, str(kit.HERE / "node"))

import nodeutil

SKIP_REASON = "end-to-end tests need --with-e2e (make e2e, make e2e-local)"
CLUSTER_ENV = "AUTOTEK_E2E_CLUSTER"
FLAVOURS = ("kind", "local")

#: How long each stage took (image, cluster, ...); the scenarios are added per test module.
TIMINGS = nodeutil.Timings()
SCENARIOS: dict[str, float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autotek-e2e", "autotek-operator end-to-end tests")
    # Registered here for `pytest tests/e2e ...`; a conftest higher up may register it too (for
    # `pytest tests ...`, where this file is read only after the command line), which is fine.
    with contextlib.suppress(ValueError):
        group.addoption(
            "--e2e-cluster",
            choices=FLAVOURS,
            default=None,
            help="where the end-to-end tests run: kind (default; Docker and kind) or local (a node on this "
            f"machine, root); the environment variable {CLUSTER_ENV} does the same",
        )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def e2e_enabled(config: pytest.Config) -> bool:
    # getoption with a default: when this conftest is not loaded at start-up (``pytest tests``
    # collects it later) the option may not be registered; the environment variable still works.
    return bool(config.getoption("--with-e2e", default=False)) or _truthy(os.environ.get("AUTOTEK_E2E"))


def cluster_flavour(config: pytest.Config) -> str:
    flavour = config.getoption("--e2e-cluster", default=None) or os.environ.get(CLUSTER_ENV, "").strip() or "kind"
    if flavour not in FLAVOURS:
        raise pytest.UsageError(f"{CLUSTER_ENV}={flavour!r}: expected one of {', '.join(FLAVOURS)}")
    return str(flavour)


def missing_prerequisites(flavour: str) -> str | None:
    """Why the end-to-end tests cannot run on this machine, or None when they can."""
    if flavour == "local":
        if shutil.which("kubectl") is None:
            raise pytest.UsageError("--e2e-cluster=local needs `kubectl` on PATH")
        if sys.platform != "linux" or os.geteuid() != 0:
            raise pytest.UsageError("--e2e-cluster=local runs containerd and a kubelet: it needs root on Linux")
        return None
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"end-to-end tests on kind need `{tool}` on PATH (or use --e2e-cluster=local)"
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
    reason = SKIP_REASON if not e2e_enabled(config) else missing_prerequisites(cluster_flavour(config))
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


def _stages_total() -> float:
    return sum(seconds for _, seconds in TIMINGS.stages)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Time each test module as a scenario, less the stages (image, cluster) that ran inside it."""
    if not _ours(item):
        return (yield)
    began, stages = time.monotonic(), _stages_total()
    try:
        return (yield)
    finally:
        spent = time.monotonic() - began - (_stages_total() - stages)
        name = f"scenario {Path(item.path).stem}"
        SCENARIOS[name] = SCENARIOS.get(name, 0.0) + spent


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not TIMINGS.stages:  # no cluster was brought up: nothing ran
        return
    rows = [*TIMINGS.stages, *SCENARIOS.items()]
    width = max(len(name) for name, _ in rows)
    terminalreporter.write_sep("-", "e2e timings")
    for name, seconds in rows:
        terminalreporter.write_line(f"{name:<{width}}  {seconds:7.1f}s")
    terminalreporter.write_line(f"{'total':<{width}}  {sum(s for _, s in rows):7.1f}s")


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


# -- the cluster and the image -------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e")
    kit.DIAGNOSTICS.workdir = path
    return path


@pytest.fixture(scope="session")
def keep() -> bool:
    return _truthy(os.environ.get("AUTOTEK_E2E_KEEP"))


def _kind_cluster(config: pytest.Config, workdir: Path, keep: bool) -> Iterator[kit.Cluster]:
    with TIMINGS.stage("image build"):
        _say(config, f"docker build -t {' -t '.join(kit.IMAGES)} {kit.ROOT}")
        kit.docker_build(workdir / "docker-build.log")
    kubeconfig = workdir / "kubeconfig"
    given = os.environ.get("KIND_CLUSTER", "").strip()
    created = not given
    name = given or f"autotek-e2e-{secrets.token_hex(3)}"
    delete_at_end = created and not keep
    try:
        with TIMINGS.stage("cluster up"):
            if created or name not in kit.kind_clusters():
                _say(config, f"kind create cluster --name {name} --wait 120s")
                kit.kind_create(name, kubeconfig, workdir / "kind-create.log")
            else:
                _say(config, f"using the existing kind cluster {name} (KIND_CLUSTER)")
            kit.kind_kubeconfig(name, kubeconfig)
        with TIMINGS.stage("load image"):
            _say(config, f"kind load docker-image {' '.join(kit.IMAGES)} --name {name}")
            kit.kind_load(name)
    except BaseException:
        if delete_at_end:
            kit.kind_delete(name, kubeconfig)
        raise
    yield kit.Cluster("kind", name, kubeconfig, created)
    if delete_at_end:
        with TIMINGS.stage("teardown"):
            _say(config, f"kind delete cluster --name {name}")
            kit.kind_delete(name, kubeconfig)
    elif keep:
        _say(
            config,
            f"AUTOTEK_E2E_KEEP=1: kind cluster {name} kept; kubeconfig {kubeconfig} "
            f"(or `kind get kubeconfig --name {name}`); delete it with `kind delete cluster --name {name}`",
        )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _local_cluster(config: pytest.Config, workdir: Path, keep: bool) -> Iterator[kit.Cluster]:
    import localnode

    node = localnode.LocalNode(timings=TIMINGS)
    running = localnode.running(node.state)
    refs = [kit.image_ref(image) for image in kit.IMAGES]
    # SIGTERM (CI stopping the run) unwinds like Ctrl-C, so the node below is stopped and cleaned up.
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if running:
            _say(config, f"using the local node that `localnode.py up` started ({node.kubeconfig})")
            try:
                node.build_images(refs)
                with TIMINGS.stage("load image"):
                    node.load_image(*refs)
            except nodeutil.NodeError as exc:
                pytest.exit(f"local node: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
        else:
            _say(config, f"bringing up a local node (state and logs in {node.state}); this takes a few minutes")
            try:
                node.up(build=refs)
            except nodeutil.NodeError as exc:
                pytest.exit(f"local node: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
        kubeconfig = workdir / "kubeconfig"
        shutil.copy2(node.kubeconfig, kubeconfig)
        if not running:  # a node `localnode.py up` started keeps its logs in .cache/localnode/logs
            kit.DIAGNOSTICS.node = node.diagnostics
        try:
            yield kit.Cluster("local", node.node_name, kubeconfig, created=not running)
        finally:
            kit.DIAGNOSTICS.node = None
            if not running:
                if keep:
                    _say(
                        config,
                        "AUTOTEK_E2E_KEEP=1 cannot keep a node this run started: start one with "
                        "`localnode.py up` before the run to keep it",
                    )
                with TIMINGS.stage("teardown"):
                    _say(config, "stopping the local node")
                    for line in node.down():
                        _say(config, f"  {line}")
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def e2e_assets(pytestconfig: pytest.Config) -> Path:
    """The Kubernetes binaries a local node runs; for tests that start a node of their own before the
    session's (there can be only one on a machine at a time)."""
    import localnode

    if cluster_flavour(pytestconfig) != "local":
        pytest.skip("needs --e2e-cluster=local")
    if kit.DIAGNOSTICS.kubectl is not None or localnode.running():
        pytest.skip("a local node is already up on this machine")
    node = localnode.LocalNode()
    with TIMINGS.stage("packages"):
        localnode.ensure_packages(node.logs)
    return node.assets


@pytest.fixture(scope="session")
def cluster(pytestconfig: pytest.Config, e2e_workdir: Path, keep: bool) -> Iterator[kit.Cluster]:
    flavour = cluster_flavour(pytestconfig)
    source = _local_cluster if flavour == "local" else _kind_cluster
    for found in source(pytestconfig, e2e_workdir, keep):
        kit.DIAGNOSTICS.kubectl = kit.Kubectl(found.kubeconfig)
        try:
            yield found
        finally:
            kit.DIAGNOSTICS.kubectl = None


@pytest.fixture(scope="session")
def kubectl(cluster: kit.Cluster) -> kit.Kubectl:
    return kit.Kubectl(cluster.kubeconfig)


# -- the test namespace, the broker -----------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_namespace(cluster: kit.Cluster, kubectl: kit.Kubectl, keep: bool) -> Iterator[str]:
    # Whatever an earlier run left (KIND_CLUSTER, a kept node) goes first: every run starts fresh.
    kubectl("delete", "namespace", kit.NS, "--ignore-not-found", "--wait=true", "--timeout=180s", timeout=200)
    kubectl.apply([kit.namespace_object()])
    yield kit.NS
    if not keep:
        kubectl("delete", "namespace", kit.NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def tls(e2e_workdir: Path) -> kit.TestCA:
    """A CA made for this run and the broker's serving certificate; credentials trust it via caBundle."""
    return kit.TestCA.create(e2e_workdir / "tls")


@pytest.fixture(scope="session")
def clients() -> dict[str, str]:
    """Client id -> client secret, generated per run, known to the broker and held in the client Secrets."""
    return {client_id: f"cs-{secrets.token_urlsafe(24)}"
            for client_id in (kit.CLIENT_ID, kit.RETAIN_CLIENT_ID, kit.CLUSTER_CLIENT_ID)}


@pytest.fixture(scope="session")
def broker(
    pytestconfig: pytest.Config,
    kubectl: kit.Kubectl,
    e2e_namespace: str,
    e2e_workdir: Path,
    clients: dict[str, str],
    tls: kit.TestCA,
) -> Iterator[kit.BrokerAPI]:
    _say(pytestconfig, f"deploying the token-endpoint double (https://{kit.BROKER_IP}:{kit.BROKER_PORT})")
    kubectl.apply(kit.broker_objects(clients, tls))
    kubectl("rollout", "status", "-n", e2e_namespace, f"deploy/{kit.BROKER}", "--timeout=120s", timeout=150)
    api = kit.BrokerAPI(kubectl, e2e_workdir / "port-forward.log", tls.ca)
    api.start()
    kit.DIAGNOSTICS.broker = api
    yield api
    kit.DIAGNOSTICS.broker = None
    api.stop()


@contextlib.contextmanager
def operator_installed(config: pytest.Config, kubectl: kit.Kubectl, overlay: Path, keep: bool) -> Iterator[Path]:
    """The operator installed from ``overlay`` for one scenario, removed at its end (unless kept)."""
    if kit.operator_present(kubectl):  # an earlier scenario or run left one
        _say(config, "removing the operator an earlier scenario or run left installed")
        kit.uninstall(kubectl, overlay)
    _say(config, f"kubectl apply -k {overlay.relative_to(kit.ROOT)}")
    kit.install(kubectl, overlay)
    try:
        yield overlay
    finally:
        if not keep:
            kit.uninstall(kubectl, overlay)


@pytest.fixture(scope="session")
def install(pytestconfig: pytest.Config, kubectl: kit.Kubectl, keep: bool) -> Any:
    """``with install(overlay):`` the operator, for a module-scoped fixture of a scenario."""

    def _install(overlay: Path) -> contextlib.AbstractContextManager[Path]:
        return operator_installed(pytestconfig, kubectl, overlay, keep)

    return _install


@pytest.fixture(scope="module")
def e2e(
    cluster: kit.Cluster,
    kubectl: kit.Kubectl,
    broker: kit.BrokerAPI,
    clients: dict[str, str],
    e2e_workdir: Path,
    tls: kit.TestCA,
    install: Any,
) -> Iterator[kit.Env]:
    """``manifests/`` installed, and the two credentials of test_e2e.py applied."""
    with install(kit.OVERLAY):
        kubectl.apply(kit.credential_objects(clients, tls.ca_pem))
        yield kit.Env(cluster=cluster, kubectl=kubectl, broker=broker, clients=clients, workdir=e2e_workdir, tls=tls)


@pytest.fixture(scope="module")
def reader_pod(e2e: kit.Env) -> str:
    """A pod mounting Secret autotek-token at /var/run/autotek, Ready."""
    e2e.wait_ready(kit.CREDENTIAL)
    e2e.kubectl.apply([kit.reader_pod_object()])
    e2e.kubectl("wait", "--for=condition=Ready", f"pod/{kit.READER_POD}", "-n", kit.NS, "--timeout=120s", timeout=150)
    return kit.READER_POD
