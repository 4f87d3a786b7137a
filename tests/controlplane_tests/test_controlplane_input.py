"""Bad input to the control plane and the pytest session: missing or broken binaries, a plane that never
becomes ready, a test process that dies. Fake binaries stand in for etcd and kube-apiserver, so these run
without KUBEBUILDER_ASSETS."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509

import controlplane
from controlplane import ControlPlane, ControlPlaneError, check_assets, wait_for

ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT = 60  # seconds a failing session may take, bad plane included

# Serves GET /health like etcd on the port of --listen-client-urls; prints its pid first.
FAKE_ETCD = """
import http.server, os, sys
if "--version" in sys.argv:
    print("etcd Version: 0.0.0-fake"); sys.exit(0)
print(f"fake etcd pid {os.getpid()}", flush=True)
url = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--listen-client-urls="))
host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"health":"true"}'
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((host, int(port)), H).serve_forever()
"""

# Never serves anything: prints its pid (and, with FAKE_CHILD=1, starts a child in its group), then sleeps.
FAKE_APISERVER_SLEEPS = """
import os, subprocess, sys, time
if "--version" in sys.argv:
    print("Kubernetes v0.0.0-fake"); sys.exit(0)
print(f"fake apiserver pid {os.getpid()}", flush=True)
if os.environ.get("FAKE_CHILD") == "1":
    child = subprocess.Popen(["sleep", "1000"])
    print(f"fake apiserver child pid {child.pid}", flush=True)
print("fake apiserver: waiting for nothing", flush=True)
time.sleep(1000)
"""

FAKE_APISERVER_EXITS = """
import sys
if "--version" in sys.argv:
    print("Kubernetes v0.0.0-fake"); sys.exit(0)
print("Error: fake apiserver refuses --etcd-servers", flush=True)
sys.exit(3)
"""

BROKEN_VERSION = """
import sys
print("broken: cannot load something", file=sys.stderr)
sys.exit(1)
"""


def script(path: Path, body: str, executable: bool = True) -> Path:
    path.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
    path.chmod(0o755 if executable else 0o644)
    return path


def fake_assets(folder: Path, apiserver: str = FAKE_APISERVER_SLEEPS, etcd: str | None = FAKE_ETCD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script(folder / "kube-apiserver", apiserver)
    if etcd is not None:
        script(folder / "etcd", etcd)
    return folder


def pids_in(text: str, what: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{what} pid (\d+)", text)]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]




# -- check_assets ----------------------------------------------------------------------------------


def test_check_assets_accepts_working_binaries(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    assert check_assets(folder) == folder.resolve()


def test_check_assets_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match=re.escape(str(tmp_path / "nowhere"))):
        check_assets(tmp_path / "nowhere")


def test_check_assets_refuses_an_empty_setting() -> None:
    with pytest.raises(ControlPlaneError, match="KUBEBUILDER_ASSETS"):
        check_assets("")


def test_check_assets_names_a_missing_binary(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets", etcd=None)
    with pytest.raises(ControlPlaneError, match=re.escape(str(folder / "etcd")) + " is missing"):
        check_assets(folder)


def test_check_assets_names_a_file_that_is_not_executable(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    (folder / "etcd").chmod(0o644)
    with pytest.raises(ControlPlaneError, match=re.escape(str(folder / "etcd")) + " is not executable"):
        check_assets(folder)


def test_check_assets_names_a_binary_whose_version_fails(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    script(folder / "kube-apiserver", BROKEN_VERSION)
    with pytest.raises(ControlPlaneError, match=re.escape(str(folder / "kube-apiserver")) + r" --version exited "
                       r"with code 1:\nbroken: cannot load something"):
        check_assets(folder)


def test_a_present_controller_manager_is_checked_too(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    script(folder / "kube-controller-manager", BROKEN_VERSION)
    plane = ControlPlane(folder, tmp_path / "plane")
    with pytest.raises(ControlPlaneError, match="kube-controller-manager --version exited with code 1"):
        plane.start()


# -- the plane, with fakes ------------------------------------------------------------------------


def test_a_plane_that_never_gets_ready_fails_with_the_log_tail_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CHILD", "1")
    folder = fake_assets(tmp_path / "assets")
    plane = ControlPlane(folder, tmp_path / "plane", ready_timeout=4, controller_manager=False,
                         extra_sans=["DNS:operator.example", "IP:192.0.2.7"])
    began = time.monotonic()
    with pytest.raises(ControlPlaneError) as err:
        plane.start()
    assert time.monotonic() - began < 4 + 30  # the ready timeout, plus the time to stop
    message = str(err.value)
    assert "kube-apiserver" in message and "/readyz answered ok did not happen in time" in message
    assert "fake apiserver: waiting for nothing" in message  # the log tail
    log = (tmp_path / "plane" / "logs" / "kube-apiserver.log").read_text()
    etcd_log = (tmp_path / "plane" / "logs" / "etcd.log").read_text()
    pids = pids_in(log, "fake apiserver") + pids_in(log, "fake apiserver child") + pids_in(etcd_log, "fake etcd")
    assert len(pids) == 3
    assert wait_gone(pids, timeout=1) == []  # start() stopped them before raising
    plane.stop()  # idempotent

    # The serving certificate was made before the wait: it carries every name clients use.
    cert = x509.load_pem_x509_certificate((tmp_path / "plane" / "pki" / "apiserver.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.96.0.1", "192.0.2.7"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", "operator.example"}
    # Advertising loopback turns the endpoint reconciler off.
    assert "--endpoint-reconciler-type=none" in log.splitlines()[0]


def test_an_apiserver_that_exits_early_fails_at_once_with_its_output(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets", apiserver=FAKE_APISERVER_EXITS)
    plane = ControlPlane(folder, tmp_path / "plane", ready_timeout=60, controller_manager=False)
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver: exited with code 3 .*"
                       "refuses --etcd-servers"):
        plane.start()
    etcd_pids = pids_in((tmp_path / "plane" / "logs" / "etcd.log").read_text(), "fake etcd")
    assert etcd_pids and wait_gone(etcd_pids, timeout=1) == []


def test_an_etcd_that_never_gets_healthy_fails_naming_etcd(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets", etcd=FAKE_APISERVER_SLEEPS)
    plane = ControlPlane(folder, tmp_path / "plane", ready_timeout=3, controller_manager=False)
    with pytest.raises(ControlPlaneError, match=r"(?s)^etcd: .*/health answered healthy did not happen"):
        plane.start()
    pids = pids_in((tmp_path / "plane" / "logs" / "etcd.log").read_text(), "fake apiserver")
    assert pids and wait_gone(pids, timeout=1) == []


def test_children_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    workdir = tmp_path / "plane"
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
        from pathlib import Path
        import controlplane
        controlplane.ControlPlane(Path({str(folder)!r}), Path({str(workdir)!r}), ready_timeout=600,
                                  controller_manager=False).start()
    """)])
    try:
        logs = workdir / "logs"
        apiserver_pid = wait_for("the fake apiserver", timeout=30, interval=0.1, fn=lambda: pids_in(
            (logs / "kube-apiserver.log").read_text() if (logs / "kube-apiserver.log").exists() else "",
            "fake apiserver"))
        etcd_pid = pids_in((logs / "etcd.log").read_text(), "fake etcd")
        pids = [*apiserver_pid, *etcd_pid]  # type: ignore[misc]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        driver.send_signal(signal.SIGKILL)  # no cleanup code runs in the driver
        driver.wait()
    assert wait_gone(pids) == []


