"""Sessions are kept per thread, origin and CA bundle; each keeps one connection alive for the
next request to its own origin with its own CA bundle, and no other state outlives a request."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from urllib3.connectionpool import HTTPConnectionPool

from autotek_operator import errors
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenClient, TokenRequest

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import PKI, KeepAliveServer, RawRequest, RawServer


@pytest.fixture
def tls_broker(pki: PKI) -> Iterator[BrokerServer]:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as b:
        yield b


def _spy_sessions(client: TokenClient) -> list[tuple[int, str, HTTPConnectionPool]]:
    """Record (thread, CA bundle, session) for every request the client makes from now on."""
    seen: list[tuple[int, str, HTTPConnectionPool]] = []
    real = client._session

    def spy(origin: str, ca_bundle: str) -> HTTPConnectionPool:
        session = real(origin, ca_bundle)
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
    assert all(session.proxy is None for session in s)  # straight to the endpoint, never through a proxy

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
    origin = f"https://127.0.0.1:{tls_broker.port}"
    made = [client._session(origin, b) for b in bundles]
    cache = client._local.sessions
    assert len(cache) == cap
    assert len({id(s) for s in made}) == cap + 4
    # The least recently used go first.
    assert client._session(origin, bundles[-1]) is made[-1]
    assert client._session(origin, bundles[4]) is made[4]
    assert client._session(origin, bundles[0]) is not made[0]  # dropped, made again; drops bundles[5]
    assert client._session(origin, bundles[4]) is made[4]
    assert client._session(origin, bundles[5]) is not made[5]
    assert len(cache) == cap
    # Another thread has a cache of its own.
    elsewhere, elsewhere_size = _in_thread(lambda: (client._session(origin, bundles[-1]), len(client._local.sessions)))
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


# -- kept-alive connections ---------------------------------------------------------------------


class _KeepAliveServer(RawServer):
    """Answers without ``Connection: close``, with a cookie if asked, then one more request."""

    def __init__(self, headers: bytes = b"") -> None:
        super().__init__(self._respond)
        self.extra_headers = headers
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
            return
        if more:
            self.requests.append(RawRequest("POST", "", _headers(more), b""))
            self._answer(conn)


def _headers(data: bytes) -> dict[str, str]:
    lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _spy_watches(client: TokenClient) -> list[list[Any]]:
    """The connection list each request's deadline guarded, one per request."""
    watched: list[list[Any]] = []
    real_watch = client._watchdog.watch

    def spy(deadline: float, conns: list[Any]) -> Any:
        watched.append(conns)
        return real_watch(deadline, conns)

    client._watchdog.watch = spy  # type: ignore[method-assign]
    return watched


def test_a_thread_reuses_its_connection_and_each_deadline_guards_it(make_client) -> None:
    with KeepAliveServer() as server:
        client = make_client(server.url)
        watched = _spy_watches(client)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        tokens = [client.request(req).access_token for _ in range(5)]
        assert server.connections == 1  # five requests, one TCP connection
        assert server.served == [(1, n) for n in range(1, 6)]
        assert len(set(tokens)) == 5
        # Each deadline guarded the connection its request used: the same, kept-alive one.
        assert len(watched) == 5
        assert all(len(conns) == 1 for conns in watched)
        assert len({id(conns[0]) for conns in watched}) == 1

        workers = [threading.Thread(target=lambda: [client.request(req) for _ in range(3)]) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=10)
        assert len(server.served) == 14
        assert server.connections == 4  # one more per thread, each reused by its own thread


def test_kept_connections_are_per_origin(make_client) -> None:
    with KeepAliveServer() as server:
        by_name = f"http://localhost:{server.port}"
        client = make_client(server.url, by_name)
        for base in (server.url, by_name, server.url, by_name):
            client.request(TokenRequest(base + "/token", CLIENT_ID, CLIENT_SECRET))
        assert server.connections == 2  # 127.0.0.1 and localhost: another origin, another connection
        assert len(server.served) == 4


def test_another_ca_bundle_gets_another_connection_and_tls_is_still_verified(pki: PKI, make_client) -> None:
    with KeepAliveServer(tls=(pki.server_cert, pki.server_key)) as server:
        client = make_client(server.url)
        url = server.url + "/token"
        one = pki.ca.pem
        two = pki.other_ca.pem + "\n" + pki.ca.pem  # also verifies the server, but is another bundle
        for bundle in (one, one, two, two, one):
            client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET, ca_bundle=bundle))
        assert server.connections == 2  # one per bundle, each reused
        assert len(server.served) == 5
        # A bundle that does not verify the server is refused, though a verified connection to the
        # same origin is open and idle: it is not lent to a request with another bundle.
        with pytest.raises(errors.TokenEndpointUnavailable, match="TLS verification"):
            client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET, ca_bundle=pki.other_ca.pem))
        # Nor to a request with none (the system's CAs do not know this test CA).
        with pytest.raises(errors.TokenEndpointUnavailable, match="TLS verification"):
            client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET))
        assert len(server.served) == 5
        client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET, ca_bundle=one))
        assert server.connections == 4  # the two refused handshakes; the bundle's own is still there
        assert server.served[-1][0] == 1


