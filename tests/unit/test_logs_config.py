"""Logging formats and the settings read from the environment."""

from __future__ import annotations

import json
import logging

import pytest

from autotek_operator import config, logs


def test_json_lines_carry_the_credential() -> None:
    fmt = logs.JsonFormatter()
    record = logging.LogRecord("autotek_operator", logging.INFO, __file__, 1,
                               "%s: rotated the token into Secret %s", ("shop/autotek", "autotek-token"), None)
    doc = json.loads(fmt.format(record))
    assert doc["namespace"] == "shop" and doc["name"] == "autotek"
    assert doc["level"] == "INFO" and doc["message"].endswith("autotek-token")
    other = logging.LogRecord("autotek_operator", logging.INFO, __file__, 1, "leading", (), None)
    assert "namespace" not in json.loads(fmt.format(other))


def test_defaults() -> None:
    s = config.from_env({})
    assert s.allowed_token_urls == ("https://api.autograb.com.au/",)
    assert s.namespaces == () and s.clusterwide
    assert (s.log_format, s.log_level, s.health_port, s.metrics_port) == ("text", "INFO", 8080, 9090)
    assert (s.http_timeout, s.max_concurrent_token_requests, s.workers) == (10.0, 8, 16)
    assert s.leader_election is False and s.rollout_restart is False and s.restart_min_interval == 300
    assert (s.leader_election_lease_duration, s.leader_election_renew_deadline, s.leader_election_retry_period) == (
        30, 20, 5)


def test_leader_election_timings() -> None:
    s = config.from_env({"AUTOTEK_LEADER_ELECTION_LEASE_DURATION": "60", "AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE": "40",
                         "AUTOTEK_LEADER_ELECTION_RETRY_PERIOD": "10"})
    assert (s.leader_election_lease_duration, s.leader_election_renew_deadline, s.leader_election_retry_period) == (
        60, 40, 10)


def test_values() -> None:
    s = config.from_env({
        "AUTOTEK_ALLOWED_TOKEN_URLS": "https://a.example/, http://127.0.0.1:8080/",
        "AUTOTEK_NAMESPACES": "shop, billing",
        "AUTOTEK_LOG_FORMAT": "json",
        "AUTOTEK_LOG_LEVEL": "debug",
        "AUTOTEK_LEADER_ELECTION": "true",
        "POD_NAMESPACE": "ops",
        "AUTOTEK_ROLLOUT_RESTART": "yes",
        "AUTOTEK_RESTART_MIN_INTERVAL": "60",
    })
    assert s.allowed_token_urls == ("https://a.example/", "http://127.0.0.1:8080/")
    assert s.namespaces == ("shop", "billing") and not s.clusterwide
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    assert s.leader_election and s.leader_election_namespace == "ops"
    assert s.rollout_restart and s.restart_min_interval == 60


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AUTOTEK_ALLOWED_TOKEN_URLS": "ftp://x/"}, "AUTOTEK_ALLOWED_TOKEN_URLS"),
        ({"AUTOTEK_LOG_FORMAT": "xml"}, "AUTOTEK_LOG_FORMAT"),
        ({"AUTOTEK_LOG_LEVEL": "loud"}, "AUTOTEK_LOG_LEVEL"),
        ({"AUTOTEK_HEALTH_PORT": "http"}, "AUTOTEK_HEALTH_PORT"),
        ({"AUTOTEK_METRICS_PORT": "70000"}, "AUTOTEK_METRICS_PORT"),
        ({"AUTOTEK_HTTP_TIMEOUT": "0"}, "AUTOTEK_HTTP_TIMEOUT"),
        ({"AUTOTEK_HTTP_TIMEOUT": "soon"}, "AUTOTEK_HTTP_TIMEOUT"),
        ({"AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS": "0"}, "AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS"),
        ({"AUTOTEK_WORKERS": "-1"}, "AUTOTEK_WORKERS"),
        ({"AUTOTEK_LEADER_ELECTION": "maybe"}, "AUTOTEK_LEADER_ELECTION"),
        ({"AUTOTEK_RESTART_MIN_INTERVAL": "1e9"}, "AUTOTEK_RESTART_MIN_INTERVAL"),
        ({"AUTOTEK_LEADER_ELECTION_LEASE_DURATION": "0"}, "AUTOTEK_LEADER_ELECTION_LEASE_DURATION"),
        ({"AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE": "soon"}, "AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE"),
        ({"AUTOTEK_LEADER_ELECTION_RETRY_PERIOD": "-5"}, "AUTOTEK_LEADER_ELECTION_RETRY_PERIOD"),
        # The renew deadline must be shorter than the Lease, the retry period shorter than the deadline.
        ({"AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE": "30"}, "AUTOTEK_LEADER_ELECTION_LEASE_DURATION"),
        ({"AUTOTEK_LEADER_ELECTION_RETRY_PERIOD": "20"}, "AUTOTEK_LEADER_ELECTION_RENEW_DEADLINE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_env(env)
    assert needle in str(info.value)
