"""Every Kubernetes API call the operator makes itself, in one place.

Each method declares the (API group, resource, verb) it needs with ``@api_call``; the RBAC
manifests are checked against ``API_CALLS`` by a test, so a new call without a matching rule
fails CI instead of a user's install. Errors leave as ``KubernetesAPIError`` with a message we
wrote (an ``ApiException``'s text can carry request bodies, i.e. Secret data).
"""

from __future__ import annotations

import functools
import json
import math
import secrets as _random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote, urlencode

import kubernetes
import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from . import constants as c
from .errors import KubernetesAPIError, NamespaceGone
from .timefmt import format_time

#: (group, resource, verb) for each call made through this module ("" is the core group).
API_CALLS: set[tuple[str, str, str]] = set()
#: Calls made only when an optional feature is switched on, by feature (their RBAC ships with it).
OPTIONAL_API_CALLS: dict[str, set[tuple[str, str, str]]] = {}

#: The workload kinds spec.rolloutRestartTargets may name, and their resources in apps/v1.
WORKLOADS = {"Deployment": "deployments", "StatefulSet": "statefulsets", "DaemonSet": "daemonsets"}

P = ParamSpec("P")
R = TypeVar("R")

#: (connect, read) seconds for every API call.
REQUEST_TIMEOUT = (5.0, 30.0)
#: Lease calls must return well within the leader's renew deadline.
LEASE_TIMEOUT = (3.0, 5.0)


class Conflict(Exception):
    """409: the object changed (stale resourceVersion) or already exists."""


def api_call(
    group: str, resource: str | tuple[str, ...], verb: str, feature: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Declare the RBAC permission a method needs and translate its errors."""
    resources = (resource,) if isinstance(resource, str) else resource
    registry = API_CALLS if feature is None else OPTIONAL_API_CALLS.setdefault(feature, set())
    registry.update((group, r, verb) for r in resources)

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 409:
                    raise Conflict(f"{verb} {'/'.join(resources)}: conflict") from None
                if getattr(exc, "namespace_gone", False):
                    raise NamespaceGone(
                        f"Kubernetes API {verb} {'/'.join(resources)} failed: HTTP {exc.status}: "
                        "the namespace is deleted or being deleted"
                    ) from None
                raise KubernetesAPIError(
                    f"Kubernetes API {verb} {'/'.join(resources)} failed: HTTP {exc.status} {exc.reason or ''}".strip(),
                    retry_after=_retry_after(exc),
                ) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise KubernetesAPIError(
                    f"Kubernetes API {verb} {'/'.join(resources)} failed: {type(exc).__name__}"
                ) from None

        return inner

    return wrap


def _retry_after(exc: ApiException) -> float | None:
    """The seconds a 429 or 503 answer asks the client to wait (``Retry-After`` in seconds, as the API
    server sends it, e.g. when API Priority and Fairness rejects a request), else None."""
    if exc.status not in (429, 503):
        return None
    value = (exc.headers or {}).get("Retry-After")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds > 0 else None


def load_api_client(pool_size: int = 16) -> ApiClient:
    """An API client for the in-cluster service account, else the current kubeconfig."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)  # type: ignore[no-untyped-call]
    config.connection_pool_maxsize = pool_size
    config.retries = False
    return ApiClient(configuration=config)


JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


class Transport:
    """The cheapest way to the API server that keeps the client's configuration: its urllib3 pool
    (TLS, client certificates, CA, proxy, pool size, no retries: built by the kubernetes client
    from its ``Configuration``) with keep-alive connections, plain ``json`` in and out, and the
    bearer token from the configuration as its own calls get it: through its refresh hook, which
    re-reads a ServiceAccount token file as it rotates (``load_incluster_config``) or runs a
    kubeconfig's exec plugin again. The hook is consulted at most every ``AUTH_EVERY`` seconds
    (the kubernetes client itself re-reads the token file once a minute). None of
    ``ApiClient.call_api``'s per-call machinery (parameter sanitising, model deserialising, the
    proxy environment looked up on each read of ``Configuration.host``). Headers are never logged."""

    #: Seconds between two looks at the configuration's token (and its refresh hook).
    AUTH_EVERY = 5.0

    def __init__(self, api_client: ApiClient) -> None:
        self.config = api_client.configuration
        self.pool = api_client.rest_client.pool_manager
        self.base = self.config.host.rstrip("/")
        # Without a proxy, every call goes to one host: its connection pool, taken once, is given the
        # path alone (no URL parsed and no pool looked up per call). Through a proxy, the manager.
        self._direct: urllib3.HTTPConnectionPool | None = None
        self._prefix = ""
        if type(self.pool) is urllib3.PoolManager:
            url = urllib3.util.parse_url(self.base)
            self._direct = self.pool.connection_from_host(url.host, port=url.port, scheme=url.scheme)
            self._prefix = (url.path or "").rstrip("/")
        self.user_agent = str(api_client.default_headers.get("User-Agent") or c.MANAGER)
        self._auth: str | None = None
        self._auth_at = -math.inf
        self._lock = threading.Lock()

    def authorization(self) -> str | None:
        now = time.monotonic()
        if now - self._auth_at >= self.AUTH_EVERY:
            with self._lock:
                if now - self._auth_at >= self.AUTH_EVERY:
                    self._auth = self.config.get_api_key_with_prefix("BearerToken", alias="authorization")
                    self._auth_at = now
        return self._auth

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        content_type: str,
        query: Mapping[str, str] | None,
        timeout: tuple[float, float],
    ) -> Any:
        headers = {"Accept": JSON, "User-Agent": self.user_agent}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        auth = self.authorization()
        if auth:
            headers["Authorization"] = auth
        target = path if not query else path + "?" + urlencode(query)
        kw: dict[str, Any] = {
            "body": data,
            "headers": headers,
            "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            "retries": False,
            "redirect": False,
            "preload_content": True,
        }
        if self._direct is not None:
            resp = self._direct.urlopen(method, self._prefix + target, assert_same_host=False, **kw)
        else:
            resp = self.pool.request(method, self.base + target, **kw)
        if not 200 <= resp.status <= 299:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.headers = resp.headers  # Retry-After; the body (which could echo data) is not kept
            # Only a write can be refused for its namespace; a read's 404 is just "not there".
            gone = method != "GET" and _namespace_gone(resp.status, resp.data)
            exc.namespace_gone = gone  # type: ignore[attr-defined]
            raise exc
        return _json(resp.data)