def test_a_connection_the_server_hung_up_is_replaced_once(make_client) -> None:
    # The server takes the second request on the first connection and closes it unanswered.
    with KeepAliveServer(
        behave=lambda conn_no, req_no: "hang up" if (conn_no, req_no) == (1, 2) else "answer"
    ) as server:
        client = make_client(server.url)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        client.request(req)
        assert client.request(req).access_token == "at-2-1"  # answered on a new connection
        client.request(req)
        assert server.connections == 2
        assert server.served == [(1, 1), (2, 1), (2, 2)]

    # A fresh connection hung up on is an error, not retried.
    with KeepAliveServer(behave=lambda conn_no, req_no: "hang up") as server:
        client = make_client(server.url)
        with pytest.raises(errors.TokenEndpointUnavailable):
            client.request(TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET))
        assert server.connections == 1


def test_the_deadline_holds_on_a_kept_connection_which_is_then_dropped(make_client) -> None:
    with KeepAliveServer(behave=lambda conn_no, req_no: "drip" if (conn_no, req_no) == (1, 2) else "answer") as server:
        client = make_client(server.url, timeout=0.3)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        client.request(req)
        with pytest.raises(errors.TokenEndpointUnavailable, match="timed out"):
            client.request(req)  # the second answer drips on the kept connection: cut off
        client.request(req)
        assert server.connections == 2  # the timed-out connection was not kept
        assert server.served[-1] == (2, 1)


def test_a_failed_answer_does_not_keep_its_connection(make_client) -> None:
    # An answer too large is refused unread: its connection is closed, not kept half-read.
    with KeepAliveServer() as server:
        client = make_client(server.url, max_body=10)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        for _ in range(2):
            with pytest.raises(errors.InvalidTokenResponse):
                client.request(req)
        assert server.connections == 2


def test_requests_keep_their_connection_unless_the_server_closes_it(make_client) -> None:
    with _KeepAliveServer() as server:  # serves two requests per connection, then closes it
        client = make_client(server.url)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        tokens = [client.request(req).access_token for _ in range(4)]
    assert len(set(tokens)) == 4
    assert all(r.headers.get("connection") != "close" for r in server.requests)


def test_cookies_are_not_carried_between_requests(make_client) -> None:
    with _KeepAliveServer(b"Set-Cookie: session=abc123; Path=/\r\n") as server:
        client = make_client(server.url)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        for _ in range(3):
            client.request(req)
    assert len(server.requests) == 3
    assert [r.headers.get("cookie") for r in server.requests] == [None] * 3


def test_proxies_and_netrc_in_the_environment_are_ignored(
    pki: PKI, make_client, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    with (
        RawServer(lambda conn, req, stopping: None) as proxy,
        _KeepAliveServer() as server,
        KeepAliveServer(tls=(pki.server_cert, pki.server_key)) as tls_server,
    ):
        for name in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
            monkeypatch.setenv(name.upper(), proxy.url)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-password\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        monkeypatch.setenv("HOME", str(tmp_path))
        (tmp_path / ".netrc").write_text(netrc.read_text())
        (tmp_path / ".netrc").chmod(0o600)
        client = make_client(server.url, tls_server.url)
        client.request(TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET, auth_method="client_secret_post"))
        client.request(TokenRequest(tls_server.url + "/token", CLIENT_ID, CLIENT_SECRET, ca_bundle=pki.ca.pem))
    assert proxy.connections == 0
    assert len(tls_server.served) == 1
    (req,) = server.requests
    assert "authorization" not in req.headers
    assert "proxy-authorization" not in req.headers


def test_each_connection_goes_back_to_its_pool_exactly_once(make_client, caplog: pytest.LogCaptureFixture) -> None:
    # After every request, whatever its outcome, the session's pool holds exactly one entry: the
    # kept connection, or a closed one (or none) in its place; never two ("pool is full").
    good = json.dumps({"access_token": "at-raw", "expires_in": 60}).encode()
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 * 1024 * 1024),  # refused unread
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",  # not followed
        b"HTTP/1.1 204 No Content\r\n\r\n",  # no body to read
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"access_token"',  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # never ends: timed out
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(good), good),
    ]

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        n = len(server.requests)
        conn.sendall(answers[n - 1])
        if n == 5:
            stopping.wait(1)  # the chunked answer that never ends

    caplog.set_level("DEBUG", logger="urllib3")
    with RawServer(respond) as server:
        client = make_client(server.url, timeout=0.3)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        for _ in range(5):
            with pytest.raises(errors.AutoTekError):
                client.request(req)
            (pool,) = client._local.sessions.values()
            assert pool.pool.qsize() == 1
        assert client.request(req).access_token == "at-raw"
        assert pool.pool.qsize() == 1
        assert len(server.requests) == 6

    # Kept, hung up on (then answered on a new connection), dripped past the deadline, new again.
    fates = {(1, 2): "hang up", (2, 2): "drip"}
    with KeepAliveServer(behave=lambda conn_no, req_no: fates.get((conn_no, req_no), "answer")) as server:
        client = make_client(server.url, timeout=0.3)
        req = TokenRequest(server.url + "/token", CLIENT_ID, CLIENT_SECRET)
        results = []
        for _ in range(4):
            try:
                results.append(client.request(req).access_token)
            except errors.TokenEndpointUnavailable as exc:
                results.append(str(exc))
            (pool,) = client._local.sessions.values()
            assert pool.pool.qsize() == 1
    assert results[:2] == ["at-1-1", "at-2-1"]
    assert "timed out" in results[2]
    assert results[3] == "at-3-1"
    assert not [r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
