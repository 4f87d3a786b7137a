"""How the client classifies failures, over real HTTP on loopback, and that none of them leaks a secret."""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time

import pytest

from autotek_operator import errors
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import MAX_BODY_BYTES, TokenRequest

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import RawRequest, RawServer, assert_no_leak, drip


def _request(broker_url: str, path: str = "/auth-broker/request-token", **kw) -> TokenRequest:
    return TokenRequest(broker_url + path, CLIENT_ID, CLIENT_SECRET, **kw)


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# (status, canned json or body, headers) -> (error class, oauth_error, retry_after)
STATUS_TABLE = [
    pytest.param(
        400, {"error": "invalid_client"}, {}, errors.InvalidClient, "invalid_client", None, id="400-invalid_client"
    ),
    pytest.param(
        400, {"error": "invalid_grant"}, {}, errors.InvalidClient, "invalid_grant", None, id="400-invalid_grant"
    ),
    pytest.param(
        400,
        {"error": "unauthorized_client"},
        {},
        errors.InvalidClient,
        "unauthorized_client",
        None,
        id="400-unauthorized_client",
    ),
    pytest.param(
        400, {"error": "invalid_request"}, {}, errors.InvalidClient, "invalid_request", None, id="400-invalid_request"
    ),
    pytest.param(400, "", {}, errors.InvalidClient, None, None, id="400-empty"),
    pytest.param(
        400,
        {"error": "temporarily_unavailable"},
        {},
        errors.TokenEndpointUnavailable,
        "temporarily_unavailable",
        None,
        id="400-temporarily_unavailable",
    ),
    pytest.param(
        401,
        {"error": "invalid_client"},
        {"WWW-Authenticate": "Basic"},
        errors.InvalidClient,
        "invalid_client",
        None,
        id="401-json",
    ),
    pytest.param(401, "", {}, errors.InvalidClient, None, None, id="401-empty"),
    pytest.param(
        403, "<html>Forbidden</html>", {"Content-Type": "text/html"}, errors.InvalidClient, None, None, id="403-html"
    ),
    pytest.param(429, {"error": "slow_down"}, {}, errors.RateLimited, "slow_down", None, id="429-no-retry-after"),
    pytest.param(429, "", {"Retry-After": "7"}, errors.RateLimited, None, 7.0, id="429-retry-after-seconds"),
    pytest.param(429, "", {"Retry-After": "soon"}, errors.RateLimited, None, None, id="429-retry-after-garbage"),
    pytest.param(500, "boom", {}, errors.TokenEndpointUnavailable, None, None, id="500"),
    pytest.param(
        502,
        "<html>Bad Gateway</html>",
        {"Content-Type": "text/html"},
        errors.TokenEndpointUnavailable,
        None,
        None,
        id="502",
    ),
    pytest.param(
        503,
        {"error": "temporarily_unavailable"},
        {"Retry-After": "30"},
        errors.TokenEndpointUnavailable,
        "temporarily_unavailable",
        30.0,
        id="503-retry-after",
    ),
    pytest.param(503, "", {}, errors.TokenEndpointUnavailable, None, None, id="503-no-retry-after"),
    pytest.param(
        404, "<html>Not Found</html>", {"Content-Type": "text/html"}, errors.InvalidTokenResponse, None, None, id="404"
    ),
    pytest.param(418, {"error": "teapot"}, {}, errors.InvalidTokenResponse, "teapot", None, id="418"),
    pytest.param(200, "not json at all", {}, errors.InvalidTokenResponse, None, None, id="200-not-json"),
    pytest.param(200, [1, 2], {}, errors.InvalidTokenResponse, None, None, id="200-array"),
    pytest.param(204, "", {}, errors.InvalidTokenResponse, None, None, id="204"),
]

RETRY_CLASS = {
    errors.InvalidClient: "credential",
    errors.RateLimited: "transient",
    errors.TokenEndpointUnavailable: "transient",
    errors.InvalidTokenResponse: "transient",
}


@pytest.mark.parametrize(("status", "payload", "headers", "exc_type", "oauth_error", "retry_after"), STATUS_TABLE)
def test_status_mapping(
    broker: BrokerServer, make_client, status, payload, headers, exc_type, oauth_error, retry_after
) -> None:
    client = make_client(broker.url)
    client.request(_request(broker.url))  # a token exists, so that a leak of it would be noticed
    canned = {"status": status, "headers": headers}
    canned["body" if isinstance(payload, str) else "json"] = payload
    broker.configure(fail=canned)

    with pytest.raises(errors.AutoTekError) as info:
        client.request(_request(broker.url))

    exc = info.value
    assert type(exc) is exc_type
    assert exc.oauth_error == oauth_error
    assert exc.retry_after == retry_after
    assert exc.retry_class == RETRY_CLASS[exc_type]
    assert f"HTTP {status}" in str(exc) or status == 200
    assert_no_leak(exc, CLIENT_SECRET, *broker.tokens)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_as_http_date(broker: BrokerServer, make_client, status) -> None:
    broker.configure(fail={"status": status, "headers": {"Retry-After": _http_date(120)}})
    with pytest.raises((errors.RateLimited, errors.TokenEndpointUnavailable)) as info:
        make_client(broker.url).request(_request(broker.url))
    assert info.value.retryable
    assert 115 <= info.value.retry_after <= 121