def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    with pytest.raises(ControlPlaneError, match="not an IP address"):
        ControlPlane(folder, tmp_path / "p", advertise_address="kubernetes.local")
    with pytest.raises(ControlPlaneError, match="neither IP:ADDRESS nor DNS:NAME"):
        ControlPlane(folder, tmp_path / "p", extra_sans=["DNS:"])
    with pytest.raises(ControlPlaneError, match=re.escape("IP:300.1.1.1")):
        ControlPlane(folder, tmp_path / "p", extra_sans=["IP:300.1.1.1"])
    with pytest.raises(ControlPlaneError, match="not been started"):
        ControlPlane(folder, tmp_path / "p").add_user("alice")
    with pytest.raises(ControlPlaneError, match="cannot attach"):
        ControlPlane.attach(tmp_path / "p")
    with pytest.raises(ControlPlaneError, match="unknown component"):
        ControlPlane(folder, tmp_path / "p").log_tail("kubelet")


def test_attach_reads_the_state_a_started_plane_wrote(tmp_path: Path) -> None:
    state = {"url": "https://127.0.0.1:6443", "secure_port": 6443, "bind_address": "127.0.0.1",
             "advertise_address": "127.0.0.1", "extra_sans": [], "assets": str(tmp_path), "controller_manager": True}
    (tmp_path / controlplane.STATE_FILE).write_text(json.dumps(state))
    plane = ControlPlane.attach(tmp_path)
    assert plane.url == "https://127.0.0.1:6443"
    assert plane.admin_kubeconfig == tmp_path.resolve() / "admin.kubeconfig"
    with pytest.raises(ControlPlaneError, match="attached"):
        plane.start()
    plane.stop()  # owns nothing


# -- the pytest session ---------------------------------------------------------------------------


def run_session(assets: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """A pytest session (on one trivial test of this file) with KUBEBUILDER_ASSETS=assets."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTEST_ADDOPTS", "AUTOTEK_TEST_KUBECONFIG", "AUTOTEK_TEST_CONTROLPLANE")}
    environ.update(KUBEBUILDER_ASSETS=str(assets), **env)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__).relative_to(ROOT)}::test_check_assets_refuses_an_empty_setting"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=SESSION_TIMEOUT,
    )
    return done, time.monotonic() - began


def test_a_session_with_a_missing_binary_fails_at_once_naming_it(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets", etcd=None)
    done, _ = run_session(folder)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert f"{folder / 'etcd'} is missing" in done.stdout + done.stderr
    assert "passed" not in done.stdout


def test_a_session_with_a_broken_binary_fails_at_once_naming_it(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    script(folder / "etcd", BROKEN_VERSION)
    done, _ = run_session(folder)
    assert done.returncode != 0
    assert f"{folder / 'etcd'} --version exited with code 1" in done.stdout + done.stderr
    (folder / "etcd").chmod(0o644)
    done, _ = run_session(folder)
    assert done.returncode != 0
    assert f"{folder / 'etcd'} is not executable" in done.stdout + done.stderr


def test_a_session_whose_plane_never_gets_ready_fails_with_the_log_tail(tmp_path: Path) -> None:
    folder = fake_assets(tmp_path / "assets")
    done, _ = run_session(folder, AUTOTEK_TEST_CONTROLPLANE_TIMEOUT="4")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "did not start" in out and "fake apiserver: waiting for nothing" in out
    assert "passed" not in done.stdout
    pids = pids_in(out, "fake apiserver")
    assert pids and wait_gone(pids, timeout=1) == []


def test_without_assets_the_header_names_the_emulator(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("KUBEBUILDER_ASSETS", "AUTOTEK_TEST_KUBECONFIG", "AUTOTEK_TEST_CONTROLPLANE")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
         f"{Path(__file__).relative_to(ROOT)}::test_check_assets_refuses_an_empty_setting"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=SESSION_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kubernetes API: the API emulator" in done.stdout
