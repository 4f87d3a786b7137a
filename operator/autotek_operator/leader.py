"""Leader election over a coordination.k8s.io/v1 Lease, in the manner of client-go's.

Only the leader runs passes; the other replicas keep their watch state warm and take over when
the leader's Lease stops being renewed. Expiry is judged by the follower's own clock (how long
the Lease record has gone unchanged), so clock skew between nodes does not matter. The leader
steps down as soon as it fails to renew within ``renew_deadline``, which is shorter than
``lease_duration``: it stops before anyone else may start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .errors import AutoTekError
from .kube import Conflict
from .timefmt import format_time

log = logging.getLogger("autotek_operator")

LEADING = "leading"
FOLLOWING = "following"
UNKNOWN = "unknown"  # the API could not be asked; keep the current role until the deadline


class LeaseAPI(Protocol):
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass
class LeaderElector:
    api: LeaseAPI
    namespace: str
    name: str
    identity: str
    clock: Callable[[], datetime]
    monotonic: Callable[[], float]
    lease_duration: float = 30.0
    renew_deadline: float = 20.0
    retry_period: float = 5.0

    def __post_init__(self) -> None:
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew: float | None = None

    def _lease_body(self, existing: Mapping[str, Any] | None, acquire: bool) -> dict[str, Any]:
        now = format_time(self.clock()).replace("Z", ".000000Z")
        spec = dict((existing or {}).get("spec") or {})
        transitions = int(spec.get("leaseTransitions") or 0)
        if acquire and existing is not None:
            transitions += 1
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.lease_duration),
            renewTime=now,
            leaseTransitions=transitions,
        )
        if acquire:
            spec["acquireTime"] = now
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if existing is not None:
            meta["resourceVersion"] = (existing.get("metadata") or {}).get("resourceVersion")
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def try_acquire_or_renew(self) -> str:
        """One round: LEADING, FOLLOWING, or UNKNOWN when the API did not answer."""
        try:
            lease = self.api.get_lease(self.namespace, self.name)
            if lease is None:
                self.api.create_lease(self.namespace, self._lease_body(None, acquire=True))
                return self._won()
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            # Any write (a renewal included) changes the resourceVersion.
            record = (holder, spec.get("renewTime"), (lease.get("metadata") or {}).get("resourceVersion"))
            now = self.monotonic()
            if record != self._observed:
                self._observed, self._observed_at = record, now
            if holder == self.identity:
                self.api.replace_lease(self.namespace, self.name, self._lease_body(lease, acquire=False))
                return self._won()
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if holder and now - self._observed_at < duration:
                return FOLLOWING
            self.api.replace_lease(self.namespace, self.name, self._lease_body(lease, acquire=True))
            log.info("took over leadership (Lease %s/%s) from %s", self.namespace, self.name, holder or "nobody")
            return self._won()
        except Conflict:
            return FOLLOWING  # someone else wrote the Lease first
        except AutoTekError as exc:
            log.warning("leader election: %s", exc.message)
            return UNKNOWN

    def _won(self) -> str:
        self._last_renew = self.monotonic()
        return LEADING

    def deadline_passed(self) -> bool:
        """True once the Lease has gone unrenewed for the renew deadline (stop acting as leader)."""
        return self._last_renew is None or self.monotonic() - self._last_renew >= self.renew_deadline

    def still_leading(self, result: str) -> bool:
        """Whether to keep acting as leader after a round that returned ``result``."""
        if result == LEADING:
            return True
        if result == FOLLOWING or self._last_renew is None:
            return False
        return self.monotonic() - self._last_renew < self.renew_deadline

    def release(self) -> None:
        """Give the Lease up on a clean shutdown so that another replica takes over at once."""
        try:
            lease = self.api.get_lease(self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            body = self._lease_body(lease, acquire=False)
            body["spec"]["holderIdentity"] = ""
            body["spec"]["leaseDurationSeconds"] = 1
            self.api.replace_lease(self.namespace, self.name, body)
        except (Conflict, AutoTekError):
            pass