def _namespace_gone(status: int, data: bytes) -> bool:
    """Whether an error answer says the request's namespace is deleted (404 NotFound about the
    namespace itself) or being deleted (403 with the NamespaceTerminating cause). Only the Status
    object's structured fields are read, never its message."""
    if status not in (403, 404) or not data:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    if not isinstance(doc, dict) or doc.get("kind") != "Status":
        return False
    details = doc.get("details")
    details = details if isinstance(details, dict) else {}
    if status == 404:
        return doc.get("reason") == "NotFound" and details.get("kind") == "namespaces"
    causes = details.get("causes")
    causes = causes if isinstance(causes, list) else []
    return any(isinstance(x, dict) and x.get("type") == "NamespaceTerminating" for x in causes)


def request(
    api_client: ApiClient | Transport,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    *,
    content_type: str = JSON,
    query: Mapping[str, str] | None = None,
    timeout: tuple[float, float] = REQUEST_TIMEOUT,
) -> Any:
    """One API call with a plain JSON body, answered with plain JSON.

    The client's typed API methods turn a dict body into their model first and write it out
    again, which loses what the model cannot hold (a MicroTime's zero fraction, unknown fields):
    the body built here is the body the API server receives. It goes out through a ``Transport``
    (made from ``api_client`` if that is what is given): the client's connection pool, TLS and
    auth (token refresh included), without its per-call machinery."""
    transport = api_client if isinstance(api_client, Transport) else Transport(api_client)
    return transport.request(method, path, body, content_type, query, timeout)


