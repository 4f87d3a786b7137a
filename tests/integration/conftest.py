"""Fixtures: one API server, one token endpoint and one operator process for the session.

Test modules import helpers from ``harness`` (``Client``, ``new_client``, ``SENSITIVE``), not from here:
a run given several test folders loads each folder's ``conftest`` under the same module name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import SENSITIVE, Broker, Client, Cluster, Operator, new_client

__all__ = ["SENSITIVE", "Client", "new_client"]  # also importable from here, for older test modules


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
    # Every run (each pytest-xdist worker too) scans all its operators' logs, Events and status.
    found = leaks(cluster, broker, workdir)
    assert not found, f"secret values found in {found}"


def leaks(cluster: Cluster, broker: Broker, workdir: Path) -> list[str]:
    """Where any client secret or token this session used appears (logs at DEBUG, and the Events and
    credential statuses of the worker's own namespaces)."""
    import base64

    needles = set(SENSITIVE) | set(broker.stats()["tokens"])
    needles |= {base64.b64encode(n.encode()).decode() for n in list(needles)}
    haystacks = {str(p.relative_to(workdir)): p.read_text(errors="replace") for p in workdir.rglob("operator-*.log")}
    haystacks.update(cluster.leak_haystacks())
    return sorted(where for where, text in haystacks.items() if any(n in text for n in needles if n))


@pytest.fixture
def ns(cluster: Cluster, operator: Operator) -> Iterator[str]:
    name = cluster.create_namespace()
    yield name
    for item in cluster.credentials_in(name):
        cluster.delete_credential(name, item["metadata"]["name"])
    cluster.delete_namespace(name)


@pytest.fixture(autouse=True)
def _operator_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "operator" in request.fixturenames:
        op: Operator = request.getfixturevalue("operator")
        assert op.alive(), "the operator process died during the test"
        assert "Traceback" not in op.log_text(), "the operator logged a traceback"


@pytest.fixture
def client(cluster: Cluster, broker: Broker, ns: str) -> Client:
    return new_client(cluster, broker, ns)


# -- the fault table (tests/integration/test_faults.py records its rows in faults.ROWS) ----------------


def _rows_dir() -> Path:
    from harness import ROOT

    return ROOT / "build" / "fault-rows"


def pytest_sessionstart(session: pytest.Session) -> None:
    """In the main process, forget rows an earlier run left for the table."""
    if not hasattr(session.config, "workerinput"):
        for old in _rows_dir().glob("*.json"):
            old.unlink()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker, hand the fault rows to the main process through a file."""
    import dataclasses
    import json

    import faults

    worker = getattr(session.config, "workerinput", None)
    if worker is None or not faults.ROWS:
        return
    _rows_dir().mkdir(parents=True, exist_ok=True)
    doc = {"rows": [dataclasses.asdict(r) for r in faults.ROWS], "totals": faults.TOTALS}
    (_rows_dir() / f"{worker['workerid']}.json").write_text(json.dumps(doc))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (also without -s) and write it to build/fault-table.md."""
    import json

    import faults
    from harness import ROOT

    if not faults.ROWS:  # run by pytest-xdist workers: collect what they handed over
        for path in sorted(_rows_dir().glob("*.json")):
            doc = json.loads(path.read_text())
            faults.ROWS.extend(faults.Row(**r) for r in doc["rows"])
            faults.TOTALS.update(doc["totals"])
    if not faults.ROWS:
        return
    terminalreporter.section("fault injection")
    for line in faults.table_lines():
        terminalreporter.write_line(line)
    out = ROOT / "build" / "fault-table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(faults.markdown())
    terminalreporter.write_line(f"(table written to {out.relative_to(ROOT)})")
