"""Prometheus metrics. Label values are namespaces, names and result classes, never secrets."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

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


def observe_token_request(result: str, seconds: float) -> None:
    TOKEN_REQUESTS.labels(result=result).inc()
    TOKEN_REQUEST_DURATION.observe(seconds)


def serve(port: int) -> None:
    """Serve /metrics on all interfaces at ``port`` (0: not at all)."""
    if port:
        start_http_server(port)
