"""The real operator process against an API server and a token endpoint, scenario by scenario."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from harness import Broker, Client, Cluster, Operator, new_client, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _broker_defaults(broker: Broker) -> Any:
    broker.control(lifetime=3600, fail=None, script=[], delay=0)
    yield
    broker.control(lifetime=3600, fail=None, script=[], delay=0)


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def spec_for(broker: Broker, **extra: Any) -> dict[str, Any]:
    return {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url, **extra}


def wait_ready(cluster: Cluster, ns: str, name: str = "autotek", status: str = "True", reason: str | None = None,
               timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        cond = cluster.ready(ns, name)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return cond
        return None

    return wait_for(f"{ns}/{name} Ready={status} {reason or ''}", check, timeout=timeout)


def token_in(cluster: Cluster, ns: str, name: str = "autotek") -> str | None:
    data = cluster.secret_data(ns, name)
    return data.get("access_token") if data else None


def test_issue_on_create(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cluster.create_credential(ns, "autotek", spec_for(broker, target={"name": "autotek-token", "template": {
        "labels": {"team": "payments"}, "annotations": {"reloader.example/match": "true"}}}))
    cond = wait_ready(cluster, ns)
    assert cond["reason"] == "TokenIssued"

    cred = cluster.credential(ns, "autotek")
    assert cred is not None
    secret = cluster.secret(ns, "autotek-token")
    assert secret is not None
    data = cluster.secret_data(ns, "autotek-token")
    assert data is not None
    issued = broker.requests_for(client.client_id)
    assert len(issued) == 1 and issued[0]["status"] == 200 and issued[0]["auth_method"] == "basic"
    token = data["access_token"]
    assert token in broker.stats()["tokens"]
    assert data["token_type"] == "bearer"
    assert data["authorization"] == f"Bearer {token}"
    assert data["scope"] == ""
    expires = parse(data["expires_at"])
    # Lifetime counted from when the request was sent.
    assert before + timedelta(seconds=3598) <= expires <= datetime.now(UTC) + timedelta(seconds=3600)
    meta = secret["metadata"]
    assert secret["type"] == "Opaque"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "autotek-operator"
    assert meta["labels"]["team"] == "payments"
    assert meta["annotations"]["reloader.example/match"] == "true"
    assert meta["annotations"]["autotek.io/credential"] == "autotek"
    assert meta["annotations"]["autotek.io/expires-at"] == data["expires_at"]
    assert parse(meta["annotations"]["autotek.io/refreshed-at"]) >= before
    refs = meta["ownerReferences"]
    assert len(refs) == 1
    assert refs[0]["kind"] == "AutoTekCredential" and refs[0]["name"] == "autotek"
    assert refs[0]["uid"] == cred["metadata"]["uid"] and refs[0]["controller"] is True

    status = cred["status"]
    assert status["observedGeneration"] == cred["metadata"]["generation"]
    assert status["secretName"] == "autotek-token"
    assert status["tokenType"] == "bearer"
    assert status["expiresAt"] == data["expires_at"]
    assert status["failedAttempts"] == 0
    assert "lastFailureTime" not in status
    next_refresh = parse(status["nextRefreshTime"])
    # Two thirds of the lifetime, moved earlier by at most the jitter.
    assert expires - timedelta(seconds=3600 * 0.33 + 130) <= next_refresh <= expires - timedelta(seconds=3600 * 0.33)
    # Events are posted in the background: one may trail the status by a moment.
    wait_for("a TokenIssued Event", lambda: "TokenIssued" in [e["reason"] for e in cluster.events(ns)], timeout=10)


def test_rotation_before_expiry(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    broker.control(lifetime=20)
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    first = token_in(cluster, ns)
    first_expiry = parse(cluster.secret_data(ns, "autotek")["expires_at"])  # type: ignore[index]
    second = wait_for("a rotated token", lambda: (t := token_in(cluster, ns)) != first and t, timeout=30)
    rotated_at = datetime.now(UTC)
    assert rotated_at < first_expiry, "the token was rotated only after it had expired"
    assert second in broker.stats()["tokens"]
    assert cluster.ready(ns, "autotek")["status"] == "True"  # type: ignore[index]
    assert len(broker.requests_for(client.client_id)) == 2
    wait_for("a TokenRotated Event", lambda: "TokenRotated" in [e["reason"] for e in cluster.events(ns)], timeout=10)


def test_client_secret_change_gets_new_token(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    first = token_in(cluster, ns)
    replacement = new_client(cluster, broker, ns)  # same Secret name, new id and secret
    wait_for("a token for the new client", lambda: broker.requests_for(replacement.client_id), timeout=15)
    wait_for("the new token in the Secret", lambda: token_in(cluster, ns) != first, timeout=15)


def test_refresh_annotation_gets_new_token(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    first = token_in(cluster, ns)
    time.sleep(10)  # one request per 10 s at most, per credential
    cluster.patch_credential(ns, "autotek", {"metadata": {"annotations": {
        "autotek.io/refresh-requested-at": datetime.now(UTC).isoformat()}}})
    wait_for("a new token", lambda: token_in(cluster, ns) != first, timeout=15)
    assert len(broker.requests_for(client.client_id)) == 2


def test_spec_change_gets_new_token(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    first = token_in(cluster, ns)
    time.sleep(10)
    cluster.patch_credential(ns, "autotek", {"spec": {"scope": "vehicles:read"}})
    wait_for("a new token", lambda: token_in(cluster, ns) != first, timeout=15)
    assert broker.requests_for(client.client_id)[-1]["scope"] == "vehicles:read"
    wait_for("observedGeneration 2", lambda: (cluster.credential(ns, "autotek") or {}).get("status", {}).get(
        "observedGeneration") == 2)


def test_owner_conflict_leaves_foreign_secret_alone(cluster: Cluster, broker: Broker, ns: str,
                                                     client: Client) -> None:
    cluster.put_client_secret(ns, "autotek", {"someone": "else"})
    cluster.create_credential(ns, "autotek", spec_for(broker))
    cond = wait_ready(cluster, ns, status="False", reason="TargetConflict")
    assert "does not own" in cond["message"]
    assert cluster.secret_data(ns, "autotek") == {"someone": "else"}
    # The first pass does not read a target Secret the Secret watch has not seen; when the
    # credential arrives before the watch reports the Secret, that pass fetches a token and only
    # its create finds the Secret taken (409). Once the Secret is known, no pass asks for a token.
    first = len(broker.requests_for(client.client_id))
    assert first <= 1
    attempts = (cluster.credential(ns, "autotek") or {})["status"]["failedAttempts"]
    time.sleep(10)  # past the floor: a refresh request would be honoured at once
    cluster.patch_credential(ns, "autotek", {"metadata": {"annotations": {
        "autotek.io/refresh-requested-at": datetime.now(UTC).isoformat()}}})
    wait_for("another pass", lambda: (cluster.credential(ns, "autotek") or {}).get(
        "status", {}).get("failedAttempts", 0) > attempts, timeout=15)
    assert cluster.ready(ns, "autotek")["reason"] == "TargetConflict"  # type: ignore[index]
    assert cluster.secret_data(ns, "autotek") == {"someone": "else"}
    assert len(broker.requests_for(client.client_id)) == first


def test_two_credentials_one_secret(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    token = token_in(cluster, ns)
    cluster.create_credential(ns, "second", spec_for(broker, target={"name": "autotek"}))
    wait_ready(cluster, ns, "second", status="False", reason="TargetConflict")
    assert token_in(cluster, ns) == token
    assert cluster.ready(ns, "autotek")["status"] == "True"  # type: ignore[index]


def test_merge_keeps_foreign_keys(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.put_client_secret(ns, "app-config", {"DATABASE_URL": "postgres://db/app"})
    cluster.create_credential(ns, "autotek", spec_for(broker, target={"name": "app-config", "creationPolicy": "Merge"}))
    wait_ready(cluster, ns)
    data = cluster.secret_data(ns, "app-config")
    assert data is not None
    assert data["DATABASE_URL"] == "postgres://db/app"
    assert data["authorization"] == f"Bearer {data['access_token']}"
    assert "ownerReferences" not in cluster.secret(ns, "app-config")["metadata"]  # type: ignore[index]
    cluster.delete_credential(ns, "autotek")
    # Merge + Delete removes only what the operator wrote; the Secret itself stays.
    wait_for("the token keys to be removed", lambda: "access_token" not in (cluster.secret_data(ns, "app-config")
                                                                            or {"access_token": 1}))
    assert cluster.secret_data(ns, "app-config") == {"DATABASE_URL": "postgres://db/app"}


def test_merge_without_secret(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker, target={"name": "missing", "creationPolicy": "Merge"}))
    wait_ready(cluster, ns, status="False", reason="TargetNotFound")
    assert broker.requests_for(client.client_id) == []


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_deletion_policy(cluster: Cluster, broker: Broker, ns: str, client: Client, policy: str) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker, target={"deletionPolicy": policy}))
    wait_ready(cluster, ns)
    owner_refs = cluster.secret(ns, "autotek")["metadata"].get("ownerReferences")  # type: ignore[index]
    assert bool(owner_refs) == (policy == "Delete")
    cluster.delete_credential(ns, "autotek")
    if policy == "Delete":
        wait_for("the Secret to be deleted", lambda: cluster.secret(ns, "autotek") is None)
    else:
        time.sleep(3)
        assert cluster.secret_data(ns, "autotek") is not None


def test_deleted_or_edited_target_is_restored_without_new_request(cluster: Cluster, broker: Broker, ns: str,
                                                                   client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    token = token_in(cluster, ns)
    cluster.core.delete_namespaced_secret("autotek", ns)
    wait_for("the Secret to be restored", lambda: token_in(cluster, ns) == token, timeout=60)
    secret = cluster.secret(ns, "autotek")
    assert secret is not None
    secret["data"]["access_token"] = "dGFtcGVyZWQ="
    cluster.core.replace_namespaced_secret("autotek", ns, secret)
    wait_for("the edit to be reverted", lambda: token_in(cluster, ns) == token, timeout=60)
    assert len(broker.requests_for(client.client_id)) == 1
    wait_for("a SecretRestored Event", lambda: "SecretRestored" in [e["reason"] for e in cluster.events(ns)],
             timeout=10)


def test_restart_makes_no_token_request(cluster: Cluster, broker: Broker, operator: Operator, ns: str,
                                        client: Client) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns)
    token = token_in(cluster, ns)
    status_before = cluster.credential(ns, "autotek")["status"]  # type: ignore[index]
    operator.restart()
    wait_for("the restarted operator to confirm the credential",
             lambda: f"{ns}/autotek: resumed" in operator.log_text(), timeout=40)
    time.sleep(2)
    assert len(broker.requests_for(client.client_id)) == 1
    assert token_in(cluster, ns) == token
    status_after = cluster.credential(ns, "autotek")["status"]  # type: ignore[index]
    assert status_after["nextRefreshTime"] == status_before["nextRefreshTime"]
    assert status_after["expiresAt"] == status_before["expiresAt"]


def test_invalid_client_then_fixed(cluster: Cluster, broker: Broker, ns: str) -> None:
    cluster.put_client_secret(ns, "autotek-client", {"client_id": "nobody", "client_secret": "wrong-secret-1"})
    cluster.create_credential(ns, "autotek", spec_for(broker))
    cond = wait_ready(cluster, ns, status="False", reason="InvalidClient")
    assert "401" in cond["message"]
    warnings = wait_for("an InvalidClient Event",
                        lambda: [e for e in cluster.events(ns) if e["reason"] == "InvalidClient"], timeout=10)
    assert warnings[0]["type"] == "Warning"
    assert "grant_type=client_credentials" in warnings[0]["message"]
    good = new_client(cluster, broker, ns)
    wait_ready(cluster, ns, timeout=20)
    assert broker.requests_for(good.client_id)[-1]["status"] == 200


def test_server_errors_back_off_then_recover(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    broker.control(script=[{"status": 503, "json": {"error": "temporarily_unavailable"}, "repeat": 2}])
    cluster.create_credential(ns, "autotek", spec_for(broker))
    cond = wait_ready(cluster, ns, status="False", reason="TokenEndpointUnavailable")
    assert "503" in cond["message"]
    wait_ready(cluster, ns, timeout=60)
    reqs = broker.requests_for(client.client_id)
    assert [r["status"] for r in reqs] == [503, 503, 200]
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(reqs)]
    assert all(g >= 9.5 for g in gaps), f"retried sooner than the 10 s floor: {gaps}"
    status = cluster.credential(ns, "autotek")["status"]  # type: ignore[index]
    assert status["failedAttempts"] == 0 and "lastFailureTime" not in status


def test_rate_limit_honours_retry_after(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    broker.control(script=[{"status": 429, "json": {"error": "slow_down"}, "headers": {"Retry-After": "20"}}])
    cluster.create_credential(ns, "autotek", spec_for(broker))
    wait_ready(cluster, ns, status="False", reason="RateLimited")
    wait_ready(cluster, ns, timeout=60)
    reqs = broker.requests_for(client.client_id)
    assert [r["status"] for r in reqs] == [429, 200]
    assert reqs[1]["time"] - reqs[0]["time"] >= 19.5


def test_missing_client_secret_then_created(cluster: Cluster, broker: Broker, ns: str) -> None:
    cluster.create_credential(ns, "autotek", spec_for(broker))
    cond = wait_ready(cluster, ns, status="False", reason="ClientSecretNotFound")
    assert "autotek-client" in cond["message"]
    new_client(cluster, broker, ns)
    wait_ready(cluster, ns, timeout=20)


def test_missing_key(cluster: Cluster, broker: Broker, ns: str) -> None:
    cluster.put_client_secret(ns, "autotek-client", {"client_id": "someone"})
    cluster.create_credential(ns, "autotek", spec_for(broker))
    cond = wait_ready(cluster, ns, status="False", reason="ClientSecretKeyMissing")
    assert "client_secret" in cond["message"]


def test_disallowed_token_url_makes_no_request(cluster: Cluster, broker: Broker, ns: str, client: Client) -> None:
    before = broker.stats()["count"]
    cluster.create_credential(ns, "autotek", spec_for(broker, tokenURL="https://api.example.net/token"))
    cond = wait_ready(cluster, ns, status="False", reason="TokenURLNotAllowed")
    assert "AUTOTEK_ALLOWED_TOKEN_URLS" in cond["message"]
    assert broker.stats()["count"] == before
