"""The plugin's pure parts: humanised times, the refresh outcome rules, the table, the parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from autotek_operator import kubectl_plugin as kp

NOW = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)


def iso(delta: float) -> str:
    return (NOW + timedelta(seconds=delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-0.5, "0s"),
        (0, "0s"),
        (45, "45s"),
        (119, "119s"),
        (120, "2m"),
        (190, "3m10s"),
        (599, "9m59s"),
        (600, "10m"),
        (41 * 60 + 59, "41m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (5 * 3600 + 2 * 60, "5h2m"),
        (20 * 3600, "20h"),
        (3 * 86400, "3d"),
        (3 * 86400 + 5 * 3600, "3d5h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400 + 10 * 86400, "3y10d"),
        (10 * 365 * 86400, "10y"),
    ],
)
def test_human_duration_matches_kubectl(seconds: float, text: str) -> None:
    assert kp.human_duration(seconds) == text


def test_expires_in_and_relative() -> None:
    assert kp.expires_in(iso(41 * 60 + 5), NOW) == "41m"
    assert kp.expires_in(iso(-3 * 60), NOW) == "expired 3m ago"
    assert kp.expires_in(iso(0), NOW) == "expired 0s ago"
    assert kp.expires_in(None, NOW) == "-"
    assert kp.expires_in("garbage", NOW) == "-"
    assert kp.relative(iso(23 * 60), NOW) == "in 23m"
    assert kp.relative(iso(-90), NOW) == "90s ago"
    assert kp.relative(iso(0), NOW) == "now"
    assert kp.relative(None, NOW) == "-"


def test_table_is_aligned_like_kubectl() -> None:
    assert kp.table(["NAME", "READY"], [["a", "True"], ["longer-name", "-"]]) == [
        "NAME          READY",
        "a             True",
        "longer-name   -",
    ]


def cred(**status: Any) -> dict[str, Any]:
    ready = status.pop("ready", None)
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready[0], "reason": ready[1], "message": ready[2]}]
    return {"metadata": {"name": "x"}, "status": status}


REQ = "2026-11-28T04:00:00Z"
BEFORE = kp.Before(last_refresh_time=iso(-600), last_failure_time=None, failed_attempts=0)


def test_outcome_unknown_until_the_request_is_handled() -> None:
    old = cred(ready=("True", "TokenIssued", "ok"), lastRefreshTime=iso(-600), failedAttempts=0)
    assert kp.refresh_outcome(old, REQ, NOW, BEFORE) is None
    # Handled, but the status still shows the old token: not yet.
    same = cred(ready=("True", "TokenIssued", "ok"), lastRefreshTime=iso(-600), lastRefreshRequest=REQ)
    assert kp.refresh_outcome(same, REQ, NOW, BEFORE) is None


def test_outcome_success() -> None:
    done = cred(ready=("True", "TokenIssued", "ok"), lastRefreshTime=iso(1), lastRefreshRequest=REQ, failedAttempts=0)
    assert kp.refresh_outcome(done, REQ, NOW, BEFORE) == kp.Outcome(True)
    # The operator's clock runs behind ours: a new lastRefreshTime still counts.
    behind = cred(ready=("True", "TokenIssued", "ok"), lastRefreshTime=iso(-3), lastRefreshRequest=REQ)
    assert kp.refresh_outcome(behind, REQ, NOW, BEFORE) == kp.Outcome(True)


def test_outcome_failure_while_the_old_token_is_valid() -> None:
    failed = cred(
        ready=("True", "TokenIssued", "token valid until X; refresh failing (InvalidClient): refused"),
        lastRefreshTime=iso(-600),
        lastRefreshRequest=REQ,
        lastFailureReason="InvalidClient",
        lastFailureTime=iso(1),
        failedAttempts=1,
    )
    outcome = kp.refresh_outcome(failed, REQ, NOW, BEFORE)
    assert outcome is not None and not outcome.ok
    assert outcome.reason == "InvalidClient"
    assert "refresh failing" in outcome.message


def test_outcome_old_failure_is_not_ours() -> None:
    before = kp.Before(last_refresh_time=None, last_failure_time=iso(-60), failed_attempts=2)
    stale = cred(
        ready=("False", "RateLimited", "slow down"),
        lastFailureReason="RateLimited",
        lastFailureTime=iso(-60),
        failedAttempts=2,
    )
    assert kp.refresh_outcome(stale, REQ, NOW, before) is None
    # A blocking reason counts once a pass after the request reported it, handled or not.
    blocked = cred(
        ready=("False", "InvalidSpec", "spec.x is bad"),
        lastFailureReason="InvalidSpec",
        lastFailureTime=iso(0),
        failedAttempts=3,
    )
    assert kp.refresh_outcome(blocked, REQ, NOW, before) == kp.Outcome(False, "InvalidSpec", "spec.x is bad")
    # A transient reason needs the request to have been handled (the operator may still retry it).
    transient = cred(
        ready=("False", "RateLimited", "slow down"),
        lastFailureReason="RateLimited",
        lastFailureTime=iso(0),
        failedAttempts=3,
    )
    assert kp.refresh_outcome(transient, REQ, NOW, before) is None


def test_annotation_value_differs_from_the_current_one() -> None:
    clock = iter(
        [NOW + timedelta(microseconds=999_000), NOW + timedelta(microseconds=999_500), NOW + timedelta(seconds=1)]
    )
    value, when = kp._annotation_value(REQ, lambda: next(clock))
    assert value == "2026-11-28T04:00:01Z"
    assert when == NOW + timedelta(seconds=1)


def test_hints() -> None:
    lines = kp.hints_for("InvalidClient")
    assert lines[0] == "AutoTek's checklist:"
    assert lines[1].startswith("  1. check that client_id")
    assert kp.hints_for("SomethingElse") == []


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["refresh"], ["refresh", "x", "--timeout", "0"], ["bogus"]):
        with pytest.raises(SystemExit) as exc:
            kp.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_global_flags_before_or_after_the_subcommand() -> None:
    parser = kp.build_parser()
    a = parser.parse_args(["--kubeconfig", "k", "-n", "a", "status"])
    assert (a.kubeconfig, a.namespace, a.context) == ("k", "a", None)
    b = parser.parse_args(["-n", "a", "status", "-n", "b", "--context", "c"])
    assert (b.kubeconfig, b.namespace, b.context) == (None, "b", "c")


def test_outcome_of_a_cluster_credential_with_namespaces_missing_the_token() -> None:
    """The exchange succeeded; some namespaces did not get the token: an outcome, reported with where."""
    partial = cred(ready=("False", "NamespacesNotProvisioned", "2 of 5"), lastRefreshTime=iso(1),
                   lastRefreshRequest=REQ, failedAttempts=0)
    assert kp.refresh_outcome(partial, REQ, NOW, BEFORE) == kp.Outcome(True)
    # The same status with another Ready=False reason is no success.
    other = cred(ready=("False", "Expired", "x"), lastRefreshTime=iso(1), lastRefreshRequest=REQ)
    assert kp.refresh_outcome(other, REQ, NOW, BEFORE) is None


@pytest.mark.parametrize("reason", ["ClientSecretNamespaceNotAllowed", "NoNamespacesSelected"])
def test_cluster_reasons_that_block_a_refresh(reason: str) -> None:
    before = kp.Before(last_refresh_time=None, last_failure_time=None, failed_attempts=0)
    blocked = cred(ready=("False", reason, "m"), lastFailureReason=reason, lastFailureTime=iso(1), failedAttempts=1)
    assert kp.refresh_outcome(blocked, REQ, NOW, before) == kp.Outcome(False, reason, "m")


@pytest.mark.parametrize(("text", "cluster", "ref"), [
    ("x", False, kp.Ref("x", "shop")),
    ("x", True, kp.Ref("x")),
    ("atc/x", False, kp.Ref("x", "shop")),
    ("autotekcredentials.autotek.io/x", False, kp.Ref("x", "shop")),
    ("AutoTekCredential/x", False, kp.Ref("x", "shop")),
    ("catc/x", False, kp.Ref("x")),
    ("catc/x", True, kp.Ref("x")),
    ("clusterautotekcredential/x", False, kp.Ref("x")),
    ("ClusterAutoTekCredentials.autotek.io/x", False, kp.Ref("x")),
])
def test_parse_ref(text: str, cluster: bool, ref: kp.Ref) -> None:
    assert kp.parse_ref(text, cluster=cluster, namespace="shop") == ref


@pytest.mark.parametrize(("text", "cluster"), [("atc/x", True), ("secret/x", False), ("catc/", False)])
def test_parse_ref_refuses(text: str, cluster: bool) -> None:
    with pytest.raises(kp.CommandError) as exc:
        kp.parse_ref(text, cluster=cluster, namespace="shop")
    assert exc.value.code == kp.EXIT_USAGE


def test_ref_names_and_not_found_messages() -> None:
    assert str(kp.Ref("x")) == "catc/x" and kp.Ref("x").kind == "ClusterAutoTekCredential"
    assert str(kp.Ref("x", "shop")) == "shop/x" and kp.Ref("x", "shop").kind == "AutoTekCredential"
    assert kp.Ref("x").not_found().message == 'ClusterAutoTekCredential "x" not found'
    assert kp.Ref("x", "shop").not_found().message == 'AutoTekCredential "x" not found in namespace "shop"'


def test_cluster_rows_and_detail() -> None:
    obj = cred(ready=("False", "NamespacesNotProvisioned", "1 of 2"), secretName="t",
               namespaces={"selected": 2, "provisioned": 1, "failed": 1},
               failedNamespaces=[{"namespace": "b", "reason": "TargetNotFound", "message": "no\nSecret"}])
    assert kp.cluster_status_rows([obj], NOW) == [["x", "False", "NamespacesNotProvisioned", "1/2", "1", "t", "-", "-",
                                                   "0"]]
    assert kp.cluster_detail(obj) == [
        "Ready: False (NamespacesNotProvisioned): 1 of 2",
        "Namespaces: 2 selected, 1 provisioned, 1 failed",
        "Failed namespaces:",
        "  NAMESPACE   REASON           MESSAGE",
        "  b           TargetNotFound   no Secret",
    ]
