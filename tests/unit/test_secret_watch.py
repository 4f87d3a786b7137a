"""watch.SecretWatch over real HTTP against the embedded API emulator, and the runtime's side of it.

The watch runs its own threads; ``deliver`` here is a recorder that calls the callback under a
lock (as the event loop's ``call_soon_threadsafe`` would: one at a time) and wakes the test. Faults
are injected with kmock reactions registered on the emulator, so the client sees real HTTP errors.
Only the paging case uses a fake CoreV1Api: the emulator ignores ``limit``.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import kmock
import kubernetes.client
import pytest
from fakes import FakeKube, FakeTokens, running_runtime, settle
from kubernetes.client.exceptions import ApiException

from autotek_operator import scheduling, watch
from autotek_operator.dev.emulator import EmulatorThread
from autotek_operator.runtime import Runtime
from autotek_operator.watch import ClusterCredentialWatch, SecretWatch

# An exception escaping a watch thread (say, from stop() closing the stream) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

Key = tuple[str, str]
LIST = ("GET", "secrets", "")
WATCH = ("WATCH", "secrets", "")


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# -- recording what the watch delivers ------------------------------------------------------------


class Recorder:
    """``deliver`` for the watch, and the two callbacks it delivers to."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        #: ("events", [(type, body), ...]) or ("listed", namespace, keys), in delivery order
        self.log: list[tuple[Any, ...]] = []
        self.after_listed: Callable[[int], None] | None = None

    def deliver(self, fn: Callable[..., Any], *args: Any) -> None:
        with self.cond:
            fn(*args)
            self.cond.notify_all()

    def on_events(self, batch: list[tuple[str | None, dict[str, Any]]]) -> None:
        self.log.append(("events", list(batch)))

    def on_listed(self, namespace: str | None, keys: set[Key]) -> None:
        self.log.append(("listed", namespace, frozenset(keys)))
        if self.after_listed is not None:
            self.after_listed(len(self.listed()))

    def listed(self) -> list[tuple[str | None, set[Key]]]:
        return [(e[1], set(e[2])) for e in self.log if e[0] == "listed"]

    def events(self, *, listed: bool | None = None) -> list[tuple[str | None, str, str, int, dict[str, str]]]:
        """(type, namespace, name, resourceVersion, data) of every event; ``listed``: only those
        from a list (True) or only watch events (False)."""
        out = []
        for entry in self.log:
            if entry[0] != "events":
                continue
            for kind, body in entry[1]:
                if listed is not None and (kind is None) != listed:
                    continue
                meta = body["metadata"]
                out.append((kind, meta["namespace"], meta["name"], int(meta["resourceVersion"]), body.get("data")))
        return out

    def watched(self) -> list[tuple[str | None, str, str, dict[str, str]]]:
        return [(kind, ns, name, data) for kind, ns, name, _, data in self.events(listed=False)]

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; delivered: {self.log!r}")


# -- the emulator, its Secrets, and faults --------------------------------------------------------


