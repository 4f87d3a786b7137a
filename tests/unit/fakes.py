"""In-memory stand-ins for the Kubernetes API and the token endpoint (unit tests only)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from autotek_operator import errors
from autotek_operator.kube import Conflict
from autotek_operator.reconcile import Deps
from autotek_operator.runtime import Runtime
from autotek_operator.token_client import Token, TokenRequest

T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


class FakeKube:
    """Secrets, status patches and Events in dicts; records every call as (verb, name)."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self._rv = itertools.count(100)
        self.fail_next: list[Exception] = []

    def _maybe_fail(self) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)

    def put_secret(self, namespace: str, name: str, data: dict[str, str], **meta: Any) -> dict[str, Any]:
        obj = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": meta.pop("type", "Opaque"),
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", **meta},
            "data": {k: b64(v) for k, v in data.items()},
        }
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self.secrets[(namespace, name)] = obj
        return obj

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        self._maybe_fail()
        obj = self.secrets.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", body["metadata"]["name"]))
        self._maybe_fail()
        key = (namespace, body["metadata"]["name"])
        if key in self.secrets:
            raise Conflict("exists")
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        obj["metadata"]["uid"] = "uid-" + key[1]
        self.secrets[key] = obj
        return copy.deepcopy(obj)

    def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("replace", name))
        self._maybe_fail()
        cur = self.secrets.get((namespace, name))
        if cur is None:
            raise errors.KubernetesAPIError("Kubernetes API update secrets failed: HTTP 404")
        if body["metadata"].get("resourceVersion") not in (None, cur["metadata"]["resourceVersion"]):
            raise Conflict("stale")
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        obj["metadata"]["uid"] = cur["metadata"].get("uid")
        self.secrets[(namespace, name)] = obj
        return copy.deepcopy(obj)

    def patch_secret(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(("patch", name))
        self._maybe_fail()
        cur = self.secrets.get((namespace, name))
        if cur is None:
            return None
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != cur["metadata"]["resourceVersion"]:
            raise Conflict("stale")  # a resourceVersion in a patch is a precondition, as on the API server
        _merge(cur, patch)
        cur["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(cur)

    def delete_secret(self, namespace: str, name: str, uid: str | None = None) -> None:
        self.calls.append(("delete", name))
        self.secrets.pop((namespace, name), None)

    #: Credentials that still exist, as get_credential answers them (to confirm a deletion).
    credentials: dict[tuple[str, str], dict[str, Any]]

    def get_credential(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get-credential", name))
        self._maybe_fail()
        found = getattr(self, "credentials", {}).get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def patch_credential_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("status", name))
        self._maybe_fail()
        cur = self.statuses.setdefault((namespace, name), {})
        _merge(cur, copy.deepcopy(status))

    #: ClusterAutoTekCredentials that still exist, by name (to confirm a deletion).
    cluster_credentials: dict[str, dict[str, Any]]

    def get_cluster_credential(self, name: str) -> dict[str, Any] | None:
        self.calls.append(("get-cluster-credential", name))
        self._maybe_fail()
        found = getattr(self, "cluster_credentials", {}).get(name)
        return copy.deepcopy(found) if found is not None else None

    def patch_cluster_credential_status(self, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("status", name))
        self._maybe_fail()
        cur = self.statuses.setdefault(("", name), {})
        _merge(cur, copy.deepcopy(status))

    def create_event(self, **kw: Any) -> None:
        self.calls.append(("event", kw["reason"]))
        self.events.append(kw)

    workloads: dict[tuple[str, str, str], dict[str, Any]]

    def get_workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get-" + kind, name))
        obj = getattr(self, "workloads", {}).get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def restart_workload(self, kind: str, namespace: str, name: str, when: str) -> bool:
        self.calls.append(("restart-" + kind, name))
        obj = getattr(self, "workloads", {}).get((kind, namespace, name))
        if obj is None:
            return False
        obj.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {}).setdefault("annotations", {})[
            "kubectl.kubernetes.io/restartedAt"
        ] = when
        return True

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("create", "replace", "patch", "delete")]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v) if isinstance(v, dict | list) else v


class FakeTokens:
    """Issues tokens ``tok-1``, ``tok-2`` ... or raises the queued errors."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0, allowed: bool = True) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.allowed = allowed
        self.requests: list[TokenRequest] = []
        self.errors: list[errors.AutoTekError] = []
        self.count = 0
        self.defaulted = False
        #: The access token for the n-th token issued.
        self.token_value: Callable[[int], str] = lambda n: f"tok-{n}"

    def check_allowed(self, url: str) -> None:
        if not self.allowed:
            raise errors.TokenURLNotAllowed(f"token URL {url} is not allowed")

    def request(self, req: TokenRequest, reusable: Any = None) -> Token:
        self.check_allowed(req.token_url)
        self.requests.append(req)
        if self.errors:
            raise self.errors.pop(0)
        self.count += 1
        return Token(
            access_token=self.token_value(self.count),
            token_type="bearer",
            lifetime=self.lifetime,
            scope="",
            sent_at=self.clock(),
            lifetime_defaulted=self.defaulted,
        )


def real_now() -> datetime:
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def running_runtime(
    namespace: str, client_secret: str = "s"
) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    """A started Runtime over the fakes, on the real clock, with a client Secret ``client``."""
    kube = FakeKube()
    kube.put_secret(namespace, "client", {"client_id": "id", "client_secret": client_secret})
    tokens = FakeTokens(real_now)  # type: ignore[arg-type]
    runtime = Runtime(Deps(kube=kube, tokens=tokens, clock=real_now, rand=lambda: 0.0), workers=2)  # type: ignore[arg-type]
    runtime.start()
    try:
        yield runtime, kube, tokens
    finally:
        await runtime.stop(grace=2)


async def settle(runtime: Runtime, seconds: float = 0.5, interval: float = 0.05) -> None:
    """Let due passes run and finish."""
    deadline = asyncio.get_running_loop().time() + 5
    await asyncio.sleep(seconds)
    while runtime.inflight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(interval)
