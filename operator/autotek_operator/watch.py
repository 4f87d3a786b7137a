"""Credentials and Secrets are listed and watched here, not through kopf.

Every Secret in the watched namespaces comes through this watch, though only the few that
credentials name matter. kopf would keep a per-object memory for each of them and run its
per-event handler machinery for each event; here one thread per namespace (one for the whole
cluster) lists the objects page by page, then watches from the list's resourceVersion, parses
each event with ``json`` and hands the events to the runtime in batches, on the event loop.
Credentials come through the same machinery, with the operator's label selector applied by the
API server: the end of each complete list is what readiness waits for, and an object that
leaves the selection arrives as DELETED, which the runtime tells apart from a deletion.

Like an informer: a 410 (the resourceVersion is too old) or a failed resume leads to a new
list, after which objects missing from it are reported through ``on_listed``; a dropped stream resumes
from the last resourceVersion seen; errors back off from 1 s to 30 s, never in a hot loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import urllib3
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from . import constants as c

log = logging.getLogger("autotek_operator")

Key = tuple[str, str]
#: (event type or None for a listed object, the object as the API sent it)
Batch = list[tuple[str | None, dict[str, Any]]]

PAGE_SIZE = 500
RETRY_MIN, RETRY_MAX = 1.0, 30.0
CONNECT_TIMEOUT = 10.0
#: A watch that ends sooner than this without any event counts as a failure (backoff applies).
QUICK_END = 1.0


class _Expired(Exception):
    """410 (an answer or an ERROR event on the stream): the resourceVersion to resume from is too
    old; list again."""


class ListWatch:
    """Lists, then watches one kind of object in each namespace (``None``: the whole cluster).

    ``on_events(batch)`` gets each batch of events in order; ``on_listed(namespace, keys)`` comes
    after each complete list with the keys it held. Both are called through ``deliver`` (the
    event loop's ``call_soon_threadsafe``), so they run on the loop, never concurrently.
    Subclasses say what is listed (``what``, ``_request``)."""

    what = "objects"
    #: A list answered 404 (the resource is not served, e.g. its CRD is not installed) is a complete
    #: empty list: what waits for this list does not wait for ever. The list is retried with backoff.
    absent_when_not_served = False

    def __init__(
        self,
        namespaces: Sequence[str | None],
        *,
        deliver: Callable[..., Any],
        on_events: Callable[[Batch], None],
        on_listed: Callable[[str | None, set[Key]], None],
        timeout: int = 300,
        page_size: int = PAGE_SIZE,
        label_selector: str = "",
    ) -> None:
        self.label_selector = label_selector
        self.namespaces = tuple(dict.fromkeys(namespaces))  # one thread per namespace, even if repeated
        self.deliver = deliver
        self.on_events = on_events
        self.on_listed = on_listed
        self.timeout = timeout
        self.page_size = page_size
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        for ns in self.namespaces:
            name = f"autotek-{self.what.lower()}-{ns or 'all'}"
            thread = threading.Thread(target=self._run, args=(ns,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_soon(self) -> None:
        """Ask the threads to stop and end their streams, without waiting for them."""
        self._stop.set()
        with self._lock:
            streams = list(self._streams.values())
        for resp in streams:
            _shutdown(resp)

    def stop(self, wait: float = 2.0) -> None:
        self.stop_soon()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- one namespace ---------------------------------------------------------------------------

    def _run(self, ns: str | None) -> None:
        where = f"namespace {ns}" if ns else "all namespaces"
        version: str | None = None
        delay = RETRY_MIN
        failing: str | None = None
        while not self._stop.is_set():
            listed = False
            try:
                if version is None:
                    version = self._list(ns)
                    listed = True
                    failing = self._recovered(failing, where)
                if self._stop.is_set():
                    return
                started, before = time.monotonic(), version
                version = self._watch(ns, version)
                if version != before or time.monotonic() - started >= min(QUICK_END, self.timeout / 2):
                    delay = RETRY_MIN
                    failing = self._recovered(failing, where)
                    continue  # the stream ended normally (server timeout): resume from where it was
                problem = "the watch ended at once"  # e.g. a proxy closing it: do not reconnect in a hot loop
            except _Expired:
                log.debug("%s watch in %s: resourceVersion too old; listing again", self.what, where)
                version = None
                if not listed:
                    continue
                problem = "the resourceVersion just listed was already too old"
            except ApiException as exc:
                problem = f"HTTP {exc.status} {exc.reason or ''}".strip()
                if exc.status == 404 and version is None and self.absent_when_not_served:
                    problem += ": not served (is its CRD installed?); taken as none until it is"
                    if problem != failing:
                        # The resource is not served (its CRD is not installed): there are none of it.
                        self.deliver(self.on_listed, ns, set())
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                problem = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - anything else (a malformed event): the thread must live on
                problem = f"unexpected {type(exc).__name__}"
            if self._stop.is_set():
                return
            if problem != failing:  # once per distinct problem, not once per retry
                log.warning("watching %s in %s failed (%s); retrying with backoff", self.what, where, problem)
                failing = problem
            self._stop.wait(delay)
            delay = min(RETRY_MAX, delay * 2)

    def _recovered(self, failing: str | None, where: str) -> str | None:
        """Log the recovery from ``failing`` (if any); the new failure state, None."""
        if failing:
            log.info("watching %s in %s again", self.what, where)
        return None

    def _request(self, ns: str | None, **kw: Any) -> Any:
        """List (or watch, with ``watch=True``) the objects of ``ns`` or of all namespaces; the raw
        urllib3 response (its JSON is parsed here, not by the client's models)."""
        raise NotImplementedError

    def _selected(self, ns: str | None, **kw: Any) -> Any:
        """``_request`` with the label selector, which lists and watches alike must carry."""
        if self.label_selector:
            kw["label_selector"] = self.label_selector
        return self._request(ns, **kw)

    def _list(self, ns: str | None) -> str:
        keys: set[Key] = set()
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"limit": self.page_size, "_request_timeout": (CONNECT_TIMEOUT, 60.0)}
            if token:
                kw["_continue"] = token
            doc = json.loads(self._selected(ns, **kw).data)
            items = doc.get("items") or []
            batch: Batch = []
            for item in items:
                meta = item.setdefault("metadata", {})
                # List items carry no apiVersion/kind; namespace is always set by the API.
                keys.add((meta.get("namespace") or ns or "", meta.get("name", "")))
                batch.append((None, item))
            if batch:
                self.deliver(self.on_events, batch)
            meta = doc.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                self.deliver(self.on_listed, ns, keys)
                return str(meta.get("resourceVersion") or "")

    def _watch(self, ns: str | None, version: str) -> str:
        kw: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self.timeout,
            "_request_timeout": (CONNECT_TIMEOUT, self.timeout + 15),
        }
        if version:
            kw["resource_version"] = version
        try:
            resp = self._selected(ns, **kw)
        except ApiException as exc:
            if exc.status == 410:
                raise _Expired() from None
            raise
        with self._lock:
            self._streams[ns] = resp
        if self._stop.is_set():  # stop() ran before this stream was registered: it cannot end it
            _shutdown(resp)
        try:
            for batch in _batches(resp):
                events: Batch = []
                for event in batch:
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise _Expired()
                        raise ValueError("watch error")
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        version = str(rv)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        events.append((kind, obj))
                if events:
                    self.deliver(self.on_events, events)
                if self._stop.is_set():
                    break
        finally:
            with self._lock:
                self._streams.pop(ns, None)
            resp.release_conn()
        return version


