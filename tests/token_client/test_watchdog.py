"""The whole-request deadline: one shared watchdog thread per client, one deadline per request."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from autotek_operator import errors, token_client
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenClient, TokenRequest, _Watchdog

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import RawRequest, RawServer, assert_no_leak, drip

TIMEOUT = 0.5
DEADLINE = 2 * TIMEOUT
LATE = 0.6  # how long after its deadline a request may still take to fail, on a loaded machine
GOOD_BODY = json.dumps({"access_token": "at-dripped", "expires_in": 60, "token_type": "bearer"}).encode()


def _req(url: str) -> TokenRequest:
    return TokenRequest(url + "/token", CLIENT_ID, CLIENT_SECRET)


def _drip_headers(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
    """Each byte well within the read timeout, the whole answer far past the deadline."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    drip(conn, b"X-Slow: " + b"a" * 60 + b"\r\n", 0.05, stopping)
    conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(GOOD_BODY), GOOD_BODY))


def _drip_body(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(GOOD_BODY))
    drip(conn, GOOD_BODY, 0.05, stopping)


def _answer(conn: socket.socket, token: str) -> None:
    body = json.dumps({"access_token": token, "expires_in": 60, "token_type": "bearer"}).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def _watchdog_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == _Watchdog.THREAD_NAME}


@pytest.fixture
def aborts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    """Every time the watchdog acts: (the acting thread's name, the connections it shuts down)."""
    seen: list[tuple[str, list[Any]]] = []
    real = token_client._abort

    def spy(conns: list[Any]) -> None:
        seen.append((threading.current_thread().name, list(conns)))
        real(conns)

    monkeypatch.setattr(token_client, "_abort", spy)
    return seen


# -- through the client ------------------------------------------------------------------------


@pytest.mark.parametrize("respond", [_drip_headers, _drip_body], ids=["headers", "body"])
def test_slow_drip_is_cut_off_by_the_shared_watchdog(make_client, aborts, respond) -> None:
    with RawServer(respond) as server:
        client = make_client(server.url, timeout=TIMEOUT)
        started = time.monotonic()
        with pytest.raises(errors.TokenEndpointUnavailable) as info:
            client.request(_req(server.url))
        elapsed = time.monotonic() - started
    assert "timed out" in str(info.value)
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + LATE, f"gave up after {elapsed:.2f}s"
    assert_no_leak(info.value, CLIENT_SECRET, "at-dripped")
    assert [name for name, _ in aborts] == [_Watchdog.THREAD_NAME]
    assert client._watchdog._thread.name == _Watchdog.THREAD_NAME
    assert client._watchdog._thread.daemon


def test_concurrent_requests_each_get_their_own_deadline(broker: BrokerServer, make_client, aborts) -> None:
    broker.configure(delay=0.3)
    with RawServer(_drip_headers) as slow:
        client = make_client(slow.url, broker.url, timeout=TIMEOUT, max_concurrent=12)
        slow_results: dict[str, tuple[str, float, float]] = {}
        fast_results: dict[int, list[str]] = {}
        failures: list[BaseException] = []
        t0 = time.monotonic()

        def run_slow(name: str, after: float) -> None:
            time.sleep(after)
            started = time.monotonic()
            try:
                client.request(_req(slow.url))
                slow_results[name] = ("answered", started - t0, time.monotonic() - started)
            except errors.TokenEndpointUnavailable as exc:
                slow_results[name] = (str(exc), started - t0, time.monotonic() - started)

        def run_fast(i: int) -> None:
            try:
                # Four requests of 0.3 s each: in flight before, while and after the slow deadlines pass.
                fast_results[i] = [
                    client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)).access_token
                    for _ in range(4)
                ]
            except BaseException as exc:  # collected and asserted on below
                failures.append(exc)

        threads = [
            threading.Thread(target=run_slow, args=("first", 0.0)),
            threading.Thread(target=run_slow, args=("second", 0.4)),
            *(threading.Thread(target=run_fast, args=(i,)) for i in range(8)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)

    assert failures == []
    assert len(fast_results) == 8
    assert len({tok for toks in fast_results.values() for tok in toks}) == 32
    assert broker.stats()["count"] == 32
    for name in ("first", "second"):
        message, _, elapsed = slow_results[name]
        assert "timed out" in message, name
        assert DEADLINE - 0.05 <= elapsed < DEADLINE + LATE, f"{name} gave up after {elapsed:.2f}s"
    # Each slow request failed at its own deadline, not at the other's.
    assert slow_results["second"][1] - slow_results["first"][1] >= 0.35
    # The watchdog acted twice, each time on the one connection of a slow request only.
    assert len(aborts) == 2
    for _, conns in aborts:
        assert [c.port for c in conns] == [slow.port]
    assert client._watchdog._heap == []  # nothing left behind once every request is over


def test_one_watchdog_thread_per_client(broker: BrokerServer, make_client) -> None:
    gc.collect()
    before = _watchdog_threads()
    client = make_client(broker.url)
    assert client._watchdog._thread is None  # started with the first request, not before
    req = TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)
    for _ in range(50):
        client.request(req)
        assert len(_watchdog_threads() - before) == 1
    assert len(client._watchdog._heap) == 0

    def five(c: TokenClient) -> None:
        for _ in range(5):
            c.request(req)

    workers = [threading.Thread(target=five, args=(client,)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert len(_watchdog_threads() - before) == 1
    assert broker.stats()["count"] == 70
    assert client._watchdog._heap == []

    other = make_client(broker.url)
    other.request(req)
    assert len(_watchdog_threads() - before) == 2  # one per client

    # A client's watchdog thread ends when the client is collected.
    thread = client._watchdog._thread
    del client
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(_watchdog_threads() - before) == 1


def test_a_request_after_a_timeout_on_the_same_thread_succeeds(broker: BrokerServer, make_client) -> None:
    calls = 0

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        nonlocal calls
        calls += 1
        if calls in (1, 3):
            _drip_headers(conn, req, stopping)
        else:
            _answer(conn, f"at-{calls}")

    with RawServer(respond) as server:
        client = make_client(server.url, broker.url, timeout=TIMEOUT)
        with pytest.raises(errors.TokenEndpointUnavailable, match="timed out"):
            client.request(_req(server.url))
        # The same server (so the same session and connection pool), now fast.
        assert client.request(_req(server.url)).access_token == "at-2"
        # The deadline is still enforced afterwards.
        started = time.monotonic()
        with pytest.raises(errors.TokenEndpointUnavailable, match="timed out"):
            client.request(_req(server.url))
        assert time.monotonic() - started < DEADLINE + LATE
        assert client.request(_req(server.url)).access_token == "at-4"
        # And another server.
        assert client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)).access_token
    assert len(server.requests) == 4


