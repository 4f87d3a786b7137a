"""Pure status building: the Ready condition and the status fields, from the outcome of a pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import constants as c
from .timefmt import format_time


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    message: str


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    """The condition of type ``kind`` in a status's conditions, if there is one."""
    for cond in conditions or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond
    return None


def ready_condition(
    previous: Sequence[Mapping[str, Any]] | None,
    readiness: Readiness,
    *,
    now: datetime,
    generation: int | None,
    kind: str = c.CONDITION_READY,
) -> dict[str, Any]:
    """A condition (Ready by default); lastTransitionTime moves only when the status flips."""
    status = "True" if readiness.ready else "False"
    last_transition = format_time(now)
    cond = find_condition(previous, kind)
    if cond is not None and cond.get("status") == status and cond.get("lastTransitionTime"):
        last_transition = str(cond["lastTransitionTime"])
    cond_out: dict[str, Any] = {
        "type": kind,
        "status": status,
        "reason": readiness.reason,
        "message": readiness.message,
        "lastTransitionTime": last_transition,
    }
    if generation is not None:
        cond_out["observedGeneration"] = generation
    return cond_out


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch taking ``current`` to ``desired`` over our own fields; None if equal.

    Fields set to None in ``desired`` are removed (merge-patch null)."""
    current = current or {}
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if current.get(key) is not None:
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch or None


def fmt(when: datetime | None) -> str | None:
    return format_time(when) if when is not None else None
