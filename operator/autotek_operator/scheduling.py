"""Pure time decisions: when to refresh a token and how long to back off after a failure.

Nothing here reads the clock or a random source: ``now`` and ``rand`` (a function returning a
float in [0, 1)) are arguments, so every decision is a table-testable function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .spec import Refresh

#: Never more than one token request per credential in this many seconds.
FLOOR_SECONDS = 10.0
#: However long a token lives, check it again within a day.
MAX_SCHEDULE_SECONDS = 86400.0
#: Lifetimes beyond this are recorded as this (RFC 3339 has no year 33658).
MAX_LIFETIME_SECONDS = 10 * 365 * 86400.0
#: Refreshes move earlier by up to this share of the renewal window ...
JITTER_FRACTION = 0.1
#: ... but never by more than this.
MAX_JITTER_SECONDS = 300.0

TRANSIENT = "transient"
CREDENTIAL = "credential"
PERMANENT = "permanent"

#: (first delay, cap) in seconds per retry class.
BACKOFF = {
    TRANSIENT: (5.0, 300.0),
    CREDENTIAL: (60.0, 1800.0),
}

Rand = Callable[[], float]


def clamp_lifetime(lifetime: float) -> float:
    """Bound a lifetime so that the expiry stays representable."""
    return min(lifetime, MAX_LIFETIME_SECONDS)


def renew_window(lifetime: float, refresh: Refresh) -> float:
    """Seconds before expiry at which the refresh is due (before jitter)."""
    pct = refresh.effective_percentage
    if pct is None:
        assert refresh.renew_before is not None
        if refresh.renew_before < lifetime:
            return refresh.renew_before
        # A renewBefore at least as long as the token would refresh at once, forever;
        # fall back to the default share, as cert-manager does for its renewBefore.
        pct = float(Refresh().effective_percentage or 33)
    return lifetime * pct / 100.0


def refresh_time(issued_at: datetime, lifetime: float, refresh: Refresh, rand: Rand) -> datetime:
    """When to refresh a token sent for at ``issued_at`` and valid for ``lifetime`` seconds."""
    lifetime = clamp_lifetime(lifetime)
    window = renew_window(lifetime, refresh)
    jitter = rand() * min(JITTER_FRACTION * window, MAX_JITTER_SECONDS)
    # Cap first, then jitter, so that very long-lived tokens still spread out.
    offset = min(lifetime - window, MAX_SCHEDULE_SECONDS) - jitter
    offset = max(offset, FLOOR_SECONDS)
    return issued_at + timedelta(seconds=offset)


def backoff_delay(retry_class: str, attempts: int, rand: Rand, retry_after: float | None = None) -> float | None:
    """Seconds to wait after the ``attempts``-th failure in a row; None: wait for a change."""
    if retry_class not in BACKOFF:
        return None
    first, cap = BACKOFF[retry_class]
    exponent = min(max(attempts, 1) - 1, 30)
    delay = min(cap, first * (2.0**exponent))
    delay = min(cap, delay * (0.8 + 0.4 * rand()))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, cap))
    return delay


def next_attempt(
    now: datetime,
    last_attempt_at: datetime | None,
    delay: float | None,
    expires_at: datetime | None,
) -> datetime | None:
    """The next pass after a failure: a retry after ``delay`` (never sooner than the floor after
    the previous request), or the held token's expiry if that comes first, so that Ready turns
    False exactly then. None: only a change retries."""
    candidates: list[datetime] = []
    if delay is not None:
        retry = now + timedelta(seconds=delay)
        if last_attempt_at is not None:
            retry = max(retry, last_attempt_at + timedelta(seconds=FLOOR_SECONDS))
        candidates.append(retry)
    if expires_at is not None and expires_at > now:
        # Still-valid token: look again at its expiry at the latest (the pass there defers its
        # token request to the floor if need be, and reports Expired).
        candidates.append(expires_at)
    return min(candidates) if candidates else None


# -- rollout restarts held back by the minimum interval ----------------------------------------------

#: After a failed restart of a workload owed one, try again this much later.
RESTART_RETRY_SECONDS = 30.0

RESTART_NOW = "now"
RESTART_DEFER = "defer"
RESTART_PAID = "paid"


@dataclass(frozen=True, slots=True)
class OwedRestart:
    """A restart the minimum interval held back, owed since a rotation (kept in the status)."""

    kind: str
    name: str
    #: The first rotation it is owed for (later rotations inside the interval add nothing).
    since: datetime
    due_at: datetime


def restart_decision(
    last_restart: datetime | None, owed_since: datetime | None, now: datetime, interval: float
) -> tuple[str, datetime | None]:
    """Whether to restart a workload now: (RESTART_NOW, None), (RESTART_DEFER, when the interval
    since its last restart ends) or (RESTART_PAID, None): restarted after the rotation it is owed
    for (by anyone), so nothing is owed any more."""
    if owed_since is not None and last_restart is not None and last_restart > owed_since:
        return RESTART_PAID, None
    if last_restart is None or interval <= 0:
        return RESTART_NOW, None
    due = last_restart + timedelta(seconds=interval)
    if now >= due:
        return RESTART_NOW, None
    return RESTART_DEFER, due


def next_due(next_refresh: datetime | None, owed: tuple[OwedRestart, ...]) -> datetime | None:
    """A credential's next pass: its next refresh or its earliest owed restart, whichever is first."""
    times = [t for t in (next_refresh, *(o.due_at for o in owed)) if t is not None]
    return min(times) if times else None