def test_process_exit_does_not_wait_for_the_watchdog() -> None:
    code = (
        "import datetime, time\n"
        "from autotek_operator.token_client import TokenClient\n"
        "c = TokenClient(allowed_prefixes=[], clock=lambda: datetime.datetime.now(datetime.UTC))\n"
        "c._watchdog.watch(time.monotonic() + 3600, [])\n"
        "assert c._watchdog._thread.is_alive()\n"
        "print('started')\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"
    assert time.monotonic() - started < 15


# -- the watchdog on its own -------------------------------------------------------------------


class _CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


def _conn() -> tuple[SimpleNamespace, socket.socket]:
    """A stand-in for a connection (the watchdog only uses ``.sock``) and the socket's peer."""
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    return SimpleNamespace(sock=ours), peer


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_watchdog_fires_the_earliest_deadline_first_and_sleeps_when_idle() -> None:
    dog = _Watchdog()
    cond = dog._cond = _CountingCondition()
    late_conn, late_peer = _conn()
    near_conn, near_peer = _conn()
    try:
        started = time.monotonic()
        late = dog.watch(started + 0.8, [late_conn])  # type: ignore[list-item]
        near = dog.watch(started + 0.2, [near_conn])  # type: ignore[list-item]
        # The later registration with the earlier deadline wakes the thread in time.
        assert near_peer.recv(1) == b""  # our end was shut down
        assert 0.15 <= time.monotonic() - started < 0.7
        assert near.fired and near.done
        assert not late.fired and not late.done
        dog.cancel(late)
        assert dog._heap == []
        dog.cancel(near)  # cancelling after the deadline fired changes nothing
        assert near.fired

        # Idle: once the thread finds nothing to watch it waits without a timeout, not in a loop.
        _wait_for(lambda: cond.waits[-1:] == [None])
        waits = len(cond.waits)
        time.sleep(0.3)
        assert len(cond.waits) == waits
        assert not late.fired
        late_peer.settimeout(0.05)
        with pytest.raises(TimeoutError):
            late_peer.recv(1)  # the cancelled request's socket was left alone

        # A first deadline wakes it; a later one does not (it is already due to wake sooner).
        first = dog.watch(time.monotonic() + 60, [])
        _wait_for(lambda: len(cond.waits) == waits + 1)
        second = dog.watch(time.monotonic() + 61, [])
        time.sleep(0.1)
        assert len(cond.waits) == waits + 1
        dog.cancel(first)
        dog.cancel(second)
    finally:
        dog.close()
        for s in (late_conn.sock, late_peer, near_conn.sock, near_peer):
            s.close()
    assert dog._thread is not None
    dog._thread.join(timeout=5)
    assert not dog._thread.is_alive()


def test_watchdog_drops_cancelled_entries() -> None:
    dog = _Watchdog()
    try:
        now = time.monotonic()
        entries = [dog.watch(now + 60 + i, []) for i in range(10)]
        for e in entries[:5]:
            dog.cancel(e)
        assert len(dog._heap) == 10  # half cancelled: not yet worth a sweep
        dog.cancel(entries[5])
        assert len(dog._heap) == 4  # more than half: swept
        assert all(not item[2].done for item in dog._heap)
        for e in entries[6:]:
            dog.cancel(e)
        assert dog._heap == []
        # Sequential requests never let the heap grow.
        for _ in range(100):
            dog.cancel(dog.watch(time.monotonic() + 60, []))
        assert dog._heap == []
        assert not any(e.fired for e in entries)
    finally:
        dog.close()


def test_watchdog_thread_is_started_lazily_and_once() -> None:
    dog = _Watchdog()
    try:
        assert dog._thread is None
        first = dog.watch(time.monotonic() + 60, [])
        thread = dog._thread
        assert thread is not None and thread.daemon and thread.name == _Watchdog.THREAD_NAME
        dog.cancel(first)
        for _ in range(20):
            dog.cancel(dog.watch(time.monotonic() + 60, []))
        assert dog._thread is thread
    finally:
        dog.close()