class Cluster:
    """Writes Secrets to the emulator through its own client; remembers every data value written."""

    def __init__(self, emu: EmulatorThread) -> None:
        self.emu = emu
        self.api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=emu.url))
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.values: list[str] = []

    def _data(self) -> dict[str, str]:
        value = f"secret-value-{uuid.uuid4().hex}"
        self.values.append(value)
        return {"token": b64(value)}

    def put(self, namespace: str, name: str) -> dict[str, str]:
        data = self._data()
        body: Any = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}
        self.core.create_namespaced_secret(namespace, body)
        return data

    def update(self, namespace: str, name: str) -> dict[str, str]:
        data = self._data()
        self.core.patch_namespaced_secret(name, namespace, {"data": data})
        return data

    def delete(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_secret(name, namespace)


class Fault:
    """A kmock reaction on ``GET path`` (lists and watches) answering HTTP errors: first the
    statuses in ``script``, one per request, then ``forever`` while it is set. Once it lets a
    request through it steps aside for good (the emulator disables a reaction that declines)."""

    def __init__(
        self,
        emu: EmulatorThread,
        path: str,
        script: tuple[int, ...] = (),
        *,
        forever: int | None = None,
        watch_only: bool = False,
    ) -> None:
        self.script = list(script)
        self.forever = forever
        self.watch_only = watch_only
        self.answered: list[int] = []
        self._lock = threading.Lock()
        emu.emulator[f"get {path}"] << self

    def __call__(self, request: kmock.Request) -> Any:
        watching = request.params.get("watch") == "true"
        with self._lock:
            if self.watch_only and not watching:
                return NotImplemented
            if self.script:
                code = self.script.pop(0)
            elif self.forever is not None:
                code = self.forever
            else:
                return NotImplemented
            self.answered.append(code)
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": "injected"}
        return kmock.Response(status=code, payload=status)


def counts(emu: EmulatorThread, what: tuple[str, str, str]) -> int:
    return emu.request_counts.get(what, 0)


@pytest.fixture
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(port=0) as emu:
        yield emu


@pytest.fixture
def cluster(emu: EmulatorThread, caplog: pytest.LogCaptureFixture) -> Iterator[Cluster]:
    """The emulator's Secrets; afterwards, no value they ever held may be in any log record."""
    caplog.set_level(logging.DEBUG)
    for name in ("autotek_operator", "kubernetes", "urllib3", "aiohttp", "kmock"):
        caplog.set_level(logging.DEBUG, logger=name)  # whatever an earlier logs.configure() set
    cluster = Cluster(emu)
    yield cluster
    cluster.api.close()
    assert cluster.values, "the test wrote no Secret: nothing was checked"
    records = [r for phase in ("setup", "call", "teardown") for r in caplog.get_records(phase)]  # type: ignore[arg-type]
    assert records, "no log record was captured at all"
    for record in records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        for value in cluster.values:
            assert value not in text and b64(value) not in text, f"a Secret value was logged: {record!r}"


def recorded_watch(
    core: Any, namespaces: Any, timeout: int, page_size: int = watch.PAGE_SIZE
) -> tuple[SecretWatch, Recorder]:
    """A SecretWatch (not started) that delivers to a new Recorder."""
    rec = Recorder()
    secrets = SecretWatch(
        core,
        namespaces,
        deliver=rec.deliver,
        on_events=rec.on_events,  # type: ignore[arg-type]
        on_listed=rec.on_listed,
        timeout=timeout,
        page_size=page_size,
    )
    return secrets, rec


@pytest.fixture
def start(emu: EmulatorThread, cluster: Cluster) -> Iterator[Callable[..., tuple[SecretWatch, Recorder]]]:
    """Starts a SecretWatch with its own client; stops it (and checks it ended) afterwards."""
    started: list[tuple[SecretWatch, kubernetes.client.ApiClient]] = []

    def start_watch(namespaces: tuple[str | None, ...] = (None,), timeout: int = 30) -> tuple[SecretWatch, Recorder]:
        api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=emu.url))
        secrets, rec = recorded_watch(kubernetes.client.CoreV1Api(api), namespaces, timeout)
        started.append((secrets, api))
        secrets.start()
        return secrets, rec

    yield start_watch
    for secrets, api in started:
        secrets.stop()  # often right after a list, while the watch request is on its way
        assert not any(t.is_alive() for t in secrets._threads), "a watch thread outlived stop()"
        api.close()


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "autotek_operator"]


# -- the list -------------------------------------------------------------------------------------


