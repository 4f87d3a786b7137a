"""The kopf layer, kept thin: start-up and shutdown; the watches and the runtime do the rest.

kopf runs the process: signals, the event loop, the start-up and cleanup activities. The
AutoTekCredentials and the Secrets are listed and watched by ``watch.py``: every Secret in the
watched namespaces comes through its watch, where kopf's per-object memory and per-event
machinery would cost more than all the operator's own work; and the credential watch must tell
readiness when its list is complete and carry the operator's label selector to the API server,
neither of which kopf's handlers see. kopf adds no finalizers and writes nothing to the objects;
the runtime posts status and Events explicitly. This is also the only place that reads the real
clock and the random source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import kopf
from kubernetes.client import CoreV1Api, CustomObjectsApi

from . import constants as c
from . import health, kube, metrics
from .config import Settings
from .events import EventRecorder
from .leader import FOLLOWING, LEADING, LeaderElector
from .reconcile import Deps
from .runtime import Runtime
from .token_client import SharedTokens, TokenClient
from .watch import ClusterCredentialWatch, CredentialWatch, ListWatch, NamespaceWatch, SecretWatch

log = logging.getLogger("autotek_operator")

#: (group, version, plural) of every resource listed and watched (by watch.CredentialWatch and
#: watch.SecretWatch); the RBAC test grants list+watch for exactly these (plus kube.API_CALLS).
WATCHED = (
    (c.GROUP, c.VERSION, c.PLURAL),
    (c.GROUP, c.VERSION, c.CLUSTER_PLURAL),
    ("", "v1", "secrets"),
    ("", "v1", "namespaces"),
)


class _Holder:
    settings: Settings = Settings()
    runtime: Runtime | None = None
    watches: tuple[ListWatch, ...] = ()
    elector: LeaderElector | None = None
    election: asyncio.Task[None] | None = None
    #: The last leader-election round's result (None before the first; always "leading" without election).
    election_result: str | None = None
    probes: aiohttp.web.AppRunner | None = None
    events: EventRecorder | None = None


STATE = _Holder()


def configure(settings: Settings) -> None:
    STATE.settings = settings


def utcnow() -> datetime:
    return datetime.now(UTC)


def identity() -> str:
    """This replica's name in the Lease and to kopf: the pod's name, else host and process id.

    Given to kopf explicitly: kopf would otherwise ask the password database for the user name,
    which fails for a uid that has no entry there (as the image's 65532 has none)."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def live() -> tuple[bool, dict[str, Any]]:
    """Liveness: the event loop answers (or this would not run) and the scheduler runs."""
    runtime = STATE.runtime
    if runtime is None:
        return True, {"starting": True}
    return runtime.running(), runtime.stats()


def ready() -> tuple[bool, dict[str, Any]]:
    """Readiness: every watch has listed its namespaces, and leader election has an answer."""
    runtime = STATE.runtime
    checks = {
        "watches": runtime is not None and runtime.watches_listed(),
        "leaderElection": STATE.election_result in (LEADING, FOLLOWING),
    }
    return all(checks.values()), {**checks, "role": STATE.election_result or "unknown"}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    s = STATE.settings
    settings.posting.enabled = False  # Events are posted by the runtime, one per outcome
    # kopf watches nothing itself: no need to scan for CRDs or namespaces (nor the RBAC for it).
    settings.scanning.disabled = True
    # The passes' workers and the namespace writers of cluster credentials (as many again).
    api = kube.load_api_client(pool_size=2 * s.workers + 4 + EventRecorder.THREADS)
    tokens = TokenClient(
        allowed_prefixes=s.allowed_token_urls,
        timeout=s.http_timeout,
        max_concurrent=s.max_concurrent_token_requests,
        clock=utcnow,
    )
    tokens.observer = metrics.observe_token_request
    deps = Deps(
        kube=kube.Kube(api),
        tokens=SharedTokens(tokens, utcnow),
        clock=utcnow,
        rand=random.random,
        rollout_restart=s.rollout_restart,
        restart_min_interval=float(s.restart_min_interval),
        selector=s.credential_selector,
        cluster_client_namespaces=frozenset(s.cluster_credential_namespaces),
        event_namespace=c.CLUSTER_EVENT_NAMESPACE,
    )
    deps.events = STATE.events = EventRecorder(deps.kube)
    runtime = STATE.runtime = Runtime(deps, workers=s.workers)
    runtime.cluster_kind = True
    runtime.confirm_deletions = bool(s.credential_selector)
    if s.leader_election:
        runtime.active = False
        STATE.elector = LeaderElector(
            api=deps.kube,
            namespace=s.leader_election_namespace,
            name=s.leader_election_id,
            identity=identity(),
            clock=utcnow,
            monotonic=time.monotonic,
            lease_duration=float(s.leader_election_lease_duration),
            renew_deadline=float(s.leader_election_renew_deadline),
            retry_period=float(s.leader_election_retry_period),
        )
        STATE.election = asyncio.create_task(_elect(STATE.elector, runtime), name="autotek-election")
    else:
        STATE.election_result = LEADING
    runtime.start()
    scopes: tuple[str | None, ...] = tuple(s.namespaces) or (None,)
    runtime.secret_scopes = set(scopes)
    # One connection per watch thread, apart from the workers' pool.
    watch_api = kube.load_api_client(pool_size=2 * len(scopes) + 2)
    common: dict[str, Any] = {"deliver": asyncio.get_running_loop().call_soon_threadsafe, "timeout": s.watch_timeout}
    STATE.watches = (
        CredentialWatch(
            CustomObjectsApi(watch_api),
            scopes,
            on_events=runtime.on_credential_events,
            on_listed=runtime.on_credentials_listed,
            label_selector=s.credential_selector,
            **common,
        ),
        SecretWatch(
            CoreV1Api(watch_api),
            scopes,
            on_events=runtime.on_secret_events,
            on_listed=runtime.on_secrets_listed,
            **common,
        ),
        ClusterCredentialWatch(
            CustomObjectsApi(watch_api),
            on_events=runtime.on_cluster_credential_events,
            on_listed=runtime.on_cluster_credentials_listed,
            label_selector=s.credential_selector,
            **common,
        ),
        NamespaceWatch(
            CoreV1Api(watch_api),
            on_events=runtime.on_namespace_events,
            on_listed=runtime.on_namespaces_listed,
            **common,
        ),
    )
    for watch in STATE.watches:
        watch.start()
    metrics.report_credentials(runtime.credential_samples)
    metrics.report_cluster_namespaces(runtime.cluster_namespace_samples)
    metrics.serve(s.metrics_port)
    if s.health_port:
        STATE.probes = await health.serve(s.health_port, live=live, ready=ready)
    log.info(
        "autotek-operator started: %s%s, token URLs allowed under %s",
        "all namespaces" if s.clusterwide else "namespaces " + ",".join(s.namespaces),
        f", credentials selected by {s.credential_selector!r}" if s.credential_selector else "",
        ", ".join(s.allowed_token_urls),
    )


async def _elect(elector: LeaderElector, runtime: Runtime) -> None:
    """Renew or contend for the Lease every retry period; lead only while it is held.

    A watchdog steps down as soon as the renew deadline passes, even while a renewal call
    still hangs, so that this replica stops before another may take the Lease over."""

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(1.0)
            if runtime.active and elector.deadline_passed():
                log.warning("could not renew the leader Lease in time; stepping down")
                runtime.set_active(False)

    guard = asyncio.create_task(watchdog())
    try:
        while True:
            result = await asyncio.to_thread(elector.try_acquire_or_renew)
            STATE.election_result = result
            runtime.set_active(elector.still_leading(result))
            await asyncio.sleep(elector.retry_period)
    finally:
        guard.cancel()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.election is not None:
        STATE.election.cancel()
    if STATE.probes is not None:
        await STATE.probes.cleanup()
    for watch in STATE.watches:
        watch.stop_soon()
    for watch in STATE.watches:
        await asyncio.to_thread(watch.stop)
    if STATE.runtime is not None:
        await STATE.runtime.stop()
    if STATE.events is not None:
        await asyncio.to_thread(STATE.events.close, 5.0)  # flush the queued Events, best effort
    if STATE.elector is not None and STATE.runtime is not None and STATE.runtime.active:
        await asyncio.to_thread(STATE.elector.release)
    log.info("autotek-operator stopped")
