"""The operator's image installed with ``kubectl apply -k manifests/``, as a user runs it (see conftest.py).

The tests run in file order and share one cluster, one operator (two replicas, leader election),
one in-cluster token endpoint over TLS (30-second tokens, so a rotation about every 20 seconds) and
two credentials (test 5c adds a ClusterAutoTekCredential that selects two namespaces); later tests rely on
what earlier ones did (test 6 deletes the credentials, test 8 uninstalls the operator the way
docs/operations.md says, the cluster credentials included). Every wait is bounded.
"""

from __future__ import annotations

import itertools
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import e2ekit as kit
import pytest
from e2ekit import CLIENT_ID, CREDENTIAL, MOUNT_PATH, NS, RETAIN_CREDENTIAL, RETAIN_TARGET, TARGET, Env, wait_for

# The session set-up (image build, cluster, install) runs inside the first test and the cluster's
# deletion inside the last one, so the project's default per-test timeout is far too short here.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

#: The operator never asks for one credential's token twice within 10 s; with 30-second tokens
#: the schedule rotates about every 20 s. Requests closer together than this are a burst.
MIN_SPACING = 15.0


def _columns(header: str) -> list[tuple[str, int]]:
    """Column names and their start offsets in a ``kubectl get`` header ("NEXT REFRESH" is one)."""
    return [(m.group(0), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]


def _table(output: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Parse ``kubectl get`` output: the column names, and each row's cells by column, keyed by NAME."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, f"kubectl get printed nothing:\n{output}"
    cols = _columns(lines[0])
    rows: dict[str, dict[str, str]] = {}
    for line in lines[1:]:
        cells = {}
        for i, (name, start) in enumerate(cols):
            end = cols[i + 1][1] if i + 1 < len(cols) else None
            cells[name] = line[start:end].strip()
        rows[cells["NAME"]] = cells
    return [name for name, _ in cols], rows


def _spacing_problems(times: list[float]) -> list[str]:
    return [
        f"requests {b - a:.1f}s apart at {datetime.fromtimestamp(b, UTC).isoformat()}"
        for a, b in itertools.pairwise(times)
        if b - a < MIN_SPACING
    ]


# -- 1 -----------------------------------------------------------------------------------------


def test_1_credential_becomes_ready(e2e: Env) -> None:
    """``kubectl wait --for=condition=Ready atc/autotek`` succeeds and the Secret holds a real token."""
    e2e.kubectl("wait", "--for=condition=Ready", f"atc/{CREDENTIAL}", "-n", NS, "--timeout=120s", timeout=150)
    cred = e2e.kubectl.get("atc", CREDENTIAL, NS)
    cond = e2e.kubectl.condition(cred, "Ready")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "TokenIssued", cond
    assert (cred or {}).get("status", {}).get("secretName") == TARGET

    data = e2e.secret_data()
    assert data is not None, f"Secret {NS}/{TARGET} does not exist"
    token = data["access_token"]
    assert token in e2e.broker.stats()["tokens"], "the Secret holds a token the broker never issued"
    assert data["authorization"] == f"Bearer {token}"
    assert data["token_type"] == "bearer"
    assert kit.parse_time(data["expires_at"]) > datetime.now(UTC)
    requests = e2e.broker.requests_for(CLIENT_ID)
    assert requests and all(r["status"] == 200 for r in requests), requests
    # Over TLS, trusted only through the credential's caBundle (the run's own CA).
    assert (cred or {})["spec"]["tokenURL"].startswith("https://")
    assert (cred or {})["spec"]["caBundle"] == e2e.tls.ca_pem

    # The Retain credential (used by test 6) comes up too.
    e2e.wait_ready(RETAIN_CREDENTIAL)


def _last_leader_state(text: str) -> str | None:
    """``leading`` or ``following``: what the operator's log last said about leader election."""
    found = re.findall(r"\b(leading: running passes|following: another replica)", text)
    return found[-1].split(":")[0] if found else None


def test_1b_two_replicas_ready_exactly_one_leading(e2e: Env) -> None:
    """Both replicas pass their readiness probe (/readyz); the Lease names one of them, the only one leading."""
    k = e2e.kubectl
    deploy = k.get("deploy", kit.OPERATOR_DEPLOY, kit.OPERATOR_NS)
    assert deploy is not None
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    probe = container.get("readinessProbe") or {}
    assert (probe.get("httpGet") or {}).get("path") == "/readyz", f"no /readyz readiness probe: {probe}"
    assert deploy["spec"]["replicas"] == 2

    def two_ready() -> list[str] | None:
        ready = [str(p["metadata"]["name"]) for p in k.operator_pods() if kit.pod_ready(p)]
        return ready if len(ready) == 2 else None

    pods = wait_for("two operator pods Ready", two_ready, timeout=120, interval=2)
    holder = wait_for("the Lease to name a Ready operator pod", lambda: _leader(e2e) in pods and _leader(e2e), 60, 2)

    def states() -> dict[str, str | None] | None:
        found = {name: _last_leader_state(k.logs("-n", kit.OPERATOR_NS, f"pod/{name}")) for name in pods}
        return found if found.get(holder) == "leading" else None

    # A replica that starts as a follower says nothing until its state changes.
    found = wait_for(f"the Lease holder {holder} to log that it leads", states, timeout=60, interval=2)
    leading = sorted(name for name, state in found.items() if state == "leading")
    assert leading == [holder], f"leader states {found}, Lease holder {holder}"


# -- 2 -----------------------------------------------------------------------------------------


def test_2_pod_reads_the_token_from_its_volume(e2e: Env, reader_pod: str) -> None:
    """A non-root pod with a read-only root filesystem reads the token from the mounted Secret."""

    # The kubelet updates a Secret volume on its own schedule (up to a minute or so after a
    # rotation), so compare until file and Secret agree, within a bound.
    def agree() -> str | None:
        secret_before = e2e.token()
        in_file = e2e.cat(f"{MOUNT_PATH}/access_token")
        secret_after = e2e.token()
        return in_file if in_file and in_file in (secret_before, secret_after) else None

    token = wait_for("the mounted access_token to equal the Secret's", agree, timeout=150, interval=2)
    assert token in e2e.broker.stats()["tokens"]
    authorization = e2e.cat(f"{MOUNT_PATH}/authorization")
    if authorization != f"Bearer {token}":  # a rotation can land between the two reads; read again
        token = wait_for("the mounted access_token to equal the Secret's", agree, timeout=150, interval=2)
        authorization = e2e.cat(f"{MOUNT_PATH}/authorization")
    assert authorization == f"Bearer {token}"

    pod = e2e.pod()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert e2e.kubectl.text("exec", "-n", NS, reader_pod, "--", "id", "-u").strip() == str(kit.RUN_AS)


# -- 3 -----------------------------------------------------------------------------------------


def test_3_rotation_reaches_the_mounted_file_without_a_restart(e2e: Env, reader_pod: str) -> None:
    """After a scheduled rotation the pod's file shows the new token; the pod is not restarted."""
    before = e2e.pod()
    first = e2e.cat(f"{MOUNT_PATH}/access_token")
    count_before = e2e.count()

    def rotated() -> str | None:
        secret_before = e2e.token()
        in_file = e2e.cat(f"{MOUNT_PATH}/access_token")
        secret_after = e2e.token()
        if in_file and in_file != first and in_file in (secret_before, secret_after):
            return in_file
        return None

    # A rotation comes within ~20 s; the kubelet syncs a Secret volume within about 60-90 s after
    # that. The file must then equal the Secret, which rotates again every ~20 s: allow for a
    # second kubelet sync if the first one lands just before a rotation.
    new = wait_for(
        "the pod's mounted access_token to change to the Secret's current token", rotated, timeout=240, interval=1
    )
    assert new in e2e.broker.stats()["tokens"]
    assert e2e.count() > count_before, "the token changed without a token request"

    after = e2e.pod()
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the pod was replaced"
    assert kit.restart_counts(after) == {"app": 0}, f"the pod's container restarted: {kit.restart_counts(after)}"


# -- 4 -----------------------------------------------------------------------------------------


def test_4_printer_columns(e2e: Env) -> None:
    """``kubectl get atc`` shows READY, SECRET, EXPIRES, AGE; ``-o wide`` adds REASON and NEXT REFRESH."""
    e2e.wait_ready(CREDENTIAL)
    names, rows = _table(e2e.kubectl.text("get", "atc", "-n", NS))
    for col in ("NAME", "READY", "SECRET", "EXPIRES", "AGE"):
        assert col in names, f"`kubectl get atc` has no {col} column: {names}"
    for col in ("REASON", "NEXT REFRESH"):
        assert col not in names, f"{col} should appear only with -o wide: {names}"
    assert rows[CREDENTIAL]["READY"] == "True"
    assert rows[CREDENTIAL]["SECRET"] == TARGET

    wide_names, wide_rows = _table(e2e.kubectl.text("get", "atc", "-n", NS, "-o", "wide"))
    assert set(wide_names) >= {"NAME", "READY", "REASON", "SECRET", "EXPIRES", "NEXT REFRESH", "AGE"}, wide_names
    assert wide_rows[CREDENTIAL]["REASON"] == "TokenIssued"
    assert wide_rows[CREDENTIAL]["NEXT REFRESH"], wide_rows[CREDENTIAL]


def test_4b_time_columns_are_readable(e2e: Env) -> None:
    """EXPIRES and NEXT REFRESH show something a person can read.

    A printer column of ``type: date`` is rendered as the age of the timestamp (now minus it), and
    the API server prints ``<invalid>`` for an instant more than a second in the future, which an
    expiry and a next refresh always are. ``type: string`` shows the RFC 3339 instant instead.
    """
    e2e.wait_ready(CREDENTIAL)
    _, rows = _table(e2e.kubectl.text("get", "atc", "-n", NS, "-o", "wide"))
    for col in ("EXPIRES", "NEXT REFRESH"):
        value = rows[CREDENTIAL][col]
        assert value and value not in ("<invalid>", "<unknown>", "<none>"), (
            f"`kubectl get atc -o wide` shows {col}={value!r} for a future instant (a `type: date` printer "
            f"column renders future timestamps as <invalid>; `type: string` would show the time itself)"
        )


# -- 5 -----------------------------------------------------------------------------------------
#
# The operator runs as two replicas with leader election (a Lease in autotek-system held by the
# pod's name): one replica runs the passes, the other takes over when the Lease is released or
# goes unrenewed. Both tests below first make the broker issue 600-second tokens and wait until
# the Secret holds one, so that no scheduled rotation is due during the restart and the
# observation window after it: any token request in that window, or any change of the Secret's
# token, is the restart's doing.

LONG_LIFETIME = 600


def _quiet_token(e2e: Env, quiet_for: float) -> tuple[str, dict[str, Any]]:
    """A token in the Secret whose next refresh is at least ``quiet_for`` seconds away; its status."""
    e2e.broker.control(lifetime=LONG_LIFETIME)

    def settled() -> tuple[str, dict[str, Any]] | None:
        cred = e2e.kubectl.get("atc", CREDENTIAL, NS) or {}
        status = cred.get("status") or {}
        data = e2e.secret_data() or {}
        if not (status.get("expiresAt") and status.get("nextRefreshTime") and data.get("expires_at")):
            return None
        if abs(kit.parse_time(status["expiresAt"]) - kit.parse_time(data["expires_at"])) >= timedelta(seconds=1):
            return None  # the status does not describe the Secret's token yet
        if kit.parse_time(status["nextRefreshTime"]) < datetime.now(UTC) + timedelta(seconds=quiet_for):
            return None
        return data["access_token"], status

    try:
        # The next scheduled rotation (within ~20 s of 30-second tokens) brings a long one.
        return wait_for("a 600-second token in the Secret", settled, timeout=45, interval=2)
    except AssertionError:
        # The Secret already holds a long token, but too little of it is left: ask for a new one.
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        e2e.kubectl("annotate", "atc", CREDENTIAL, "-n", NS, f"autotek.io/refresh-requested-at={stamp}", "--overwrite")
        return wait_for("a 600-second token after a requested refresh", settled, timeout=60, interval=2)


def _lease(e2e: Env) -> dict[str, Any] | None:
    """The leader-election Lease (named after the Deployment), or None when there is none."""
    return e2e.kubectl.get("lease", kit.OPERATOR_DEPLOY, kit.OPERATOR_NS)


def _leader(e2e: Env) -> str | None:
    holder = ((_lease(e2e) or {}).get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def _replicas(e2e: Env) -> int:
    deploy = e2e.kubectl.get("deploy", kit.OPERATOR_DEPLOY, kit.OPERATOR_NS)
    assert deploy is not None
    return int(deploy["spec"].get("replicas", 1))


def _restart_loses_no_token(e2e: Env, delete: list[str], victims: set[str]) -> None:
    """Run ``kubectl delete pod <delete>`` (which removes the pods ``victims``) and check the aftermath.

    Throughout: the Secret holds the same, unexpired token. After: the Deployment has all its
    replicas Ready again, a pod that was not deleted holds the Lease and runs the passes, and the
    broker saw no token request from before the deletion until 15 s after the new leader started.
    """
    k = e2e.kubectl
    token, status = _quiet_token(e2e, quiet_for=240)
    replicas = _replicas(e2e)
    for pod in k.operator_pods():  # test 7 checks that no replica restarted, these ones included
        if pod["metadata"]["name"] in victims:
            e2e.notes.setdefault("deleted_operator_restarts", {})[pod["metadata"]["name"]] = kit.restart_counts(pod)
    for name in sorted(victims):  # their logs go with them; test 7 reads them
        e2e.notes.setdefault("deleted_operator_logs", []).append(
            k.logs("-n", kit.OPERATOR_NS, f"pod/{name}", "--all-containers")
            + k.logs("-n", kit.OPERATOR_NS, f"pod/{name}", "--all-containers", "--previous")
        )
    count_before = e2e.count()
    restart_at = time.time()

    with kit.SecretWatch(k, NS, TARGET) as watch:
        k("delete", "pod", *delete, "-n", kit.OPERATOR_NS, "--wait=true", "--timeout=120s", timeout=150)

        def all_ready() -> list[str] | None:
            ready = [str(p["metadata"]["name"]) for p in k.operator_pods() if kit.pod_ready(p)]
            fresh = [name for name in ready if name not in victims]
            return fresh if len(fresh) >= replicas else None

        pods = wait_for(f"{replicas} operator pods to be Ready", all_ready, timeout=180, interval=2)

        def leading() -> str | None:
            if _lease(e2e) is None:  # no leader election: the one replica runs the passes once started
                text = k.logs("-n", kit.OPERATOR_NS, f"pod/{pods[0]}", "--all-containers")
                return pods[0] if "autotek-operator started" in text else None
            holder = _leader(e2e)
            if holder not in pods:
                return None
            text = k.logs("-n", kit.OPERATOR_NS, f"pod/{holder}", "--all-containers")
            return holder if "leading: running passes" in text else None

        # A leader that shuts down cleanly releases the Lease; otherwise it expires within ~30 s.
        leader = wait_for("a remaining operator pod to take the Lease and lead", leading, timeout=120, interval=2)
        count_at_ready = e2e.count()
        time.sleep(15)  # a new leader that re-requested tokens would have done so by now
        count_later = e2e.count()

    samples = watch.samples
    readable = [s for s in samples if s.error is None]
    assert len(readable) >= 10, f"too few reads of the Secret during the restart: {samples}"
    assert len(readable) >= len(samples) / 2, f"most reads of the Secret failed: {samples}"
    lost = [s.at.isoformat() for s in readable if s.token is None]
    assert not lost, f"Secret {NS}/{TARGET} had no access_token during the restart at {lost}"
    expired = [s.at.isoformat() for s in readable if s.expires_at is None or s.expires_at <= s.at]
    assert not expired, f"Secret {NS}/{TARGET} held an expired token during the restart at {expired}"
    changed = [s.at.isoformat() for s in readable if s.token != token]
    assert not changed, f"the token in Secret {NS}/{TARGET} changed at the restart (at {changed})"

    assert count_before == count_at_ready == count_later, (
        f"a token was requested that was not due: {CLIENT_ID} requests {count_before} before the restart, "
        f"{count_at_ready} when {leader} led, {count_later} 15 s later"
    )
    after = e2e.wait_ready(CREDENTIAL)
    assert after["status"].get("lastRefreshTime") == status.get("lastRefreshTime"), (after["status"], status)
    assert e2e.token() == token

    # No burst: from the last request before the restart on, requests are spaced like a schedule.
    times = sorted(float(r["time"]) for r in e2e.broker.requests_for(CLIENT_ID))
    first_after = next((i for i, t in enumerate(times) if t >= restart_at), len(times))
    burst = _spacing_problems(times[max(first_after - 1, 0) :])
    assert not burst, f"token requests for {CLIENT_ID} closer than {MIN_SPACING:.0f}s: {burst}"


def test_5_deleting_the_operator_pods_loses_no_token_and_makes_no_request(e2e: Env) -> None:
    """``kubectl delete pod -l app.kubernetes.io/name=autotek-operator``: every replica at once."""
    e2e.wait_ready(CREDENTIAL)
    pods = {str(p["metadata"]["name"]) for p in e2e.kubectl.operator_pods()}
    assert pods, "no operator pods"
    try:
        _restart_loses_no_token(e2e, ["-l", kit.OPERATOR_SELECTOR], pods)
    finally:
        e2e.broker.control(lifetime=kit.BROKER_LIFETIME)


def test_5b_deleting_the_leader_hands_over_without_a_token_request(e2e: Env) -> None:
    """Deleting only the pod that holds the Lease: another replica takes over, the token stays."""
    e2e.wait_ready(CREDENTIAL)
    if _replicas(e2e) < 2:
        pytest.skip("the operator runs a single replica: no leader hand-over to test")
    leader = wait_for("the Lease to name a running operator pod", lambda: _leader(e2e), timeout=60, interval=2)
    try:
        _restart_loses_no_token(e2e, [leader], {leader})
    finally:
        e2e.broker.control(lifetime=kit.BROKER_LIFETIME)
    new_leader = _leader(e2e)
    assert new_leader and new_leader != leader, f"the Lease still names {new_leader}"

    # Rotation goes on under the new leader: a requested refresh brings a 30-second token, and the
    # schedule then replaces it on its own, one token request per rotation.
    count_before, began = e2e.count(), time.time()
    held = e2e.token()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    e2e.kubectl("annotate", "atc", CREDENTIAL, "-n", NS, f"autotek.io/refresh-requested-at={stamp}", "--overwrite")
    refreshed = wait_for("the requested refresh", lambda: (t := e2e.token()) != held and t, timeout=60, interval=1)
    rotated = wait_for(
        "a scheduled rotation by the new leader", lambda: (t := e2e.token()) != refreshed and t, timeout=90, interval=1
    )
    assert rotated in e2e.broker.stats()["tokens"]
    times = sorted(float(r["time"]) for r in e2e.broker.requests_for(CLIENT_ID) if float(r["time"]) >= began)
    assert len(times) == e2e.count() - count_before >= 2, times
    burst = _spacing_problems(times)
    assert not burst, f"token requests for {CLIENT_ID} closer than {MIN_SPACING:.0f}s after the hand-over: {burst}"


# -- 5c ----------------------------------------------------------------------------------------

CLUSTER_CREDENTIAL = "autotek-cluster"
CLUSTER_NAMESPACES = ("autotek-e2e-c1", "autotek-e2e-c2")
CLUSTER_SELECTION = {"autotek.io/e2e-token": "true"}


def test_5c_cluster_credential_pods_in_two_namespaces_read_one_token_then_the_rotated_one(e2e: Env) -> None:
    """A ClusterAutoTekCredential selecting two namespaces by label: a pod in each reads the same token from
    its volume, then the same rotated one; one token request for each (the refresh annotation asks for the
    second; 600-second tokens keep the schedule out of the way)."""
    k = e2e.kubectl
    k("wait", "--for=condition=Established", f"crd/{kit.CLUSTER_CRD_NAME}", "--timeout=60s", timeout=90)
    # What an earlier run left goes first.
    k("delete", "namespace", *CLUSTER_NAMESPACES, "--ignore-not-found", "--wait=true", "--timeout=120s", timeout=150)
    e2e.broker.control(lifetime=LONG_LIFETIME)
    try:
        namespaces = []
        for ns in CLUSTER_NAMESPACES:
            doc = kit.hardened_namespace(ns)
            doc["metadata"]["labels"].update(CLUSTER_SELECTION)
            namespaces.append(doc)
        k.apply([
            *namespaces,
            kit.client_secret_object(kit.OPERATOR_NS, kit.CLUSTER_CLIENT_SECRET_NAME, kit.CLUSTER_CLIENT_ID,
                                     e2e.clients),
            kit.cluster_credential_object(CLUSTER_CREDENTIAL, {"name": TARGET}, e2e.tls.ca_pem,
                                          namespaceSelector={"matchLabels": CLUSTER_SELECTION}),
        ])
        k("wait", "--for=condition=Ready", f"catc/{CLUSTER_CREDENTIAL}", "--timeout=120s", timeout=150)
        k.apply([kit.reader_pod_object(ns, TARGET) for ns in CLUSTER_NAMESPACES])
        for ns in CLUSTER_NAMESPACES:
            k("wait", "--for=condition=Ready", f"pod/{kit.READER_POD}", "-n", ns, "--timeout=120s", timeout=150)

        def secrets() -> list[str | None]:
            return [(k.secret_data(ns, TARGET) or {}).get("access_token") for ns in CLUSTER_NAMESPACES]

        def files() -> list[str]:
            return [k.exec_cat(ns, kit.READER_POD, f"{MOUNT_PATH}/access_token") for ns in CLUSTER_NAMESPACES]

        first = secrets()[0]
        assert first and secrets() == [first, first], "two namespaces, two tokens"
        wait_for("both pods to read the one token", lambda: files() == [first, first], timeout=60, interval=2)
        assert first in e2e.broker.stats()["tokens"]
        assert e2e.count(kit.CLUSTER_CLIENT_ID) == 1, "more than one token request for two namespaces"
        _, rows = _table(k.text("get", "catc"))
        assert rows[CLUSTER_CREDENTIAL]["READY"] == "True" and rows[CLUSTER_CREDENTIAL]["NAMESPACES"] == "2/2", rows

        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        k("annotate", "catc", CLUSTER_CREDENTIAL, f"autotek.io/refresh-requested-at={stamp}", "--overwrite")
        second = wait_for("the rotated token in both Secrets", lambda: (t := secrets())[0] not in (None, first)
                          and t == [t[0], t[0]] and t[0], timeout=60, interval=1)
        # The kubelet refreshes Secret volumes on its own schedule (about a minute); nothing rotates meanwhile.
        wait_for("both pods to read the rotated token", lambda: files() == [second, second], timeout=240, interval=2)
        assert e2e.count(kit.CLUSTER_CLIENT_ID) == 2, "the rotation made more than one token request"
        for ns in CLUSTER_NAMESPACES:
            assert kit.restart_counts(k.get("pod", kit.READER_POD, ns) or {}) == {"app": 0}
    finally:
        e2e.broker.control(lifetime=kit.BROKER_LIFETIME)
        for ns in CLUSTER_NAMESPACES:
            k("delete", "pod", kit.READER_POD, "-n", ns, "--ignore-not-found", "--wait=false", check=False)


# -- 6 -----------------------------------------------------------------------------------------


def test_6_deletion_policies(e2e: Env) -> None:
    """Deleting ``autotek`` (Delete) deletes its Secret; deleting ``autotek-retain`` (Retain) keeps its own."""
    k = e2e.kubectl
    cred = e2e.wait_ready(CREDENTIAL)
    secret = k.get("secret", TARGET, NS)
    assert secret is not None
    refs = secret["metadata"].get("ownerReferences") or []
    assert any(
        r.get("kind") == "AutoTekCredential"
        and r.get("name") == CREDENTIAL
        and r.get("uid") == cred["metadata"]["uid"]
        and r.get("controller") is True
        for r in refs
    ), f"Secret {TARGET} has no controller reference to its credential: {refs}"

    e2e.wait_ready(RETAIN_CREDENTIAL)
    retained = k.get("secret", RETAIN_TARGET, NS)
    assert retained is not None
    assert not retained["metadata"].get("ownerReferences"), retained["metadata"].get("ownerReferences")

    k("delete", "atc", CREDENTIAL, "-n", NS, "--wait=true", "--timeout=60s", timeout=90)
    wait_for(
        f"Secret {NS}/{TARGET} to be deleted with its credential",
        lambda: k.get("secret", TARGET, NS) is None,
        timeout=90,
        interval=1,
    )

    k("delete", "atc", RETAIN_CREDENTIAL, "-n", NS, "--wait=true", "--timeout=60s", timeout=90)
    retained_data = k.secret_data(NS, RETAIN_TARGET)
    assert retained_data and retained_data.get("access_token"), f"Secret {NS}/{RETAIN_TARGET} lost its token"
    # Give the garbage collector and the operator time to (wrongly) act, watching all along.
    with kit.SecretWatch(k, NS, RETAIN_TARGET) as watch:
        time.sleep(20)
    missing = [s.at.isoformat() for s in watch.samples if s.error is None and s.token is None]
    assert not missing, f"Secret {NS}/{RETAIN_TARGET} (deletionPolicy: Retain) vanished at {missing}"
    final = k.get("secret", RETAIN_TARGET, NS)
    assert final is not None, f"Secret {NS}/{RETAIN_TARGET} (deletionPolicy: Retain) was deleted"
    assert k.secret_data(NS, RETAIN_TARGET) == retained_data, "the Secret changed after its credential was deleted"
    assert final["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "autotek-operator"


# -- 7 -----------------------------------------------------------------------------------------


def test_7_no_rbac_denials_and_no_restarts(e2e: Env) -> None:
    """No 403/Forbidden in any operator log (every replica, previous containers, the pods tests 5 deleted);
    no operator container ever restarted."""
    deleted = [str(text) for text in e2e.notes.get("deleted_operator_logs", [])]
    kit.assert_no_denials_and_no_restarts(e2e.kubectl, deleted)
    restarted = {n: c for n, c in e2e.notes.get("deleted_operator_restarts", {}).items() if any(c.values())}
    assert not restarted, f"operator pods deleted by test 5 had restarted: {restarted}"


# -- 8 -----------------------------------------------------------------------------------------

UNINSTALL = {
    # credential: (creationPolicy, deletionPolicy at creation)
    "u-owned": ("Owner", "Delete"),
    "u-kept": ("Owner", "Delete"),  # switched to Retain before the uninstall (step 1 of the docs)
    "u-merge": ("Merge", "Delete"),
    "u-merge-kept": ("Merge", "Retain"),
}
TOKEN_KEYS = {"access_token", "token_type", "authorization", "expires_at"}
UNINSTALL_CLUSTER = {
    # ClusterAutoTekCredential (selecting NS): deletionPolicy
    "u-cluster": "Delete",
    "u-cluster-kept": "Retain",
}


def test_8_uninstall_as_the_docs_say(e2e: Env) -> None:
    """docs/operations.md "Uninstall": Retain what must survive, delete the credentials, ``kubectl delete -k``.

    Afterwards the page's table holds: an Owner/Delete Secret is gone, an Owner Secret switched to
    Retain keeps its (fresh) token, a Merge/Delete Secret keeps only what was there before the
    operator wrote to it, a Merge/Retain Secret stays as it was; client Secrets stay; the operator's
    namespace, RBAC and CRD are gone.
    """
    k = e2e.kubectl
    mine = {"app_key": "mine"}
    objects: list[dict[str, Any]] = []
    for name, (creation, deletion) in UNINSTALL.items():
        target = {"name": f"{name}-token", "creationPolicy": creation, "deletionPolicy": deletion}
        if creation == "Merge":  # the Secret is the application's, and exists first
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": f"{name}-token",
                        "namespace": NS,
                        "labels": {"team": "shop"},
                        "annotations": {"note": "mine"},
                    },
                    "stringData": mine,
                }
            )
        objects.append(kit.credential_object(NS, name, kit.CLIENT_SECRET_NAME, target, e2e.tls.ca_pem))
    objects.append(kit.client_secret_object(kit.OPERATOR_NS, kit.CLUSTER_CLIENT_SECRET_NAME, kit.CLUSTER_CLIENT_ID,
                                            e2e.clients))
    for name, deletion in UNINSTALL_CLUSTER.items():
        objects.append(kit.cluster_credential_object(name, {"name": f"{name}-token", "deletionPolicy": deletion},
                                                     e2e.tls.ca_pem, namespaces=[NS]))
    k.apply(objects)
    for name in UNINSTALL:
        e2e.wait_ready(name)
    for name in UNINSTALL_CLUSTER:
        k("wait", "--for=condition=Ready", f"catc/{name}", "--timeout=120s", timeout=150)
    for name in ("u-merge", "u-merge-kept"):
        data = k.secret_data(NS, f"{name}-token") or {}
        assert TOKEN_KEYS <= set(data) and data["app_key"] == "mine", sorted(data)

    # 1. Retain what must survive; wait until the operator has dropped the owner reference.
    kept_before = k.secret_data(NS, "u-kept-token") or {}
    k("patch", "atc", "u-kept", "-n", NS, "--type", "merge", "-p", '{"spec":{"target":{"deletionPolicy":"Retain"}}}')

    def unowned() -> bool:
        secret = k.get("secret", "u-kept-token", NS) or {}
        return bool(secret) and not secret["metadata"].get("ownerReferences")

    wait_for("Secret u-kept-token to lose its owner reference", unowned, timeout=90, interval=1)
    wait_for(
        "a fresh token for the retained Secret (the spec changed)",
        lambda: (k.secret_data(NS, "u-kept-token") or {}).get("access_token") != kept_before.get("access_token"),
        timeout=60,
        interval=1,
    )

    # 2. Delete the credentials while the operator still runs (the docs' `kubectl delete atc --all -A`,
    #    here for the suite's own namespace).
    k("delete", "atc", "--all", "-n", NS, "--wait=true", "--timeout=120s", timeout=150)
    k("delete", "catc", "--all", "--wait=true", "--timeout=120s", timeout=150)

    # 3. Remove the operator, its RBAC, its namespace and the CRD.
    kit.uninstall(k, kit.OVERLAY)

    wait_for(
        "Secret u-owned-token (Owner, Delete) to be deleted",
        lambda: k.get("secret", "u-owned-token", NS) is None,
        timeout=60,
        interval=1,
    )
    kept = k.get("secret", "u-kept-token", NS)
    assert kept is not None and not kept["metadata"].get("ownerReferences"), "the retained Secret is gone or owned"
    assert (k.secret_data(NS, "u-kept-token") or {}).get("access_token"), "the retained Secret lost its token"

    merged = k.get("secret", "u-merge-token", NS)
    assert merged is not None, "the Merge/Delete Secret was deleted (it belongs to the application)"
    assert k.secret_data(NS, "u-merge-token") == mine, "the operator's keys should be gone, the application's kept"
    assert merged["metadata"].get("labels") == {"team": "shop"}, merged["metadata"].get("labels")
    annotations = merged["metadata"].get("annotations") or {}
    assert annotations.get("note") == "mine"
    assert not [a for a in annotations if a.startswith("autotek.io/")], annotations

    merge_kept = k.secret_data(NS, "u-merge-kept-token") or {}
    assert merge_kept.get("app_key") == "mine" and TOKEN_KEYS <= set(merge_kept), sorted(merge_kept)

    assert k.get("secret", kit.CLIENT_SECRET_NAME, NS) is not None, "the client Secret is the user's to delete"
    assert k.get("namespace", kit.OPERATOR_NS) is None
    assert k.get("crd", kit.CRD_NAME) is None
    assert k.get("crd", kit.CLUSTER_CRD_NAME) is None

    # The cluster credentials: Delete took its Secrets (here and in test 5c's namespaces), Retain left its own.
    for ns in (NS, *CLUSTER_NAMESPACES):
        secret = "u-cluster-token" if ns == NS else TARGET
        wait_for(f"Secret {ns}/{secret} (ClusterAutoTekCredential, Delete) to be deleted",
                 lambda n=ns, s=secret: k.get("secret", s, n) is None, timeout=60, interval=1)
    cluster_kept = k.get("secret", "u-cluster-kept-token", NS)
    assert cluster_kept is not None, "the Secret of a ClusterAutoTekCredential with deletionPolicy Retain is gone"
    assert not cluster_kept["metadata"].get("ownerReferences"), cluster_kept["metadata"]["ownerReferences"]
    assert (k.secret_data(NS, "u-cluster-kept-token") or {}).get("access_token"), "the retained Secret lost its token"
    k("delete", "namespace", *CLUSTER_NAMESPACES, "--ignore-not-found", "--wait=false", check=False)
    assert k.get("clusterrole", kit.OPERATOR_DEPLOY) is None
    assert k.get("clusterrolebinding", kit.OPERATOR_DEPLOY) is None
