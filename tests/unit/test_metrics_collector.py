"""The per-credential metrics: built at scrape time from ``Runtime.credential_samples``.

Each scrape goes through a fresh ``CollectorRegistry`` and ``generate_latest``, then the text is
parsed back, so what is checked is what Prometheus would read.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from fakes import FakeKube, FakeTokens, real_now, running_runtime, settle
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from autotek_operator import metrics, scheduling
from autotek_operator.metrics import CONDITIONS, CredentialCollector, CredentialSample
from autotek_operator.runtime import Runtime

READY = "autotek_credential_ready_status"
EXPIRY = "autotek_token_expiration_timestamp_seconds"
REFRESH = "autotek_token_next_refresh_timestamp_seconds"
FAMILIES = (READY, EXPIRY, REFRESH)

Samples = dict[str, dict[tuple[str, ...], float]]


def parse(text: str) -> Samples:
    """{family: {label values (namespace, name[, condition]): value}} of every family in ``text``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for sample in family.samples:
            assert sample.name == family.name
            labels = sample.labels
            key = (
                (labels["namespace"], labels["name"], labels["condition"])
                if family.name == READY
                else (labels["namespace"], labels["name"])
            )
            assert set(labels) == (
                {"namespace", "name", "condition"} if family.name == READY else {"namespace", "name"}
            )
            assert key not in samples, f"duplicate series {family.name}{labels}"
            samples[key] = sample.value
    return out


def registry_for(source: Callable[[], Iterable[CredentialSample]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CredentialCollector(source))
    return registry


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    text = generate_latest(registry).decode()
    return text, parse(text)


def ready_of(samples: Samples, namespace: str, name: str) -> dict[str, float]:
    return {cond: v for (ns, n, cond), v in samples[READY].items() if (ns, n) == (namespace, name)}


# -- the collector on its own ---------------------------------------------------------------------


def test_three_families_ready_one_hot_and_times_only_when_known() -> None:
    source: list[CredentialSample] = [
        ("shop", "a", "True", 1_800_000_000.0, 1_799_990_000.5),
        ("shop", "b", "False", None, 1_799_000_000.0),
        ("other", "c", "Unknown", None, None),
    ]
    text, got = scrape(registry_for(lambda: source))
    for family in FAMILIES:
        assert f"# TYPE {family} gauge" in text
    assert set(got) == set(FAMILIES)
    assert ready_of(got, "shop", "a") == {"True": 1.0, "False": 0.0, "Unknown": 0.0}
    assert ready_of(got, "shop", "b") == {"True": 0.0, "False": 1.0, "Unknown": 0.0}
    assert ready_of(got, "other", "c") == {"True": 0.0, "False": 0.0, "Unknown": 1.0}
    assert len(got[READY]) == 9
    assert got[EXPIRY] == {("shop", "a"): 1_800_000_000.0}
    assert got[REFRESH] == {("shop", "a"): 1_799_990_000.5, ("shop", "b"): 1_799_000_000.0}


def test_series_are_built_at_each_scrape_and_a_removed_credential_is_gone() -> None:
    calls = 0
    source: list[CredentialSample] = [("shop", "a", "True", 10.0, 5.0), ("shop", "b", "True", 20.0, 15.0)]

    def current() -> list[CredentialSample]:
        nonlocal calls
        calls += 1
        return list(source)

    registry = registry_for(current)
    assert calls == 0  # registering describes the families without asking for the credentials
    _, first = scrape(registry)
    assert calls == 1 and set(first[EXPIRY]) == {("shop", "a"), ("shop", "b")}
    source.pop(0)  # "a" deleted
    source[0] = ("shop", "b", "False", None, 30.0)  # "b" failed and lost its token
    _, second = scrape(registry)
    assert calls == 2
    assert {(ns, n) for ns, n, _ in second[READY]} == {("shop", "b")}
    assert ready_of(second, "shop", "b") == {"True": 0.0, "False": 1.0, "Unknown": 0.0}
    assert second[EXPIRY] == {} and second[REFRESH] == {("shop", "b"): 30.0}
    source.clear()
    text, third = scrape(registry)
    assert third == {READY: {}, EXPIRY: {}, REFRESH: {}} and "shop" not in text


def test_report_credentials_twice_registers_once_and_uses_the_latest_source(monkeypatch: Any) -> None:
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "REGISTRY", registry)
    monkeypatch.setattr(metrics, "_collectors", {})
    metrics.report_credentials(lambda: [("shop", "old", "True", 1.0, 2.0)])
    metrics.report_credentials(lambda: [("shop", "new", "False", None, 3.0)])  # a second register would raise
    text, got = scrape(registry)
    assert text.count(f"# TYPE {READY} gauge") == 1
    assert {(ns, n) for ns, n, _ in got[READY]} == {("shop", "new")}
    assert got[REFRESH] == {("shop", "new"): 3.0} and got[EXPIRY] == {}


