"""What the client sends, and what it makes of a good answer, against a real server on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import json
import socket
import threading
from urllib.parse import parse_qsl, unquote_plus

import pytest

from autotek_operator import errors
from autotek_operator.dev.broker import ABSENT, BrokerServer
from autotek_operator.spec import AUTH_BASIC, AUTH_POST
from autotek_operator.token_client import Token, TokenClient, TokenRequest, basic_authorization

from .conftest import CLIENT_ID, CLIENT_SECRET, LIFETIME, FakeClock
from .servers import RawRequest, RawServer, assert_no_leak

AWKWARD_CREDENTIALS = [
    pytest.param("id:with:colons", "sec:ret:", id="colons"),
    pytest.param("plus+id", "a+b+c", id="plus"),
    pytest.param("pct%20id", "100%sure%2F%", id="percent"),
    pytest.param("space id", " pass word ", id="space"),
    pytest.param("é-client", "pässwörd-é", id="latin"),
    pytest.param("日本", "秘密の鍵", id="cjk"),
    pytest.param("a:+% é日本/=&?", ":+% é日本/=&?#~", id="everything"),
]


def _last(broker: BrokerServer) -> dict:
    return broker.stats()["requests"][-1]


def test_basic_success(broker: BrokerServer, make_client, clock: FakeClock) -> None:
    client = make_client(broker.url)
    token = client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))

    assert isinstance(token, Token)
    assert broker.tokens == [token.access_token]
    assert token.token_type == "bearer"
    assert token.lifetime == LIFETIME
    assert token.lifetime_defaulted is False
    assert token.scope == ""
    assert token.sent_at == clock.now
    rec = _last(broker)
    assert rec["auth_method"] == "basic"
    assert rec["client_id"] == CLIENT_ID
    assert rec["form_keys"] == ["grant_type"]
    assert rec["form"] == {"grant_type": "client_credentials"}


def test_each_request_gets_a_fresh_token(broker: BrokerServer, make_client) -> None:
    client = make_client(broker.url)
    req = TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)
    tokens = [client.request(req).access_token for _ in range(3)]
    assert len(set(tokens)) == 3
    assert broker.stats()["count"] == 3


@pytest.mark.parametrize(("client_id", "client_secret"), AWKWARD_CREDENTIALS)
def test_basic_encoding_of_awkward_credentials(broker: BrokerServer, make_client, client_id, client_secret) -> None:
    broker.configure(clients={client_id: client_secret})
    client = make_client(broker.url)

    token = client.request(TokenRequest(broker.token_url, client_id, client_secret))

    assert token.access_token in broker.tokens
    assert broker.stats()["by_client"] == {client_id: 1}  # the server decoded exactly our id

    # The header is base64 of "urlencoded(id):urlencoded(secret)": ASCII, with exactly one raw colon.
    header = basic_authorization(client_id, client_secret)
    scheme, _, b64 = header.partition(" ")
    assert scheme == "Basic"
    raw = base64.b64decode(b64, validate=True).decode("ascii")
    assert raw.count(":") == 1
    enc_id, _, enc_secret = raw.partition(":")
    assert (unquote_plus(enc_id), unquote_plus(enc_secret)) == (client_id, client_secret)


@pytest.mark.parametrize(("client_id", "client_secret"), AWKWARD_CREDENTIALS)
def test_wrong_secret_is_invalid_client(broker: BrokerServer, make_client, client_id, client_secret) -> None:
    broker.configure(clients={client_id: client_secret + "x"})
    client = make_client(broker.url)

    with pytest.raises(errors.InvalidClient) as info:
        client.request(TokenRequest(broker.token_url, client_id, client_secret))

    assert info.value.oauth_error == "invalid_client"
    assert info.value.retry_class == "credential"
    assert info.value.reason == "InvalidClient"
    assert broker.stats()["by_status"] == {"401": 1}
    assert_no_leak(info.value, client_secret, client_secret + "x")


def test_basic_authorization_rfc_example() -> None:
    # RFC 7617's example, with RFC 6749 §2.3.1's form-encoding of the space (as %20, which
    # form decoders and plain percent-decoders both read back as a space).
    expected = "Basic " + base64.b64encode(b"Aladdin:open%20sesame").decode()
    assert basic_authorization("Aladdin", "open sesame") == expected
    assert basic_authorization("a", "b") == "Basic YTpi"


@pytest.mark.parametrize(("client_id", "client_secret"), AWKWARD_CREDENTIALS)
def test_client_secret_post(broker: BrokerServer, make_client, client_id, client_secret) -> None:
    broker.configure(clients={client_id: client_secret})
    client = make_client(broker.url)

    token = client.request(TokenRequest(broker.token_url, client_id, client_secret, auth_method=AUTH_POST))

    assert token.access_token in broker.tokens
    rec = _last(broker)
    assert rec["auth_method"] == "post"  # the double answers 400 if a Basic header came along too
    assert rec["client_id"] == client_id
    assert rec["form_keys"][0] == "grant_type"
    assert set(rec["form_keys"]) == {"grant_type", "client_id", "client_secret"}


def _capture_server(answer: dict | None = None):
    answer = answer or {"access_token": "at-captured", "expires_in": 60, "token_type": "bearer"}
    body = json.dumps(answer).encode()

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    return RawServer(respond)


def test_wire_format_basic(make_client) -> None:
    with _capture_server() as server:
        client = make_client(server.url)
        client.request(TokenRequest(server.url + "/auth-broker/request-token", CLIENT_ID, CLIENT_SECRET))
    (req,) = server.requests
    assert req.method == "POST"
    assert req.path == "/auth-broker/request-token"
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert req.headers["accept"] == "application/json"
    assert req.headers["authorization"] == basic_authorization(CLIENT_ID, CLIENT_SECRET)
    assert req.body == b"grant_type=client_credentials"
    assert CLIENT_SECRET.encode() not in req.body


def test_wire_format_post_has_no_authorization_header(make_client) -> None:
    with _capture_server() as server:
        client = make_client(server.url)
        client.request(TokenRequest(server.url + "/t", "id é", "se+cret &x=1", auth_method=AUTH_POST))
    (req,) = server.requests
    assert "authorization" not in req.headers
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qsl(req.body.decode("ascii"), strict_parsing=True) == [
        ("grant_type", "client_credentials"),
        ("client_id", "id é"),
        ("client_secret", "se+cret &x=1"),
    ]


@pytest.mark.parametrize("auth_method", [AUTH_BASIC, AUTH_POST])
def test_wire_format_headers_are_exactly_ours(make_client, auth_method) -> None:
    # Nothing else goes out: no cookie, no proxy or netrc credentials, and the answer is asked
    # for without compression (it is never decompressed).
    with _capture_server() as server:
        client = make_client(server.url)
        client.request(TokenRequest(server.url + "/t?x=1#frag", CLIENT_ID, CLIENT_SECRET, auth_method=auth_method))
    (req,) = server.requests
    assert req.path == "/t?x=1"  # the fragment stays here
    expected = {
        "host": f"127.0.0.1:{server.port}",
        "accept": "application/json",
        "accept-encoding": "identity",
        "connection": "keep-alive",
        "content-type": "application/x-www-form-urlencoded",
        "content-length": str(len(req.body)),
        "user-agent": "autotek-operator",
    }
    if auth_method == AUTH_BASIC:
        expected["authorization"] = basic_authorization(CLIENT_ID, CLIENT_SECRET)
        assert req.body == b"grant_type=client_credentials"
    else:
        assert req.body == b"grant_type=client_credentials&client_id=client-1&client_secret=s3cr3t-Zq9xKw7Lp"
    assert req.headers == expected


def test_a_compressed_answer_is_not_decompressed(make_client) -> None:
    # Asked for no compression, a server that compresses anyway gets its bytes read as they came.
    body = gzip.compress(json.dumps({"access_token": "at-zipped", "expires_in": 60}).encode())

    def respond(conn: socket.socket, req: RawRequest, stopping: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    with RawServer(respond) as server:
        with pytest.raises(errors.InvalidTokenResponse, match="not JSON") as info:
            make_client(server.url).request(TokenRequest(server.url + "/t", CLIENT_ID, CLIENT_SECRET))
    assert_no_leak(info.value, CLIENT_SECRET, "at-zipped")


@pytest.mark.parametrize("auth_method", [AUTH_BASIC, AUTH_POST])
def test_scope_sent_only_when_set(broker: BrokerServer, make_client, auth_method) -> None:
    client = make_client(broker.url)
    without = client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, auth_method=auth_method))
    assert "scope" not in _last(broker)["form_keys"]
    assert without.scope == ""

    with_scope = client.request(
        TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, auth_method=auth_method, scope="read write:all")
    )
    rec = _last(broker)
    assert rec["form"]["scope"] == "read write:all"
    assert rec["form_keys"][0] == "grant_type"
    assert with_scope.scope == "read write:all"


@pytest.mark.parametrize("auth_method", [AUTH_BASIC, AUTH_POST])
def test_extra_params_are_sent(broker: BrokerServer, make_client, auth_method) -> None:
    client = make_client(broker.url)
    extra = (("audience", "https://api.example.com/v1"), ("resource", "a b&c=d"))
    client.request(
        TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, auth_method=auth_method, extra_params=extra)
    )
    rec = _last(broker)
    assert rec["form_keys"][0] == "grant_type"
    assert rec["form"]["grant_type"] == "client_credentials"
    assert rec["form"]["audience"] == "https://api.example.com/v1"
    assert rec["form"]["resource"] == "a b&c=d"


def test_sent_at_comes_from_the_injected_clock_before_sending(broker: BrokerServer) -> None:
    seen: list[int] = []

    class RecordingClock(FakeClock):
        def __call__(self) -> dt.datetime:
            seen.append(broker.stats()["count"])  # how many requests the server had seen when asked
            return super().__call__()

    clock = RecordingClock(dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    client = TokenClient(allowed_prefixes=[broker.url + "/"], clock=clock, timeout=2)
    token = client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    assert token.sent_at == dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert clock.calls == 1
    assert seen == [0]  # read before the server saw the request


@pytest.mark.parametrize(
    ("raw", "lifetime", "defaulted"),
    [
        (3599, 3599.0, False),
        ("3599", 3599.0, False),
        (59.5, 59.5, False),
        (1e12, 1e12, False),
        (ABSENT, 777.0, True),
        (None, 777.0, True),
    ],
)
def test_lifetime_over_the_wire(broker: BrokerServer, make_client, raw, lifetime, defaulted) -> None:
    broker.configure(expires_in_raw=raw)
    client = make_client(broker.url)
    token = client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, default_lifetime=777.0))
    assert token.lifetime == lifetime
    assert token.lifetime_defaulted is defaulted


@pytest.mark.parametrize("raw", [0, -5, "abc", "", True, "NaN", "Infinity", [60], {"s": 60}])
def test_unusable_lifetime_over_the_wire(broker: BrokerServer, make_client, raw) -> None:
    broker.configure(expires_in_raw=raw)
    client = make_client(broker.url)
    with pytest.raises(errors.InvalidTokenResponse) as info:
        client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    assert info.value.retryable
    assert_no_leak(info.value, CLIENT_SECRET, *broker.tokens)  # the token was issued, but never shown


def test_observer_sees_each_attempt(broker: BrokerServer, make_client) -> None:
    client = make_client(broker.url)
    seen: list[tuple[str, float]] = []
    client.observer = lambda result, seconds: seen.append((result, seconds))
    client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    with pytest.raises(errors.InvalidClient):
        client.request(TokenRequest(broker.token_url, CLIENT_ID, "wrong"))
    assert [r for r, _ in seen] == ["success", "InvalidClient"]
    assert all(s >= 0 for _, s in seen)


def test_reprs_hide_secret_and_token(broker: BrokerServer, make_client) -> None:
    req = TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, ca_bundle="-----BEGIN CERTIFICATE-----x")
    assert CLIENT_SECRET not in repr(req)
    assert CLIENT_SECRET not in str(req)
    token = make_client(broker.url).request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    assert token.access_token not in repr(token)
    assert token.access_token not in str(token)
    assert "bearer" in repr(token)
