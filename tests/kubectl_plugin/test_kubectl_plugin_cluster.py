"""``kubectl autotek status|refresh|check`` on ClusterAutoTekCredentials (``catc/NAME`` or ``--cluster NAME``).

Cluster-scoped objects are shared by every test worker on a real API server: each test gives its
credentials and namespaces unique names (and a selection label of its own) and looks only at those.
``refresh`` is checked against a stand-in for the operator that answers the annotation by writing the
status the operator writes (the contract between the two); ``check`` against the broker double.
"""

from __future__ import annotations

import base64
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from autotek_operator import constants as c
from autotek_operator import kubectl_plugin

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LABEL = "kp.autotek.io/selection"


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def rows(out: str) -> list[list[str]]:
    return [re.split(r"\s{3,}", line.strip()) for line in out.strip().splitlines()]


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def catc(kube: Any) -> Iterator[Callable[..., str]]:
    """Create a ClusterAutoTekCredential (deleted at the end); its name."""
    made: list[str] = []

    def make(name: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> str:
        kube.create_cluster_credential(name, spec)
        made.append(name)
        if status is not None:
            kube.set_cluster_status(name, status)
        return name

    yield make
    for name in made:
        kube.delete_cluster_credential(name)


@pytest.fixture
def labelled(kube: Any) -> Iterator[Callable[[str, dict[str, str]], str]]:
    """Create a namespace with labels, on the real server and the emulator alike (deleted at the end)."""
    made: list[str] = []

    def make(name: str, labels: dict[str, str]) -> str:
        kube.create_labelled_namespace(name, labels)
        made.append(name)
        return name

    yield make
    for name in made:
        kube.delete_namespace(name)


def spec(client_ns: str = "autotek-system", **fields: Any) -> dict[str, Any]:
    return {"clientSecretRef": {"namespace": client_ns, "name": "autotek-client"}, "namespaces": ["shop"], **fields}


def ready(status: str, reason: str, message: str = "") -> list[dict[str, Any]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": message or reason}]


FAILED = [
    {"namespace": f"team-{i:02d}", "reason": "TargetConflict",
     "message": f"Secret team-{i:02d}/autotek-token is not ours"}
    for i in range(20)
]


def seed(catc: Callable[..., str], uid: str) -> tuple[str, str, str]:
    """Three cluster credentials: all provisioned, some namespaces failed, never seen by the operator."""
    good = catc(f"good-{uid}", spec(), {
        "conditions": ready("True", "TokenIssued"), "secretName": "autotek-token", "expiresAt": at(41 * 60 + 30),
        "nextRefreshTime": at(23 * 60 + 30), "failedAttempts": 0,
        "namespaces": {"selected": 3, "provisioned": 3, "failed": 0, "summary": "3/3"},
    })
    partial = catc(f"partial-{uid}", spec(), {
        "conditions": ready("False", "NamespacesNotProvisioned", "22 of 1000 selected namespaces not provisioned"),
        "secretName": "autotek-token", "expiresAt": at(59 * 60 + 30), "nextRefreshTime": at(39 * 60 + 30),
        "failedAttempts": 0,
        "namespaces": {"selected": 1000, "provisioned": 978, "failed": 22, "summary": "978/1000"},
        "failedNamespaces": FAILED,
    })
    fresh = catc(f"fresh-{uid}", spec())
    return good, partial, fresh


# -- status ---------------------------------------------------------------------------------------------


def test_status_cluster_table(run: Any, catc: Any, uid: str) -> None:
    good, partial, fresh = seed(catc, uid)
    r = run("status", "--cluster")
    assert r.code == 0, r.err
    table = rows(r.out)
    assert table[0] == ["NAME", "READY", "REASON", "NAMESPACES", "FAILED", "SECRET", "EXPIRES IN", "NEXT REFRESH",
                        "FAILURES"]
    mine = {row[0]: row for row in table[1:] if row[0] in (good, partial, fresh)}
    assert mine == {
        fresh: [fresh, "-", "-", "-", "-", "-", "-", "-", "0"],
        good: [good, "True", "TokenIssued", "3/3", "0", "autotek-token", "41m", "in 23m", "0"],
        partial: [partial, "False", "NamespacesNotProvisioned", "978/1000", "22", "autotek-token", "59m", "in 39m",
                  "0"],
    }
    names = [row[0] for row in table[1:]]
    assert names == sorted(names)


def test_status_of_one_cluster_credential_lists_its_failed_namespaces(run: Any, catc: Any, uid: str) -> None:
    _good, partial, _fresh = seed(catc, uid)
    r = run("status", f"catc/{partial}")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert rows(lines[0])[0][:5] == ["NAME", "READY", "REASON", "NAMESPACES", "FAILED"]
    assert rows(lines[1])[0][:5] == [partial, "False", "NamespacesNotProvisioned", "978/1000", "22"]
    assert "Ready: False (NamespacesNotProvisioned): 22 of 1000 selected namespaces not provisioned" in r.out
    assert "Namespaces: 1000 selected, 978 provisioned, 22 failed" in r.out
    assert "Failed namespaces:" in r.out
    failed = [row for row in rows(r.out) if row[0].startswith("team-")]
    assert failed[0] == ["team-00", "TargetConflict", "Secret team-00/autotek-token is not ours"]
    assert [row[0] for row in failed] == [f"team-{i:02d}" for i in range(20)]
    assert "... and 2 more (the status lists the first 20)" in r.out


@pytest.mark.parametrize("form", ["catc/{}", "--cluster {}", "clusterautotekcredential/{}",
                                  "ClusterAutoTekCredentials.autotek.io/{}"])
def test_status_accepts_kubectl_spellings(run: Any, catc: Any, uid: str, form: str) -> None:
    good, _partial, _fresh = seed(catc, uid)
    r = run("status", *form.format(good).split())
    assert r.code == 0, r.err
    assert "Namespaces: 3 selected, 3 provisioned, 0 failed" in r.out
    assert "Failed namespaces" not in r.out


def test_status_of_a_cluster_credential_the_operator_has_not_seen(run: Any, catc: Any, uid: str) -> None:
    _good, _partial, fresh = seed(catc, uid)
    r = run("status", f"catc/{fresh}")
    assert r.code == 0
    assert "Namespaces: not reported yet" in r.out


def test_status_of_a_missing_cluster_credential(run: Any, uid: str) -> None:
    r = run("status", f"catc/ghost-{uid}")
    assert r.code == 1
    assert f'ClusterAutoTekCredential "ghost-{uid}" not found' in r.err
    assert "namespace" not in r.err.split("not found")[1]


def test_status_of_one_namespaced_credential(run: Any, kube: Any, ns: str) -> None:
    kube.create_credential(ns, "alpha", {"clientSecretRef": {"name": "client"}})
    r = run("-n", ns, "status", "atc/alpha")
    assert r.code == 0, r.err
    assert rows(r.out) == [["NAME", "READY", "REASON", "SECRET", "EXPIRES IN", "NEXT REFRESH", "FAILURES"],
                           ["alpha", "-", "-", "-", "-", "-", "0"]]
    assert run("-n", ns, "status", "alpha").out == r.out
    r = run("-n", ns, "status", "catc/alpha")
    assert r.code == 1  # the namespaced one is not found as a cluster credential


@pytest.mark.parametrize(("args", "message"), [
    (("status", "--cluster", "atc/x"), "--cluster names a ClusterAutoTekCredential"),
    (("status", "deployment/x"), "unknown type 'deployment'"),
    (("refresh", "catc/"), "no name after the type"),
])
def test_bad_names_are_usage_errors(run: Any, args: tuple[str, ...], message: str) -> None:
    r = run(*args)
    assert r.code == 2
    assert message in r.err


# -- refresh --------------------------------------------------------------------------------------------


class StandIn:
    """Answers a new refresh-requested-at annotation on one cluster credential the way the operator does."""

    def __init__(self, kube: Any, name: str, answer: Callable[[str], dict[str, Any]]) -> None:
        self.kube, self.name, self.answer = kube, name, answer
        self.stop = threading.Event()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        first = self._value()
        while not self.stop.wait(0.1):
            value = self._value()
            if value and value != first and value not in self.seen:
                self.seen.append(value)
                self.kube.set_cluster_status(self.name, self.answer(value))

    def _value(self) -> str | None:
        try:
            meta = self.kube.cluster_credential(self.name)["metadata"]
        except ApiException:
            return None
        value: str | None = (meta.get("annotations") or {}).get(c.ANN_REFRESH_REQUESTED_AT)
        return value

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def issued(value: str, *, failed: int = 0) -> dict[str, Any]:
    """The status after a successful exchange: every namespace provisioned, or ``failed`` of 5 not."""
    cond = ready("True", "TokenIssued") if not failed else ready(
        "False", "NamespacesNotProvisioned", f"{failed} of 5 selected namespaces not provisioned")
    return {
        "conditions": cond, "secretName": "autotek-token", "lastRefreshRequest": value, "lastRefreshTime": at(0),
        "expiresAt": at(3600), "nextRefreshTime": at(2400), "failedAttempts": 0,
        "namespaces": {"selected": 5, "provisioned": 5 - failed, "failed": failed, "summary": f"{5 - failed}/5"},
        "failedNamespaces": FAILED[:failed],
    }


def test_refresh_no_wait_sets_the_annotation_on_the_cluster_object(run: Any, kube: Any, catc: Any, uid: str) -> None:
    name = catc(f"refresh-{uid}", spec())
    r = run("refresh", f"catc/{name}", "--no-wait")
    assert r.code == 0, r.err
    value = kube.cluster_credential(name)["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT]
    assert f"refresh requested for catc/{name} ({c.ANN_REFRESH_REQUESTED_AT}={value})" in r.out
    assert datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) <= datetime.now(UTC)
    r = run("refresh", "--cluster", name, "--no-wait")
    assert r.code == 0
    assert kube.cluster_credential(name)["metadata"]["annotations"][c.ANN_REFRESH_REQUESTED_AT] != value


def test_refresh_waits_for_the_new_token_in_every_namespace(run: Any, kube: Any, catc: Any, uid: str) -> None:
    name = catc(f"refresh-{uid}", spec(), issued("2026-01-01T00:00:00Z") | {"lastRefreshTime": at(-600)})
    with StandIn(kube, name, issued) as operator:
        r = run("refresh", f"catc/{name}", "--timeout", "20")
    assert r.code == 0, r.text
    assert operator.seen
    assert re.search(rf"token refreshed for catc/{name}; valid until \S+ \((59m|60m)\), in Secret autotek-token "
                     r"in 5/5 selected namespaces", r.out), r.out


def test_refresh_reports_namespaces_still_missing_the_token(run: Any, kube: Any, catc: Any, uid: str) -> None:
    name = catc(f"refresh-{uid}", spec())
    with StandIn(kube, name, lambda value: issued(value, failed=2)):
        r = run("refresh", f"catc/{name}", "--timeout", "20")
    assert r.code == 1, r.text
    assert f"token refreshed for catc/{name}" in r.out
    assert "in 3/5 selected namespaces" in r.out
    assert "not every namespace has it: NamespacesNotProvisioned" in r.out
    assert re.search(r"team-00\s+TargetConflict", r.out)
    assert re.search(r"team-01\s+TargetConflict", r.out)


def test_refresh_stops_at_a_blocking_failure(run: Any, kube: Any, catc: Any, uid: str) -> None:
    name = catc(f"refresh-{uid}", spec(client_ns="shop"))

    def refused(value: str) -> dict[str, Any]:
        message = "client Secret namespace shop is not allowed (AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES: autotek-system)"
        return {"conditions": ready("False", c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED, message),
                "lastFailureReason": c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED, "lastFailureTime": at(0),
                "failedAttempts": 1}

    with StandIn(kube, name, refused):
        r = run("refresh", f"catc/{name}", "--timeout", "20")
    assert r.code == 1, r.text
    assert f"refresh failed for catc/{name}: ClientSecretNamespaceNotAllowed" in r.out
    assert "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES" in r.out


def test_refresh_times_out_naming_the_cluster_object(run: Any, catc: Any, uid: str) -> None:
    name = catc(f"refresh-{uid}", spec())
    r = run("refresh", f"catc/{name}", "--timeout", "1")
    assert r.code == 2
    assert f"kubectl describe catc {name}'" in r.err


# -- check ----------------------------------------------------------------------------------------------


def secret_data(client: Any) -> dict[str, str]:
    return {"client_id": client.client_id, "client_secret": client.client_secret}


def no_leaks(text: str, broker: Any, client: Any) -> None:
    for s in [client.client_secret, *broker.tokens]:
        assert s not in text
        assert base64.b64encode(s.encode()).decode() not in text


def test_check_a_cluster_credential(run: Any, kube: Any, broker: Any, client: Any, catc: Any, ns: str,
                                    labelled: Any, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kube.put_secret(ns, "autotek-client", secret_data(client))
    a, b = labelled(f"kp-a-{uid}", {LABEL: uid}), labelled(f"kp-b-{uid}", {LABEL: uid})
    name = catc(f"check-{uid}", {"clientSecretRef": {"namespace": ns, "name": "autotek-client"},
                                 "namespaceSelector": {"matchLabels": {LABEL: uid}},
                                 "namespaces": [f"kp-later-{uid}"], "tokenURL": broker.token_url})
    before = kube.cluster_credential(name)["metadata"]["resourceVersion"]
    monkeypatch.setenv("AUTOTEK_ALLOWED_TOKEN_URLS", broker.url + "/")
    monkeypatch.setenv("AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES", f"autotek-system,{ns}")
    r = run("check", f"catc/{name}")
    assert r.code == 0, r.text
    assert f"Checking ClusterAutoTekCredential {name} (a dry run: nothing is written to the cluster)" in r.out
    assert f"namespaces labelled {LABEL}={uid} and 1 listed by name; target Secret {name}" in r.out
    assert f"namespace {ns} is allowed (AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES)" in r.out
    assert f"2 selected now: {a}, {b}" in r.out
    assert f"listed but not (yet) existing: kp-later-{uid}" in r.out
    assert "the broker issued a bearer token valid for 3599 s" in r.out
    assert f"no Secret {name} was changed in any namespace" in r.out
    assert broker.stats()["count"] == 1
    no_leaks(r.text, broker, client)
    assert kube.cluster_credential(name)["metadata"]["resourceVersion"] == before
    for namespace in (a, b):
        assert kube.core.list_namespaced_secret(namespace).items == []


def test_check_refuses_a_client_secret_namespace_not_allowed_without_reading_it(
    run: Any, kube: Any, broker: Any, client: Any, catc: Any, ns: str, labelled: Any, uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No client Secret exists: had check read it, it would report ClientSecretNotFound.
    labelled(f"kp-a-{uid}", {LABEL: uid})
    name = catc(f"check-{uid}", {"clientSecretRef": {"namespace": ns, "name": "autotek-client"},
                                 "namespaceSelector": {"matchLabels": {LABEL: uid}}, "tokenURL": broker.token_url})
    monkeypatch.delenv("AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES", raising=False)
    r = run("check", f"catc/{name}", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "FAILED: ClientSecretNamespaceNotAllowed" in r.out
    assert f"namespace {ns} is not one of autotek-system" in r.out
    assert "the Secret was not read" in r.out
    assert "ClientSecretNotFound" not in r.out
    assert broker.stats()["count"] == 0

    # Told that the namespace is allowed, check goes on and reads it.
    r = run("check", f"catc/{name}", "--allowed-token-url", broker.url + "/", "--client-secret-namespace", ns)
    assert r.code == 1
    assert f"namespace {ns} is allowed (--client-secret-namespace)" in r.out
    assert "FAILED: ClientSecretNotFound" in r.out


def test_check_without_a_selected_namespace(run: Any, kube: Any, broker: Any, client: Any, catc: Any, ns: str,
                                            uid: str) -> None:
    kube.put_secret(ns, "autotek-client", secret_data(client))
    name = catc(f"check-{uid}", {"clientSecretRef": {"namespace": ns, "name": "autotek-client"},
                                 "namespaceSelector": {"matchExpressions": [{"key": LABEL, "operator": "In",
                                                                             "values": [uid]}]},
                                 "tokenURL": broker.token_url})
    r = run("check", "--cluster", name, "--allowed-token-url", broker.url + "/", "--client-secret-namespace", ns)
    assert r.code == 1
    assert "FAILED: NoNamespacesSelected" in r.out
    assert f"{LABEL} In ({uid})" in r.out
    assert broker.stats()["count"] == 0


# -- check, offline -------------------------------------------------------------------------------------


def offline(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """The plugin with a kubeconfig that does not exist: nothing may reach for a cluster."""
    capsys.readouterr()
    code = kubectl_plugin.main(["--kubeconfig", str(tmp_path / "no-such-kubeconfig"), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_spec_only_from_a_file_needs_no_cluster(capsys: Any, tmp_path: Path) -> None:
    code, out, err = offline(capsys, tmp_path, "check", "-f", str(EXAMPLES / "cluster-credential.yaml"), "--spec-only")
    assert code == 0, err
    assert "Checking ClusterAutoTekCredential autotek from" in out
    assert "spec" in out and "ok: token URL https://api.autograb.com.au/auth-broker/request-token" in out
    assert "namespaces labelled autotek.io/token=true and 1 listed by name; target Secret autotek-token" in out
    assert "namespace autotek-system is allowed" in out
    assert "Spec only: no Secret was read and no token was requested." in out

    code, out, err = offline(capsys, tmp_path, "check", "-f", str(EXAMPLES / "credential.yaml"), "--spec-only")
    assert code == 0, err
    assert "Checking AutoTekCredential shop/autotek from" in out


@pytest.mark.parametrize(("change", "reason", "text"), [
    (lambda s: s.update(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In"}]}),
     "InvalidSpec", "needs at least one value"),
    (lambda s: s.update(namespaces=["Not_A_Namespace"]), "InvalidSpec", "not a valid namespace name"),
    (lambda s: (s.pop("namespaceSelector"), s.pop("namespaces")), "InvalidSpec",
     "spec.namespaceSelector or spec.namespaces is required"),
    (lambda s: s["clientSecretRef"].update(namespace="shop"), "ClientSecretNamespaceNotAllowed",
     "namespace shop is not one of autotek-system"),
])
def test_check_spec_only_finds_what_the_operator_refuses(capsys: Any, tmp_path: Path, change: Any, reason: str,
                                                         text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES", raising=False)
    docs = list(yaml.safe_load_all((EXAMPLES / "cluster-credential.yaml").read_text()))
    (doc,) = [d for d in docs if d["kind"] == c.CLUSTER_KIND]
    change(doc["spec"])
    path = tmp_path / "catc.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    code, out, _err = offline(capsys, tmp_path, "check", "-f", str(path), "--spec-only")
    assert code == 1, out
    assert f"FAILED: {reason}" in out
    assert text in out


def test_check_file_with_several_credentials_needs_a_name(capsys: Any, tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text((EXAMPLES / "cluster-credential.yaml").read_text() + "\n---\n"
                    + (EXAMPLES / "credential-minimal.yaml").read_text())
    code, _out, err = offline(capsys, tmp_path, "check", "-f", str(path), "--spec-only")
    assert code == 1
    assert "holds 2 credentials; name one" in err
    code, out, err = offline(capsys, tmp_path, "check", "-f", str(path), "--spec-only", "catc/autotek")
    assert code == 0, err
    assert "ClusterAutoTekCredential autotek" in out
    code, out, err = offline(capsys, tmp_path, "check", "-f", str(path), "--spec-only", "autotek-minimal")
    assert code == 0, err
    assert "AutoTekCredential default/autotek-minimal" not in out  # the file names its namespace
    assert "AutoTekCredential shop/autotek-minimal" in out


def test_check_file_without_spec_only_still_needs_a_cluster(capsys: Any, tmp_path: Path) -> None:
    code, _out, err = offline(capsys, tmp_path, "check", "-f", str(EXAMPLES / "cluster-credential.yaml"))
    assert code == 3
    assert "no kubeconfig found" in err
