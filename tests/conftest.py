"""Options and the Kubernetes API for the whole test tree.

``--with-e2e`` and ``--e2e-cluster`` are registered here so that ``pytest tests --with-e2e`` works.

When ``KUBEBUILDER_ASSETS`` names a folder with ``kube-apiserver`` and ``etcd`` (and optionally
``kube-controller-manager``), the main pytest process starts one real control plane
(:mod:`controlplane`) under ``build/controlplane/`` before any pytest-xdist worker exists and
exports ``AUTOTEK_TEST_KUBECONFIG`` (its admin kubeconfig; the cluster-facing tiers switch to it)
and ``AUTOTEK_TEST_CONTROLPLANE`` (its folder, for ``ControlPlane.attach``). Workers inherit both.
The plane is stopped when the session ends, fails or is interrupted. Without ``KUBEBUILDER_ASSETS``
nothing changes: the tiers use the API emulator.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `import controlplane` from any test, whatever the import mode
    sys.path.insert(0, str(TESTS))

import controlplane  # noqa: E402

ROOT = TESTS.parent
PLANES_DIR = ROOT / "build" / "controlplane"
ASSETS_ENV = "KUBEBUILDER_ASSETS"
KUBECONFIG_ENV = "AUTOTEK_TEST_KUBECONFIG"
PLANE_ENV = "AUTOTEK_TEST_CONTROLPLANE"
#: Seconds the session waits for the control plane to become ready (default 60).
TIMEOUT_ENV = "AUTOTEK_TEST_CONTROLPLANE_TIMEOUT"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autotek-e2e", "autotek-operator end-to-end tests")
    group.addoption(
        "--with-e2e",
        action="store_true",
        default=False,
        help="run the end-to-end tests in tests/e2e, on kind (Docker, kind and kubectl) or on a node on this "
        "machine (--e2e-cluster=local); the environment variable AUTOTEK_E2E=1 does the same",
    )
    group.addoption(
        "--e2e-cluster",
        choices=("kind", "local"),
        default=None,
        help="where the end-to-end tests run: kind (default; Docker and kind) or local (a node on this "
        "machine, root); the environment variable AUTOTEK_E2E_CLUSTER does the same",
    )


# -- the session's control plane ---------------------------------------------------------------


class _Session:
    """The control plane this pytest process started, and what to undo at the end."""

    plane: controlplane.ControlPlane | None = None
    description: str = ""
    previous_sigterm: Any = None
    atexit_registered: bool = False


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _stop_plane() -> None:
    plane, _Session.plane = _Session.plane, None
    if plane is None:
        return
    try:
        plane.stop()
    finally:
        # The etcd data is large and useless once stopped; logs and certificates stay for inspection.
        shutil.rmtree(plane.workdir / "etcd", ignore_errors=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C: pytest stops its workers and runs pytest_unconfigure, which stops the plane.
    signal.signal(signal.SIGTERM, _Session.previous_sigterm or signal.SIG_DFL)
    raise KeyboardInterrupt("SIGTERM")


def _prune_old_planes() -> None:
    """Remove the folders of earlier sessions whose pytest process is gone."""
    if not PLANES_DIR.is_dir():
        return
    for child in PLANES_DIR.iterdir():
        if not child.name.isdigit() or int(child.name) == os.getpid():
            continue
        try:
            os.kill(int(child.name), 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except PermissionError:
            pass


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    assets = os.environ.get(ASSETS_ENV)
    if _is_worker(config) or not assets or config.option.help or config.option.version:
        return
    try:
        folder = controlplane.check_assets(assets)
    except controlplane.ControlPlaneError as exc:
        pytest.exit(f"{ASSETS_ENV}={assets}: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or 60)
    except ValueError:
        pytest.exit(f"{TIMEOUT_ENV} must be a number of seconds, not {os.environ[TIMEOUT_ENV]!r}",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    _prune_old_planes()
    workdir = PLANES_DIR / str(os.getpid())
    plane = controlplane.ControlPlane(folder, workdir, ready_timeout=timeout)
    if not _Session.atexit_registered:
        atexit.register(_stop_plane)
        _Session.atexit_registered = True
    _Session.previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    _Session.plane = plane
    began = time.monotonic()
    try:
        plane.start()
    except controlplane.ControlPlaneError as exc:
        _Session.plane = None
        pytest.exit(f"the control plane from {ASSETS_ENV}={assets} did not start: {exc}",
                    returncode=pytest.ExitCode.INTERNAL_ERROR)
    os.environ[KUBECONFIG_ENV] = str(plane.admin_kubeconfig)
    os.environ[PLANE_ENV] = str(plane.workdir)
    version = controlplane.binary_version(folder / "kube-apiserver")
    cm = "with kube-controller-manager" if plane.kcm is not None else "without kube-controller-manager"
    _Session.description = (f"real {version} API server at {plane.url} ({cm}; ready in "
                            f"{time.monotonic() - began:.1f}s; logs in {plane.workdir / 'logs'})")
    # One line even under -q (which hides the report header).
    sys.stderr.write(f"Kubernetes API for this session: {_Session.description}\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _is_worker(config):
        return
    if _Session.plane is not None:
        _stop_plane()
        if _Session.previous_sigterm is not None:
            signal.signal(signal.SIGTERM, _Session.previous_sigterm)
            _Session.previous_sigterm = None


def pytest_report_header(config: pytest.Config) -> str:
    if _Session.description:
        return f"kubernetes API: {_Session.description} (KUBEBUILDER_ASSETS)"
    if os.environ.get(KUBECONFIG_ENV):
        return f"kubernetes API: the cluster in AUTOTEK_TEST_KUBECONFIG={os.environ[KUBECONFIG_ENV]}"
    return "kubernetes API: the API emulator (set KUBEBUILDER_ASSETS for a real kube-apiserver)"