def test_cluster_wide_list_delivers_every_secret_then_exactly_their_keys(
    emu: EmulatorThread, cluster: Cluster, start: Any
) -> None:
    data = {("a", "one"): cluster.put("a", "one"), ("a", "two"): cluster.put("a", "two")}
    data["b", "one"] = cluster.put("b", "one")
    _, rec = start((None,))
    rec.wait("the list", rec.listed)
    assert rec.listed() == [(None, set(data))]
    # The listed objects come first, as (None, body) with their data, then on_listed.
    assert [e[0] for e in rec.log] == ["events", "listed"]
    listed = rec.events(listed=True)
    assert {(ns, name): d for _, ns, name, _, d in listed} == data
    assert len(listed) == 3 and all(kind is None for kind, *_ in listed)
    assert counts(emu, LIST) == 1


def test_namespaced_lists_hold_only_their_namespaces_secrets(emu: EmulatorThread, cluster: Cluster, start: Any) -> None:
    for ns, name in (("a", "one"), ("a", "two"), ("b", "one"), ("c", "one")):
        cluster.put(ns, name)
    _, rec = start(("a", "c"))  # one thread each
    rec.wait("both lists", lambda: len(rec.listed()) == 2)
    assert dict(rec.listed()) == {"a": {("a", "one"), ("a", "two")}, "c": {("c", "one")}}
    assert sorted((ns, name) for _, ns, name, _, _ in rec.events(listed=True)) == [
        ("a", "one"),
        ("a", "two"),
        ("c", "one"),
    ]
    cluster.put("b", "late")
    cluster.put("c", "late")
    rec.wait("the Secret created in c", lambda: rec.watched())
    assert [(kind, ns, name) for kind, ns, name, _ in rec.watched()] == [("ADDED", "c", "late")]
    assert counts(emu, LIST) == 2


# -- the watch ------------------------------------------------------------------------------------


def test_changes_after_the_list_arrive_in_order_with_their_bodies(cluster: Cluster, start: Any) -> None:
    cluster.put("a", "kept")
    _, rec = start((None,))
    rec.wait("the list", rec.listed)
    v1 = cluster.put("a", "s1")
    v2 = cluster.update("a", "s1")
    v3 = cluster.put("a", "s2")
    cluster.delete("a", "s1")
    rec.wait("four events", lambda: len(rec.watched()) >= 4)
    assert rec.watched() == [
        ("ADDED", "a", "s1", v1),
        ("MODIFIED", "a", "s1", v2),
        ("ADDED", "a", "s2", v3),
        ("DELETED", "a", "s1", v2),
    ]
    versions = [rv for *_, rv, _ in rec.events(listed=False)]
    assert versions == sorted(versions) and len(set(versions)) == 4
    assert rec.listed() == [(None, {("a", "kept")})]  # nothing listed again


def test_an_ended_stream_resumes_from_the_last_resource_version(
    emu: EmulatorThread, cluster: Cluster, start: Any
) -> None:
    cluster.put("a", "old1")
    cluster.put("a", "old2")
    _, rec = start((None,), timeout=1)  # the server ends each stream after 1 s
    rec.wait("the list", rec.listed)
    created = []
    for i in range(7):
        name = f"new{i}"
        created.append(("ADDED", name, cluster.put("a", name)))
        time.sleep(0.35)
    rec.wait("every Secret created", lambda: len(rec.watched()) >= len(created))
    time.sleep(0.3)  # a duplicate would come with the next reconnect
    assert counts(emu, WATCH) >= 3, "the streams did not end and resume as meant"
    # Exactly once each, in order, and nothing already listed comes again as ADDED.
    assert [(kind, name, data) for kind, _, name, data in rec.watched()] == created
    assert counts(emu, LIST) == 1 and len(rec.listed()) == 1
    # Each watch resumes where the last one ended (never from "0", which replays everything).
    resumed = [int(r.params["resourceVersion"]) for r in list(emu.emulator) if r.params.get("watch") == "true"]
    assert resumed and all(v > 0 for v in resumed) and resumed == sorted(resumed)
    assert all(r.params.get("allowWatchBookmarks") == "true" for r in list(emu.emulator) if r.params.get("watch"))


