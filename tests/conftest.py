"""Options for the whole test tree (registered here so that ``pytest tests --with-e2e`` works)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autotek-e2e", "autotek-operator end-to-end tests")
    group.addoption(
        "--with-e2e",
        action="store_true",
        default=False,
        help="run the end-to-end tests in tests/e2e on a kind cluster (needs Docker, kind and kubectl); "
        "the environment variable AUTOTEK_E2E=1 does the same",
    )
