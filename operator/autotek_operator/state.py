"""What the operator knows about one credential, of either kind, between passes.

A namespaced AutoTekCredential is a ClusterAutoTekCredential with exactly one namespace: both
keep one held token and, per namespace they write into, what is known of the target Secret
there (``NamespaceTarget``). The pass (reconcile.py) reads and updates this; the runtime keeps
it, feeds it watch events and schedules the next pass at ``next_due``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import constants as c
from . import scheduling
from .status import find_condition
from .target import HeldToken
from .timefmt import parse_time


class _Unknown:
    """Marks a cached object that must be read from the API (as opposed to None: known absent)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    version: str
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)


@dataclass(slots=True)
class NamespaceTarget:
    """The target Secret in one namespace: as last seen or written, and its own failure record.

    A ClusterAutoTekCredential retries a namespace whose write failed on that namespace's own
    backoff (``retry_at``), never holding back the others nor the token's schedule."""

    #: UNKNOWN: read it; None: absent; a dict: the Secret as seen; a target.Written: as we wrote it.
    body: Any = field(default=UNKNOWN, repr=False)
    #: resourceVersion of our last write (our own writes come back on the watch with it).
    version: str | None = None
    reason: str | None = None
    message: str = ""
    attempts: int = 0
    retry_at: datetime | None = None
    #: The API server said the namespace is deleted or Terminating: not counted, not reported, looked
    #: at again at ``retry_at`` unless the namespace watch drops it from the selection first.
    gone: bool = False

    def failed(self) -> bool:
        return self.reason is not None

    def waiting(self, now: datetime) -> bool:
        """Failed or gone, and its retry time not reached (None: until a change)."""
        return (self.reason is not None or self.gone) and (self.retry_at is None or now < self.retry_at)

    def clear_failure(self) -> None:
        self.reason, self.message, self.attempts, self.retry_at, self.gone = None, "", 0, None, False


