"""Table tests of the pure time decisions: refresh time, backoff, next attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from autotek_operator.scheduling import (
    CREDENTIAL,
    PERMANENT,
    TRANSIENT,
    Rand,
    backoff_delay,
    clamp_lifetime,
    next_attempt,
    refresh_time,
)
from autotek_operator.spec import Refresh

ISSUED = datetime(2026, 11, 28, 3, 0, 0, tzinfo=UTC)
NOW = ISSUED
DAY = 86400.0
TEN_YEARS = 10 * 365 * 86400.0
AUTOTEK = 3599.0  # AutoTek's expires_in

LOW: Rand = lambda: 0.0  # noqa: E731
MID: Rand = lambda: 0.5  # noqa: E731
HIGH: Rand = lambda: 0.999999  # noqa: E731
RANDS = {"r0": LOW, "r0.5": MID, "r1": HIGH}

DEFAULT = Refresh()


def pct(p: float) -> Refresh:
    return Refresh(renew_before_percentage=p)


def before(seconds: float) -> Refresh:
    return Refresh(renew_before=seconds)


def offset(at: datetime) -> float:
    return (at - ISSUED).total_seconds()


# --- refresh_time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "refresh", "rand", "expected"),
    [
        # default: two thirds (33 % of the lifetime left); jitter up to 10 % of the 33 % window
        pytest.param(AUTOTEK, DEFAULT, LOW, AUTOTEK * 0.67, id="default-r0"),
        pytest.param(AUTOTEK, DEFAULT, MID, AUTOTEK * 0.67 - 0.5 * AUTOTEK * 0.033, id="default-r0.5"),
        pytest.param(AUTOTEK, DEFAULT, HIGH, AUTOTEK * 0.67 - 0.999999 * AUTOTEK * 0.033, id="default-r1"),
        pytest.param(AUTOTEK, pct(33), LOW, AUTOTEK * 0.67, id="explicit-33"),
        # 10 h: 10 % of the window is 1188 s, so the 300 s jitter cap applies
        pytest.param(36000.0, DEFAULT, LOW, 24120.0, id="10h-r0"),
        pytest.param(36000.0, DEFAULT, MID, 24120.0 - 150.0, id="10h-r0.5-jitter-capped"),
        pytest.param(36000.0, DEFAULT, HIGH, 24120.0 - 0.999999 * 300.0, id="10h-r1-jitter-capped"),
        # custom percentage
        pytest.param(AUTOTEK, pct(50), LOW, AUTOTEK * 0.5, id="pct50"),
        pytest.param(AUTOTEK, pct(10), LOW, AUTOTEK * 0.9, id="pct10"),
        pytest.param(AUTOTEK, pct(90), LOW, AUTOTEK * 0.1, id="pct90"),
        pytest.param(AUTOTEK, pct(1), HIGH, AUTOTEK * 0.99 - 0.999999 * AUTOTEK * 0.001, id="pct1-r1"),
        pytest.param(1000.0, pct(12.5), MID, 875.0 - 0.5 * 12.5, id="pct-float-r0.5"),
        # renewBefore: absolute, ahead of expiry
        pytest.param(AUTOTEK, before(600), LOW, AUTOTEK - 600, id="before-600-r0"),
        pytest.param(AUTOTEK, before(600), MID, AUTOTEK - 600 - 30, id="before-600-r0.5"),
        pytest.param(AUTOTEK, before(600), HIGH, AUTOTEK - 600 - 0.999999 * 60, id="before-600-r1"),
        pytest.param(
            36000.0, before(3600 * 5), HIGH, 18000.0 - 0.999999 * 300, id="before-5h-r1-jitter-capped"
        ),
        pytest.param(AUTOTEK, before(1), LOW, AUTOTEK - 1, id="before-1s"),
        # renewBefore at least the lifetime: the 33 % default instead
        pytest.param(AUTOTEK, before(AUTOTEK), LOW, AUTOTEK * 0.67, id="before-equals-lifetime"),
        pytest.param(AUTOTEK, before(7200), LOW, AUTOTEK * 0.67, id="before-longer-than-lifetime"),
        pytest.param(
            AUTOTEK, before(7200), HIGH, AUTOTEK * 0.67 - 0.999999 * AUTOTEK * 0.033, id="before-long-r1"
        ),
        # the 10 s floor
        pytest.param(15.0, DEFAULT, LOW, 15.0 * 0.67, id="15s-just-above-floor"),
        pytest.param(12.0, DEFAULT, LOW, 10.0, id="12s-floor"),
        pytest.param(10.0, DEFAULT, HIGH, 10.0, id="10s-floor"),
        pytest.param(5.0, DEFAULT, LOW, 10.0, id="5s-floor"),
        pytest.param(1.0, before(600), HIGH, 10.0, id="1s-before-floor"),
        pytest.param(0.0, DEFAULT, MID, 10.0, id="0s-floor"),
        # the one-day cap
        pytest.param(1e12, DEFAULT, LOW, DAY, id="1e12-day-cap-r0"),
        pytest.param(1e12, DEFAULT, HIGH, DAY - HIGH() * 300.0, id="1e12-day-cap-r1"),
        pytest.param(1e12, before(600), MID, DAY - MID() * 60.0, id="1e12-before-day-cap"),
        pytest.param(float("inf"), DEFAULT, LOW, DAY, id="inf-day-cap"),
        pytest.param(DAY / 0.67 + 1000, DEFAULT, LOW, DAY, id="just-over-day-cap"),
        pytest.param(100000.0, DEFAULT, LOW, 67000.0, id="under-day-cap"),
    ],
)
def test_refresh_time(lifetime: float, refresh: Refresh, rand: Rand, expected: float) -> None:
    assert offset(refresh_time(ISSUED, lifetime, refresh, rand)) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(
    ("lifetime", "refresh", "max_jitter"),
    [
        pytest.param(AUTOTEK, DEFAULT, 0.1 * AUTOTEK * 0.33, id="default-10pct-of-window"),
        pytest.param(AUTOTEK, pct(50), 0.1 * AUTOTEK * 0.5, id="pct50"),
        pytest.param(AUTOTEK, before(600), 60.0, id="before-600"),
        pytest.param(AUTOTEK, before(1), 0.1, id="before-1s"),
        pytest.param(36000.0, DEFAULT, 300.0, id="10h-capped-300"),
        pytest.param(36000.0, before(20000), 300.0, id="before-capped-300"),
        pytest.param(20.0, DEFAULT, 0.1 * 20 * 0.33, id="20s"),
    ],
)
def test_jitter_moves_earlier_only_and_within_bound(
    lifetime: float, refresh: Refresh, max_jitter: float
) -> None:
    unjittered = refresh_time(ISSUED, lifetime, refresh, LOW)
    for name, rand in RANDS.items():
        jittered = refresh_time(ISSUED, lifetime, refresh, rand)
        assert jittered <= unjittered, name
        assert (unjittered - jittered).total_seconds() <= max_jitter + 1e-6, name
    spread = (unjittered - refresh_time(ISSUED, lifetime, refresh, HIGH)).total_seconds()
    assert spread == pytest.approx(max_jitter * 0.999999, abs=2e-6)


@pytest.mark.parametrize("rand", [LOW, MID, HIGH], ids=list(RANDS))
@pytest.mark.parametrize(
    "issued",
    [
        pytest.param(ISSUED, id="utc"),
        pytest.param(datetime(2026, 3, 29, 0, 30, tzinfo=UTC), id="near-dst-change"),
        pytest.param(datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC), id="leap-day-microseconds"),
    ],
)
def test_refresh_time_is_relative_to_issue_and_keeps_tz(issued: datetime, rand: Rand) -> None:
    at = refresh_time(issued, AUTOTEK, DEFAULT, rand)
    assert at.tzinfo is UTC
    assert issued + timedelta(seconds=10) <= at < issued + timedelta(seconds=AUTOTEK)


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        pytest.param(AUTOTEK, AUTOTEK, id="autotek"),
        pytest.param(0.5, 0.5, id="tiny-unchanged"),
        pytest.param(TEN_YEARS - 1, TEN_YEARS - 1, id="just-under-cap"),
        pytest.param(TEN_YEARS, TEN_YEARS, id="at-cap"),
        pytest.param(TEN_YEARS + 1, TEN_YEARS, id="just-over-cap"),
        pytest.param(1e12, TEN_YEARS, id="1e12"),
        pytest.param(float("inf"), TEN_YEARS, id="inf"),
    ],
)
def test_clamp_lifetime(lifetime: float, expected: float) -> None:
    assert clamp_lifetime(lifetime) == expected


def test_clamped_expiry_is_representable() -> None:
    assert ISSUED + timedelta(seconds=clamp_lifetime(1e15)) < datetime(2100, 1, 1, tzinfo=UTC)


# --- backoff_delay --------------------------------------------------------------------------------

# Delay before jitter after the n-th failure in a row (rand 0.5 gives exactly these).
TRANSIENT_BASE = [5, 10, 20, 40, 80, 160] + [300] * 14
CREDENTIAL_BASE = [60, 120, 240, 480, 960] + [1800] * 15
CAP = {TRANSIENT: 300.0, CREDENTIAL: 1800.0}
FACTOR = {"r0": 0.8, "r0.5": 1.0, "r1": 0.8 + 0.4 * 0.999999}

BACKOFF_TABLE = [
    pytest.param(cls, n, RANDS[r], min(CAP[cls], base * FACTOR[r]), id=f"{cls}-n{n}-{r}")
    for cls, bases in ((TRANSIENT, TRANSIENT_BASE), (CREDENTIAL, CREDENTIAL_BASE))
    for n, base in enumerate(bases, start=1)
    for r in RANDS
]


@pytest.mark.parametrize(("retry_class", "attempts", "rand", "expected"), BACKOFF_TABLE)
def test_backoff_delay(retry_class: str, attempts: int, rand: Rand, expected: float) -> None:
    assert backoff_delay(retry_class, attempts, rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retry_class", "attempts", "rand", "expected"),
    [
        pytest.param(TRANSIENT, 1, LOW, 4.0, id="transient-first-r0"),
        pytest.param(TRANSIENT, 1, HIGH, 5 * 1.1999996, id="transient-first-r1"),
        pytest.param(TRANSIENT, 6, HIGH, 160 * (0.8 + 0.4 * 0.999999), id="transient-6-r1"),
        pytest.param(TRANSIENT, 7, LOW, 240.0, id="transient-capped-r0-below-cap"),
        pytest.param(TRANSIENT, 7, HIGH, 300.0, id="transient-capped-r1-never-above-cap"),
        pytest.param(CREDENTIAL, 1, LOW, 48.0, id="credential-first-r0"),
        pytest.param(CREDENTIAL, 1, HIGH, 60 * 1.1999996, id="credential-first-r1"),
        pytest.param(CREDENTIAL, 6, LOW, 1440.0, id="credential-capped-r0"),
        pytest.param(CREDENTIAL, 6, HIGH, 1800.0, id="credential-capped-r1"),
        pytest.param(TRANSIENT, 0, MID, 5.0, id="zero-attempts-as-first"),
        pytest.param(TRANSIENT, -3, MID, 5.0, id="negative-attempts-as-first"),
        pytest.param(TRANSIENT, 31, MID, 300.0, id="transient-31"),
        pytest.param(TRANSIENT, 1_000_000, LOW, 240.0, id="transient-million"),
        pytest.param(TRANSIENT, 2**64, HIGH, 300.0, id="transient-2pow64"),
        pytest.param(CREDENTIAL, 10**100, MID, 1800.0, id="credential-googol"),
    ],
)
def test_backoff_delay_edges(retry_class: str, attempts: int, rand: Rand, expected: float) -> None:
    assert backoff_delay(retry_class, attempts, rand) == pytest.approx(expected)


@pytest.mark.parametrize("attempts", [1, 5, 10**9], ids=["n1", "n5", "huge"])
@pytest.mark.parametrize(
    "retry_after", [None, 30.0, 1e9], ids=["no-retry-after", "retry-after-30", "retry-after-1e9"]
)
@pytest.mark.parametrize("retry_class", [PERMANENT, "bogus", ""], ids=["permanent", "unknown", "empty"])
def test_backoff_delay_none_without_a_retry_class(
    retry_class: str, retry_after: float | None, attempts: int
) -> None:
    assert backoff_delay(retry_class, attempts, MID, retry_after) is None


@pytest.mark.parametrize(
    ("retry_class", "attempts", "rand", "retry_after", "expected"),
    [
        pytest.param(TRANSIENT, 1, MID, 120.0, 120.0, id="transient-larger-used"),
        pytest.param(TRANSIENT, 1, MID, 300.0, 300.0, id="transient-at-cap"),
        pytest.param(TRANSIENT, 1, MID, 1000.0, 300.0, id="transient-larger-capped"),
        pytest.param(TRANSIENT, 1, MID, float("inf"), 300.0, id="transient-inf-capped"),
        pytest.param(TRANSIENT, 1, MID, 2.0, 5.0, id="transient-smaller-computed"),
        pytest.param(TRANSIENT, 6, MID, 100.0, 160.0, id="transient-smaller-than-late-delay"),
        pytest.param(TRANSIENT, 7, LOW, 290.0, 290.0, id="transient-capped-delay-larger-retry-after"),
        pytest.param(TRANSIENT, 1, MID, 0.0, 5.0, id="transient-zero-ignored"),
        pytest.param(TRANSIENT, 1, MID, -10.0, 5.0, id="transient-negative-ignored"),
        pytest.param(TRANSIENT, 1, MID, float("nan"), 5.0, id="transient-nan-ignored"),
        pytest.param(TRANSIENT, 1, MID, None, 5.0, id="transient-none"),
        pytest.param(CREDENTIAL, 1, MID, 900.0, 900.0, id="credential-larger-used"),
        pytest.param(CREDENTIAL, 1, MID, 7200.0, 1800.0, id="credential-larger-capped"),
        pytest.param(CREDENTIAL, 1, MID, 30.0, 60.0, id="credential-smaller-computed"),
    ],
)
def test_backoff_delay_retry_after(
    retry_class: str, attempts: int, rand: Rand, retry_after: float | None, expected: float
) -> None:
    assert backoff_delay(retry_class, attempts, rand, retry_after) == pytest.approx(expected)


# --- next_attempt ---------------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("last_attempt", "delay", "expires_at", "expected"),
    [
        pytest.param(None, 30.0, None, at(30), id="delay-only"),
        pytest.param(at(-100), 30.0, None, at(30), id="delay-last-long-ago"),
        pytest.param(None, 300.0, at(60), at(60), id="bounded-by-valid-expiry"),
        pytest.param(at(-100), 300.0, at(60), at(60), id="bounded-by-expiry-last-long-ago"),
        pytest.param(None, 30.0, at(600), at(30), id="expiry-later-than-delay"),
        pytest.param(None, 30.0, at(-5), at(30), id="expiry-past-ignored"),
        pytest.param(None, 30.0, NOW, at(30), id="expiry-now-ignored"),
        pytest.param(NOW, 1.0, None, at(10), id="floor-wins-over-delay"),
        pytest.param(at(-4), 1.0, None, at(6), id="floor-from-last-attempt"),
        # The wake-up at expiry is not held back by the floor (Ready must turn False then); the
        # pass at expiry defers its token request to the floor itself.
        pytest.param(NOW, 300.0, at(5), at(5), id="expiry-inside-floor-still-wakes"),
        pytest.param(NOW, 0.0, None, at(10), id="zero-delay-floor"),
        pytest.param(None, 0.0, None, NOW, id="zero-delay-no-last-attempt"),
        pytest.param(at(-10), 0.0, None, NOW, id="floor-exactly-now"),
        pytest.param(None, None, None, None, id="no-delay-no-expiry"),
        pytest.param(NOW, None, None, None, id="no-delay-no-expiry-with-last"),
        pytest.param(None, None, at(-1), None, id="no-delay-expired"),
        pytest.param(None, None, at(100), at(100), id="no-delay-valid-expiry"),
        pytest.param(NOW, None, at(3), at(3), id="no-delay-expiry-inside-floor"),
    ],
)
def test_next_attempt(
    last_attempt: datetime | None, delay: float | None, expires_at: datetime | None, expected: datetime | None
) -> None:
    assert next_attempt(NOW, last_attempt, delay, expires_at) == expected
