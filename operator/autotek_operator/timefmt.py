"""RFC 3339 timestamps as Kubernetes writes them (UTC, second precision, ``Z``)."""

from __future__ import annotations

from datetime import UTC, datetime


def format_time(when: datetime) -> str:
    """Format an aware datetime as ``2026-11-28T04:10:00Z``."""
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    return f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"


def parse_time(value: object) -> datetime | None:
    """Parse an RFC 3339 timestamp; None for anything that is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