def test_retry_after_in_the_past_is_zero(broker: BrokerServer, make_client) -> None:
    broker.configure(fail={"status": 429, "headers": {"Retry-After": _http_date(-3600)}})
    with pytest.raises(errors.RateLimited) as info:
        make_client(broker.url).request(_request(broker.url))
    assert info.value.retry_after == 0


def test_real_refusals_from_the_broker(broker: BrokerServer, make_client) -> None:
    client = make_client(broker.url)
    for req in (
        TokenRequest(broker.token_url, CLIENT_ID, "wrong-secret"),
        TokenRequest(broker.token_url, "no-such-client", CLIENT_SECRET),
    ):
        with pytest.raises(errors.InvalidClient) as info:
            client.request(req)
        assert info.value.oauth_error == "invalid_client"
        assert_no_leak(info.value, CLIENT_SECRET, "wrong-secret")
    assert broker.stats()["by_status"] == {"401": 2}


def test_unknown_path_is_invalid_token_response(broker: BrokerServer, make_client) -> None:
    with pytest.raises(errors.InvalidTokenResponse) as info:
        make_client(broker.url).request(_request(broker.url, "/no/such/endpoint"))
    assert "HTTP 404" in str(info.value)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed(broker: BrokerServer, make_client, status) -> None:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}) as elsewhere:
        broker.configure(fail={"status": status, "headers": {"Location": elsewhere.token_url}})
        # Both servers are allowed: the point is that the client does not follow, not the allow-list.
        client = make_client(broker.url, elsewhere.url)
        with pytest.raises(errors.InvalidTokenResponse) as info:
            client.request(_request(broker.url))
        assert "redirect" in str(info.value)
        assert elsewhere.stats()["count"] == 0
        assert broker.stats()["count"] == 1
        assert_no_leak(info.value, CLIENT_SECRET)


