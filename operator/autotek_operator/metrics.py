"""Prometheus metrics, named in cert-manager's style.

Label values are namespaces, names, condition values, operations and failure reasons (a fixed
set), never secrets or tokens.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TOKEN_EXPIRATION = Gauge(
    "autotek_token_expiration_timestamp_seconds",
    "When the token held for a credential expires (Unix time).",
    ["namespace", "name"],
)
TOKEN_NEXT_REFRESH = Gauge(
    "autotek_token_next_refresh_timestamp_seconds",
    "When the operator next tries to refresh a credential's token (Unix time).",
    ["namespace", "name"],
)
CREDENTIAL_READY = Gauge(
    "autotek_credential_ready_status",
    "The Ready condition of a credential: 1 for the condition value it has, 0 for the others.",
    ["namespace", "name", "condition"],
)
TOKEN_REQUESTS = Counter(
    "autotek_token_requests_total",
    "Token requests made to token endpoints, by result (success or the failure reason).",
    ["result"],
)
TOKEN_REQUEST_DURATION = Histogram(
    "autotek_token_request_duration_seconds",
    "Time taken by token requests, including failures.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SECRET_WRITES = Counter(
    "autotek_secret_writes_total",
    "Writes of target Secrets, by operation (create, update, patch).",
    ["operation"],
)
CONDITIONS = ("True", "False", "Unknown")


def observe_token_request(result: str, seconds: float) -> None:
    TOKEN_REQUESTS.labels(result=result).inc()
    TOKEN_REQUEST_DURATION.observe(seconds)


def observe_secret_write(operation: str) -> None:
    SECRET_WRITES.labels(operation=operation).inc()


def observe_credential(
    namespace: str, name: str, ready: str, expires_at: float | None, next_refresh: float | None
) -> None:
    """Record a credential's state after a pass."""
    for value in CONDITIONS:
        CREDENTIAL_READY.labels(namespace, name, value).set(1.0 if value == ready else 0.0)
    if expires_at is not None:
        TOKEN_EXPIRATION.labels(namespace, name).set(expires_at)
    else:
        _remove(TOKEN_EXPIRATION, namespace, name)
    if next_refresh is not None:
        TOKEN_NEXT_REFRESH.labels(namespace, name).set(next_refresh)
    else:
        _remove(TOKEN_NEXT_REFRESH, namespace, name)


def forget_credential(namespace: str, name: str) -> None:
    """Drop a deleted credential's series."""
    _remove(TOKEN_EXPIRATION, namespace, name)
    _remove(TOKEN_NEXT_REFRESH, namespace, name)
    for value in CONDITIONS:
        _remove(CREDENTIAL_READY, namespace, name, value)


def _remove(metric: Gauge, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def serve(port: int) -> None:
    """Serve /metrics on all interfaces at ``port`` (0: not at all)."""
    if port:
        start_http_server(port)
