"""Fixtures for the CRD tests: the CRD file and its schema, read once per session."""

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
