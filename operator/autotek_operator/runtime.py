"""One scheduler for all credentials: a heap of due times, a bounded worker pool.

Idle credentials cost nothing but a heap entry: no task, thread or timer per credential, and
no wake-up until the earliest due time. Watch events (credentials, Secrets, namespaces) only
update in-memory state and move due times; the blocking work of a pass (Kubernetes API, token
endpoint) runs in a fixed-size thread pool, one pass per credential at a time.

Both kinds go through the same state, indexes and pass. A ClusterAutoTekCredential has the key
("", name); the runtime keeps which namespaces its selector selects (from the namespace watch),
which of them an older cluster credential keeps the Secret in, and indexes its target Secret in
every one of them, so that a Secret event or a namespace entering the selection schedules a pass
that only writes (no token request while the held token is good). A namespace that leaves the
selection is, for that namespace, a credential that is gone: converge.py's rule handles it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from . import constants as c
from . import converge, metrics
from .errors import AutoTekError, InvalidSpec
from .kube import Conflict
from .reconcile import Deps, cleanup_deleted, run_pass
from .spec import NamespaceSelection, parse_spec
from .state import UNKNOWN, CredentialState
from .status import find_condition
from .target import trim_secret, unmerge_patch

log = logging.getLogger("autotek_operator")

Key = tuple[str, str]
Change = Callable[[CredentialState], bool]

#: After an unexpected error in a pass, try that credential again after this long.
CRASH_RETRY_SECONDS = 60.0
#: A cleanup that failed (an API error, or the Secret changing under it twice) is tried again after this.
CONVERGE_RETRY_SECONDS = 10.0
#: The namespace part of a ClusterAutoTekCredential's key (no namespace is called "").
CLUSTER = ""
#: At most this many early client Secrets are kept (``Runtime.early_clients``), each of at most
#: this many bytes of data: client Secrets are small; TLS, registry and Helm release Secrets are not kept.
EARLY_CLIENTS_MAX = 50_000
EARLY_CLIENT_BYTES = 4096


def _secret_refs(namespace: str, name: str, spec: Mapping[str, Any]) -> tuple[Key | None, Key]:
    """(client Secret, target Secret) keys named by a raw spec, tolerating invalid specs."""
    ref = spec.get("clientSecretRef") if isinstance(spec, Mapping) else None
    client_name = ref.get("name") if isinstance(ref, Mapping) else None
    target = spec.get("target") if isinstance(spec, Mapping) else None
    target_name = target.get("name") if isinstance(target, Mapping) else None
    client_key = (namespace, client_name) if isinstance(client_name, str) else None
    return client_key, (namespace, target_name if isinstance(target_name, str) else name)


class Runtime:
    """Holds every credential's state and runs passes when they are due."""

    def __init__(self, deps: Deps, *, workers: int = 8) -> None:
        self.deps = deps
        self.workers = workers
        self.states: dict[Key, CredentialState] = {}
        self.client_index: dict[Key, set[Key]] = {}
        self.target_index: dict[Key, set[Key]] = {}
        self.refs: dict[Key, tuple[Key | None, frozenset[Key]]] = {}
        #: resourceVersion of every Secret seen on the watch (to spot changes made while down).
        self.secret_versions: dict[Key, str] = {}
        #: Small Opaque Secrets seen (version and data only) while the credentials are still being
        #: listed, before any credential names them: a credential listed after its client Secret
        #: takes it from here instead of a GET. Dropped once every credential list is complete.
        self.early_clients: dict[Key, dict[str, Any]] = {}
        #: Namespaces (None: all) whose Secrets have been listed completely at least once; once
        #: every watched scope is, a Secret missing from ``secret_versions`` is known not to exist.
        self.secret_scopes: set[str | None] = set()
        self.listed_scopes: set[str | None] = set()
        #: Namespaces (None: all) whose credentials have been listed completely at least once.
        self.listed_credential_scopes: set[str | None] = set()
        #: True while a label selector scopes the credential watch: a DELETED event may then mean
        #: "no longer selected", so a deletion is confirmed by a read before anything is cleaned up.
        self.confirm_deletions = False
        #: The operator's marks on every Secret that carries them (no record for other Secrets).
        self.marked: dict[Key, converge.Mark] = {}
        #: Marked Secrets whose cleanup is under way, and (Secret, problem) pairs already logged.
        self._converging: set[Key] = set()
        #: Secrets asked about again while their cleanup ran: looked at again once it is over.
        self._converge_again: set[Key] = set()
        self._reported: set[tuple[Key, str]] = set()
        self.inflight: set[Key] = set()
        self.pending: dict[Key, list[Change]] = {}
        #: Credentials deleted while their pass ran: clean up again once it has finished, since
        #: the pass may have written the target Secret after the first cleanup.
        self._cleanup_after: dict[Key, Mapping[str, Any]] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autotek-worker")
        #: The namespaces' reads and writes of a cluster credential's pass, concurrently; a pool of
        #: their own, so that a pass waiting for them never waits for a pass's worker.
        self._writers: ThreadPoolExecutor | None = None
        if deps.fan_out is None:
            self._writers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autotek-writer")
            deps.fan_out = self._writers
        self._slots: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.passes = 0
        #: Whether this replica runs passes (False while another replica leads).
        self.active = True
        #: Whether ClusterAutoTekCredentials and namespaces are watched (readiness and convergence
        #: then wait for their lists too).
        self.cluster_kind = False
        self.namespaces_listed = False
        self.cluster_listed = False
        #: Every namespace that exists and is not Terminating: its labels (all that is kept of it).
        self.namespace_labels: dict[str, dict[str, str]] = {}
        #: Per ClusterAutoTekCredential: its parsed selection (None: the spec is invalid), the
        #: namespaces it selects now, and those of them where an older one keeps the Secret.
        self.selections: dict[Key, NamespaceSelection | None] = {}
        self.selected: dict[Key, frozenset[str]] = {}
        self.yielded: dict[Key, dict[str, str]] = {}
        self._reach_reported: set[Key] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self.workers)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._loop(), name="autotek-scheduler")

    async def stop(self, grace: float = 20.0) -> None:
        """Stop scheduling; let passes in flight finish (each writes its Secret in one call)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._writers is not None:
            self._writers.shutdown(wait=False, cancel_futures=True)

    def running(self) -> bool:
        """Whether the scheduler loop is alive (started and not ended)."""
        return self._loop_task is not None and not self._loop_task.done()

    def watches_listed(self) -> bool:
        """Whether the credentials and Secrets of every watched namespace (and, with the cluster
        kind, the cluster credentials and the namespaces) have been listed."""
        scopes = self.secret_scopes
        listed = bool(scopes) and scopes <= self.listed_scopes and scopes <= self.listed_credential_scopes
        return listed and self._cluster_lists_complete()

    def _drop_early_clients(self) -> None:
        """Every credential listed: each named Secret is indexed, the early copies are not needed."""
        if self.early_clients and self.secret_scopes <= self.listed_credential_scopes:
            if not self.cluster_kind or self.cluster_listed:
                self.early_clients = {}

    def _keep_early_client(self, skey: Key, version: str, body: Mapping[str, Any]) -> None:
        """Keep (or refresh, or drop) the early copy of a Secret, while credentials are being listed."""
        listing = (
            not self.secret_scopes
            or not self.secret_scopes <= self.listed_credential_scopes
            or (self.cluster_kind and not self.cluster_listed)
        )
        data = body.get("data") or {}
        if (
            listing
            and body.get("type") in (None, "Opaque")
            and sum(len(v) for v in data.values() if isinstance(v, str)) <= EARLY_CLIENT_BYTES
            and (skey in self.early_clients or len(self.early_clients) < EARLY_CLIENTS_MAX)
        ):
            self.early_clients[skey] = {"metadata": {"resourceVersion": version}, "data": dict(data)}
        else:
            self.early_clients.pop(skey, None)  # never an outdated copy

    def _cluster_lists_complete(self) -> bool:
        return not self.cluster_kind or (self.namespaces_listed and self.cluster_listed)

    def set_active(self, active: bool) -> None:
        """Lead (run passes) or follow (only keep watch state warm)."""
        if active == self.active:
            return
        self.active = active
        if active:
            # Take over from what the previous leader stored: every credential gets a pass now,
            # which confirms the Secret and fetches a token only where one is due.
            for key, st in self.states.items():
                st.force_new = self._resume_reason(st)
                self.schedule(key)
            log.info("leading: running passes for %d credentials", len(self.states))
            # What the previous leader may have missed: Secrets of credentials gone meanwhile.
            for scope in self.listed_scopes & self.listed_credential_scopes:
                self.converge_scope(scope)
        else:
            log.info("following: another replica runs the passes")
        if self._wake is not None:
            self._wake.set()

    def credential_samples(self) -> list[metrics.CredentialSample]:
        """The per-credential metric values (called from the metrics server's thread). A
        follower reports none: the leader does, and two sources would disagree."""
        if not self.active:
            return []
        states = tuple(self.states.values())  # a copy taken without running Python code
        return [_sample(st) for st in states if st.status or st.token is not None]

    def cluster_namespace_samples(self) -> list[metrics.ClusterNamespacesSample]:
        """Per ClusterAutoTekCredential: (name, selected, provisioned, failed), as in its status."""
        if not self.active:
            return []
        out = []
        for st in tuple(self.states.values()):
            counts = st.status.get("namespaces") if st.cluster else None
            if isinstance(counts, Mapping):
                values = [counts.get(k) for k in ("selected", "provisioned", "failed")]
                selected, provisioned, failed = (float(v) if isinstance(v, int) else 0.0 for v in values)
                out.append((st.name, selected, provisioned, failed))
        return out

    def stats(self) -> dict[str, int]:
        return {
            "active": int(self.active),
            "credentials": len(self.states),
            "scheduled": len(self._due),
            "inflight": len(self.inflight),
            "passes": self.passes,
        }

    # -- scheduling --------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.deps.clock()

    def schedule(self, key: Key, when: datetime | None = None) -> None:
        """Run a pass for ``key`` at ``when`` (now if None), unless one is due sooner."""
        ts = (when or self._now()).timestamp()
        current = self._due.get(key)
        if current is not None and current <= ts:
            return
        self._due[key] = ts
        heapq.heappush(self._heap, (ts, next(self._seq), key))
        if self._wake is not None and (not self._heap or self._heap[0][0] >= ts):
            self._wake.set()

    def due_at(self, key: Key) -> datetime | None:
        ts = self._due.get(key)
        return datetime.fromtimestamp(ts, tz=self._now().tzinfo) if ts is not None else None

    async def _loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            now = self._now().timestamp()
            while self.active and self._heap and self._heap[0][0] <= now:
                ts, _, key = heapq.heappop(self._heap)
                if self._due.get(key) != ts:
                    continue  # superseded by an earlier or later schedule
                del self._due[key]
                if key not in self.states:
                    continue
                if key[0] == CLUSTER and not self.namespaces_listed:
                    continue  # every cluster credential gets a pass once the namespaces are listed
                if key in self.inflight:
                    self.pending.setdefault(key, []).append(lambda st: True)
                    continue
                await self._slots.acquire()
                self.inflight.add(key)
                task = asyncio.create_task(self._run(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            timeout = max(0.0, self._heap[0][0] - self._now().timestamp()) if self._heap and self.active else None
            self._wake.clear()
            try:
                # asyncio.timeout, not wait_for: wait_for can swallow a cancellation that lands
                # together with a wake-up, and stop() would then wait for ever.
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _run(self, key: Key) -> None:
        assert self._slots is not None
        live = self.states.get(key)
        try:
            if live is None:
                return
            snapshot = live.copy_for_pass()
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, run_pass, snapshot, self.deps)
            self.passes += 1
            if self.states.get(key) is not live:
                deleted = self._cleanup_after.pop(key, None)
                if deleted is not None:
                    await loop.run_in_executor(self._executor, self._cleanup, deleted)
                if key[0] == CLUSTER:
                    self.converge_scope(None)  # the pass may have written after the deletion's convergence
                return  # deleted (or deleted and re-created) while the pass ran
            self.states[key] = result
            rerun = False
            for change in self.pending.pop(key, []):
                rerun = change(result) or rerun
            if rerun:
                self.schedule(key)
            due = result.next_due()
            if due is not None:
                self.schedule(key, due)
        except Exception:
            log.exception(
                "%s/%s: unexpected error in a pass; retrying in %ds", key[0], key[1], int(CRASH_RETRY_SECONDS)
            )
            if key in self.states:
                self.schedule(key, self._now() + timedelta(seconds=CRASH_RETRY_SECONDS))
        finally:
            self.inflight.discard(key)
            if key not in self.states:
                self.pending.pop(key, None)
            self._slots.release()

    def _change(self, key: Key, change: Change, what: str) -> None:
        """Apply an event's change now, or after the pass in flight; schedule if it asks."""
        if key in self.inflight:
            log.debug("%s/%s: %s during a pass; looking again afterwards", key[0], key[1], what)
            self.pending.setdefault(key, []).append(change)
            return
        st = self.states.get(key)
        if st is not None and change(st):
            log.debug("%s/%s: %s; pass scheduled", key[0], key[1], what)
            self.schedule(key)

    # -- convergence on a complete list ---------------------------------------------------------

    def converge_scope(self, namespace: str | None) -> None:
        """Compare the Secrets with the operator's marks in ``namespace`` (None: all) with the live
        credentials, and clean up after those that are gone (confirmed by a read, on a worker)."""
        if not self.active or not self.running():
            return  # the leader converges; a new leader does when it takes over
        if not self._cluster_lists_complete():
            return  # a cluster credential's selection is not known yet: it might want any Secret
        wanted = self._wanted()
        todo = []
        for action in converge.converge(self.marked, wanted, self.deps.selector, namespace):
            if action.action == converge.BAD_INPUT:
                if (action.secret, action.why) not in self._reported:
                    self._reported.add((action.secret, action.why))
                    log.warning(
                        "Secret %s/%s carries this operator's marks, but %s; left alone",
                        action.secret[0],
                        action.secret[1],
                        action.why,
                    )
                continue
            if action.secret not in self._converging:
                self._converging.add(action.secret)
                todo.append(action)
            else:
                self._converge_again.add(action.secret)  # what the running cleanup read may be older
        if not todo:
            return
        loop = asyncio.get_running_loop()

        async def clean() -> list[converge.Action]:
            return await loop.run_in_executor(self._executor, self._clean_orphans, todo, wanted)

        def done(fut: asyncio.Task[list[converge.Action]]) -> None:
            again = set()
            for action in todo:
                self._converging.discard(action.secret)
                if action.secret in self._converge_again:
                    self._converge_again.discard(action.secret)
                    again.add(action.secret[0])
            failed = fut.result() if not fut.cancelled() and fut.exception() is None else todo
            if failed:  # try again soon (a complete list may not come for a long time)
                loop.call_later(CONVERGE_RETRY_SECONDS, self.converge_scope, namespace)
            for ns in sorted(again):
                loop.call_soon(self.converge_scope, ns)

        task = asyncio.create_task(clean())
        task.add_done_callback(done)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wanted(self) -> dict[Key, frozenset[str]]:
        """converge.py's input: each live credential and the namespaces it wants its Secret in."""
        out: dict[Key, frozenset[str]] = {}
        everywhere: frozenset[str] | None = None
        for key in self.states:
            if key[0] != CLUSTER:
                out[key] = frozenset((key[0],))
            elif self.selections.get(key) is None:
                # An invalid spec selects nothing it can prove: keep every Secret it has.
                everywhere = everywhere or frozenset(ns for ns, _ in self.marked)
                out[key] = everywhere
            else:
                out[key] = self.selected.get(key, frozenset()) - self.yielded.get(key, {}).keys()
        return out

    def _clean_orphans(
        self, actions: list[converge.Action], wanted: Mapping[Key, frozenset[str]] | None = None
    ) -> list[converge.Action]:
        """Confirm each credential is gone (or, for a cluster credential, no longer wants that
        namespace), then apply the recorded policy (worker thread); the actions that failed."""
        failed = []
        wanted = wanted or {}
        for action in actions:
            if not self._clean_orphan(action, wanted):
                failed.append(action)
        return failed

    def _clean_orphan(self, action: converge.Action, wanted: Mapping[Key, frozenset[str]]) -> bool:
        """One Secret of ``_clean_orphans``; False if it must be tried again later. A Secret that
        changed between the read and the write (409) is read and decided again once at once."""
        for attempt in range(2):
            done = self._clean_orphan_once(action, wanted, last=attempt == 1)
            if done is not None:
                return done
        return False

    def _clean_orphan_once(
        self, action: converge.Action, wanted: Mapping[Key, frozenset[str]], last: bool
    ) -> bool | None:
        kube = self.deps.kube
        assert action.credential is not None
        (ns, name), (secret_ns, secret_name) = action.credential, action.secret
        try:
            live: dict[Key, frozenset[str]] = {}
            if ns == CLUSTER:
                if kube.get_cluster_credential(name) is not None:
                    if action.credential not in wanted:
                        log.debug(
                            "%s %s: exists; Secret %s/%s left as it is",
                            c.CLUSTER_KIND,
                            name,
                            secret_ns,
                            secret_name,
                        )
                        return True
                    live = {action.credential: wanted[action.credential]}
            elif kube.get_credential(ns, name) is not None:
                log.debug("%s/%s: still exists; Secret %s left as it is", ns, name, secret_name)
                return True
            secret = kube.get_secret(secret_ns, secret_name)
            mark = converge.mark_of(secret) if secret is not None else None
            if secret is None or mark is None:
                log.debug("Secret %s/%s: gone or no longer marked; nothing to clean up", secret_ns, secret_name)
                return True
            again = converge.decide(action.secret, mark, live, self.deps.selector)
            if again.action != action.action or again.credential != action.credential:
                log.debug(
                    "Secret %s/%s: changed since it was seen (%s); left to the next look",
                    secret_ns,
                    secret_name,
                    again.why,
                )
                return True  # changed since it was seen: the next look decides
            if action.action == converge.UNMERGE:
                kube.patch_secret(secret_ns, secret_name, unmerge_patch(secret))
                what = "removed its keys and annotations from"
            else:
                kube.delete_secret(secret_ns, secret_name, uid=(secret.get("metadata") or {}).get("uid"))
                what = "deleted"
            metrics.observe_orphan_cleaned(action.action)
            if live:
                log.info(
                    "%s %s: no longer selects namespace %s; %s Secret %s (%s)",
                    c.CLUSTER_KIND,
                    name,
                    secret_ns,
                    what,
                    secret_name,
                    action.why,
                )
            elif ns == CLUSTER:
                log.info(
                    "%s %s: deleted; %s Secret %s/%s (%s)",
                    c.CLUSTER_KIND,
                    name,
                    what,
                    secret_ns,
                    secret_name,
                    action.why,
                )
            else:
                log.info(
                    "%s/%s: deleted while no operator watched; %s Secret %s (%s)",
                    ns,
                    name,
                    what,
                    secret_name,
                    action.why,
                )
        except Conflict:
            log.debug(
                "Secret %s/%s: changed while being cleaned up; %s",
                secret_ns,
                secret_name,
                f"again in {int(CONVERGE_RETRY_SECONDS)}s" if last else "reading it again",
            )
            return False if last else None
        except AutoTekError as exc:
            log.warning("%s/%s: cleanup of Secret %s failed: %s; retrying later", ns, name, secret_name, exc.message)
            return False
        return True

    # -- indexes -----------------------------------------------------------------------------

    def _refs_for(self, key: Key, spec: Mapping[str, Any]) -> tuple[Key | None, frozenset[Key]]:
        """(client Secret, target Secrets) of a credential: a cluster credential's client Secret only
        if its namespace is allowed (else it is never read), its target in every selected namespace."""
        if key[0] != CLUSTER:
            client_key, target_key = _secret_refs(key[0], key[1], spec)
            return client_key, frozenset((target_key,))
        ref = spec.get("clientSecretRef") if isinstance(spec, Mapping) else None
        client_ns = ref.get("namespace") if isinstance(ref, Mapping) else None
        client_name = ref.get("name") if isinstance(ref, Mapping) else None
        allowed = isinstance(client_ns, str) and client_ns in self.deps.cluster_client_namespaces
        client = (str(client_ns), client_name) if allowed and isinstance(client_name, str) else None
        target_name = _secret_refs(CLUSTER, key[1], spec)[1][1]
        return client, frozenset((ns, target_name) for ns in self.selected.get(key, ()))

    def _index(self, key: Key, spec: Mapping[str, Any]) -> None:
        refs = self._refs_for(key, spec)
        old = self.refs.get(key)
        if old == refs:
            return
        self._unindex(key)
        self.refs[key] = refs
        client_key, target_keys = refs
        if client_key is not None:
            self.client_index.setdefault(client_key, set()).add(key)
        for target_key in target_keys:
            self.target_index.setdefault(target_key, set()).add(key)

    def _unindex(self, key: Key) -> None:
        old = self.refs.pop(key, None)
        if old is None:
            return
        for index, skeys in ((self.client_index, (old[0],)), (self.target_index, old[1])):
            for skey in skeys:
                if skey is not None and skey in index:
                    index[skey].discard(key)
                    if not index[skey]:
                        del index[skey]

    # -- events ------------------------------------------------------------------------------

    def on_credential_events(self, batch: list[tuple[str | None, dict[str, Any]]]) -> None:
        for event_type, body in batch:
            self.on_credential_event(event_type, body)

    def on_credentials_listed(self, namespace: str | None, keys: set[Key]) -> None:
        """A complete list of the selected credentials in ``namespace`` (None: all). One held but
        not listed was deleted or stopped being selected while the watch was down: forget it
        (an owned Secret of a deleted credential is garbage-collected through its owner reference)."""
        gone = [
            k for k in self.states if k[0] != CLUSTER and (namespace is None or k[0] == namespace) and k not in keys
        ]
        for key in gone:
            log.info("%s/%s: no longer listed (deleted, or no longer selected); forgotten", key[0], key[1])
            self._forget(key)
        self.listed_credential_scopes.add(namespace)
        self._drop_early_clients()
        if namespace in self.listed_scopes:
            self.converge_scope(namespace)

    # -- ClusterAutoTekCredentials and namespaces ---------------------------------------------------

    def on_cluster_credential_events(self, batch: list[tuple[str | None, dict[str, Any]]]) -> None:
        for event_type, body in batch:
            self.on_credential_event(event_type, body, kind=c.CLUSTER_KIND)

    def on_cluster_credentials_listed(self, _scope: str | None, keys: set[Key]) -> None:
        """A complete list of the selected cluster credentials: one held but not listed is gone
        (what it wrote is handled by the convergence that follows)."""
        for key in [k for k in self.states if k[0] == CLUSTER and (CLUSTER, k[1]) not in keys]:
            log.info("%s %s: no longer listed (deleted, or no longer selected); forgotten", c.CLUSTER_KIND, key[1])
            self._forget(key)
        self._reconsider_yields()
        self.cluster_listed = True
        self._drop_early_clients()
        self._converge_listed()

    def on_namespace_events(self, batch: list[tuple[str | None, dict[str, Any]]]) -> None:
        changed: set[str] = set()
        for event_type, body in batch:
            meta = body.get("metadata") or {}
            name = meta.get("name", "")
            phase = (body.get("status") or {}).get("phase")
            if event_type != "DELETED" and not meta.get("deletionTimestamp") and phase != "Terminating":
                labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
                if self.namespace_labels.get(name) != labels:
                    self.namespace_labels[name] = labels
                    changed.add(name)
            elif self.namespace_labels.pop(name, None) is not None:
                changed.add(name)  # deleted or Terminating: skipped quietly from now on
        if changed:
            self._namespaces_changed(changed)

    def on_namespaces_listed(self, _scope: str | None, keys: set[Key]) -> None:
        names = {k[1] for k in keys}
        for name in [n for n in self.namespace_labels if n not in names]:
            del self.namespace_labels[name]
        first = not self.namespaces_listed
        self.namespaces_listed = True
        self._namespaces_changed(None)
        if first:
            for key in [k for k in self.states if k[0] == CLUSTER]:
                self.schedule(key)
        self._converge_listed()

    def _converge_listed(self) -> None:
        for scope in self.listed_scopes & self.listed_credential_scopes:
            self.converge_scope(scope)

    def _selects(self, key: Key, ns: str) -> bool:
        selection = self.selections.get(key)
        labels = self.namespace_labels.get(ns)
        if selection is None or labels is None or not selection.selects(ns, labels):
            return False
        scopes = self.secret_scopes
        return not scopes or None in scopes or ns in scopes

    def _compute_selected(self, key: Key) -> frozenset[str]:
        selection = self.selections.get(key)
        if selection is None:
            return frozenset()
        out = frozenset(ns for ns, labels in self.namespace_labels.items() if selection.selects(ns, labels))
        scopes = self.secret_scopes
        if scopes and None not in scopes:
            outside = out - scopes
            if outside and key not in self._reach_reported:
                self._reach_reported.add(key)
                log.warning(
                    "%s %s selects namespaces this operator does not watch (e.g. %s); it writes only into the "
                    "watched ones (AUTOTEK_NAMESPACES)",
                    c.CLUSTER_KIND,
                    key[1],
                    ", ".join(sorted(outside)[:3]),
                )
            out = frozenset(ns for ns in out if ns in scopes)
        return out

    def _namespaces_changed(self, names: set[str] | None) -> None:
        """Namespaces appeared, changed labels or went (None: all may have): re-evaluate every
        cluster credential's selection for them, and converge where one left a selection."""
        left: set[str] = set()
        changed = []
        for key in [k for k in self.states if k[0] == CLUSTER]:
            old = self.selected.get(key, frozenset())
            if names is None:
                new = self._compute_selected(key)
            else:
                new = frozenset((old - names) | {n for n in names if self._selects(key, n)})
            if new != old:
                self.selected[key] = new
                left |= old - new
                changed.append(key)
        if not changed:
            return
        self._reconsider_yields(force=changed)
        for ns in sorted(left) if len(left) <= 50 else [None]:
            self.converge_scope(ns)

    def _reconsider_yields(self, force: list[Key] | None = None) -> None:
        """Of cluster credentials aiming at one Secret (namespace and name), the oldest
        (creationTimestamp, then name) keeps it; the others yield that namespace. Then push each
        changed view (selection, yields) into the credential's state and index."""
        claims: dict[Key, list[tuple[str, str]]] = {}
        for key, selected in self.selected.items():
            st = self.states.get(key)
            if st is None:
                continue
            target_name = _secret_refs(CLUSTER, key[1], st.spec)[1][1]
            for ns in selected:
                claims.setdefault((ns, target_name), []).append((st.created, key[1]))
        yielded: dict[Key, dict[str, str]] = {}
        for (ns, _), claimants in claims.items():
            if len(claimants) < 2:
                continue
            claimants.sort()
            for _, name in claimants[1:]:
                yielded.setdefault((CLUSTER, name), {})[ns] = claimants[0][1]
        touched = set(force or ())
        for key in [k for k in self.states if k[0] == CLUSTER]:
            if yielded.get(key, {}) != self.yielded.get(key, {}):
                touched.add(key)
        self.yielded = yielded
        for key in touched:
            st = self.states.get(key)
            if st is not None:
                self._index(key, st.spec)
                self._push_cluster_view(key)

    def _push_cluster_view(self, key: Key) -> None:
        """Give the credential's state the runtime's view of its namespaces; a pass if it changed."""
        selected = self.selected.get(key, frozenset())
        yielded = dict(self.yielded.get(key, {}))
        st0 = self.states.get(key)
        spec = st0.spec if st0 is not None else {}
        target_name = _secret_refs(CLUSTER, key[1], spec)[1][1]
        owner_policy = _creation_policy(spec) == "Owner"

        def change(st: CredentialState) -> bool:
            if st.selected == selected and dict(st.yielded) == yielded:
                return False
            for ns in set(st.yielded) - set(yielded):
                found = st.targets.get(ns)
                if found is not None:
                    found.clear_failure()  # no longer yielded: try it now
            for ns in selected - st.selected:
                t = st.target(ns)
                if t.body is UNKNOWN and owner_policy and self._known_absent((ns, target_name)):
                    t.body = None  # the watch has listed the namespace and not seen it: no GET
            st.selected, st.yielded = selected, yielded
            return True

        self._change(key, change, "selected namespaces changed")

    def _unwanted(self, skey: Key) -> bool:
        """Whether converge.py would act on this marked Secret now (its credential no longer wants it)."""
        mark = self.marked[skey]
        if not converge.valid_name(mark.credential):
            return False
        key = mark.credential_key(skey[0])
        wanted: dict[Key, frozenset[str]] = {}
        if key in self.states:  # as _wanted() has it, for this one credential
            if key[0] != CLUSTER or self.selections.get(key) is None:
                return False
            wanted[key] = self.selected.get(key, frozenset()) - self.yielded.get(key, {}).keys()
        action = converge.decide(skey, mark, wanted, self.deps.selector).action
        return action not in (converge.LEAVE, converge.BAD_INPUT)

    def _known_absent(self, skey: Key) -> bool:
        """Whether the Secret is known not to exist (every watched scope listed, never seen)."""
        return (
            bool(self.secret_scopes) and self.listed_scopes >= self.secret_scopes and skey not in self.secret_versions
        )

    def _cleanup(self, body: Mapping[str, Any]) -> None:
        """Apply the deletion policy of a credential that is gone (worker thread)."""
        if self.confirm_deletions:
            meta = body.get("metadata") or {}
            ns, name = meta.get("namespace", ""), meta.get("name", "")
            try:
                current = self.deps.kube.get_credential(ns, name)
            except AutoTekError as exc:
                log.warning("%s/%s: deletion not confirmed (%s); its Secrets are left alone", ns, name, exc.message)
                return
            if current is not None and (current.get("metadata") or {}).get("uid") == meta.get("uid"):
                log.info("%s/%s: no longer selected by this operator; left as it is", ns, name)
                return
        cleanup_deleted(body, self.deps)

    def on_credential_event(self, event_type: str | None, body: Mapping[str, Any], kind: str = c.KIND) -> None:
        meta = body.get("metadata") or {}
        cluster = kind == c.CLUSTER_KIND
        key = (CLUSTER if cluster else meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self._forget(key)
            if cluster:
                self._reconsider_yields()  # a younger one may take over its namespaces
                # Its Secrets: owned ones go with it (garbage collection), merged ones are unmerged
                # by the convergence, after a read confirms it is gone.
                self.converge_scope(None)
                return
            if not self.active:
                return  # the leader cleans up
            if key in self.inflight:
                self._cleanup_after[key] = body
            task = asyncio.get_running_loop().run_in_executor(self._executor, self._cleanup, body)
            self._tasks.add(asyncio.ensure_future(task))
            return
        if meta.get("deletionTimestamp"):
            return
        st = self.states.get(key)
        spec = body.get("spec") or {}
        if cluster:
            self.selections[key] = _selection_of(key[1], spec)
        if not self.active:
            # A follower mirrors what the leader stores, so that it can take over exactly.
            self.states[key] = CredentialState.from_body(body, kind)
            self._index(key, spec)
            if cluster:
                self.selected[key] = self._compute_selected(key)
                self._reconsider_yields(force=[key])
            self.schedule(key)
            return
        if st is None or st.uid != meta.get("uid", st.uid):
            if st is not None:
                self._forget(key)
                if cluster:
                    self.selections[key] = _selection_of(key[1], spec)
            st = CredentialState.from_body(body, kind)
            self.states[key] = st
            self._index(key, spec)
            client_key = self.refs[key][0]
            if client_key is not None and client_key in self.early_clients:
                st.client_body = self.early_clients[client_key]  # delivered by the list: no GET
            st.force_new = self._resume_reason(st)
            if cluster:
                self.selected[key] = self._compute_selected(key)
                self._reconsider_yields(force=[key])
            else:
                st.target_body = self._known_target(key, spec)
            self.schedule(key)
            return
        old_target = _secret_refs(key[0], key[1], st.spec)[1][1]
        new_target = _secret_refs(key[0], key[1], spec)[1][1]
        if cluster:
            self.selected[key] = self._compute_selected(key)
            self._reconsider_yields(force=[key])
        self._index(key, spec)

        def change(state: CredentialState) -> bool:
            old_generation, old_request = state.generation, state.refresh_request
            state.update_from_body(body)
            if state.generation != old_generation:
                state.force_new = "the spec changed"
                state.client = None
                state.client_body = UNKNOWN  # the spec may name other Secrets now
                if not cluster:
                    state.target_body = self._known_target(key, spec)
                elif old_target != new_target:
                    state.targets.clear()
                else:
                    for t in state.targets.values():
                        t.clear_failure()  # the change may have fixed it
                return True
            if state.refresh_request != old_request and state.refresh_request:
                state.force_new = "a refresh was requested"
                return True
            return False

        self._change(key, change, "credential changed")

    def _known_target(self, key: Key, spec: Mapping[str, Any]) -> Any:
        """None when the target Secret is known not to exist (no GET needed), else UNKNOWN.

        Only for creationPolicy Owner, whose create answers 409 if the watch was behind; Merge
        reports a missing Secret as an error, so it reads the Secret to be sure."""
        target = spec.get("target") if isinstance(spec, Mapping) else None
        policy = target.get("creationPolicy") if isinstance(target, Mapping) else None
        if policy not in (None, "Owner") or not self.secret_scopes or self.listed_scopes != self.secret_scopes:
            return UNKNOWN
        refs = self.refs.get(key)
        if refs is None or any(t in self.secret_versions for t in refs[1]):
            return UNKNOWN
        return None

    def _resume_reason(self, st: CredentialState) -> str | None:
        """Why a credential seen for the first time (new, or after a restart) needs a token now."""
        if not st.status.get("expiresAt"):
            return None  # never issued: the pass fetches one anyway ("no token yet")
        if st.generation != st.handled_generation:
            return "the spec changed"
        if st.refresh_request and st.refresh_request != st.handled_refresh_request:
            return "a refresh was requested"
        refs = self.refs.get(st.key)
        version = self.secret_versions.get(refs[0]) if refs and refs[0] else None
        if version is not None and st.issued_client_version and version != st.issued_client_version:
            return "the client Secret changed"
        return None

    def _forget(self, key: Key) -> None:
        self.states.pop(key, None)
        self._due.pop(key, None)
        self.pending.pop(key, None)
        self._unindex(key)
        if key[0] == CLUSTER:
            self.selections.pop(key, None)
            self.selected.pop(key, None)
            self.yielded.pop(key, None)
            self._reach_reported.discard(key)

    def on_secret_events(self, batch: list[tuple[str | None, dict[str, Any]]]) -> None:
        for event_type, body in batch:
            self.on_secret_event(event_type, body)

    def on_secrets_listed(self, namespace: str | None, keys: set[Key]) -> None:
        """A complete list of the Secrets in ``namespace`` (None: all): those it lacks are gone."""
        gone = [k for k in self.secret_versions if (namespace is None or k[0] == namespace) and k not in keys]
        for skey in gone:
            self.on_secret_event("DELETED", {"metadata": {"namespace": skey[0], "name": skey[1]}})
        self.listed_scopes.add(namespace)
        if namespace in self.listed_credential_scopes:
            self.converge_scope(namespace)

    def on_secret_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        skey = (meta.get("namespace", ""), meta.get("name", ""))
        version = str(meta.get("resourceVersion", ""))
        deleted = event_type == "DELETED"
        if deleted:
            self.secret_versions.pop(skey, None)
            self.marked.pop(skey, None)
            self.early_clients.pop(skey, None)
        else:
            self.secret_versions[skey] = version
            self._keep_early_client(skey, version, body)
            mark = converge.mark_of(body)
            if mark is not None:
                self.marked[skey] = mark
            elif skey in self.marked:
                del self.marked[skey]
        if not self.active:
            return  # the leader reacts; a new leader compares versions when it takes over
        if not deleted and skey in self.marked and self.watches_listed() and self._unwanted(skey):
            # The Secret watch and the namespace and credential watches are not ordered: a namespace
            # may leave a selection (or a credential go) before this Secret was seen, and that
            # convergence then did not know it. Converge its namespace now, not at the next list.
            self.converge_scope(skey[0])

        for key in tuple(self.client_index.get(skey, ())):

            def client_change(st: CredentialState) -> bool:
                if deleted:
                    st.client = None
                    st.client_body = None
                    return False
                known = st.client.version if st.client is not None else st.issued_client_version
                if version == known:
                    if st.client is None:  # not read yet: the next pass can use this copy
                        st.client_body = trim_secret(body)
                    return False
                st.client_body = trim_secret(body)
                st.client = None
                st.force_new = "the client Secret changed"
                return True

            self._change(key, client_change, f"client Secret {event_type or 'listed'}")

        for key in tuple(self.target_index.get(skey, ())):

            def target_change(st: CredentialState) -> bool:
                ns = skey[0]
                if st.cluster and ns not in st.selected:
                    return False  # a namespace that is entering the selection: its pass reads it
                t = st.target(ns)
                # Our own writes come back with the version we recorded: nothing to do.
                if not deleted and version == t.version:
                    return False
                t.body = None if deleted else trim_secret(body)
                if st.cluster:
                    if t.failed() and ns not in st.yielded:
                        t.retry_at = self._now()  # the obstacle may be gone: this namespace, now
                elif st.last_failure_reason in (c.REASON_TARGET_CONFLICT, c.REASON_TARGET_NOT_FOUND):
                    st.force_new = "the target Secret changed"  # the obstacle may be gone: try now
                return True

            self._change(key, target_change, f"target Secret {event_type or 'listed'}")


def _selection_of(name: str, spec: Mapping[str, Any]) -> NamespaceSelection | None:
    """A cluster credential's namespace selection; None when its spec is invalid (the pass says why)."""
    try:
        return parse_spec(spec, name=name, cluster=True).namespaces
    except InvalidSpec:
        return None


def _creation_policy(spec: Mapping[str, Any]) -> str:
    target = spec.get("target") if isinstance(spec, Mapping) else None
    policy = target.get("creationPolicy") if isinstance(target, Mapping) else None
    return policy if isinstance(policy, str) else "Owner"


def _sample(st: CredentialState) -> metrics.CredentialSample:
    cond = find_condition(st.status.get("conditions"), c.CONDITION_READY)
    ready = str(cond.get("status", "Unknown")) if cond is not None else "Unknown"
    return (
        st.namespace,
        st.name,
        ready,
        st.token.expires_at.timestamp() if st.token is not None else None,
        st.next_refresh.timestamp() if st.next_refresh is not None else None,
    )
