"""One credential, one pass: decide, fetch a token if needed, write the Secrets, report.

One path for both kinds: an AutoTekCredential writes into its own namespace, a
ClusterAutoTekCredential into each namespace it selects. Either way a pass makes at most one
token request, then one write per namespace whose Secret does not hold the token (for the
cluster kind concurrently, each namespace failing and retrying on its own).

Framework-free: the pass gets its I/O (``Deps``), the clock and the random source from the
caller and works on a ``CredentialState`` that only it touches while it runs. The runtime
serialises passes per credential and applies what they return.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from . import constants as c
from . import errors, metrics, scheduling
from .events import EventRecorder
from .kube import Conflict, Kube
from .spec import CREATION_MERGE, DELETION_DELETE, CredentialSpec, parse_spec
from .state import UNKNOWN, ClientCredentials, CredentialState, NamespaceTarget
from .status import Readiness, find_condition, fmt, ready_condition, status_patch
from .target import (
    HeldToken,
    Owner,
    Written,
    check_target,
    desired_secret,
    held_from_secret,
    is_ours,
    matches,
    merge_patch,
    render_templates,
    rotation_patch,
    trim_secret,
    unb64,
    unmerge_patch,
)
from .timefmt import format_time, parse_time
from .token_client import Token, TokenRequest

log = logging.getLogger("autotek_operator")


class TokenSource(Protocol):
    def check_allowed(self, url: str) -> None: ...

    def request(self, req: TokenRequest, reusable: Callable[[Token], bool] | None = None) -> Token: ...


@dataclass
class Deps:
    kube: Kube
    tokens: TokenSource
    clock: Callable[[], datetime]
    rand: Callable[[], float]
    #: spec.rolloutRestartTargets is honoured only when switched on (it needs extra RBAC).
    rollout_restart: bool = False
    restart_min_interval: float = 300.0
    #: AUTOTEK_CREDENTIAL_SELECTOR, recorded on every Secret written (proof of scope for cleanups).
    selector: str = ""
    #: AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES: where ClusterAutoTekCredentials' client Secrets may live.
    cluster_client_namespaces: frozenset[str] = frozenset()
    #: Where the Events of ClusterAutoTekCredentials go (``default``: see c.CLUSTER_EVENT_NAMESPACE).
    event_namespace: str = c.CLUSTER_EVENT_NAMESPACE
    #: Runs the namespaces' reads and writes of a ClusterAutoTekCredential concurrently (None: in turn).
    fan_out: Executor | None = None
    #: Posts Events in the background (events.EventRecorder); None: on the pass's own thread.
    events: EventRecorder | None = None


__all__ = ["UNKNOWN", "ClientCredentials", "CredentialState", "Deps", "NamespaceTarget", "run_pass"]


def _owed_to_status(owed: tuple[scheduling.OwedRestart, ...]) -> list[dict[str, str]] | None:
    if not owed:
        return None
    return [
        {"kind": o.kind, "name": o.name, "since": format_time(o.since), "dueAt": format_time(o.due_at)} for o in owed
    ]


def new_token_reason(st: CredentialState, now: datetime) -> str | None:
    """Why this pass must fetch a new token, or None when the held one will do."""
    if st.force_new:
        return st.force_new
    if st.token is None:
        return "no token yet"
    if not st.token.valid(now):
        return "the token expired"
    if st.token.generation != st.generation:
        return "the spec changed"
    if st.refresh_request and st.refresh_request != st.handled_refresh_request:
        return "a refresh was requested"
    if st.next_refresh is None or now >= st.next_refresh:
        return "the token is due for refresh"
    return None


def _reusable(st: CredentialState, spec: CredentialSpec, now: datetime) -> Callable[[Token], bool] | None:
    """Whether a token another credential of the same client fetched may serve this one.

    Only for routine refreshes and first issues: a change (spec, client Secret, refresh request)
    wants a token fetched after it. A shared token must not be due for this credential yet, even
    with the earliest jitter."""
    if st.force_new or (st.refresh_request and st.refresh_request != st.handled_refresh_request):
        return None
    if st.token is not None and st.token.generation != st.generation:
        return None
    floor = now + timedelta(seconds=scheduling.FLOOR_SECONDS)

    def check(token: Token) -> bool:
        sent = token.sent_at or now
        return scheduling.refresh_time(sent, token.lifetime, spec.refresh, lambda: 1.0) > floor

    return check


def _floor_seconds(when: datetime) -> datetime:
    return when.replace(microsecond=0)


def _read_client(st: CredentialState, spec: CredentialSpec, kube: Kube) -> ClientCredentials:
    if st.client is not None:
        return st.client
    ref = spec.client_secret_ref
    namespace = ref.namespace or st.namespace
    secret = kube.get_secret(namespace, ref.name) if st.client_body is UNKNOWN else st.client_body
    if secret is None:
        raise errors.ClientSecretNotFound(f"Secret {ref.name} not found in namespace {namespace}")
    data = secret.get("data") or {}
    client_id = unb64(data.get(ref.client_id_key))
    client_secret = unb64(data.get(ref.client_secret_key))
    for key, value in ((ref.client_id_key, client_id), (ref.client_secret_key, client_secret)):
        if key not in data:
            raise errors.ClientSecretKeyMissing(f"Secret {ref.name} has no key {key}")
        if not value:
            raise errors.ClientSecretKeyMissing(f"Secret {ref.name} key {key} is empty or not UTF-8 text")
    assert client_id is not None and client_secret is not None
    version = str((secret.get("metadata") or {}).get("resourceVersion", ""))
    st.client = ClientCredentials(version=version, client_id=client_id, client_secret=client_secret)
    st.client_body = UNKNOWN  # the decoded credentials are all that is kept
    return st.client


def _token_request(spec: CredentialSpec, client: ClientCredentials) -> TokenRequest:
    return TokenRequest(
        token_url=spec.token_url,
        client_id=client.client_id,
        client_secret=client.client_secret,
        auth_method=spec.client_auth_method,
        scope=spec.scope,
        extra_params=spec.extra_params,
        ca_bundle=spec.ca_bundle,
        default_lifetime=spec.refresh.default_lifetime,
    )


def _write_target(
    ns: str,
    spec: CredentialSpec,
    owner: Owner,
    target: Mapping[str, Any] | Written | None,
    token: HeldToken,
    kube: Kube,
) -> tuple[Written, bool]:
    """Make the target Secret in namespace ``ns`` hold ``token`` in one API call; (the Secret as
    now stored, written?)."""
    name = spec.target.name
    merge = spec.target.creation_policy == CREATION_MERGE
    if isinstance(target, Written):
        if target.token == token:
            return target, False
        if merge:
            return _merge_write(ns, spec, owner, token, kube), True
        try:
            resp = kube.patch_secret(ns, name, rotation_patch(spec, owner, token, target))
        except Conflict:
            # Changed by someone else since we wrote it: look again, and stop if it is not ours.
            target = kube.get_secret(ns, name)
            check_target(target, spec, owner)
        else:
            if resp is not None:
                metrics.observe_secret_write("patch")
                return _written(resp, token), True
            target = None  # deleted meanwhile: create it again
    if target is not None and matches(target, spec, owner, token):
        return _written(target, token), False
    if merge:
        return _merge_write(ns, spec, owner, token, kube), True
    for _ in range(2):
        try:
            if target is None:
                created = kube.create_secret(ns, desired_secret(None, spec, owner, token, ns))
                metrics.observe_secret_write("create")
                return _written(created, token), True
            replaced = kube.replace_secret(ns, name, desired_secret(target, spec, owner, token, ns))
            metrics.observe_secret_write("update")
            return _written(replaced, token), True
        except Conflict:
            # Created or changed by someone else meanwhile: look again, and stop if it is not ours.
            target = kube.get_secret(ns, name)
            check_target(target, spec, owner)
            if target is not None and matches(target, spec, owner, token):
                return _written(target, token), False
    raise errors.KubernetesAPIError(f"Secret {name} kept changing while being written; will retry")


def _merge_write(ns: str, spec: CredentialSpec, owner: Owner, token: HeldToken, kube: Kube) -> Written:
    resp = kube.patch_secret(ns, spec.target.name, merge_patch(spec, owner, token))
    if resp is None:
        raise errors.TargetNotFound(f"Secret {spec.target.name} does not exist; creationPolicy Merge needs it to exist")
    metrics.observe_secret_write("patch")
    return _written(resp, token)


#: Data key sets seen in written Secrets, shared: thousands of credentials have the same few.
_KEY_SETS: dict[frozenset[str], frozenset[str]] = {}


def _written(secret: Mapping[str, Any], token: HeldToken) -> Written:
    version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
    keys = frozenset(secret.get("data") or ())
    if len(_KEY_SETS) < 1024:
        keys = _KEY_SETS.setdefault(keys, keys)
    else:
        keys = _KEY_SETS.get(keys, keys)
    return Written(version=version, token=token, keys=keys)


def _event(deps: Deps, st: CredentialState, event_type: str, reason: str, message: str, now: datetime) -> None:
    event: dict[str, Any] = {
        "namespace": deps.event_namespace if st.cluster else st.namespace,
        "name": st.name,
        "uid": st.uid,
        "event_type": event_type,
        "reason": reason,
        "message": message,
        "now": now,
    }
    if st.cluster:
        event["kind"] = st.kind
    if deps.events is not None:
        deps.events.record(st.label(), **event)  # posted in the background, off the path to Ready
        return
    try:
        deps.kube.create_event(**event)
    except errors.AutoTekError as exc:
        log.warning("%s: could not post event %s: %s", st.label(), reason, exc.message)


def _rollout_restart(
    st: CredentialState, spec: CredentialSpec, deps: Deps, now: datetime, rotated: bool
) -> Readiness | None:
    """Restart the listed workloads after a rotation, and make the restarts owed since an earlier
    one once they are due. A workload restarted less than the minimum interval ago is not
    restarted now: the restart is owed (status.pendingRestarts) and made once, when the interval
    ends, however many rotations fall inside it. None: nothing was considered (condition kept)."""
    owed = {(o.kind, o.name): o for o in st.pending_restarts}
    if not deps.rollout_restart:
        st.pending_restarts = ()
        if not rotated:
            return None
        return Readiness(
            False,
            c.REASON_RESTART_DISABLED,
            "rolloutRestartTargets are ignored: the operator runs without AUTOTEK_ROLLOUT_RESTART=true",
        )
    listed = {(t.kind, t.name) for t in spec.rollout_restart_targets}
    owed = {k: o for k, o in owed.items() if k in listed}  # a target no longer listed is owed nothing
    considered = [
        t
        for t in spec.rollout_restart_targets
        if rotated or ((t.kind, t.name) in owed and owed[(t.kind, t.name)].due_at <= now)
    ]
    if not considered:
        st.pending_restarts = tuple(owed.values())
        return None
    interval = deps.restart_min_interval
    restarted: list[str] = []
    late: list[str] = []
    deferred: list[str] = []
    missing: list[str] = []
    failed: list[str] = []
    for target in considered:
        key = (target.kind, target.name)
        label = f"{target.kind} {target.name}"
        debt = owed.get(key)
        try:
            workload = deps.kube.get_workload(target.kind, st.namespace, target.name)
            if workload is None:
                missing.append(label)
                owed.pop(key, None)
                continue
            template_meta = ((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}
            last = parse_time((template_meta.get("annotations") or {}).get(c.ANN_RESTARTED_AT))
            decision, due = scheduling.restart_decision(last, debt.since if debt else None, now, interval)
            if decision == scheduling.RESTART_PAID:
                log.info("%s: %s was restarted since the rotation; the owed restart is dropped", st.label(), label)
                owed.pop(key, None)
                continue
            if decision == scheduling.RESTART_DEFER:
                assert due is not None
                if debt is None:
                    deferred.append(f"{label} until {format_time(due)}")
                    metrics.observe_restart("deferred")
                    log.info("%s: restart of %s deferred until %s", st.label(), label, format_time(due))
                owed[key] = scheduling.OwedRestart(
                    target.kind, target.name, debt.since if debt else _floor_seconds(now), due
                )
                continue
            if deps.kube.restart_workload(target.kind, st.namespace, target.name, format_time(now)):
                owed.pop(key, None)
                if debt is not None:
                    late.append(f"{label} (deferred since the rotation at {format_time(debt.since)})")
                    metrics.observe_restart("made_after_deferral")
                else:
                    restarted.append(label)
                    metrics.observe_restart("made")
            else:
                missing.append(label)
                owed.pop(key, None)
        except errors.AutoTekError as exc:
            failed.append(f"{label}: {exc.message}")
            if debt is not None:  # try again later, not in a loop
                owed[key] = replace(debt, due_at=now + timedelta(seconds=scheduling.RESTART_RETRY_SECONDS))
    st.pending_restarts = tuple(owed.values())
    if restarted:
        _event(deps, st, "Normal", c.EVENT_RESTARTED, "restarted " + ", ".join(restarted) + " after the rotation", now)
    if late:
        log.info("%s: made the deferred restart of %s", st.label(), ", ".join(late))
        _event(
            deps,
            st,
            "Normal",
            c.EVENT_RESTARTED,
            "restarted " + ", ".join(late) + ": the minimum interval has passed",
            now,
        )
    if deferred:
        _event(
            deps,
            st,
            "Normal",
            c.EVENT_RESTART_DEFERRED,
            f"restarted less than {int(interval)}s ago (AUTOTEK_RESTART_MIN_INTERVAL), so restarted once the "
            "interval ends: " + ", ".join(deferred),
            now,
        )
    if missing:
        message = "not found in namespace " + st.namespace + ": " + ", ".join(missing)
        _event(deps, st, "Warning", c.REASON_RESTART_TARGET_NOT_FOUND, message, now)
        return Readiness(False, c.REASON_RESTART_TARGET_NOT_FOUND, message)
    if failed:
        _event(deps, st, "Warning", c.REASON_RESTART_FAILED, "; ".join(failed), now)
        return Readiness(False, c.REASON_RESTART_FAILED, "; ".join(failed))
    parts = []
    if restarted or late:
        parts.append("restarted " + ", ".join(restarted + late) + f" at {format_time(now)}")
    if st.pending_restarts:
        waiting = [f"{o.kind} {o.name} until {format_time(o.due_at)}" for o in st.pending_restarts]
        parts.append("restart deferred (restarted recently): " + ", ".join(waiting))
        return Readiness(True, c.REASON_RESTART_DEFERRED, "; ".join(parts))
    return Readiness(True, c.REASON_RESTARTED, "; ".join(parts))


def _failure_message(exc: errors.AutoTekError) -> str:
    if isinstance(exc, errors.InvalidClient):
        return exc.message + ". AutoTek's checklist: " + "; ".join(c.TROUBLESHOOTING_HINTS)
    return exc.message


def _look(st: CredentialState, spec: CredentialSpec, owner: Owner, ns: str, kube: Kube) -> Any:
    """The target Secret in ``ns`` as it is (read only when there is no fresh copy); raises when
    this credential must not write it (TargetConflict, TargetNotFound)."""
    t = st.targets[ns]
    target = t.body
    if target is UNKNOWN or (isinstance(target, Written) and st.token is None):
        target = trim_secret(kube.get_secret(ns, spec.target.name))
        t.body = target
    if target is None and spec.target.creation_policy == CREATION_MERGE:
        raise errors.TargetNotFound(
            f"Secret {spec.target.name} does not exist; creationPolicy Merge writes only into an existing Secret"
        )
    if not isinstance(target, Written):
        check_target(target, spec, owner)
    return target


Outcome = tuple[Any, errors.AutoTekError | None]


def _each(deps: Deps, namespaces: list[str], fn: Callable[[str], Any]) -> dict[str, Outcome]:
    """``fn`` for every namespace (concurrently on ``deps.fan_out``), each failure kept to its own."""

    def one(ns: str) -> Outcome:
        try:
            return fn(ns), None
        except errors.AutoTekError as exc:
            return None, exc

    if deps.fan_out is None or len(namespaces) < 2:
        return {ns: one(ns) for ns in namespaces}
    return dict(zip(namespaces, deps.fan_out.map(one, namespaces), strict=True))


def _namespace_failed(t: NamespaceTarget, exc: errors.AutoTekError, now: datetime, deps: Deps) -> None:
    """Record a failure in one namespace: that namespace alone backs off."""
    if isinstance(exc, errors.NamespaceGone):
        # Deleted or Terminating since the selection was computed: skipped quietly, not a failure.
        t.reason, t.message, t.attempts, t.gone = None, "", 0, True
        t.retry_at = now + timedelta(seconds=c.NAMESPACE_GONE_RECHECK_SECONDS)
        return
    t.attempts += 1
    refused = isinstance(exc, errors.TargetConflict | errors.TargetNotFound)
    t.reason = exc.reason if refused else c.REASON_WRITE_FAILED
    t.message = exc.message
    delay = scheduling.backoff_delay(exc.retry_class, t.attempts, deps.rand, exc.retry_after)
    t.retry_at = now + timedelta(seconds=max(delay, scheduling.FLOOR_SECONDS)) if delay is not None else None


def _look_all(st: CredentialState, spec: CredentialSpec, owner: Owner, deps: Deps, now: datetime) -> dict[str, Any]:
    """The target Secret of every namespace to write this pass: the namespaced kind's own (a
    refusal raises, as for the whole credential); for the cluster kind each selected namespace
    that is not backing off, a refusal recorded for that namespace only."""
    if not st.cluster:
        st.target(st.namespace)
        return {st.namespace: _look(st, spec, owner, st.namespace, deps.kube)}
    todo = []
    for ns in sorted(st.selected):
        t = st.target(ns)
        older = st.yielded.get(ns)
        if older is not None:
            if t.reason != c.REASON_TARGET_CONFLICT or t.retry_at is not None:
                t.attempts += 1
            t.reason, t.retry_at = c.REASON_TARGET_CONFLICT, None  # until the runtime sees a change
            t.message = f"Secret {spec.target.name} is kept by the older {c.CLUSTER_KIND} {older}"
            continue
        if t.waiting(now):
            continue  # this namespace's own backoff; a change to its Secret clears it
        todo.append(ns)
    looked: dict[str, Any] = {}
    for ns, (target, exc) in _each(deps, todo, lambda ns: _look(st, spec, owner, ns, deps.kube)).items():
        if exc is not None:
            _namespace_failed(st.targets[ns], exc, now, deps)
        else:
            looked[ns] = target
    return looked


def _first(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _adopt(
    st: CredentialState, spec: CredentialSpec, owner: Owner, looked: Mapping[str, Any], now: datetime, deps: Deps
) -> bool:
    """After a restart: hold the token a Secret of ours holds, if it is still valid (the latest one
    when several namespaces hold different ones), instead of asking for a new one."""
    if st.token is not None:
        return False
    found: list[tuple[HeldToken, str]] = []
    for ns, target in looked.items():
        if target is None or isinstance(target, Written) or not is_ours_or_merged(target, spec, owner):
            continue
        held = held_from_secret(target, owner)
        if held is not None and held.valid(now):
            found.append((held, ns))
    if not found:
        return False
    adopted, ns = max(found, key=lambda f: (f[0].expires_at, f[1]))
    st.token = replace(adopted, generation=st.handled_generation, client_version=st.issued_client_version)
    if st.status.get("expiresAt") != format_time(adopted.expires_at):
        # The Secret is newer than the status (a crash between the two writes): trust it.
        lifetime = (adopted.expires_at - adopted.refreshed_at).total_seconds()
        st.next_refresh = scheduling.refresh_time(adopted.refreshed_at, lifetime, spec.refresh, deps.rand)
    log.debug(
        "%s: resumed: holding the token in Secret %s/%s, valid until %s, next refresh %s",
        st.label(),
        ns,
        spec.target.name,
        format_time(adopted.expires_at),
        fmt(st.next_refresh),
    )
    return True


@dataclass(frozen=True)
class NamespaceCounts:
    """A ClusterAutoTekCredential's namespaces after a pass."""

    selected: int
    provisioned: int
    #: (namespace, reason, message), sorted by namespace.
    failed: tuple[tuple[str, str, str], ...]

    def status(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "provisioned": self.provisioned,
            "failed": len(self.failed),
            "summary": f"{self.provisioned}/{self.selected}",
        }

    def failed_status(self) -> list[dict[str, str]] | None:
        """status.failedNamespaces: the first MAX_FAILED_NAMESPACES, by name."""
        listed = self.failed[: c.MAX_FAILED_NAMESPACES]
        return [{"namespace": ns, "reason": r, "message": m} for ns, r, m in listed] or None

    def describe(self, first: int = 5) -> str:
        shown = ", ".join(f"{ns} ({r})" for ns, r, _ in self.failed[:first])
        more = f" and {len(self.failed) - first} more" if len(self.failed) > first else ""
        return f"{len(self.failed)} of {self.selected} selected namespaces not provisioned: {shown}{more}"