@pytest.mark.parametrize("how", ["expired-resource-version", "http-410"])
def test_gone_leads_to_a_new_list_and_on_listed(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    cluster.put("a", "s0")
    _, rec = start((None,), timeout=1)
    rec.wait("the list", rec.listed)
    if how == "expired-resource-version":
        # The emulator answers 410 (an ERROR event) to a resume from below its history floor.
        # Once the new list is delivered (in the watch thread, before it watches again), the
        # history is whole again: the list's resourceVersion is fresh, as on a real server.
        rec.after_listed = lambda n: setattr(emu.emulator, "_floor", 0) if n >= 2 else None
        emu.emulator._floor = 10**9
    else:
        Fault(emu, "/api/v1/secrets", (410,), watch_only=True)  # HTTP 410 to the next watch
    rec.wait("a second list", lambda: len(rec.listed()) == 2)
    assert rec.listed() == [(None, {("a", "s0")}), (None, {("a", "s0")})]
    assert [(kind, name) for kind, _, name, _, _ in rec.events(listed=True)] == [(None, "s0"), (None, "s0")]
    assert counts(emu, LIST) == 2
    data = cluster.put("a", "s1")
    rec.wait("the Secret created after", rec.watched)
    assert rec.watched() == [("ADDED", "a", "s1", data)]
    assert len(warnings_logged(caplog)) <= 1
    if how == "expired-resource-version":
        assert any("too old" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


# -- errors ---------------------------------------------------------------------------------------


def test_a_failing_list_backs_off_warns_once_and_recovers(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.put("a", "s1")
    fault = Fault(emu, "/api/v1/secrets", forever=500)
    emu.reset_request_counts()
    _, rec = start((None,))
    time.sleep(2.5)
    attempts = counts(emu, LIST)
    assert 2 <= attempts <= 3, f"{attempts} list attempts in 2.5 s: expected tries at 0 s, 1 s (then 3 s)"
    assert rec.log == []
    warned = warnings_logged(caplog)
    assert len(warned) == 1 and "HTTP 500" in warned[0] and "all namespaces" in warned[0]
    fault.forever = None  # the server answers again
    rec.wait("the list once the server answers", rec.listed, timeout=4)
    assert rec.listed() == [(None, {("a", "s1")})]
    assert len(warnings_logged(caplog)) == 1


def test_a_watch_that_ends_at_once_backs_off_instead_of_reconnecting_in_a_loop(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.put("a", "s1")
    _, rec = start((None,), timeout=2)  # a normal watch lasts 2 s: longer than "at once"
    rec.wait("the list", rec.listed)
    # Like a proxy that answers every watch at once with an empty 200: no event, no error.
    fault = Fault(emu, "/api/v1/secrets", forever=200, watch_only=True)
    rec.wait("the first watch that ends at once", lambda: fault.answered, timeout=5)
    emu.reset_request_counts()
    time.sleep(3.5)
    attempts = counts(emu, WATCH)
    assert 1 <= attempts <= 3, f"{attempts} watch requests in 3.5 s: expected backoff (1 s, 2 s, 4 s)"
    warned = warnings_logged(caplog)
    assert len(warned) == 1 and "ended at once" in warned[0]
    fault.forever = None
    later = cluster.put("a", "after")
    rec.wait("events again", rec.watched, timeout=8)
    assert rec.watched() == [("ADDED", "a", "after", later)]
    assert counts(emu, LIST) == 0  # resumed from where it was, not listed again


def test_a_malformed_event_does_not_end_the_watch_thread(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.put("a", "s1")
    secrets, rec = start((None,), timeout=2)
    rec.wait("the list", rec.listed)
    sent: list[int] = []

    def malformed(request: kmock.Request) -> Any:
        if request.params.get("watch") != "true" or sent:
            return NotImplemented
        sent.append(1)
        return kmock.Response(status=200, payload={"type": "ADDED", "object": ["not", "an", "object"]})

    emu.emulator["get /api/v1/secrets"] << malformed
    rec.wait("the malformed event sent", lambda: sent, timeout=5)
    later = cluster.put("a", "after")
    rec.wait("events again", rec.watched, timeout=8)
    assert rec.watched() == [("ADDED", "a", "after", later)]
    assert all(t.is_alive() for t in secrets._threads)
    warned = warnings_logged(caplog)
    assert len(warned) == 1 and "unexpected AttributeError" in warned[0]


def test_one_warning_per_distinct_problem_then_again(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setattr(watch, "RETRY_MIN", 0.02)
    monkeypatch.setattr(watch, "RETRY_MAX", 0.08)
    cluster.put("a", "s1")
    fault = Fault(emu, "/api/v1/secrets", (500, 500, 500, 403, 403, 403))
    _, rec = start((None,), timeout=1)
    rec.wait("the list once the server answers", rec.listed)
    assert fault.answered == [500, 500, 500, 403, 403, 403]
    assert counts(emu, LIST) == 7
    warned = warnings_logged(caplog)
    assert len(warned) == 2
    assert "HTTP 500 Internal Server Error" in warned[0] and "HTTP 403 Forbidden" in warned[1]
    # Back to normal is said once the watch has worked (its first stream ends after 1 s).
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and not any("again" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert [r.getMessage() for r in caplog.records if "again" in r.getMessage()] == [
        "watching Secrets in all namespaces again"
    ]


def test_a_failing_watch_retries_from_where_it_was_without_listing_again(
    emu: EmulatorThread, cluster: Cluster, start: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setattr(watch, "RETRY_MIN", 0.05)
    cluster.put("a", "s0")
    _, rec = start((None,), timeout=1)
    rec.wait("the list", rec.listed)
    fault = Fault(emu, "/api/v1/secrets", (503, 503), watch_only=True)
    data = cluster.put("a", "during")  # in the open stream, or in the history the retry resumes from
    rec.wait("the watch back", lambda: fault.answered == [503, 503] and rec.watched(), timeout=5)
    later = cluster.put("a", "after")
    rec.wait("the Secret created after", lambda: len(rec.watched()) >= 2)
    assert rec.watched() == [("ADDED", "a", "during", data), ("ADDED", "a", "after", later)]
    assert counts(emu, LIST) == 1 and len(rec.listed()) == 1
    assert [w for w in warnings_logged(caplog) if "HTTP 503" in w] and len(warnings_logged(caplog)) == 1


# -- paging (a fake core: the emulator ignores limit) ---------------------------------------------


class _Resp:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc).encode()


class _Stream:
    """A watch response that sends nothing until shut down."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.released = False

    def stream(self, amt: Any = None, decode_content: Any = None) -> Iterator[bytes]:
        self.closed.wait(10)
        return iter(())

    def shutdown(self) -> None:
        self.closed.set()

    def release_conn(self) -> None:
        self.released = True


class PagedCore:
    """list_* of a CoreV1Api: pages of 2 (and ``continue`` tokens), then a watch that waits."""

    def __init__(self, namespace: str | None) -> None:
        self.namespace = namespace
        ns = namespace or "a"
        items = [{"metadata": {"namespace": ns, "name": f"s{i}", "resourceVersion": str(10 + i)}} for i in range(5)]
        self.pages = {
            None: ({"metadata": {"resourceVersion": "15", "continue": "t1"}, "items": items[0:2]}),
            "t1": ({"metadata": {"resourceVersion": "16", "continue": "t2"}, "items": items[2:4]}),
            "t2": ({"metadata": {"resourceVersion": "17", "continue": ""}, "items": items[4:5]}),
        }
        self.lists: list[dict[str, Any]] = []
        self.watches: list[dict[str, Any]] = []
        self.streams: list[_Stream] = []
        self.watching = threading.Event()

    def _call(self, kw: dict[str, Any]) -> Any:
        if kw.get("watch"):
            self.watches.append(kw)
            self.streams.append(_Stream())
            self.watching.set()
            return self.streams[-1]
        self.lists.append(kw)
        return _Resp(self.pages[kw.get("_continue")])

    def list_secret_for_all_namespaces(self, **kw: Any) -> Any:
        assert self.namespace is None
        return self._call(kw)

    def list_namespaced_secret(self, namespace: str, **kw: Any) -> Any:
        assert namespace == self.namespace
        return self._call(kw)


@pytest.mark.parametrize("namespace", [None, "a"])
def test_every_page_is_delivered_and_the_last_pages_version_is_watched(namespace: str | None) -> None:
    core = PagedCore(namespace)
    secrets, rec = recorded_watch(core, [namespace], timeout=77, page_size=2)
    secrets.start()
    try:
        assert core.watching.wait(5)
    finally:
        secrets.stop()
    assert not any(t.is_alive() for t in secrets._threads)
    assert [kw.get("limit") for kw in core.lists] == [2, 2, 2]
    assert [kw.get("_continue") for kw in core.lists] == [None, "t1", "t2"]
    # One batch per page, each item as (None, body), then the union of the keys.
    assert [e[0] for e in rec.log] == ["events", "events", "events", "listed"]
    assert [[(kind, body["metadata"]["name"]) for kind, body in e[1]] for e in rec.log[:3]] == [
        [(None, "s0"), (None, "s1")],
        [(None, "s2"), (None, "s3")],
        [(None, "s4")],
    ]
    assert rec.listed() == [(namespace, {(namespace or "a", f"s{i}") for i in range(5)})]
    assert len(core.watches) == 1
    kw = core.watches[0]
    assert kw["resource_version"] == "17" and kw["allow_watch_bookmarks"] is True and kw["timeout_seconds"] == 77
    assert core.streams[0].released


# -- stop -----------------------------------------------------------------------------------------


def test_stop_returns_promptly_while_a_long_watch_is_open(emu: EmulatorThread, cluster: Cluster, start: Any) -> None:
    cluster.put("a", "s1")
    secrets, rec = start((None, "a"), timeout=300)
    rec.wait("the lists", lambda: len(rec.listed()) == 2)
    deadline = time.monotonic() + 5
    while counts(emu, WATCH) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # both streams open and waiting
    began = time.monotonic()
    secrets.stop()
    took = time.monotonic() - began
    assert took < 1.5, f"stop() took {took:.1f}s: the open streams were not shut down"  # join waits up to 2 s
    assert len(secrets._threads) == 2 and not any(t.is_alive() for t in secrets._threads)


def test_stop_between_the_list_and_the_watch_ends_the_thread(emu: EmulatorThread, cluster: Cluster, start: Any) -> None:
    cluster.put("a", "s1")
    rec = Recorder()
    stopper: list[threading.Thread] = []
    secrets = SecretWatch(
        kubernetes.client.CoreV1Api(cluster.api),
        [None],
        deliver=rec.deliver,
        on_events=rec.on_events,
        on_listed=rec.on_listed,
        timeout=300,
    )

    def stop_now(n: int) -> None:  # in the watch thread, after the list, before the watch
        stopper.append(threading.Thread(target=secrets.stop, args=(3.0,)))
        stopper[0].start()
        time.sleep(0.2)  # stop() has set the flag and found no stream to shut down

    rec.after_listed = stop_now
    secrets.start()
    rec.wait("the list", rec.listed)
    stopper[0].join(5)
    assert not any(t.is_alive() for t in secrets._threads)
    assert counts(emu, WATCH) == 0  # no stream opened after stop()


def test_stop_while_the_watch_request_is_in_flight_ends_the_stream_it_returns() -> None:
    core = PagedCore(None)
    answer = threading.Event()
    requested = threading.Event()
    plain = core._call

    def slow(kw: dict[str, Any]) -> Any:
        if kw.get("watch"):
            requested.set()
            answer.wait(5)  # the response arrives only after stop() has looked for streams
        return plain(kw)

    core._call = slow  # type: ignore[method-assign]
    secrets, rec = recorded_watch(core, [None], timeout=300, page_size=2)
    secrets.start()
    assert requested.wait(5)
    stopper = threading.Thread(target=secrets.stop, args=(3.0,))
    began = time.monotonic()
    stopper.start()
    time.sleep(0.2)
    answer.set()
    stopper.join(5)
    assert time.monotonic() - began < 2, "the stream returned after stop() was left open"
    assert not any(t.is_alive() for t in secrets._threads)
    assert core.streams[0].closed.is_set() and core.streams[0].released


# -- the runtime's side: on_secrets_listed and _known_target ---------------------------------------

NS = "shop"


def credential(**target: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"clientSecretRef": {"name": "client"}}
    if target:
        spec["target"] = target
    return {"metadata": {"namespace": NS, "name": "autotek", "uid": "u1", "generation": 1}, "spec": spec}


@pytest.fixture
async def rt(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS) as world:
        yield world


def calls_for(kube: FakeKube, name: str) -> list[str]:
    return [verb for verb, n in kube.calls if n == name]


def ready(kube: FakeKube) -> tuple[str, str]:
    cond = kube.statuses[(NS, "autotek")]["conditions"][0]
    return cond["status"], cond["reason"]


async def test_a_relist_reports_a_missing_target_as_deleted_and_the_pass_restores_it(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes = {None}
    runtime.on_credential_event(None, credential())
    await settle(runtime, 0.15, 0.02)
    assert tokens.count == 1 and (NS, "autotek") in kube.secrets
    # The watch lists what is there (our own write included): nothing to do.
    listed = [(None, copy.deepcopy(kube.secrets[k])) for k in ((NS, "client"), (NS, "autotek"))]
    runtime.on_secret_events(listed)
    runtime.on_secrets_listed(None, {(NS, "client"), (NS, "autotek")})
    await settle(runtime, 0.15, 0.02)
    passes = runtime.passes
    assert passes == 1 and runtime.listed_scopes == {None}
    # The target is deleted while the watch is down; another namespace's list says nothing of it.
    del kube.secrets[(NS, "autotek")]
    runtime.on_secrets_listed("elsewhere", set())
    await settle(runtime, 0.15, 0.02)
    assert runtime.passes == passes and (NS, "autotek") in runtime.secret_versions
    # The next complete list lacks it: reported deleted, and the pass writes it again.
    runtime.on_secrets_listed(None, {(NS, "client")})
    assert (NS, "autotek") not in runtime.secret_versions and (NS, "client") in runtime.secret_versions
    await settle(runtime, 0.15, 0.02)
    assert runtime.passes == passes + 1
    assert kube.secrets[(NS, "autotek")]["data"]["access_token"] == b64("tok-1")
    assert tokens.count == 1  # the held token, restored: no new one


@pytest.mark.parametrize(
    ("case", "gets"),
    [
        ("all scopes listed, Secret unseen", False),
        ("no Secret watch", True),
        ("not listed yet", True),
        ("one of two scopes listed", True),
        ("Secret seen on the watch", True),
        ("creationPolicy Merge", True),
    ],
)
async def test_first_pass_reads_the_target_only_when_its_absence_is_not_known(rt: Any, case: str, gets: bool) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes, runtime.listed_scopes = {None}, {None}
    body = credential()
    if case == "no Secret watch":
        runtime.secret_scopes, runtime.listed_scopes = set(), set()
    elif case == "not listed yet":
        runtime.listed_scopes = set()
    elif case == "one of two scopes listed":
        runtime.secret_scopes, runtime.listed_scopes = {NS, "other"}, {NS}
    elif case == "Secret seen on the watch":
        runtime.secret_versions[(NS, "autotek")] = "5"  # (since deleted: the GET finds nothing)
    elif case == "creationPolicy Merge":
        body = credential(creationPolicy="Merge")
    runtime.on_credential_event(None, body)
    await settle(runtime, 0.15, 0.02)
    assert runtime.passes == 1
    if case == "creationPolicy Merge":
        assert calls_for(kube, "autotek") == ["get", "status"] and tokens.count == 0
        assert ready(kube) == ("False", "TargetNotFound") and (NS, "autotek") not in kube.secrets
        return
    assert calls_for(kube, "autotek") == (["get"] if gets else []) + ["create", "status"]
    assert tokens.count == 1
    assert ready(kube)[0] == "True"
    assert kube.secrets[(NS, "autotek")]["data"]["access_token"] == b64("tok-1")


async def test_a_target_the_watch_has_not_reported_yet_goes_through_the_conflict_path(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes, runtime.listed_scopes = {None}, {None}
    foreign = kube.put_secret(NS, "autotek", {"someone": "else"})  # exists, but no event for it yet
    runtime.on_credential_event(None, credential())
    await settle(runtime, 0.15, 0.02)
    # Assumed absent: create -> 409 (FakeKube raises kube.Conflict) -> read -> not ours: refused.
    assert calls_for(kube, "autotek") == ["create", "get", "status"]
    assert ready(kube) == ("False", "TargetConflict")
    assert kube.secrets[(NS, "autotek")] == foreign


async def test_our_own_target_the_watch_has_not_reported_yet_is_updated_after_the_conflict(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes, runtime.listed_scopes = {None}, {None}
    owner = {
        "apiVersion": "autotek.io/v1alpha1",
        "kind": "AutoTekCredential",
        "name": "autotek",
        "uid": "u1",
        "controller": True,
    }
    kube.put_secret(NS, "autotek", {"access_token": "stale"}, ownerReferences=[owner])
    runtime.on_credential_event(None, credential())
    await settle(runtime, 0.15, 0.02)
    assert calls_for(kube, "autotek") == ["create", "get", "replace", "status"]
    assert ready(kube)[0] == "True"
    assert kube.secrets[(NS, "autotek")]["data"]["access_token"] == b64("tok-1")


class _NotServed:
    """list_cluster_custom_object of a CustomObjectsApi whose resource is not served (404) until ``serve``."""

    def __init__(self) -> None:
        self.served = threading.Event()
        self.lists = 0
        self.watching = threading.Event()

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **kw: Any) -> Any:
        if kw.get("watch"):
            self.watching.set()
            return _Stream()
        self.lists += 1
        if not self.served.is_set():
            raise ApiException(status=404, reason="Not Found")
        return _Resp({"metadata": {"resourceVersion": "5"}, "items": [{"metadata": {"name": "cc"}}]})


@pytest.mark.parametrize("absent_ok", [True, False])
def test_a_resource_not_served_is_an_empty_list_only_where_that_is_safe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, absent_ok: bool
) -> None:
    """The cluster credentials' list answering 404 (an operator upgraded before the CRD) counts as a
    complete empty list, once per failing spell, so that convergence does not wait for it; the list is
    retried with backoff and the real list follows once the CRD is served."""
    monkeypatch.setattr(watch, "RETRY_MIN", 0.05)
    api = _NotServed()
    rec = Recorder()
    w = ClusterCredentialWatch(api, deliver=rec.deliver, on_events=rec.on_events, on_listed=rec.on_listed)
    monkeypatch.setattr(w, "absent_when_not_served", absent_ok)
    w.start()
    try:
        deadline = time.monotonic() + 5
        while api.lists < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.listed() == ([(None, set())] if absent_ok else [])
        api.served.set()
        assert api.watching.wait(5)
    finally:
        w.stop()
    assert rec.listed()[-1] == (None, {("", "cc")})
    assert len(rec.listed()) == (2 if absent_ok else 1)
    assert len([m for m in warnings_logged(caplog) if "404" in m]) == 1
