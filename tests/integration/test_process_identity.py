"""The operator as its image runs it: uid 65532, which has no passwd entry, and no USER or LOGNAME.

The process runs in a user namespace that maps this test's user to uid 65532, so it sees itself as
that uid (``os.getuid()`` is 65532 and the password database has no entry for it) while it can
still read the test's files. kopf used to ask the password database for a user name at start and
crashed (``KeyError: 'getpwuid(): uid not found: 65532'``).
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import Broker, Client, Cluster, Operator, wait_for

pytestmark = pytest.mark.integration

UID = 65532
#: What getpass.getuser() would read before it asks the password database.
LOGIN_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME", "HOME", "POD_ID", "POD_NAME")


def as_uid_without_passwd_entry() -> tuple[str, ...]:
    """The command prefix that runs a process as UID in a user namespace (fails the test if it cannot)."""
    try:
        pwd.getpwuid(UID)
        pytest.fail(f"this machine has a passwd entry for uid {UID}: the test would not show the defect")
    except KeyError:
        pass
    tool = shutil.which("unshare")
    assert tool is not None, "util-linux's unshare is needed to run a process as another uid"
    prefix = (tool, "--user", f"--map-user={UID}", f"--map-group={UID}")
    probe = subprocess.run([*prefix, "id", "-u"], capture_output=True, text=True, timeout=30, check=False)
    assert probe.returncode == 0 and probe.stdout.strip() == str(UID), f"unshare failed: {probe.stderr.strip()}"
    return prefix


def test_starts_and_issues_a_token_as_a_uid_without_a_passwd_entry(
    cluster: Cluster, broker: Broker, workdir: Path, ns: str, client: Client
) -> None:
    home = workdir / "uid-65532"
    home.mkdir(exist_ok=True)
    op = Operator(cluster, broker, home, prefix=as_uid_without_passwd_entry(), unset_env=LOGIN_VARIABLES,
                  extra_env={"AUTOTEK_NAMESPACES": ns})
    try:
        op.start()
        cluster.create_credential(ns, "autotek", {"clientSecretRef": {"name": "autotek-client"},
                                                  "tokenURL": broker.token_url}, scope=op.scope)
        wait_for("Ready=True", lambda: (cluster.ready(ns, "autotek") or {}).get("status") == "True", timeout=30)
        assert op.alive()
        assert "getpwuid" not in op.log_text() and "Traceback" not in op.log_text()
    finally:
        op.stop()
