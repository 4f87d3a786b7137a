"""The local node's tooling: errors that name the step and show the log, PID files, pip settings, cleanup.

The unmarked tests need neither root nor a cluster and run in ``make test``. The one marked
``e2e`` brings a node up with a kubelet that fails at once and checks what a user sees and that
nothing is left behind; it runs with ``--e2e-cluster=local``, before the session's node starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import localnode  # noqa: E402
import nodeimages  # noqa: E402
import nodeutil  # noqa: E402

# -- errors ---------------------------------------------------------------------------------------


def test_a_failing_command_names_the_step_and_shows_its_log(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    with pytest.raises(nodeutil.NodeError) as caught:
        nodeutil.run(
            "image build", ["sh", "-c", "echo first; echo 'E: the real reason' >&2; exit 7"], timeout=30, log=log
        )
    text = str(caught.value)
    assert caught.value.step == "image build"
    assert text.startswith("[image build] `sh -c")
    assert "exited with 7" in text and "E: the real reason" in text and str(log) in text


def test_a_command_that_hangs_is_stopped_and_named(tmp_path: Path) -> None:
    with pytest.raises(nodeutil.NodeError, match=r"\[base image\] `sleep 30` did not finish within 1s"):
        nodeutil.run("base image", ["sleep", "30"], timeout=1, log=tmp_path / "x.log")


def test_a_missing_program_is_named() -> None:
    with pytest.raises(nodeutil.NodeError, match=r"\[packages\] `autotek-no-such-tool` is not installed"):
        nodeutil.run("packages", ["autotek-no-such-tool"], timeout=5)


def test_a_missing_package_fails_with_apt_gets_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package apt cannot install fails the ``packages`` step, with the tail of apt-get's output."""
    fake = tmp_path / "bin"
    fake.mkdir()
    apt = fake / "apt-get"
    apt.write_text(
        "#!/bin/sh\n"
        'echo "apt-get $*" >> "$0.calls"\n'
        'if [ "$1" = install ]; then echo "E: Unable to locate package autotek-missing"; exit 100; fi\n'
    )
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(localnode, "PACKAGES", {"autotek-missing": str(tmp_path / "nothing-here")})
    with pytest.raises(nodeutil.NodeError) as caught:
        localnode.ensure_packages(tmp_path / "logs")
    assert caught.value.step == "packages"
    assert "E: Unable to locate package autotek-missing" in str(caught.value)
    calls = (fake / "apt-get.calls").read_text().splitlines()
    assert calls == ["apt-get update", "apt-get install -y --no-install-recommends autotek-missing"]


def test_nothing_is_installed_when_nothing_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localnode, "PACKAGES", {"present": str(tmp_path)})
    monkeypatch.setenv("PATH", str(tmp_path / "no-apt-here"))
    assert localnode.ensure_packages(tmp_path / "logs") == []


def test_a_component_that_dies_fails_the_wait_with_its_own_log(tmp_path: Path) -> None:
    """Waiting for something else, a dead component is reported at once, with the tail of its log."""
    child = nodeutil.Child("kube-proxy", tmp_path / "kube-proxy.log", tmp_path / "pids")
    child.start(["sh", "-c", "echo 'failed validate: HealthzBindAddress'; exit 1"])
    try:

        def alive() -> tuple[str, Path] | None:
            dead = child.dead()
            return (dead, child.log) if dead else None

        with pytest.raises(nodeutil.NodeError) as caught:
            nodeutil.wait_until("kubelet", "node vm Ready", lambda: False, 30, interval=0.1, alive=alive)
    finally:
        child.stop()
    text = str(caught.value)
    assert text.startswith("[kubelet] kube-proxy exited with code 1 while waiting for node vm Ready")
    assert "failed validate: HealthzBindAddress" in text and "kube-proxy.log" in text
    assert not child.pid_file.exists()


def test_a_wait_that_times_out_names_what_it_waited_for(tmp_path: Path) -> None:
    log = tmp_path / "kubelet.log"
    log.write_text("E1204 kubelet.go:1 container runtime network not ready\n")
    with pytest.raises(nodeutil.NodeError, match=r"(?s)\[kubelet\] node vm Ready: not within 0s.*network not ready"):
        nodeutil.wait_until("kubelet", "node vm Ready", lambda: None, 0, interval=0.01, log=log)


# -- processes ------------------------------------------------------------------------------------


