"""The kopf layer, kept thin: watch events in, the runtime does the rest.

kopf watches the AutoTekCredentials. Only ``@kopf.on.event`` handlers are used, so kopf adds no
finalizers and writes nothing to the objects itself; the runtime posts status and Events
explicitly. Secrets are watched by ``watch.SecretWatch`` instead: every Secret in the watched
namespaces comes through that watch, and kopf's per-object memory and per-event machinery would
cost more than all the operator's own work. This is also the only place that reads the real
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

import kopf
from kubernetes.client import CoreV1Api

from . import constants as c
from . import kube, metrics
from .config import Settings
from .leader import LeaderElector
from .reconcile import Deps
from .runtime import Runtime
from .token_client import SharedTokens, TokenClient
from .watch import SecretWatch

log = logging.getLogger("autotek_operator")

#: (group, version, plural) of every resource listed and watched (credentials by kopf, Secrets by
#: watch.SecretWatch); the RBAC test grants list+watch for exactly these (plus kube.API_CALLS).
WATCHED = ((c.GROUP, c.VERSION, c.PLURAL), ("", "v1", "secrets"))


class _NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no "last handled" state: with only ``on.event`` handlers kopf never diffs, but it
    would still deep-copy every object on every event to build the diff base."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class _Holder:
    settings: Settings = Settings()
    runtime: Runtime | None = None
    secrets: SecretWatch | None = None
    elector: LeaderElector | None = None
    election: asyncio.Task[None] | None = None


STATE = _Holder()


def configure(settings: Settings) -> None:
    STATE.settings = settings


def utcnow() -> datetime:
    return datetime.now(UTC)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    s = STATE.settings
    settings.watching.server_timeout = s.watch_timeout
    settings.watching.client_timeout = s.watch_timeout + 15
    settings.watching.connect_timeout = 10
    settings.posting.enabled = False  # Events are posted by the runtime, one per outcome
    # The watched resources are fixed: no need to watch CRDs or namespaces (nor the RBAC for it).
    settings.scanning.disabled = True
    settings.persistence.diffbase_storage = _NoDiffBase()
    api = kube.load_api_client(pool_size=s.workers + 4)
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
    )
    STATE.runtime = Runtime(deps, workers=s.workers)
    if s.leader_election:
        STATE.runtime.active = False
        STATE.elector = LeaderElector(
            api=deps.kube,
            namespace=s.leader_election_namespace,
            name=s.leader_election_id,
            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            clock=utcnow,
            monotonic=time.monotonic,
        )
        STATE.election = asyncio.create_task(_elect(STATE.elector, STATE.runtime), name="autotek-election")
    STATE.runtime.start()
    scopes: tuple[str | None, ...] = tuple(s.namespaces) or (None,)
    STATE.runtime.secret_scopes = set(scopes)
    loop = asyncio.get_running_loop()
    STATE.secrets = SecretWatch(
        CoreV1Api(kube.load_api_client(pool_size=len(scopes))),
        scopes,
        deliver=loop.call_soon_threadsafe,
        on_events=STATE.runtime.on_secret_events,
        on_listed=STATE.runtime.on_secrets_listed,
        timeout=s.watch_timeout,
    )
    STATE.secrets.start()
    metrics.report_credentials(STATE.runtime.credential_samples)
    metrics.serve(s.metrics_port)
    log.info(
        "autotek-operator started: %s, token URLs allowed under %s",
        "all namespaces" if s.clusterwide else "namespaces " + ",".join(s.namespaces),
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
            runtime.set_active(elector.still_leading(result))
            await asyncio.sleep(elector.retry_period)
    finally:
        guard.cancel()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.election is not None:
        STATE.election.cancel()
    if STATE.secrets is not None:
        await asyncio.to_thread(STATE.secrets.stop)
    if STATE.runtime is not None:
        await STATE.runtime.stop()
    if STATE.elector is not None and STATE.runtime is not None and STATE.runtime.active:
        await asyncio.to_thread(STATE.elector.release)
    log.info("autotek-operator stopped")


@kopf.on.event(*WATCHED[0])
async def credential_event(event: kopf.RawEvent, **_: Any) -> None:
    if STATE.runtime is not None:
        STATE.runtime.on_credential_event(event.get("type"), event["object"])


@kopf.on.probe(id="credentials")
def probe(**_: Any) -> dict[str, int]:
    return STATE.runtime.stats() if STATE.runtime is not None else {}
