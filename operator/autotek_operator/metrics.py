"""Prometheus metrics, named in cert-manager's style.

Label values are namespaces, names, condition values, operations and failure reasons (a fixed
set), never secrets or tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

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
ROLLOUT_RESTARTS = Counter(
    "autotek_rollout_restarts_total",
    "Rollout restarts of spec.rolloutRestartTargets, by result: made (after a rotation), deferred "
    "(held back by AUTOTEK_RESTART_MIN_INTERVAL) or made_after_deferral (a deferred restart, made).",
    ["result"],
)
ORPHANED_SECRETS = Counter(
    "autotek_orphaned_secrets_cleaned_total",
    "Target Secrets of credentials deleted while no operator watched, cleaned up on a complete list, "
    "by action (unmerge, delete).",
    ["action"],
)
EVENTS_DROPPED = Counter(
    "autotek_events_dropped_total",
    "Events not posted because the queue of Events waiting to be posted was full.",
)
CONDITIONS = ("True", "False", "Unknown")


def observe_token_request(result: str, seconds: float) -> None:
    TOKEN_REQUESTS.labels(result=result).inc()
    TOKEN_REQUEST_DURATION.observe(seconds)


def observe_secret_write(operation: str) -> None:
    SECRET_WRITES.labels(operation=operation).inc()


def observe_restart(result: str) -> None:
    ROLLOUT_RESTARTS.labels(result=result).inc()


def observe_event_dropped() -> None:
    EVENTS_DROPPED.inc()


def observe_orphan_cleaned(action: str) -> None:
    ORPHANED_SECRETS.labels(action=action).inc()


#: (namespace, name, Ready condition value, expiry, next refresh) of each credential reported.
CredentialSample = tuple[str, str, str, float | None, float | None]


class CredentialCollector:
    """The per-credential series, built at scrape time from the operator's state.

    Nothing is stored per credential between scrapes (ten thousand credentials would otherwise
    hold fifty thousand gauge children), and a deleted credential's series are gone with it."""

    def __init__(self, source: Callable[[], Iterable[CredentialSample]]) -> None:
        self.source = source

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "autotek_credential_ready_status",
                "The Ready condition of a credential: 1 for the condition value it has, 0 for the others.",
                labels=["namespace", "name", "condition"],
            ),
            GaugeMetricFamily(
                "autotek_token_expiration_timestamp_seconds",
                "When the token held for a credential expires (Unix time).",
                labels=["namespace", "name"],
            ),
            GaugeMetricFamily(
                "autotek_token_next_refresh_timestamp_seconds",
                "When the operator next tries to refresh a credential's token (Unix time).",
                labels=["namespace", "name"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        ready, expiration, next_refresh = self._families()
        for namespace, name, condition, expires_at, refresh_at in self.source():
            for value in CONDITIONS:
                ready.add_metric([namespace, name, value], 1.0 if value == condition else 0.0)
            if expires_at is not None:
                expiration.add_metric([namespace, name], expires_at)
            if refresh_at is not None:
                next_refresh.add_metric([namespace, name], refresh_at)
        yield from (ready, expiration, next_refresh)


#: The scrape-time collectors registered so far, by class: each is registered once, its source replaced.
_collectors: dict[type, Any] = {}


def _report(collector: type, source: Callable[[], Iterable[Any]]) -> None:
    found = _collectors.get(collector)
    if found is None:
        _collectors[collector] = found = collector(source)
        REGISTRY.register(found)
    else:
        found.source = source


def report_credentials(source: Callable[[], Iterable[CredentialSample]]) -> None:
    """Export the per-credential series from ``source`` (called at each scrape; replaces any
    previous source)."""
    _report(CredentialCollector, source)


#: (name, selected, provisioned, failed) of each ClusterAutoTekCredential reported.
ClusterNamespacesSample = tuple[str, float, float, float]


class ClusterNamespacesCollector:
    """``autotek_cluster_credential_namespaces{name, state}``: a ClusterAutoTekCredential's selected,
    provisioned and failed namespaces, built at scrape time like the per-credential series (its
    expiry and readiness are among those, with namespace="")."""

    def __init__(self, source: Callable[[], Iterable[ClusterNamespacesSample]]) -> None:
        self.source = source

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "autotek_cluster_credential_namespaces",
            "Namespaces of a ClusterAutoTekCredential: selected, provisioned (the Secret holds the current "
            "token) and failed.",
            labels=["name", "state"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for name, selected, provisioned, failed in self.source():
            family.add_metric([name, "selected"], selected)
            family.add_metric([name, "provisioned"], provisioned)
            family.add_metric([name, "failed"], failed)
        yield family


def report_cluster_namespaces(source: Callable[[], Iterable[ClusterNamespacesSample]]) -> None:
    """Export ``autotek_cluster_credential_namespaces`` from ``source`` (replaces any previous source)."""
    _report(ClusterNamespacesCollector, source)


def serve(port: int) -> None:
    """Serve /metrics on all interfaces at ``port`` (0: not at all)."""
    if port:
        start_http_server(port)