def namespace_counts(st: CredentialState, now: datetime) -> NamespaceCounts:
    provisioned = gone = 0
    failed = []
    token = st.token if st.token is not None and st.token.valid(now) else None
    for ns in sorted(st.selected):
        t = st.targets.get(ns)
        if t is None:
            continue
        if t.gone:
            gone += 1  # deleted or Terminating: no longer counted as selected
        elif t.reason is not None:
            failed.append((ns, t.reason, t.message))
        elif token is not None and isinstance(t.body, Written) and t.body.token == token:
            provisioned += 1
    return NamespaceCounts(len(st.selected) - gone, provisioned, tuple(failed))


def _check_client_namespace(spec: CredentialSpec, deps: Deps) -> None:
    ns = spec.client_secret_ref.namespace
    if ns not in deps.cluster_client_namespaces:
        allowed = ", ".join(sorted(deps.cluster_client_namespaces)) or "none"
        raise errors.ClientSecretNamespaceNotAllowed(
            f"spec.clientSecretRef.namespace {ns} is not one the operator reads client Secrets from "
            f"(AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES: {allowed}); the Secret was not read"
        )


def run_pass(st: CredentialState, deps: Deps) -> CredentialState:
    """Bring one credential up to date. Returns the (mutated) state; never raises AutoTekError."""
    now = deps.clock()
    owner = Owner(st.namespace, st.name, st.uid, deps.selector, st.kind)
    spec: CredentialSpec | None = None
    error: errors.AutoTekError | None = None
    target_ok = False  # every Secret this credential writes holds the token
    delivered = False  # at least one Secret holds the token (the namespaced kind: its one Secret)
    issued: str | None = None  # event reason when a new token was written
    had_token = st.token is not None
    template_problems: list[str] = []
    deferred = False  # a new token is wanted, but backoff or the floor says not yet
    nothing_selected = False
    restored: list[str] = []  # Secrets rewritten with the held token (an Event)
    provisioned: list[str] = []  # namespaces new to a cluster credential, given the held token (logged)

    try:
        spec = parse_spec(st.spec, name=st.name, cluster=st.cluster)
        deps.tokens.check_allowed(spec.token_url)
        if st.cluster:
            _check_client_namespace(spec, deps)
            for ns in [ns for ns in st.targets if ns not in st.selected]:
                del st.targets[ns]  # left the selection: its Secret is converge.py's (deletion policy)
            nothing_selected = not st.selected
        looked = _look_all(st, spec, owner, deps, now)
        if _adopt(st, spec, owner, looked, now, deps):
            had_token = True
        reason = new_token_reason(st, now)
        if nothing_selected:
            reason = None  # no token is requested until a namespace is selected
            st.next_refresh = None
        if reason and not st.force_new and st.backoff_until is not None and now < st.backoff_until:
            reason, deferred = None, True  # backing off after a failure; only a change cuts this short
        if reason and st.last_attempt_at is not None:
            floor_at = st.last_attempt_at + timedelta(seconds=scheduling.FLOOR_SECONDS)
            if now < floor_at:
                st.next_refresh = floor_at  # never more than one request per floor interval
                reason, deferred = None, True
        if reason:
            reusable = _reusable(st, spec, now)
            st.last_attempt_at = now
            st.force_new = None
            if st.refresh_request:
                st.handled_refresh_request = st.refresh_request
            log.debug("%s: requesting a token: %s", st.label(), reason)
            try:
                client = _read_client(st, spec, deps.kube)
                token = deps.tokens.request(_token_request(spec, client), reusable)
            except errors.AutoTekError as exc:
                error = exc
            else:
                sent_at = token.sent_at or now
                lifetime = scheduling.clamp_lifetime(token.lifetime)
                st.token = HeldToken(
                    access_token=token.access_token,
                    token_type=token.token_type,
                    scope=token.scope,
                    issued_at=sent_at,
                    expires_at=_floor_seconds(sent_at + timedelta(seconds=lifetime)),
                    refreshed_at=_floor_seconds(deps.clock()),
                    generation=st.generation,
                    client_version=client.version,
                )
                st.next_refresh = scheduling.refresh_time(sent_at, token.lifetime, spec.refresh, deps.rand)
                st.backoff_until = None
                issued = c.EVENT_ROTATED if had_token else c.EVENT_ISSUED
                if token.lifetime_defaulted:
                    _event(
                        deps,
                        st,
                        "Normal",
                        c.EVENT_DEFAULT_LIFETIME,
                        "the token response had no expires_in; assuming spec.refresh.defaultLifetime "
                        f"({int(spec.refresh.default_lifetime)}s)",
                        now,
                    )
        if st.token is not None and st.token.valid(now) and looked:
            held = st.token
            if st.cluster:
                outcomes = _each(
                    deps, sorted(looked), lambda ns: _write_target(ns, spec, owner, looked[ns], held, deps.kube)
                )
            else:  # a refusal or failure is the whole credential's (raised)
                ns = st.namespace
                outcomes = {ns: (_write_target(ns, spec, owner, looked[ns], held, deps.kube), None)}
            wrote_any = False
            for ns, (result, failure) in outcomes.items():
                t = st.targets[ns]
                if failure is not None:
                    _namespace_failed(t, failure, now, deps)
                    continue
                written, wrote = result
                known = t.version is not None  # written by this operator before: a write now restores it
                t.body, t.version = written, written.version
                t.clear_failure()
                wrote_any = wrote_any or wrote
                if wrote and issued is None:
                    (restored if known or not st.cluster else provisioned).append(ns)
            if spec.target.data:
                template_problems = render_templates(spec.target.data, held)[1]
                if wrote_any and template_problems:
                    _event(
                        deps,
                        st,
                        "Warning",
                        c.EVENT_TEMPLATE_ERROR,
                        "left out of Secret " + spec.target.name + ": " + "; ".join(template_problems),
                        now,
                    )
        if st.cluster:
            so_far = namespace_counts(st, now)
            delivered = so_far.provisioned > 0
            target_ok = so_far.selected > 0 and so_far.provisioned == so_far.selected
        else:
            delivered = target_ok = st.namespace in looked and st.token is not None and st.token.valid(now)
        if provisioned:
            log.info(
                "%s: wrote Secret %s with the held token into namespace(s) %s",
                st.label(),
                spec.target.name,
                _first(provisioned),
            )
        if restored and st.token is not None:
            where = f" in namespace(s) {_first(restored)}" if st.cluster else ""
            log.info("%s: restored Secret %s%s with the held token", st.label(), spec.target.name, where)
            _event(
                deps,
                st,
                "Normal",
                c.EVENT_RESTORED,
                f"restored Secret {spec.target.name}{where} with the held token (valid until "
                f"{format_time(st.token.expires_at)})",
                now,
            )
    except errors.AutoTekError as exc:
        error = error or exc

    now_after = deps.clock()
    token_valid = st.token is not None and st.token.valid(now_after)
    counts = namespace_counts(st, now_after) if st.cluster else None

    if issued and delivered and st.token is not None:
        verb = "rotated the token" if issued == c.EVENT_ROTATED else "issued a token"
        where = f" in {counts.provisioned}/{counts.selected} namespaces" if counts is not None else ""
        log.info(
            "%s: %s into Secret %s%s, valid until %s",
            st.label(),
            verb,
            spec.target.name if spec else "?",
            where,
            format_time(st.token.expires_at),
        )
        _event(
            deps,
            st,
            "Normal",
            issued,
            f"{verb} into Secret {spec.target.name if spec else '?'}{where}; valid until "
            f"{format_time(st.token.expires_at)}, next refresh {fmt(st.next_refresh)}",
            now,
        )

    if counts is not None:
        # A refusal is announced at once; an API error once it has failed twice in a row (a first
        # one is often a namespace just turning Terminating, which the namespace watch then drops).
        current = frozenset(
            (ns, r) for ns, r, _ in counts.failed if r != c.REASON_WRITE_FAILED or st.targets[ns].attempts > 1
        )
        if current - st.reported_failures:
            message = counts.describe() + ". First: " + counts.failed[0][2]
            log.warning("%s: %s", st.label(), message)
            _event(deps, st, "Warning", c.REASON_NAMESPACES_NOT_PROVISIONED, message, now)
        st.reported_failures = current

    restart: Readiness | None = None
    rotated = issued == c.EVENT_ROTATED and delivered
    if spec is None:
        st.pending_restarts = ()  # a spec that does not parse names no workloads
    elif (rotated and spec.rollout_restart_targets) or st.pending_restarts:
        restart = _rollout_restart(st, spec, deps, now, rotated)

    if error is None and deferred:
        pass  # nothing was tried: the failure record stands
    elif error is None:
        st.failed_attempts = 0
        st.last_failure_time = None
        st.last_failure_reason = None
        st.expired_reported = False
    else:
        st.failed_attempts += 1
        st.last_failure_time = now
        st.last_failure_reason = error.reason
        delay = scheduling.backoff_delay(error.retry_class, st.failed_attempts, deps.rand, error.retry_after)
        expires = st.token.expires_at if token_valid and st.token is not None else None
        retry_at = scheduling.next_attempt(now, st.last_attempt_at, delay, expires)
        st.next_refresh = retry_at
        st.backoff_until = retry_at
        log.warning(
            "%s: %s: %s (attempt %d, next try %s)",
            st.label(),
            error.reason,
            error.message,
            st.failed_attempts,
            fmt(retry_at) or "after a change",
        )
        _event(deps, st, "Warning", error.reason, _failure_message(error), now)

    # Readiness: True exactly while the Secrets hold our unexpired token.
    target_refused = isinstance(error, errors.TargetConflict | errors.TargetNotFound)
    if counts is not None and error is None and nothing_selected:
        readiness = Readiness(
            False,
            c.REASON_NO_NAMESPACES_SELECTED,
            "no namespace is selected (spec.namespaceSelector, spec.namespaces); no token is requested until one is",
        )
    elif counts is not None and token_valid and counts.failed and not isinstance(error, errors.InvalidSpec):
        assert st.token is not None
        message = f"{counts.describe()}; token valid until {format_time(st.token.expires_at)}"
        if error is not None:
            message += f"; refresh failing ({error.reason}): {error.message}"
        readiness = Readiness(False, c.REASON_NAMESPACES_NOT_PROVISIONED, message)
    elif token_valid and (target_ok or (error is not None and not target_refused and st.target_version is not None)):
        assert st.token is not None
        message = f"token valid until {format_time(st.token.expires_at)}"
        if counts is not None:
            message += f"; Secret {spec.target.name if spec else '?'} in {counts.provisioned} namespaces"
        if template_problems:
            message += f"; template keys left out: {'; '.join(template_problems)}"
        if error is not None:
            message += f"; refresh failing ({error.reason}): {error.message}"
        readiness = Readiness(True, c.REASON_TOKEN_ISSUED, message)
    elif st.token is not None and not token_valid and had_token:
        detail = f"; refresh failing ({error.reason}): {error.message}" if error else ""
        readiness = Readiness(False, c.REASON_EXPIRED, f"token expired at {format_time(st.token.expires_at)}{detail}")
        if not st.expired_reported:
            st.expired_reported = True
            _event(deps, st, "Warning", c.EVENT_EXPIRED, readiness.message, now)
    elif error is not None:
        readiness = Readiness(False, error.reason, error.message)
    elif deferred and st.last_failure_reason:
        previous = find_condition(st.status.get("conditions"), c.CONDITION_READY) or {}
        readiness = Readiness(False, st.last_failure_reason, str(previous.get("message", "")))
    else:
        readiness = Readiness(False, c.REASON_PENDING, "waiting for the first token")

    tok = st.token
    desired_status: dict[str, Any] = {
        "observedGeneration": st.generation,
        "conditions": _conditions(st, spec, readiness, restart, now_after),
        "secretName": spec.target.name if spec else st.status.get("secretName"),
        "tokenType": tok.token_type if tok else None,
        "lastRefreshTime": fmt(tok.refreshed_at) if tok else None,
        "expiresAt": fmt(tok.expires_at) if tok else None,
        "nextRefreshTime": fmt(st.next_refresh),
        "lastFailureTime": fmt(st.last_failure_time),
        "lastFailureReason": st.last_failure_reason,
        "failedAttempts": st.failed_attempts,
        "clientSecretVersion": tok.client_version if tok else None,
        "lastRefreshRequest": st.handled_refresh_request,
        "pendingRestarts": _owed_to_status(st.pending_restarts),
    }
    if counts is not None:
        desired_status["namespaces"] = counts.status()
        desired_status["failedNamespaces"] = counts.failed_status()
    if tok is not None:
        st.handled_generation = tok.generation
        st.issued_client_version = tok.client_version
    patch = status_patch(st.status, desired_status)
    if patch:
        try:
            if st.cluster:
                deps.kube.patch_cluster_credential_status(st.name, patch)
            else:
                deps.kube.patch_credential_status(st.namespace, st.name, patch)
        except errors.AutoTekError as exc:
            log.warning("%s: could not update status: %s", st.label(), exc.message)
            # Keep the old view so that the next pass tries the patch again.
            if st.next_refresh is None or st.next_refresh > now_after + timedelta(seconds=30):
                st.next_refresh = now_after + timedelta(seconds=30)
        else:
            st.status = {k: v for k, v in {**st.status, **desired_status}.items() if v is not None}
    return st


