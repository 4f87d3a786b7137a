"""An embedded Kubernetes API server double: kmock 0.8 made real enough for kopf and the kubernetes client.

``Emulator`` subclasses ``kmock.KubernetesEmulator``. It serves the resource URLs (``/api/v1/...``,
``/apis/<group>/<version>/...``) itself from an in-memory store and leaves discovery (``/api``,
``/apis/...``, ``/version``) to kmock. Each workaround names the kmock 0.8 gap it covers ("gap N": the
numbered table of KMOCK.md, the project's notes on kmock). Fixed: gaps 1-11, 14, 15, 16. Not fixed:

- gap 12: no validation or admission beyond the object name (a DNS subdomain) and the body shape;
- gap 13: ``ownerReferences`` are stored, never garbage-collected; deleting a namespace leaves its
  objects; namespaces are not enforced (objects may go into a namespace that does not exist);
- no ``deletecollection``, server-side apply (415), pagination (``limit`` is ignored) or ``dryRun``;
  strategic-merge patches are applied as JSON merge patches (RFC 7386).

Writes that change nothing (a patch that sets what is there) keep the resourceVersion and send no
watch event, as on a real server. kmock reactions registered on the emulator (``emu[...] << 503``)
answer first and leave the store untouched, which makes fault injection easy.

Run it with ``EmulatorThread`` (a background thread with its own loop), ``async with
Emulator().serve(port) as url``, or ``python -m autotek_operator.dev.emulator --port 0 --kubeconfig
PATH``, which prints ``EMULATOR READY <url>`` once listening. It binds 127.0.0.1 only: there is no auth.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import json
import logging
import math
import re
import secrets
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import k8s_views, parsing, rendering

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never anything else: the emulator has no authentication at all
LOG_SIZE = 50  # requests kept in kmock's request log (gap 15)
HISTORY_SIZE = 10_000  # watch events kept for resuming watches from a resourceVersion (gap 9)
VERSIONS_KEPT = 10  # past versions kept per object in emulator.objects
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
# gap 14: the declared resources, served in discovery: "group/version/plural": (kind, namespaced, subresources).
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/namespaces": ("Namespace", False, ("status",)),
    "v1/secrets": ("Secret", True, ()),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/events": ("Event", True, ()),
    "events.k8s.io/v1/events": ("Event", True, ()),
    "apps/v1/deployments": ("Deployment", True, ("status",)),
    "apps/v1/statefulsets": ("StatefulSet", True, ("status",)),
    "apps/v1/daemonsets": ("DaemonSet", True, ("status",)),
    "coordination.k8s.io/v1/leases": ("Lease", True, ()),
    "autotek.io/v1alpha1/autotekcredentials": ("AutoTekCredential", True, ("status",)),
    "autotek.io/v1alpha1/clusterautotekcredentials": ("ClusterAutoTekCredential", False, ("status",)),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, ()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, ()),
}
SECRETS, NAMESPACES = kmock.resource("v1/secrets"), kmock.resource("v1/namespaces")
KEPT_FIELDS = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation", "resourceVersion")
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SET_TERM = re.compile(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)")
_EQ_TERM = re.compile(r"(!?)([^=!\s]+)\s*(?:(==|=|!=)\s*(\S*))?")
_FIELD_TERM = re.compile(r"metadata\.(name|namespace)\s*(==|=|!=)\s*(\S*)")
#: MicroTime fields by resource: a real API server parses them only with six fractional digits.
MICROTIME_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "coordination.k8s.io/v1/leases": (("spec", "renewTime"), ("spec", "acquireTime")),
    "v1/events": (("eventTime",),),
    "events.k8s.io/v1/events": (("eventTime",),),
}
_MICROTIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")

Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]
Event = tuple[int, kmock.resource, str, Obj, Obj | None]  # resourceVersion, resource, type, object, old object


class ApiError(Exception):
    """An API failure, answered as a Kubernetes ``Status``."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
            **({"details": dict(self.details)} if self.details else {}),
        }


def _not_found(key: Key) -> ApiError:
    res, _, name = key
    return ApiError(
        404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "group": res.group, "kind": res.plural}
    )