def test_a_child_and_its_group_are_stopped(tmp_path: Path) -> None:
    child = nodeutil.Child("sleeper", tmp_path / "sleeper.log", tmp_path / "pids")
    child.start(["sh", "-c", "sleep 60 & sleep 60; wait"])
    assert child.proc is not None
    pid = child.proc.pid
    doc = json.loads(child.pid_file.read_text())
    assert doc == {"pid": pid, "start": nodeutil.start_time(pid)}
    child.stop(timeout=5)
    assert not _group_members(pid), f"processes left in the group: {_group_members(pid)}"


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in nodeutil.all_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(pid)
    return members


def test_a_pid_file_never_stops_another_process(tmp_path: Path) -> None:
    """A PID file whose process is gone (the PID maybe reused) is removed without signalling anyone."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_file = tmp_path / "old.pid"
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": "0"}))  # another process's start time
        assert nodeutil.stop_from_pid_file(pid_file) is None
        assert proc.poll() is None, "a process that the PID file did not describe was stopped"
        assert not pid_file.exists()
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": nodeutil.start_time(proc.pid)}))
        assert nodeutil.stop_from_pid_file(pid_file, timeout=5) == f"old (pid {proc.pid})"
        assert proc.wait(timeout=5) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_timings_add_up_and_survive_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "timings.json"
    timings = nodeutil.Timings(path)
    timings.add("packages", 1.5)
    with timings.stage("node up"):
        pass
    timings.add("packages", 0.5)
    again = nodeutil.Timings.read(path)
    assert [name for name, _ in again.stages] == ["packages", "node up"]
    assert again.stages[0] == ("packages", 2.0)
    assert "packages" in again.table() and "total" in again.table()
    assert nodeutil.Timings(path).stages == [], "a new run starts from nothing"


# -- images ---------------------------------------------------------------------------------------


def test_pip_settings_for_the_build_keep_the_index_and_ca_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CERT", str(ca))
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.example.org/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/pypi/simple https://mirror.example.org/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CONSTRAINT", "/etc/xdg/pip/constraints.txt")
    conf, found = nodeimages.host_pip_config(tmp_path / "pip.conf")
    text = conf.read_text()
    assert found == ca.resolve()
    assert f"cert = {ca.resolve()}" in text
    assert "index-url = https://pypi.example.org/simple" in text
    assert "extra-index-url = https://mirror.example.org/simple" in text
    assert "file://" not in text and "/opt/wheels" not in text and "constraint" not in text


def test_a_pip_ca_bundle_that_does_not_exist_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.pem"))
    with pytest.raises(nodeutil.NodeError, match=r"\[image build\] pip's CA bundle .*missing.pem does not exist"):
        nodeimages.host_pip_config(tmp_path / "pip.conf")


def test_the_cache_keys_follow_the_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    key = nodeimages.recipe_key()
    assert key == nodeimages.recipe_key() and len(key) == 16
    monkeypatch.setattr(nodeimages, "BASE_PACKAGES", (*nodeimages.BASE_PACKAGES, "curl"))
    assert nodeimages.recipe_key() != key


# -- a node that cannot come up -------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_kubelet_that_fails_is_named_and_nothing_is_left(
    tmp_path: Path, pytestconfig: pytest.Config, e2e_assets: Path
) -> None:
    """``localnode.py up`` with a kubelet that exits at once: the run fails naming the kubelet and showing
    its log, within its timeout, and ``up`` leaves no process, mount or network device behind."""
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in localnode.NODE_BINARIES:
        (assets / name).symlink_to(e2e_assets / name)
    (assets / "kubelet").unlink()
    (assets / "kubelet").write_text(
        '#!/bin/sh\ncase "$1" in --version) echo "Kubernetes v1.36.2";; '
        '*) echo "kubelet: simulated start-up failure (bad config)"; exit 1;; esac\n'
    )
    (assets / "kubelet").chmod(0o755)
    state = tmp_path / "state"
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(assets)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "localnode.py"), "--state", str(state), "up", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[kubelet]" in proc.stderr and "simulated start-up failure" in proc.stderr, proc.stderr
    leftovers = [
        f"{pid}: {' '.join(nodeutil.cmdline(pid))}"
        for pid in nodeutil.all_pids()
        if any(str(state) in arg or str(assets) in arg for arg in nodeutil.cmdline(pid))
    ]
    assert not leftovers, f"processes left behind: {leftovers}"
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in line]
    assert not mounts, mounts
    assert not (state / "run").exists()
    assert not Path(f"/sys/class/net/{localnode.BRIDGE}").exists()
