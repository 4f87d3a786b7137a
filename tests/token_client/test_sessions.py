"""Sessions are kept per thread and CA bundle, yet no connection and no state outlives a request."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenClient, TokenRequest

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import PKI, RawRequest, RawServer


@pytest.fixture
def tls_broker(pki: PKI) -> Iterator[BrokerServer]:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as b:
        yield b


def _spy_sessions(client: TokenClient) -> list[tuple[int, str, requests.Session]]:
    """Record (thread, CA bundle, session) for every request the client makes from now on."""
    seen: list[tuple[int, str, requests.Session]] = []
    real = client._session

    def spy(ca_bundle: str) -> requests.Session:
        session = real(ca_bundle)
        seen.append((threading.get_ident(), ca_bundle, session))
        return session

    client._session = spy  # type: ignore[method-assign]
    return seen


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(timeout=10)
    return out[0]


def test_sessions_are_reused_per_thread_and_ca_bundle(
    tls_broker: BrokerServer, broker: BrokerServer, pki: PKI, make_client
) -> None:
    client = make_client(tls_broker.url, broker.url)
    seen = _spy_sessions(client)
    one = pki.ca.pem
    two = pki.other_ca.pem + "\n" + pki.ca.pem  # also verifies the server: a different bundle, same outcome

    def tls(ca_bundle: str) -> str:
        return client.request(TokenRequest(tls_broker.token_url, CLIENT_ID, CLIENT_SECRET, ca_bundle=ca_bundle))

    tls(one)
    tls(one)
    tls(two)
    tls(two)
    tls(one)
    client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    s = [session for _, _, session in seen]
    assert s[0] is s[1] is s[4]  # same thread, same bundle
    assert s[2] is s[3]
    assert s[0] is not s[2]  # another bundle, another session
    assert s[5] is s[6]
    assert s[5] not in (s[0], s[2])  # no bundle is a bundle of its own
    assert all(session.trust_env is False for session in s)

    _in_thread(lambda: tls(one))
    assert seen[-1][0] != seen[0][0]
    assert seen[-1][2] is not s[0]  # another thread, another session
    assert tls_broker.stats()["count"] == 6
    assert broker.stats()["count"] == 2


def test_the_per_thread_session_cache_is_bounded(tls_broker: BrokerServer, pki: PKI, make_client) -> None:
    client = make_client(tls_broker.url)
    cap = TokenClient.SESSIONS_PER_THREAD
    assert cap == 16
    bundles = [pki.ca.pem + "\n" * i for i in range(cap + 4)]  # as many distinct (and valid) bundles
    made = [client._session(b) for b in bundles]
    cache = client._local.sessions
    assert len(cache) == cap
    assert len({id(s) for s in made}) == cap + 4
    # The least recently used go first.
    assert client._session(bundles[-1]) is made[-1]
    assert client._session(bundles[4]) is made[4]
    assert client._session(bundles[0]) is not made[0]  # dropped, made again; drops bundles[5]
    assert client._session(bundles[4]) is made[4]
    assert client._session(bundles[5]) is not made[5]
    assert len(cache) == cap
    # Another thread has a cache of its own.
    elsewhere, elsewhere_size = _in_thread(lambda: (client._session(bundles[-1]), len(client._local.sessions)))
    assert elsewhere is not made[-1]
    assert elsewhere_size == 1
    assert len(cache) == cap

    # Requests still work while sessions come and go.
    client.SESSIONS_PER_THREAD = 2
    for b in bundles[:5] * 2:
        token = client.request(TokenRequest(tls_broker.token_url, CLIENT_ID, CLIENT_SECRET, ca_bundle=b))
        assert token.access_token
        assert len(client._local.sessions) <= cap
    assert len(client._local.sessions) == 2
    assert tls_broker.stats()["count"] == 10


# -- no connection and no state outlives a request ---------------------------------------------


class _KeepAliveServer(RawServer):
    """Answers without ``Connection: close`` and then offers the connection for another request,
    noting what the client did with it: closed it, reused it, or left it open."""

    def __init__(self, headers: bytes = b"") -> None:
        super().__init__(self._respond)
        self.extra_headers = headers
        self.outcomes: list[str] = []
        self._lock = threading.Lock()
        self._n = 0

    def _answer(self, conn: socket.socket) -> None:
        with self._lock:
            self._n += 1
            n = self._n
        body = json.dumps({"access_token": f"at-{n}", "expires_in": 60, "token_type": "bearer"}).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (self.extra_headers, len(body), body)
        )

    def _respond(self, conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        self._answer(conn)
        conn.settimeout(2)
        try:
            more = conn.recv(65536)
        except TimeoutError:
            self.outcomes.append("left open")
            return
        if more:
            self.outcomes.append("reused")
            self._answer(conn)
        else:
            self.outcomes.append("closed")


def test_each_request_opens_and_closes_its_own_connection(make_client) -> None:
    with _KeepAliveServer() as server:
        client = make_client(server.url)
        watched: list[list[Any]] = []
        real_watch = client._watchdog.watch

        def spy(deadline: float, conns: list[Any]) -> Any:
            watched.append(conns)
            return real_watch(deadline, conns)

        client._watchdog.watch = spy
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        tokens = [client.request(req).access_token for _ in range(3)]
        workers = [threading.Thread(target=lambda: [client.request(req) for _ in range(3)]) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=10)
    assert len(set(tokens)) == 3
    assert len(server.requests) == 12  # one connection per request...
    assert server.outcomes == ["closed"] * 12  # ...closed by the client as soon as it was answered
    assert all(r.headers.get("connection") == "close" for r in server.requests)
    # Each deadline guarded the one connection opened for its own request.
    assert len(watched) == 12
    assert all(len(conns) == 1 for conns in watched)


def test_cookies_are_not_carried_between_requests(make_client) -> None:
    with _KeepAliveServer(b"Set-Cookie: session=abc123; Path=/\r\n") as server:
        client = make_client(server.url)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        for _ in range(3):
            client.request(req)
    assert len(server.requests) == 3
    assert [r.headers.get("cookie") for r in server.requests] == [None] * 3
    assert all(len(s.cookies) == 0 for s in client._local.sessions.values())