class _Objects(k8s_views.ObjectsArray):
    """gap 16: ``('v1/secrets', ns, name) in emulator.objects`` works, and is False once deleted."""

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 3):
            return False
        found = self._objects.get((kmock.resource(key[0]), key[1], key[2]))
        return found is not None and not found.deleted


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``null`` deletes a key (gap 11: strategic-merge patches get this too)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _selector(params: Mapping[str, str], namespace: str | None, name: str | None) -> Callable[[Obj], bool]:
    """gap 10: a predicate for ``labelSelector``, ``fieldSelector`` (name, namespace) and the URL."""
    labels: list[tuple[str, str, set[str]]] = []  # key, op (in, notin, exists, !), values
    for term in filter(str.strip, re.split(r",(?![^()]*\))", params.get("labelSelector", ""))):
        if m := _SET_TERM.fullmatch(term.strip()):
            labels.append((m[1], m[2], {v.strip() for v in m[3].split(",")}))
        elif (m := _EQ_TERM.fullmatch(term.strip())) and not (m[1] and m[3]):
            labels.append(
                (m[2], "!" if m[1] else "exists" if not m[3] else "notin" if m[3] == "!=" else "in", {m[4] or ""})
            )
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    fields: list[tuple[str, bool, str | None]] = []  # metadata key, equal?, value
    for term in filter(str.strip, params.get("fieldSelector", "").split(",")):
        if not (m := _FIELD_TERM.fullmatch(term.strip())):
            raise ApiError(400, "BadRequest", f"field label not supported: {term!r}")
        fields.append((m[1], m[2] != "!=", m[3]))
    fields += [("namespace", True, namespace)] if namespace is not None else []
    fields += [("name", True, name)] if name is not None else []

    def check(obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        have = meta.get("labels") or {}
        return all((meta.get(key) == value) == equal for key, equal, value in fields) and all(
            (key in have) == (op == "exists")
            if op in ("exists", "!")
            else (key in have and have[key] in values) == (op == "in")
            for key, op, values in labels
        )

    return check


def _route(path: str) -> tuple[str, str, str | None, str, str | None, str | None] | None:
    """Split a resource URL into group, version, namespace, plural, name, subresource; else None.

    gap 3: kmock's own parser crashes on ``/api/v1/namespaces``; this one knows namespaces from the rest.
    """
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "api":
        group, version, parts = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, parts = parts[1], parts[2], parts[3:]
    else:
        return None  # discovery, /version, anything else
    namespace = None
    namespace_itself = group == "" and len(parts) == 3 and parts[2] in ("status", "finalize")
    if parts[0] == "namespaces" and len(parts) >= 3 and not namespace_itself:
        namespace, parts = parts[1], parts[2:]
    if len(parts) > 3 or not all(parts):
        return None
    padded: list[str | None] = [*parts, None, None]
    return group, version, namespace, parts[0], padded[1], padded[2]


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """A kmock Kubernetes emulator that behaves like a real API server for kopf and the kubernetes client."""

    _objects: k8s_views.ObjectsArray = attrs.field(factory=_Objects, init=False)
    _rv: int = attrs.field(default=0, init=False)  # the global resourceVersion counter
    _history: collections.deque[Event] = attrs.field(factory=lambda: collections.deque(maxlen=HISTORY_SIZE), init=False)
    _floor: int = attrs.field(default=0, init=False)  # the newest resourceVersion dropped from _history
    _watchers: set[asyncio.Queue[Event | None]] = attrs.field(factory=set, init=False)
    _counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter, init=False)
    _counts_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for spec, (kind, namespaced, subresources) in RESOURCES.items():  # gap 14
            self.resources[spec] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=VERBS, subresources=subresources
            )
        self.resources["autotek.io/v1alpha1/autotekcredentials"].shortnames = {"atc"}
        self.resources["autotek.io/v1alpha1/autotekcredentials"].categories = {"autotek"}
        self.resources["autotek.io/v1alpha1/clusterautotekcredentials"].shortnames = {"catc"}
        self.resources["autotek.io/v1alpha1/clusterautotekcredentials"].categories = {"autotek"}
        for namespace in ("default", "kube-system"):
            self._create(NAMESPACES, None, {"metadata": {"name": namespace}})

    # --- The Python API ----------------------------------------------------------------------------

    @property
    def request_counts(self) -> dict[tuple[str, str, str], int]:
        """Requests served, by (method, plural, subresource or ""); watch requests count as ``WATCH``.

        Requests for other paths (discovery) count as (method, "", path).
        """
        with self._counts_lock:
            return dict(self._counts)

    def reset_request_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    def read_object(self, resource: str | kmock.resource, namespace: str | None, name: str) -> Obj | None:
        """The current state of an object (``namespace=None`` if cluster-scoped), or None."""
        found = self._objects._objects.get((kmock.resource(resource), namespace, name))
        return None if found is None or found.deleted else found.raw

    @asynccontextmanager
    async def serve(self, port: int = 0) -> AsyncIterator[str]:
        """Listen on 127.0.0.1:port (0: any free port) and yield the base URL."""
        runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self, handler_cancellation=True), shutdown_timeout=1)
        await runner.setup()
        async with self:  # kmock's handler context: live-stream feeding and error collection
            try:
                await aiohttp.web.TCPSite(runner, HOST, port).start()
                yield f"http://{HOST}:{runner.addresses[0][1]}"
            finally:
                for queue in self._watchers:
                    queue.put_nowait(None)  # end the watch streams, or the shutdown waits for them
                await runner.cleanup()

    # --- Requests ----------------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path.startswith("/_emulator/"):
            return self._serve_stats(raw)
        if (route := _route(raw.path)) is None:  # discovery and unknown paths: kmock's own handling
            self._count(raw.method, "", raw.path)
            try:
                return await super().__call__(raw)
            finally:
                self._trim_log()
        group, version, namespace, plural, name, sub = route
        body, params = await raw.read(), dict(raw.query)
        try:
            data, bad_json = (json.loads(body) if body else None), False
        except ValueError:
            data, bad_json = None, True  # answered below, unless a kmock reaction answers first
        watching = raw.method == "GET" and params.get("watch", "").lower() in ("true", "1")
        self._count("WATCH" if watching else raw.method, plural, sub or "")
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=params,
            headers=dict(raw.headers),
            body=body,
            text=body.decode(errors="replace"),
            data=data,
            action=parsing.guess_k8s(
                parsing.ParsedPath(group, version, plural, namespace, name, sub), kmock.method(raw.method), params
            ),
            resource=kmock.resource(group, version, plural),
            namespace=namespace,
            name=name,
            subresource=sub,
        )
        self._requests.append(request)  # kmock's request log, kept short (gap 15)
        self._trim_log()
        try:
            if (reaction := await self._react(request)) is not None:
                return reaction
            if bad_json:
                raise ApiError(400, "BadRequest", "the request body is not valid JSON")
            return await self._serve(request, raw, watching)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except Exception as e:
            logger.exception("The emulator failed on %s %s", raw.method, raw.path)
            if self._errors:
                self._errors[-1].append(e)  # kmock's convention: collected while entered
            return aiohttp.web.json_response(ApiError(500, "InternalError", repr(e)).status(), status=500)

    async def _react(self, request: rendering.Request) -> aiohttp.web.StreamResponse | None:
        """Let kmock reactions registered by users (not the -inf fallbacks) answer first."""
        for payload in list(self._payloads):
            if -math.inf in payload.priorities or payload._disabled.is_set() or request not in payload._source:
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:
                payload._disabled.set()
            except NotImplementedError:
                pass
        return None

    async def _serve(
        self, rq: rendering.Request, raw: aiohttp.web.BaseRequest, watching: bool
    ) -> aiohttp.web.StreamResponse:
        res, ns, name, sub, method, data = rq.resource, rq.namespace, rq.name, rq.subresource, rq.method.value, rq.data
        assert res is not None
        info = self.resources[res] if res in self.resources else None
        if (
            info is None
            or (not info.namespaced and ns is not None)
            or sub not in (None, *info.subresources)
            or (info.namespaced and ns is None and (name is not None or method != "GET"))
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if watching:
            return await self._watch(res, rq.params, ns, name, raw)
        if name is None and method == "GET":
            items = self._list(res, _selector(rq.params, ns, None))
            return aiohttp.web.json_response(
                {  # gap 9: a real resourceVersion, to watch from
                    "apiVersion": _api_version(res),
                    "kind": f"{info.kind}List",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                }
            )
        if name is None and method == "POST":
            return aiohttp.web.json_response(self._create(res, ns, data), status=201)  # gap 5
        if name is None or method not in ("GET", "PUT", "PATCH", "DELETE"):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        if method == "PUT" and (not isinstance(data, dict) or (data.get("metadata") or {}).get("name", name) != name):
            raise ApiError(400, "BadRequest", "the body must be an object named as in the URL")
        key: Key = (res, ns, name)
        if (old := self.read_object(res, ns, name)) is None:
            if method == "PUT" and sub is None:  # gap 4: PUT routed; it creates a missing object (201, gap 5)
                return aiohttp.web.json_response(
                    self._create(res, ns, _merge(data, {"metadata": {"name": name}})), status=201
                )
            raise _not_found(key)
        if method == "GET":
            return aiohttp.web.json_response(old)
        if method == "DELETE":
            return aiohttp.web.json_response(self._delete(key, old, data if isinstance(data, dict) else {}))
        new = copy.deepcopy(data) if method == "PUT" else self._patch(old, data, rq.headers.get("Content-Type", ""))
        return aiohttp.web.json_response(self._write(key, old, new, sub))  # gap 4: 200 on replace

    async def _serve_version(self, request: rendering.Request) -> Any:
        result: Any = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")  # kmock says "/v1" for the core group
        return result

    # --- The store -----------------------------------------------------------------------------------

    def _create(self, res: kmock.resource, ns: str | None, body: Any) -> Obj:
        info = self.resources[res]
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
        meta.pop("namespace", None)
        meta.update({"namespace": ns} if info.namespaced else {})  # gap 8: defaulted from the URL
        while not meta.get("name") and meta.get("generateName"):  # gap 6
            name = meta["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            meta["name"] = None if self.read_object(res, ns, name) else name
        if not _NAME.fullmatch(meta.get("name") or ""):
            raise ApiError(422, "Invalid", f"metadata.name: Invalid value: {meta.get('name')!r}")
        if self.read_object(res, ns, meta["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{res.plural} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": res.group, "kind": res.plural},
            )
        if "status" in info.subresources:  # gap 11: the status is written only through /status
            obj.pop("status", None)
        if res == NAMESPACES:
            obj["status"] = {"phase": "Active"}
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        self._rv += 1  # gap 1: server-side metadata
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1, resourceVersion=str(self._rv))
        self._normalize(res, obj)
        self._store((res, ns, meta["name"]), obj)
        self._emit(res, "ADDED", obj, None)
        return obj

    def _patch(self, old: Obj, patch: Any, content_type: str) -> Any:
        content_type = content_type.split(";")[0].strip()
        if content_type not in PATCH_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type: {content_type}")
        if not isinstance(patch, list if content_type == PATCH_TYPES[0] else dict):
            raise ApiError(400, "BadRequest", f"the body does not fit {content_type}")
        if isinstance(patch, dict):
            return _merge(copy.deepcopy(old), patch)
        try:
            return jsonpatch.apply_patch(old, patch)  # a deep copy, not in place
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:  # incl. a failed "test"
            raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {e}") from e  # gap 2

    def _write(self, key: Key, old: Obj, new: Any, sub: str | None) -> Obj:
        """The common tail of PUT and PATCH: keep the server fields, isolate the status, bump, notify."""
        res, info = key[0], self.resources[key[0]]
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the object must be a JSON object")
        if sub == "status" or "status" in info.subresources:  # gap 11: /status writes the status only;
            status = (new if sub == "status" else old).get("status")  # the main resource all but the status
            new = {k: v for k, v in (copy.deepcopy(old) if sub == "status" else new).items() if k != "status"}
            new.update({"status": status} if status is not None else {})
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        if meta.get("resourceVersion", old_meta["resourceVersion"]) != old_meta["resourceVersion"]:  # gap 4
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{key[2]}": the object '
                "has been modified; please apply your changes to the latest version and try again",
                {"name": key[2], "group": res.group, "kind": res.plural},
            )
        for field in KEPT_FIELDS:
            meta.pop(field, None)
            meta.update({field: old_meta[field]} if field in old_meta else {})
        self._normalize(res, new)
        if new == old:
            return old  # nothing changed: no new resourceVersion, no event
        if new.get("spec") != old.get("spec"):
            meta["generation"] = old_meta.get("generation", 0) + 1
        self._rv += 1  # gap 1
        meta["resourceVersion"] = str(self._rv)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):  # the last finalizer is gone
            self._objects._objects[key].delete()
            self._emit(res, "DELETED", new, old)
        else:
            self._store(key, new)
            self._emit(res, "MODIFIED", new, old)
        return cast(Obj, new)

    def _delete(self, key: Key, old: Obj, options: Obj) -> Obj:
        for field, wanted in (options.get("preconditions") or {}).items():  # DeleteOptions: uid, resourceVersion
            if wanted is not None and wanted != old["metadata"].get(field):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field} in precondition: {wanted}, "
                    f"{field} in object meta: {old['metadata'].get(field)}",
                    {"name": key[2], "group": key[0].group, "kind": key[0].plural},
                )
        if old["metadata"].get("finalizers") and old["metadata"].get("deletionTimestamp"):
            return old  # already waiting for its finalizers
        new = copy.deepcopy(old)
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        if old["metadata"].get("finalizers"):  # marked; deleted when the last finalizer is removed
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            self._store(key, new)
            self._emit(key[0], "MODIFIED", new, old)
            return new
        self._objects._objects[key].delete()
        self._emit(key[0], "DELETED", new, old)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": key[2], "group": key[0].group, "kind": key[0].plural, "uid": old["metadata"]["uid"]},
        }

    def _normalize(self, res: kmock.resource, obj: Obj) -> None:
        self._check_microtimes(res, obj)
        obj.setdefault("apiVersion", _api_version(res))
        obj.setdefault("kind", self.resources[res].kind)
        if res == SECRETS and "stringData" in obj:  # gap 7: stringData folds into base64 data
            obj["data"] = dict(obj.get("data") or {}) | {
                k: base64.b64encode(str(v).encode()).decode() for k, v in (obj.pop("stringData") or {}).items()
            }

    def _check_microtimes(self, res: kmock.resource, obj: Obj) -> None:
        """Refuse a MicroTime without six fractional digits, as the API server's decoder does."""
        for path in MICROTIME_FIELDS.get(f"{_api_version(res)}/{res.plural}", ()):
            value: Any = obj
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None and not (isinstance(value, str) and _MICROTIME.fullmatch(value)):
                kind = self.resources[res].kind
                raise ApiError(
                    400,
                    "BadRequest",
                    f'{kind} in version "{res.version}" cannot be handled as a {kind}: parsing time '
                    f'{json.dumps(value)} as "2006-01-02T15:04:05.000000Z07:00": cannot parse',
                )

    def _store(self, key: Key, obj: Obj) -> None:
        found = self._objects._objects.get(key)
        if found is None:
            self._objects[key] = obj
        else:
            found.history.append(obj)
            del found.history[:-VERSIONS_KEPT]

    def _list(self, res: kmock.resource, check: Callable[[Obj], bool]) -> list[Obj]:
        return [
            found.raw
            for (r, _, _), found in self._objects.items()
            if r == res and not found.deleted and check(found.raw)
        ]

    def _emit(self, res: kmock.resource, kind: str, obj: Obj, old: Obj | None) -> None:
        event: Event = (int(obj["metadata"]["resourceVersion"]), res, kind, obj, old)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0][0]
        self._history.append(event)
        for queue in self._watchers:
            queue.put_nowait(event)

    # --- Watching ------------------------------------------------------------------------------------

    async def _watch(
        self,
        res: kmock.resource,
        params: Mapping[str, str],
        ns: str | None,
        name: str | None,
        raw: aiohttp.web.BaseRequest,
    ) -> aiohttp.web.StreamResponse:
        check = _selector(params, ns, name)
        since = params.get("resourceVersion") or "0"
        if not since.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resourceVersion: {since!r}")
        expired = since != "0" and int(since) < self._floor
        if since == "0":  # from now: the current state first, as ADDED events
            backlog: list[Event] = [(0, res, "ADDED", obj, None) for obj in self._list(res, check)]
        elif expired:  # gap 9: too old to resume from: the client must list again
            backlog = [(0, res, "ERROR", ApiError(410, "Expired", f"too old resource version: {since}").status(), None)]
        else:  # gap 9: resume exactly after the given resourceVersion
            backlog = [event for event in self._history if event[1] == res and event[0] > int(since)]
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._watchers.add(queue)  # no await since the snapshot above: no event can slip in between
        loop = asyncio.get_running_loop()
        timeout = params.get("timeoutSeconds")  # gap 9: the stream ends after it
        deadline = None if not timeout else loop.time() + float(timeout)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for event in backlog:
                await self._send(response, check, event)
            while not expired:
                try:
                    item = await asyncio.wait_for(queue.get(), None if deadline is None else deadline - loop.time())
                except TimeoutError:
                    if params.get("allowWatchBookmarks", "").lower() == "true":  # where to resume from
                        bookmark = {
                            "apiVersion": _api_version(res),
                            "kind": self.resources[res].kind,
                            "metadata": {"resourceVersion": str(self._rv)},
                        }
                        await self._send(response, check, (0, res, "BOOKMARK", bookmark, None))
                    break
                if item is None:  # the server is shutting down
                    break
                if item[1] == res:
                    await self._send(response, check, item)
            await response.write_eof()
        except ConnectionError:
            pass  # the client has gone
        finally:
            self._watchers.discard(queue)
        return response

    @staticmethod
    async def _send(response: aiohttp.web.StreamResponse, check: Callable[[Obj], bool], event: Event) -> None:
        _, _, kind, obj, old = event
        if kind == "MODIFIED" and check(obj) != (old is not None and check(old)):
            kind = "ADDED" if check(obj) else "DELETED"  # moved into or out of the selection
        elif kind not in ("ERROR", "BOOKMARK") and not check(obj):
            return
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    # --- Housekeeping --------------------------------------------------------------------------------

    def _count(self, method: str, plural: str, sub: str) -> None:
        with self._counts_lock:
            self._counts[method, plural, sub] += 1

    def _trim_log(self) -> None:
        # gap 15: kmock matches each reaction against its whole request log: O(n²) unless kept short.
        for log in [self._requests, *(payload._requests for payload in self._payloads)]:
            del log[:-LOG_SIZE]

    def _serve_stats(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.method == "POST" and raw.path == "/_emulator/stats/reset":
            self.reset_request_counts()
            return aiohttp.web.json_response({"reset": True})
        if raw.method == "GET" and raw.path == "/_emulator/stats":
            counts = self.request_counts
            return aiohttp.web.json_response(
                {
                    "total": sum(counts.values()),
                    "requests": {
                        f"{m} {p}/{s}" if p and s else f"{m} {p or s}": n for (m, p, s), n in sorted(counts.items())
                    },
                }
            )
        return aiohttp.web.json_response(ApiError(404, "NotFound", raw.path).status(), status=404)


def kubeconfig(url: str, namespace: str = "default") -> Obj:
    """A kubeconfig for the emulator: one cluster, a dummy token, the context ``emulator`` as current."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "emulator",
        "preferences": {},
        "clusters": [{"name": "emulator", "cluster": {"server": url, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [
            {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}
        ],
    }


def write_kubeconfig(url: str, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(kubeconfig(url), indent=2) + "\n")  # JSON is YAML
    return path


class EmulatorThread:
    """An ``Emulator`` on 127.0.0.1 in a daemon thread with its own event loop.

    ``with EmulatorThread(port=0) as emu: emu.url; emu.write_kubeconfig(path); emu.emulator.objects``
    """

    def __init__(self, port: int = 0, emulator: Emulator | None = None) -> None:
        self.emulator = emulator or Emulator()
        self.url = ""
        self._port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="k8s-emulator", daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with self.emulator.serve(self._port) as self.url:
                self._ready.set()
                await self._stop.wait()
        except Exception as e:
            self._error = e  # raised by start(), in the caller's thread
            logger.debug("The emulator has failed", exc_info=True)
        finally:
            self._ready.set()

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError("The Kubernetes API emulator did not start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def request_counts(self) -> dict[tuple[str, str, str], int]:
        return self.emulator.request_counts

    def reset_request_counts(self) -> None:
        self.emulator.reset_request_counts()

    def write_kubeconfig(self, path: str | Path) -> Path:
        return write_kubeconfig(self.url, path)


async def _serve_until_signalled(port: int, kubeconfig_path: Path | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with Emulator().serve(port) as url:
        if kubeconfig_path is not None:
            write_kubeconfig(url, kubeconfig_path)
        print(f"EMULATOR READY {url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autotek_operator.dev.emulator",
        description="Serve an in-memory Kubernetes API on 127.0.0.1 until SIGTERM.",
    )
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (default 0: any free port)")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for the emulator to this path")
    args = parser.parse_args(argv)
    asyncio.run(_serve_until_signalled(args.port, args.kubeconfig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