class SecretWatch(ListWatch):
    """Every Secret in the watched namespaces."""

    what = "Secrets"

    def __init__(self, core: CoreV1Api, namespaces: Sequence[str | None], **kw: Any) -> None:
        super().__init__(namespaces, **kw)
        self.core = core

    def _request(self, ns: str | None, **kw: Any) -> Any:
        if ns:
            return self.core.list_namespaced_secret(ns, _preload_content=False, **kw)
        return self.core.list_secret_for_all_namespaces(_preload_content=False, **kw)


class CredentialWatch(ListWatch):
    """The AutoTekCredentials in the watched namespaces that the label selector selects."""

    what = "credentials"

    def __init__(self, custom: CustomObjectsApi, namespaces: Sequence[str | None], **kw: Any) -> None:
        super().__init__(namespaces, **kw)
        self.custom = custom

    def _request(self, ns: str | None, **kw: Any) -> Any:
        if ns:
            return self.custom.list_namespaced_custom_object(
                c.GROUP, c.VERSION, ns, c.PLURAL, _preload_content=False, **kw
            )
        return self.custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL, _preload_content=False, **kw)


class ClusterCredentialWatch(ListWatch):
    """The ClusterAutoTekCredentials the label selector selects (cluster-scoped: one thread)."""

    what = "cluster credentials"
    absent_when_not_served = True  # an operator upgraded before its ClusterAutoTekCredential CRD

    def __init__(self, custom: CustomObjectsApi, **kw: Any) -> None:
        super().__init__((None,), **kw)
        self.custom = custom

    def _request(self, ns: str | None, **kw: Any) -> Any:
        return self.custom.list_cluster_custom_object(
            c.GROUP, c.VERSION, c.CLUSTER_PLURAL, _preload_content=False, **kw
        )


class NamespaceWatch(ListWatch):
    """Every namespace: its name, labels and phase are all the runtime keeps (for the selectors of
    ClusterAutoTekCredentials). Nothing is ever written to a namespace, finalizers least of all."""

    what = "namespaces"

    def __init__(self, core: CoreV1Api, **kw: Any) -> None:
        super().__init__((None,), **kw)
        self.core = core

    def _request(self, ns: str | None, **kw: Any) -> Any:
        return self.core.list_namespace(_preload_content=False, **kw)


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (the read sees the end of the stream)."""
    try:
        resp.shutdown()
    except (OSError, ValueError, RuntimeError) as exc:  # already closed or released
        log.debug("closing the Secret watch: %s", type(exc).__name__)


def _batches(resp: Any) -> Iterator[list[dict[str, Any]]]:
    """The watch stream's events, as lists of those that arrived together."""
    pending = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        pending += chunk
        if b"\n" not in pending:
            continue
        *lines, pending = pending.split(b"\n")
        events = [json.loads(line) for line in lines if line.strip()]
        if events:
            yield events
    if pending.strip():
        yield [json.loads(pending)]