@dataclass(slots=True)
class CredentialState:
    """What the operator knows about one AutoTekCredential or ClusterAutoTekCredential.

    ``namespace`` is "" for the cluster kind; its key is then ("", name)."""

    namespace: str
    name: str
    uid: str
    generation: int | None
    spec: Mapping[str, Any]
    refresh_request: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    kind: str = c.KIND
    #: metadata.creationTimestamp: of two cluster credentials aiming at one Secret, the older keeps it.
    created: str = ""

    token: HeldToken | None = None
    client: ClientCredentials | None = None
    #: The client Secret as last seen (watch events), so that a pass reads it from the API only
    #: when it has no fresh copy. UNKNOWN: read it; None: absent.
    client_body: Any = field(default=UNKNOWN, repr=False)
    #: Per namespace written into: the target Secret there (the namespaced kind: its own namespace).
    targets: dict[str, NamespaceTarget] = field(default_factory=dict)
    #: ClusterAutoTekCredential: the namespaces selected (existing, not Terminating, watched).
    selected: frozenset[str] = frozenset()
    #: ClusterAutoTekCredential: selected namespaces whose Secret an older cluster credential keeps
    #: (namespace -> its name): reported as TargetConflict, never written.
    yielded: Mapping[str, str] = field(default_factory=dict)
    next_refresh: datetime | None = None
    backoff_until: datetime | None = None
    failed_attempts: int = 0
    last_failure_time: datetime | None = None
    last_failure_reason: str | None = None
    last_attempt_at: datetime | None = None
    handled_refresh_request: str | None = None
    handled_generation: int | None = None
    issued_client_version: str | None = None
    #: A change asked for a new token now (spec, client Secret, annotation): the reason.
    force_new: str | None = None
    expired_reported: bool = False
    #: Rollout restarts held back by the minimum interval (status.pendingRestarts).
    pending_restarts: tuple[scheduling.OwedRestart, ...] = ()
    #: ClusterAutoTekCredential: the failed namespaces last reported in an Event (one Event per change).
    reported_failures: frozenset[tuple[str, str]] = frozenset()

    @property
    def cluster(self) -> bool:
        return self.kind == c.CLUSTER_KIND

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.cluster else f"{self.namespace}/{self.name}"

    def wanted_namespaces(self) -> frozenset[str]:
        """The namespaces this credential writes its Secret into."""
        if not self.cluster:
            return frozenset((self.namespace,))
        return self.selected

    def target(self, namespace: str) -> NamespaceTarget:
        found = self.targets.get(namespace)
        if found is None:
            found = self.targets[namespace] = NamespaceTarget()
        return found

    # The namespaced kind's one target Secret, in its own namespace.
    @property
    def target_body(self) -> Any:
        found = self.targets.get(self.namespace)
        return found.body if found is not None else UNKNOWN

    @target_body.setter
    def target_body(self, value: Any) -> None:
        self.target(self.namespace).body = value

    @property
    def target_version(self) -> str | None:
        found = self.targets.get(self.namespace)
        return found.version if found is not None else None

    @target_version.setter
    def target_version(self, value: str | None) -> None:
        self.target(self.namespace).version = value

    def next_due(self) -> datetime | None:
        """When the next pass is due: the next refresh, an owed restart or a namespace's retry,
        whichever comes first."""
        due = scheduling.next_due(self.next_refresh, self.pending_restarts)
        for t in self.targets.values():
            if t.retry_at is not None and (due is None or t.retry_at < due):
                due = t.retry_at
        return due

    def status_has(self, condition: str) -> bool:
        return find_condition(self.status.get("conditions"), condition) is not None

    def copy_for_pass(self) -> CredentialState:
        """A copy a pass may change freely (the per-namespace records are copied too)."""
        from copy import copy

        out = copy(self)
        out.targets = {ns: copy(t) for ns, t in self.targets.items()}
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any], kind: str | None = None) -> CredentialState:
        """State for a credential seen for the first time, resumed from its stored status
        (``kind``: when the body does not say, as list items do not)."""
        meta = body.get("metadata") or {}
        status = dict(body.get("status") or {})
        st = cls(
            namespace=meta.get("namespace", "") or "",
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            generation=meta.get("generation"),
            spec=body.get("spec") or {},
            refresh_request=(meta.get("annotations") or {}).get(c.ANN_REFRESH_REQUESTED_AT),
            status=status,
            kind=kind or (c.CLUSTER_KIND if body.get("kind") == c.CLUSTER_KIND else c.KIND),
            created=str(meta.get("creationTimestamp") or ""),
        )
        st.next_refresh = parse_time(status.get("nextRefreshTime"))
        attempts = status.get("failedAttempts")
        st.failed_attempts = attempts if isinstance(attempts, int) and attempts >= 0 else 0
        st.last_failure_time = parse_time(status.get("lastFailureTime"))
        st.last_failure_reason = status.get("lastFailureReason")
        if st.failed_attempts and st.next_refresh is not None:
            st.backoff_until = st.next_refresh
        st.handled_refresh_request = status.get("lastRefreshRequest")
        st.handled_generation = status.get("observedGeneration")
        st.issued_client_version = status.get("clientSecretVersion")
        st.pending_restarts = _owed_from_status(status.get("pendingRestarts"))
        return st

    def update_from_body(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        self.uid = meta.get("uid", self.uid)
        self.generation = meta.get("generation")
        self.spec = body.get("spec") or {}
        self.refresh_request = (meta.get("annotations") or {}).get(c.ANN_REFRESH_REQUESTED_AT)


def _owed_from_status(value: object) -> tuple[scheduling.OwedRestart, ...]:
    """status.pendingRestarts as stored; entries that are not well formed are dropped."""
    out = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, Mapping):
            continue
        kind, name = item.get("kind"), item.get("name")
        since, due = parse_time(item.get("since")), parse_time(item.get("dueAt"))
        if isinstance(kind, str) and isinstance(name, str) and since is not None and due is not None:
            out.append(scheduling.OwedRestart(kind, name, since, due))
    return tuple(out)
