"""Operator settings, read once from the environment into a frozen object."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from . import constants as c


class ConfigError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    #: AUTOTEK_ALLOWED_TOKEN_URLS: comma-separated URL prefixes credentials may be sent to.
    allowed_token_urls: tuple[str, ...] = c.DEFAULT_ALLOWED_TOKEN_URLS
    #: AUTOTEK_NAMESPACES: comma-separated namespaces to watch; empty means all namespaces.
    namespaces: tuple[str, ...] = ()
    #: AUTOTEK_CREDENTIAL_SELECTOR: a label selector the API server applies to the credential watch.
    credential_selector: str = ""
    #: AUTOTEK_LOG_FORMAT: text or json.
    log_format: str = "text"
    #: AUTOTEK_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    #: AUTOTEK_HEALTH_PORT: liveness endpoint port (/healthz); 0 disables it.
    health_port: int = 8080
    #: AUTOTEK_METRICS_PORT: Prometheus metrics port (/metrics); 0 disables it.
    metrics_port: int = 9090
    #: AUTOTEK_HTTP_TIMEOUT: seconds for connecting to and reading from the token endpoint.
    http_timeout: float = 10.0
    #: AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS: token requests in flight at once, operator-wide.
    max_concurrent_token_requests: int = 8
    #: AUTOTEK_WORKERS: threads for blocking calls (Kubernetes API and token endpoint).
    workers: int = 16
    #: AUTOTEK_WATCH_TIMEOUT: seconds a watch request stays open before it is renewed.
    watch_timeout: int = 300
    #: AUTOTEK_ROLLOUT_RESTART: true to honour spec.rolloutRestartTargets (needs the extra RBAC).
    rollout_restart: bool = False
    #: AUTOTEK_RESTART_MIN_INTERVAL: seconds between two restarts of one workload.
    restart_min_interval: int = 300
    #: AUTOTEK_LEADER_ELECTION: true to run several replicas, of which one (holding a Lease) works.
    leader_election: bool = False
    #: AUTOTEK_LEADER_ELECTION_NAMESPACE: where the Lease lives (default: $POD_NAMESPACE, else autotek-system).
    leader_election_namespace: str = "autotek-system"
    #: AUTOTEK_LEADER_ELECTION_ID: the Lease's name.
    leader_election_id: str = "autotek-operator"
    #: AUTOTEK_LEADER_ELECTION_LEASE_DURATION: seconds a Lease unrenewed for this long may be taken over.
    leader_election_lease_duration: int = 30
    #: AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE: seconds without a renewal after which a leader steps down.
    leader_election_renew_deadline: int = 20
    #: AUTOTEK_LEADER_ELECTION_RETRY_PERIOD: seconds between two renewals or checks of the Lease.
    leader_election_retry_period: int = 5
    #: AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES: namespaces whose client Secrets ClusterAutoTekCredentials
    #: may use (default: the operator's own namespace).
    cluster_credential_namespaces: tuple[str, ...] = ("autotek-system",)
    #: The operator's own namespace ($POD_NAMESPACE, else the leader election namespace): where the
    #: Events of cluster-scoped credentials go.
    operator_namespace: str = "autotek-system"

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


ENV = {
    "allowed_token_urls": "AUTOTEK_ALLOWED_TOKEN_URLS",
    "namespaces": "AUTOTEK_NAMESPACES",
    "credential_selector": "AUTOTEK_CREDENTIAL_SELECTOR",
    "log_format": "AUTOTEK_LOG_FORMAT",
    "log_level": "AUTOTEK_LOG_LEVEL",
    "health_port": "AUTOTEK_HEALTH_PORT",
    "metrics_port": "AUTOTEK_METRICS_PORT",
    "http_timeout": "AUTOTEK_HTTP_TIMEOUT",
    "max_concurrent_token_requests": "AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS",
    "workers": "AUTOTEK_WORKERS",
    "watch_timeout": "AUTOTEK_WATCH_TIMEOUT",
    "rollout_restart": "AUTOTEK_ROLLOUT_RESTART",
    "restart_min_interval": "AUTOTEK_RESTART_MIN_INTERVAL",
    "leader_election": "AUTOTEK_LEADER_ELECTION",
    "leader_election_namespace": "AUTOTEK_LEADER_ELECTION_NAMESPACE",
    "leader_election_id": "AUTOTEK_LEADER_ELECTION_ID",
    "leader_election_lease_duration": "AUTOTEK_LEADER_ELECTION_LEASE_DURATION",
    "leader_election_renew_deadline": "AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE",
    "leader_election_retry_period": "AUTOTEK_LEADER_ELECTION_RETRY_PERIOD",
    "cluster_credential_namespaces": "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES",
    "operator_namespace": "POD_NAMESPACE",
}


_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_VALUE = re.compile(rf"({_NAME})?")
_SET_TERM = re.compile(r"(\S+)\s+(in|notin)\s+\(([^()]*)\)")
_EQ_TERM = re.compile(r"(\S+?)\s*(==|!=|=)\s*(\S*)")
_EXISTS_TERM = re.compile(r"(!?)\s*(\S+)")


def check_label_selector(selector: str) -> str:
    """Return a label selector in ``kubectl -l`` syntax if it is well-formed; else ConfigError."""
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        if m := _SET_TERM.fullmatch(term):
            key, values = m[1], [v.strip() for v in m[3].split(",")]
        elif m := _EQ_TERM.fullmatch(term):
            key, values = m[1], [m[3]]
        elif m := _EXISTS_TERM.fullmatch(term):
            key, values = m[2], []
        else:
            raise ConfigError(f"AUTOTEK_CREDENTIAL_SELECTOR: cannot parse {term!r} (e.g. team=shop,tier in (a,b),!old)")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"AUTOTEK_CREDENTIAL_SELECTOR: {key!r} is not a valid label key")
        for value in values:
            if not _VALUE.fullmatch(value):
                raise ConfigError(f"AUTOTEK_CREDENTIAL_SELECTOR: {value!r} is not a valid label value")
    return selector


def _list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {number}")
    return number


def _bool(name: str, value: str) -> bool:
    flag = value.lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    return flag in ("true", "1", "yes")


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment (or a given mapping); raise ConfigError if bad."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    raw = {f.name: env.get(ENV[f.name], "").strip() for f in fields(Settings)}

    if raw["allowed_token_urls"]:
        urls = _list(raw["allowed_token_urls"])
        for url in urls:
            if not (url.startswith("https://") or url.startswith("http://")):
                raise ConfigError(f"AUTOTEK_ALLOWED_TOKEN_URLS entries must start with https:// or http://: {url!r}")
        values["allowed_token_urls"] = urls
    if raw["namespaces"]:
        values["namespaces"] = _list(raw["namespaces"])
    if raw["credential_selector"]:
        values["credential_selector"] = check_label_selector(raw["credential_selector"])
    if raw["log_format"]:
        if raw["log_format"] not in ("text", "json"):
            raise ConfigError(f"AUTOTEK_LOG_FORMAT must be text or json, not {raw['log_format']!r}")
        values["log_format"] = raw["log_format"]
    if raw["log_level"]:
        level = raw["log_level"].upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"AUTOTEK_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {raw['log_level']!r}")
        values["log_level"] = level
    for key in ("health_port", "metrics_port"):
        if raw[key]:
            values[key] = _int(ENV[key], raw[key], 0, 65535)
    if raw["http_timeout"]:
        try:
            timeout = float(raw["http_timeout"])
        except ValueError:
            raise ConfigError(
                f"AUTOTEK_HTTP_TIMEOUT must be a number of seconds, not {raw['http_timeout']!r}"
            ) from None
        if not 0.1 <= timeout <= 300:
            raise ConfigError("AUTOTEK_HTTP_TIMEOUT must be between 0.1 and 300 seconds")
        values["http_timeout"] = timeout
    if raw["max_concurrent_token_requests"]:
        values["max_concurrent_token_requests"] = _int(
            ENV["max_concurrent_token_requests"], raw["max_concurrent_token_requests"], 1, 1000
        )
    if raw["workers"]:
        values["workers"] = _int(ENV["workers"], raw["workers"], 1, 256)
    if raw["watch_timeout"]:
        values["watch_timeout"] = _int(ENV["watch_timeout"], raw["watch_timeout"], 1, 3600)
    for key in ("leader_election", "rollout_restart"):
        if raw[key]:
            values[key] = _bool(ENV[key], raw[key])
    if raw["restart_min_interval"]:
        values["restart_min_interval"] = _int(ENV["restart_min_interval"], raw["restart_min_interval"], 0, 86400)
    lease_ns = raw["leader_election_namespace"] or env.get("POD_NAMESPACE", "").strip()
    if lease_ns:
        values["leader_election_namespace"] = lease_ns
    own = raw["operator_namespace"] or str(values.get("leader_election_namespace", Settings.leader_election_namespace))
    values["operator_namespace"] = own
    if raw["cluster_credential_namespaces"]:
        allowed = _list(raw["cluster_credential_namespaces"])
        for ns in allowed:
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns):
                raise ConfigError(f"AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES: {ns!r} is not a valid namespace name")
        values["cluster_credential_namespaces"] = allowed
    else:
        values["cluster_credential_namespaces"] = (own,)
    if raw["leader_election_id"]:
        values["leader_election_id"] = raw["leader_election_id"]
    timings = {
        key: _int(ENV[key], raw[key], 1, 3600) if raw[key] else default
        for key, default in (
            ("leader_election_lease_duration", Settings.leader_election_lease_duration),
            ("leader_election_renew_deadline", Settings.leader_election_renew_deadline),
            ("leader_election_retry_period", Settings.leader_election_retry_period),
        )
    }
    values.update(timings)
    lease, renew, retry = timings.values()
    # As client-go: the leader must step down before another may take over, and renew more than once.
    if not retry < renew < lease:
        raise ConfigError(
            f"AUTOTEK_LEADER_ELECTION_RETRY_PERIOD ({retry}) < AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE ({renew}) < "
            f"AUTOTEK_LEADER_ELECTION_LEASE_DURATION ({lease}) must hold"
        )
    return Settings(**values)  # type: ignore[arg-type]