def _conditions(
    st: CredentialState,
    spec: CredentialSpec | None,
    readiness: Readiness,
    restart: Readiness | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Ready, and RolloutRestart while the spec lists restart targets (kept between rotations)."""
    previous = st.status.get("conditions") or []
    conditions = [ready_condition(previous, readiness, now=now, generation=st.generation)]
    wants_restart = spec.rollout_restart_targets if spec is not None else st.status_has(c.CONDITION_ROLLOUT)
    if wants_restart:
        if restart is None:
            kept = find_condition(previous, c.CONDITION_ROLLOUT)
            if kept is not None:
                conditions.append(dict(kept))
                return conditions
            restart = Readiness(
                True, c.REASON_RESTART_PENDING, "the listed workloads are restarted after each rotation"
            )
        conditions.append(
            ready_condition(previous, restart, now=now, generation=st.generation, kind=c.CONDITION_ROLLOUT)
        )
    return conditions


def is_ours_or_merged(target: Mapping[str, Any], spec: CredentialSpec, owner: Owner) -> bool:
    if spec.target.creation_policy == CREATION_MERGE:
        return True  # check_target already refused Secrets claimed by another credential
    return is_ours(target, owner)


def cleanup_deleted(body: Mapping[str, Any], deps: Deps) -> None:
    """Apply deletionPolicy Delete after an AutoTekCredential is gone (best effort).

    Owner: delete the Secret we own (garbage collection does the same through the owner
    reference; doing it here also covers a cluster without it). Merge: remove our keys."""
    meta = body.get("metadata") or {}
    owner = Owner(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""))
    try:
        spec = parse_spec(body.get("spec"), name=owner.name)
    except errors.InvalidSpec:
        return
    if spec.target.deletion_policy != DELETION_DELETE:
        return
    try:
        target = deps.kube.get_secret(owner.namespace, spec.target.name)
        if target is None:
            return
        if spec.target.creation_policy == CREATION_MERGE:
            if ((target.get("metadata") or {}).get("annotations") or {}).get(c.ANN_CREDENTIAL) == owner.name:
                deps.kube.patch_secret(owner.namespace, spec.target.name, unmerge_patch(target, spec))
        elif is_ours(target, owner):
            deps.kube.delete_secret(owner.namespace, spec.target.name, uid=target["metadata"].get("uid"))
        log.info("%s/%s: deleted; cleaned up Secret %s", owner.namespace, owner.name, spec.target.name)
    except Conflict:
        # Changed since it was read: the next complete list looks at it again (converge.py).
        log.warning(
            "%s/%s: Secret %s changed during its cleanup; left for now", owner.namespace, owner.name, spec.target.name
        )
    except errors.AutoTekError as exc:
        log.warning(
            "%s/%s: cleanup of Secret %s failed: %s", owner.namespace, owner.name, spec.target.name, exc.message
        )