def _request_or_none(api_client: ApiClient | Transport, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    """Like request, but None when the object does not exist (404)."""
    try:
        return request(api_client, method, path, body, **kw)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _secrets(namespace: str, *name: str) -> str:
    return _path("api", "v1", "namespaces", namespace, "secrets", *name)


def _leases(namespace: str, *name: str) -> str:
    return _path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases", *name)


def _workload(kind: str, namespace: str, name: str) -> str:
    return _path("apis", "apps", "v1", "namespaces", namespace, WORKLOADS[kind], name)


def _credentials(namespace: str, *rest: str) -> str:
    return _path("apis", c.GROUP, c.VERSION, "namespaces", namespace, c.PLURAL, *rest)


def _cluster_credentials(*rest: str) -> str:
    return _path("apis", c.GROUP, c.VERSION, c.CLUSTER_PLURAL, *rest)


class Kube:
    """The operator's Kubernetes calls, blocking; run them from worker threads.

    Every body goes out as the plain JSON built here (see ``request``). 409 answers leave as
    ``Conflict`` (see ``api_call``), 404 as None where that is meaningful."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = Transport(api_client)

    @api_call("", "secrets", "get")
    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(self.api_client, "GET", _secrets(namespace, name))
        return result

    @api_call("", "secrets", "create")
    def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = request(self.api_client, "POST", _secrets(namespace), body)
        return result

    @api_call("", "secrets", "update")
    def replace_secret(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = request(self.api_client, "PUT", _secrets(namespace, name), body)
        return result

    @api_call("", "secrets", "patch")
    def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(
            self.api_client, "PATCH", _secrets(namespace, name), patch, content_type=MERGE_PATCH
        )
        return result

    @api_call("", "secrets", "delete")
    def delete_secret(self, namespace: str, name: str, uid: str | None = None) -> None:
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            _request_or_none(self.api_client, "DELETE", _secrets(namespace, name), body)
        except ApiException as exc:
            if exc.status != 409:  # 409: the uid changed, i.e. someone else's Secret now
                raise

    @api_call("coordination.k8s.io", "leases", "get")
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(
            self.api_client, "GET", _leases(namespace, name), timeout=LEASE_TIMEOUT
        )
        return result

    @api_call("coordination.k8s.io", "leases", "create")
    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = request(self.api_client, "POST", _leases(namespace), body, timeout=LEASE_TIMEOUT)
        return result

    @api_call("coordination.k8s.io", "leases", "update")
    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = request(self.api_client, "PUT", _leases(namespace, name), body, timeout=LEASE_TIMEOUT)
        return result

    @api_call("apps", tuple(WORKLOADS.values()), "get", feature="rollout-restart")
    def get_workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(self.api_client, "GET", _workload(kind, namespace, name))
        return result

    @api_call("apps", tuple(WORKLOADS.values()), "patch", feature="rollout-restart")
    def restart_workload(self, kind: str, namespace: str, name: str, when: str) -> bool:
        """Bump the pod template's restartedAt annotation, as ``kubectl rollout restart`` does."""
        body = {"spec": {"template": {"metadata": {"annotations": {c.ANN_RESTARTED_AT: when}}}}}
        path = _workload(kind, namespace, name)
        return _request_or_none(self.api_client, "PATCH", path, body, content_type=MERGE_PATCH) is not None

    @api_call(c.GROUP, c.PLURAL, "get")
    def get_credential(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(self.api_client, "GET", _credentials(namespace, name))
        return result

    @api_call(c.GROUP, f"{c.PLURAL}/status", "patch")
    def patch_credential_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        # 404: deleted meanwhile, nothing to report on.
        _request_or_none(
            self.api_client,
            "PATCH",
            _credentials(namespace, name, "status"),
            {"status": dict(status)},
            content_type=MERGE_PATCH,
        )

    @api_call(c.GROUP, c.CLUSTER_PLURAL, "get")
    def get_cluster_credential(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _request_or_none(self.api_client, "GET", _cluster_credentials(name))
        return result

    @api_call(c.GROUP, f"{c.CLUSTER_PLURAL}/status", "patch")
    def patch_cluster_credential_status(self, name: str, status: Mapping[str, Any]) -> None:
        # 404: deleted meanwhile, nothing to report on.
        _request_or_none(
            self.api_client,
            "PATCH",
            _cluster_credentials(name, "status"),
            {"status": dict(status)},
            content_type=MERGE_PATCH,
        )

    @api_call("", "events", "create")
    def create_event(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        event_type: str,
        reason: str,
        message: str,
        now: datetime,
        kind: str = c.KIND,
    ) -> None:
        """An Event about a credential, in ``namespace``: the credential's own, or for a
        ClusterAutoTekCredential (``kind``) ``default`` (c.CLUSTER_EVENT_NAMESPACE). Its
        involvedObject.namespace is then empty, as for a Node's Events: the API server accepts that
        only in ``default``, and ``kubectl describe catc NAME`` looks for exactly that."""
        stamp = format_time(now)
        involved = {
            "apiVersion": c.API_VERSION,
            "kind": kind,
            "name": name,
            "namespace": namespace if kind == c.KIND else "",
            "uid": uid,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{_random.token_hex(8)}", "namespace": namespace},
            "involvedObject": involved,
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": c.MANAGER},
            "reportingComponent": c.MANAGER,
            "reportingInstance": c.MANAGER,
        }
        request(self.api_client, "POST", _path("api", "v1", "namespaces", namespace, "events"), body)


def _json(data: bytes) -> Any:
    if not data:
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        raise KubernetesAPIError("Kubernetes API answered with something that is not JSON") from None
    if not isinstance(doc, dict):
        raise KubernetesAPIError("Kubernetes API answered with something that is not an object")
    return doc
