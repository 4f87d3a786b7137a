"""Fixtures for the manifest tests: the kustomizations rendered once per session, and the Dockerfile."""

from __future__ import annotations

import manifestcheck as mc
import pytest


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = mc.find_kubectl()
    if path is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomizations with `kubectl kustomize`")
    return path


@pytest.fixture(scope="session")
def base_docs(kubectl: str) -> list[mc.Doc]:
    return mc.kustomize(kubectl, mc.BASE_DIR)


@pytest.fixture(scope="session")
def overlay_docs(kubectl: str) -> list[mc.Doc]:
    return mc.kustomize(kubectl, mc.OVERLAY_DIR)


@pytest.fixture(scope="session", params=["base", "overlay"])
def rendered(request: pytest.FixtureRequest) -> list[mc.Doc]:
    """Each rendering in turn: ``kubectl kustomize manifests/`` and the namespaced overlay."""
    return request.getfixturevalue(f"{request.param}_docs")


@pytest.fixture(scope="session")
def stages() -> list[mc.Stage]:
    return mc.dockerfile_stages(mc.DOCKERFILE.read_text(encoding="utf-8"))
