"""Fixtures: one API server, one token endpoint and one operator process for the session."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Broker, Cluster, Operator

#: Every client secret and token the session used, for the leak scan.
SENSITIVE: set[str] = set()


@dataclass
class Client:
    ns: str
    secret_name: str
    client_id: str
    client_secret: str


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="session")
def cluster(workdir: Path) -> Iterator[Cluster]:
    c = Cluster(workdir)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def broker(workdir: Path) -> Iterator[Broker]:
    b = Broker(workdir)
    yield b
    SENSITIVE.update(b.stats()["tokens"])
    b.stop()


@pytest.fixture(scope="session")
def operator(cluster: Cluster, broker: Broker, workdir: Path) -> Iterator[Operator]:
    op = Operator(cluster, broker, workdir)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def ns(cluster: Cluster, operator: Operator) -> Iterator[str]:
    name = cluster.create_namespace()
    yield name
    for item in cluster.list_credentials():
        if item["metadata"]["namespace"] == name:
            cluster.delete_credential(name, item["metadata"]["name"])
    cluster.delete_namespace(name)


@pytest.fixture(autouse=True)
def _operator_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "operator" in request.fixturenames:
        op: Operator = request.getfixturevalue("operator")
        assert op.alive(), "the operator process died during the test"
        assert "Traceback" not in op.log_text(), "the operator logged a traceback"


def new_client(cluster: Cluster, broker: Broker, ns: str, secret_name: str = "autotek-client") -> Client:
    """Register a fresh client at the token endpoint and store it in a Secret in ``ns``."""
    client = Client(ns, secret_name, f"id-{secrets.token_hex(4)}", f"cs-{secrets.token_urlsafe(18)}")
    SENSITIVE.add(client.client_secret)
    broker.add_client(client.client_id, client.client_secret)
    cluster.put_client_secret(ns, secret_name, {"client_id": client.client_id, "client_secret": client.client_secret})
    return client


@pytest.fixture
def client(cluster: Cluster, broker: Broker, ns: str) -> Client:
    return new_client(cluster, broker, ns)


# -- the fault table (tests/integration/test_faults.py records its rows in faults.ROWS) ----------------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (also without -s) and write it to build/fault-table.md."""
    import faults
    from harness import ROOT

    if not faults.ROWS:
        return
    terminalreporter.section("fault injection")
    for line in faults.table_lines():
        terminalreporter.write_line(line)
    out = ROOT / "build" / "fault-table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(faults.markdown())
    terminalreporter.write_line(f"(table written to {out.relative_to(ROOT)})")