def test_read_timeout(broker: BrokerServer, make_client) -> None:
    broker.configure(delay=1.5)
    client = make_client(broker.url, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(errors.TokenEndpointUnavailable) as info:
        client.request(_request(broker.url))
    assert time.monotonic() - started < 1.4
    assert "timed out" in str(info.value)
    assert info.value.retryable
    assert_no_leak(info.value, CLIENT_SECRET)


def test_connection_refused(make_client) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(errors.TokenEndpointUnavailable) as info:
        make_client(url).request(_request(url))
    assert "could not connect" in str(info.value)
    assert info.value.retryable
    assert_no_leak(info.value, CLIENT_SECRET)


def test_server_closes_without_answer(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.close()

    with RawServer(respond) as server:
        with pytest.raises(errors.TokenEndpointUnavailable) as info:
            make_client(server.url).request(_request(server.url))
    assert_no_leak(info.value, CLIENT_SECRET)


def test_truncated_body(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"access_token": "at-x"')

    with RawServer(respond) as server:
        with pytest.raises(errors.TokenEndpointUnavailable):
            make_client(server.url).request(_request(server.url))


# -- slow drips: the whole exchange must end near the client's deadline (2 x timeout) -------------

GOOD_BODY = json.dumps(
    {"access_token": "at-dripped", "expires_in": 60, "token_type": "bearer", "pad": "x" * 30}
).encode()
TIMEOUT = 0.5
DRIP_INTERVAL = 0.05  # each byte arrives well within the read timeout...
DRIP_BYTES = 44  # ...but the drip lasts ~2.2 s, past GIVE_UP_BY
GIVE_UP_BY = 2 * TIMEOUT + 0.6


def _assert_gave_up_in_time(make_client, respond) -> errors.AutoTekError:
    with RawServer(respond) as server:
        client = make_client(server.url, timeout=TIMEOUT)
        started = time.monotonic()
        with pytest.raises(errors.TokenEndpointUnavailable) as info:
            client.request(_request(server.url))
        elapsed = time.monotonic() - started
    assert elapsed < GIVE_UP_BY, f"gave up after {elapsed:.2f}s"
    assert_no_leak(info.value, CLIENT_SECRET, "at-dripped")
    return info.value


def test_slow_drip_chunked_body_hits_the_deadline(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for byte in GOOD_BODY:
            if stopping.is_set():
                return
            conn.sendall(b"1\r\n" + bytes([byte]) + b"\r\n")
            time.sleep(DRIP_INTERVAL)
        conn.sendall(b"0\r\n\r\n")

    exc = _assert_gave_up_in_time(make_client, respond)
    assert "timed out" in str(exc)


def test_slow_drip_content_length_body_hits_the_deadline(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(GOOD_BODY)
        )
        conn.sendall(GOOD_BODY[:-DRIP_BYTES])
        drip(conn, GOOD_BODY[-DRIP_BYTES:], DRIP_INTERVAL, stopping)

    _assert_gave_up_in_time(make_client, respond)


def test_slow_drip_headers_hit_the_deadline(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        drip(conn, b"X-Slow: " + b"a" * (DRIP_BYTES - 10) + b"\r\n", DRIP_INTERVAL, stopping)
        conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(GOOD_BODY), GOOD_BODY))

    _assert_gave_up_in_time(make_client, respond)


# -- the 1 MiB cap -----------------------------------------------------------------------------


def _padded_token_body(size: int) -> str:
    head = json.dumps({"access_token": "at-big", "expires_in": 60, "token_type": "bearer"})
    return head + " " * (size - len(head))


def test_body_of_exactly_one_mebibyte_is_read(broker: BrokerServer, make_client) -> None:
    broker.configure(fail={"status": 200, "body": _padded_token_body(MAX_BODY_BYTES)})
    token = make_client(broker.url).request(_request(broker.url))
    assert token.access_token == "at-big"


def test_body_over_one_mebibyte_with_content_length_is_refused(broker: BrokerServer, make_client) -> None:
    broker.configure(fail={"status": 200, "body": _padded_token_body(MAX_BODY_BYTES + 1)})
    with pytest.raises(errors.InvalidTokenResponse) as info:
        make_client(broker.url).request(_request(broker.url))
    assert "larger than" in str(info.value)
    assert_no_leak(info.value, CLIENT_SECRET)


def test_oversize_content_length_is_refused_unread(make_client) -> None:
    sent = threading.Event()

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (50 * MAX_BODY_BYTES)
        )
        sent.set()
        stopping.wait(3)  # never sends the body: a client that tried to read it would hang here

    with RawServer(respond) as server:
        started = time.monotonic()
        with pytest.raises(errors.InvalidTokenResponse) as info:
            make_client(server.url, timeout=2).request(_request(server.url))
        assert time.monotonic() - started < 1.0
    assert sent.is_set()
    assert "refused unread" in str(info.value)
    assert_no_leak(info.value, CLIENT_SECRET)


def test_chunked_body_over_one_mebibyte_is_refused(make_client) -> None:
    written = []

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        try:
            for _ in range(64):  # 4 MiB if the client kept reading
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                written.append(len(chunk))
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    with RawServer(respond) as server:
        with pytest.raises(errors.InvalidTokenResponse) as info:
            make_client(server.url).request(_request(server.url))
    assert "larger than" in str(info.value)
    assert_no_leak(info.value, CLIENT_SECRET)


def test_non_ascii_digit_content_length(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall("HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\nConnection: close\r\n\r\n{}".encode("latin-1"))

    with RawServer(respond) as server:
        with pytest.raises(errors.AutoTekError):
            make_client(server.url).request(_request(server.url))


def test_non_ascii_digit_retry_after(make_client) -> None:
    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: \u00b2\r\nContent-Length: 0\r\n\r\n".encode("latin-1")
        )

    with RawServer(respond) as server:
        with pytest.raises(errors.RateLimited):
            make_client(server.url).request(_request(server.url))


# -- secrets in error answers --------------------------------------------------------------------


def test_secret_echoed_by_the_server_is_scrubbed(broker: BrokerServer, make_client) -> None:
    broker.configure(
        fail={
            "status": 400,
            "json": {
                "error": "invalid_client",
                "error_description": f"client {CLIENT_ID} sent secret {CLIENT_SECRET} which is wrong",
            },
        }
    )
    with pytest.raises(errors.InvalidClient) as info:
        make_client(broker.url).request(_request(broker.url))
    assert_no_leak(info.value, CLIENT_SECRET)
    assert "which is wrong" in str(info.value)  # the rest of the server's explanation is kept


def test_secret_as_error_code_is_scrubbed(broker: BrokerServer, make_client) -> None:
    broker.configure(fail={"status": 500, "json": {"error": CLIENT_SECRET}})
    with pytest.raises(errors.TokenEndpointUnavailable) as info:
        make_client(broker.url).request(_request(broker.url))
    assert_no_leak(info.value, CLIENT_SECRET)


def test_long_error_description_is_truncated(broker: BrokerServer, make_client) -> None:
    broker.configure(fail={"status": 400, "json": {"error": "invalid_request", "error_description": "x" * 5000}})
    with pytest.raises(errors.InvalidClient) as info:
        make_client(broker.url).request(_request(broker.url))
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("echo", ["basic", "form"])
def test_encoded_secret_echoed_by_the_server_is_scrubbed(broker: BrokerServer, make_client, echo) -> None:
    from urllib.parse import quote_plus

    from autotek_operator.token_client import basic_authorization

    secret = "s3cr3t with spaces"
    broker.configure(clients={CLIENT_ID: secret})
    echoed = basic_authorization(CLIENT_ID, secret) if echo == "basic" else f"client_secret={quote_plus(secret)}"
    broker.configure(fail={"status": 400, "json": {"error": "invalid_request", "error_description": f"got {echoed}"}})
    with pytest.raises(errors.InvalidClient) as info:
        make_client(broker.url).request(TokenRequest(broker.token_url, CLIENT_ID, secret))
    text = str(info.value)
    assert secret not in text
    assert quote_plus(secret) not in text
    assert basic_authorization(CLIENT_ID, secret).split()[1] not in text