# -- from the runtime ---------------------------------------------------------------------------------

NS = "shop"
CLIENT_SECRET = f"client-secret-{uuid.uuid4().hex}"
TOKEN = f"access-token-{uuid.uuid4().hex}"


def credential(name: str = "autotek", **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": name, "uid": f"u-{name}", "generation": 1},
        "spec": {"clientSecretRef": {"name": "client"}},
        **extra,
    }


@pytest.fixture
async def rt(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS, client_secret=CLIENT_SECRET) as world:
        world[2].token_value = lambda n: f"{TOKEN}-{n}"
        yield world


async def test_runtime_samples_follow_the_credentials_and_a_follower_reports_none(rt: Any) -> None:
    runtime, kube, tokens = rt
    registry = registry_for(runtime.credential_samples)
    runtime.on_credential_event(None, credential())
    assert runtime.credential_samples() == []  # no pass yet: no status, no token, nothing to say
    await settle(runtime, 0.15, 0.02)
    st = runtime.states[(NS, "autotek")]
    assert st.token is not None and st.next_refresh is not None
    expected = (NS, "autotek", "True", st.token.expires_at.timestamp(), st.next_refresh.timestamp())
    assert runtime.credential_samples() == [expected]
    _, got = scrape(registry)
    assert ready_of(got, NS, "autotek") == {"True": 1.0, "False": 0.0, "Unknown": 0.0}
    assert got[EXPIRY] == {(NS, "autotek"): expected[3]} and got[REFRESH] == {(NS, "autotek"): expected[4]}
    assert expected[3] > real_now().timestamp() and expected[4] < expected[3]

    runtime.set_active(False)  # another replica leads: it reports, this one does not
    assert runtime.credential_samples() == []
    assert scrape(registry)[1] == {READY: {}, EXPIRY: {}, REFRESH: {}}
    runtime.set_active(True)
    await settle(runtime, 0.15, 0.02)
    assert [s[:3] for s in runtime.credential_samples()] == [(NS, "autotek", "True")]

    runtime.on_credential_event("DELETED", credential())
    await settle(runtime, 0.15, 0.02)
    assert runtime.credential_samples() == []
    assert scrape(registry)[1] == {READY: {}, EXPIRY: {}, REFRESH: {}}


async def test_a_stored_status_without_a_held_token_reports_ready_and_next_refresh_only(rt: Any) -> None:
    runtime, kube, tokens = rt
    status = {
        "conditions": [{"type": "Ready", "status": "False", "reason": "InvalidClient"}],
        "nextRefreshTime": "2026-11-28T05:00:00Z",
        "failedAttempts": 2,
    }
    runtime.on_credential_event(None, credential("failing", status=status))
    # Before its first pass (no await yet) it is known only from the status it stored.
    assert runtime.credential_samples() == [
        (NS, "failing", "False", None, datetime(2026, 11, 28, 5, 0, tzinfo=UTC).timestamp())
    ]
    _, got = scrape(registry_for(runtime.credential_samples))
    assert ready_of(got, NS, "failing") == {"True": 0.0, "False": 1.0, "Unknown": 0.0}
    assert got[EXPIRY] == {} and set(got[REFRESH]) == {(NS, "failing")}
    runtime.on_credential_event("DELETED", credential("failing"))
    await settle(runtime, 0.05)


async def test_samples_carry_only_names_and_numbers(rt: Any) -> None:
    runtime, kube, tokens = rt
    for name in ("one", "two"):
        runtime.on_credential_event(None, credential(name))
    await settle(runtime, 0.15, 0.02)
    assert tokens.count == 2
    held = {st.token.access_token for st in runtime.states.values() if st.token is not None}
    assert held == {f"{TOKEN}-1", f"{TOKEN}-2"}  # the runtime does hold the secrets...
    samples = runtime.credential_samples()
    assert sorted(s[1] for s in samples) == ["one", "two"]
    for namespace, name, condition, expires_at, refresh_at in samples:
        assert (namespace, condition) == (NS, "True") and name in ("one", "two")
        assert condition in CONDITIONS
        assert isinstance(expires_at, float) and math.isfinite(expires_at)
        assert isinstance(refresh_at, float) and math.isfinite(refresh_at)
    text, _ = scrape(registry_for(runtime.credential_samples))
    # ...and none of it reaches a scrape.
    for value in (TOKEN, CLIENT_SECRET, "client_secret", "access_token"):
        assert value not in text and value not in repr(samples)
