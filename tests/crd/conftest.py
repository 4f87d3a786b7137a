"""Fixtures for the CRD tests: the CRD files and their schemas, read once per session."""

from __future__ import annotations

from typing import Any

import crdcheck
import pytest


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return crdcheck.load_crd()


@pytest.fixture(scope="session")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crdcheck.openapi_schema(crd)


@pytest.fixture(scope="session")
def cluster_crd() -> dict[str, Any]:
    return crdcheck.load_crd(crdcheck.CLUSTER_CRD_PATH)


@pytest.fixture(scope="session")
def cluster_schema(cluster_crd: dict[str, Any]) -> dict[str, Any]:
    return crdcheck.openapi_schema(cluster_crd)
