"""The token URL allow-list: url_allowed's table, safe_url, and that a refused URL gets no request."""

from __future__ import annotations

import pytest

from autotek_operator import errors
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenRequest, safe_url, url_allowed

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import assert_no_leak

AUTOTEK = ["https://api.autograb.com.au/"]
BROKER_PATH = ["https://api.example.com/auth-broker/"]
BROKER_PATH_NO_SLASH = ["https://api.example.com/auth-broker"]


@pytest.mark.parametrize(
    ("url", "prefixes", "allowed"),
    [
        # the default prefix
        ("https://api.autograb.com.au/auth-broker/request-token", AUTOTEK, True),
        ("https://api.autograb.com.au/", AUTOTEK, True),
        ("https://api.autograb.com.au", AUTOTEK, True),
        ("https://API.AutoGrab.com.au/auth-broker/request-token", AUTOTEK, True),
        ("https://api.autograb.com.au/auth-broker/request-token?x=1", AUTOTEK, True),
        # host: exact match only
        ("https://api.autograb.com.au.evil.net/auth-broker/request-token", AUTOTEK, False),
        ("https://api.autograb.com.au.evil.net/", AUTOTEK, False),
        ("https://evilapi.autograb.com.au/", AUTOTEK, False),
        ("https://x.api.autograb.com.au/", AUTOTEK, False),
        ("https://autograb.com.au/", AUTOTEK, False),
        ("https://evil.net/api.autograb.com.au/", AUTOTEK, False),
        ("https://api.autograb.com.au./", AUTOTEK, False),
        # scheme
        ("http://api.autograb.com.au/auth-broker/request-token", AUTOTEK, False),
        ("ftp://api.autograb.com.au/", AUTOTEK, False),
        ("//api.autograb.com.au/", AUTOTEK, False),
        ("api.autograb.com.au/auth-broker/request-token", AUTOTEK, False),
        ("", AUTOTEK, False),
        # ports, with default-port equivalence
        ("https://api.autograb.com.au:443/auth-broker/request-token", AUTOTEK, True),
        ("https://api.autograb.com.au:8443/auth-broker/request-token", AUTOTEK, False),
        ("https://api.autograb.com.au:80/", AUTOTEK, False),
        ("https://api.example.com/x", ["https://api.example.com:443/"], True),
        ("https://api.example.com:443/x", ["https://api.example.com/"], True),
        ("http://127.0.0.1/x", ["http://127.0.0.1:80/"], True),
        ("http://127.0.0.1:80/x", ["http://127.0.0.1/"], True),
        ("http://127.0.0.1:8080/x", ["http://127.0.0.1/"], False),
        ("http://127.0.0.1/x", ["http://127.0.0.1:8080/"], False),
        ("https://api.autograb.com.au:99999/", AUTOTEK, False),
        ("https://api.autograb.com.au:port/", AUTOTEK, False),
        # userinfo is refused outright, and cannot smuggle a host past the check
        ("https://user:pw@api.autograb.com.au/auth-broker/request-token", AUTOTEK, False),
        ("https://user@api.autograb.com.au/auth-broker/request-token", AUTOTEK, False),
        ("https://:pw@api.autograb.com.au/", AUTOTEK, False),
        ("https://api.autograb.com.au@evil.net/", AUTOTEK, False),
        ("https://api.autograb.com.au:443@evil.net/", AUTOTEK, False),
        ("https://evil.net\\@api.autograb.com.au/", AUTOTEK, False),
        ("https://evil.net#@api.autograb.com.au/", AUTOTEK, False),
        ("https://evil.net?@api.autograb.com.au/", AUTOTEK, False),
        # path prefixes end on a segment boundary
        ("https://api.example.com/auth-broker/request-token", BROKER_PATH, True),
        ("https://api.example.com/auth-broker/", BROKER_PATH, True),
        ("https://api.example.com/auth-broker", BROKER_PATH, True),
        ("https://api.example.com/auth-broker-evil/request-token", BROKER_PATH, False),
        ("https://api.example.com/auth-brokerx", BROKER_PATH, False),
        ("https://api.example.com/other/request-token", BROKER_PATH, False),
        ("https://api.example.com/", BROKER_PATH, False),
        ("https://api.example.com/AUTH-BROKER/request-token", BROKER_PATH, False),
        ("https://api.example.com/auth-broker/request-token", BROKER_PATH_NO_SLASH, True),
        ("https://api.example.com/auth-broker", BROKER_PATH_NO_SLASH, True),
        ("https://api.example.com/auth-broker-evil", BROKER_PATH_NO_SLASH, False),
        ("https://api.example.com/auth-brokerx/y", BROKER_PATH_NO_SLASH, False),
        # IPv6 literals
        ("http://[::1]:8080/token", ["http://[::1]:8080/"], True),
        ("http://[::1]:8081/token", ["http://[::1]:8080/"], False),
        ("http://[::1/token", ["http://[::1]:8080/"], False),
        # several prefixes; none
        ("http://127.0.0.1:9000/token", ["https://api.autograb.com.au/", "http://127.0.0.1:9000/"], True),
        ("https://api.autograb.com.au/x", [], False),
        ("https://api.autograb.com.au/x", ["not a url", "https://[bad/", "https://api.autograb.com.au:99999/"], False),
    ],
)
def test_url_allowed(url, prefixes, allowed) -> None:
    assert url_allowed(url, prefixes) is allowed


@pytest.mark.parametrize("path", ["/auth-broker/../admin", "/auth-broker/./../admin", "/auth-broker/x/../../admin"])
def test_url_allowed_dot_segments(path) -> None:
    assert url_allowed("https://api.example.com" + path, BROKER_PATH) is False


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:pw@api.example.com/auth-broker/request-token?client_secret=x#frag",
            "https://api.example.com/auth-broker/request-token",
        ),
        ("https://api.example.com:8443/t", "https://api.example.com:8443/t"),
        ("http://[::1]:8080/t", "http://[::1]:8080/t"),
        ("https://API.Example.com/t", "https://api.example.com/t"),
    ],
)
def test_safe_url(url, shown) -> None:
    assert safe_url(url) == shown


# -- the client: a refused URL gets no request at all ----------------------------------------------


def test_url_outside_the_prefixes_gets_no_request(broker: BrokerServer, make_client) -> None:
    client = make_client(allowed_prefixes=["https://api.autograb.com.au/"])
    with pytest.raises(errors.TokenURLNotAllowed) as info:
        client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    assert broker.stats()["count"] == 0
    assert info.value.retry_class == "permanent"
    assert safe_url(broker.token_url) in str(info.value)
    assert_no_leak(info.value, CLIENT_SECRET)


def test_refusal_message_hides_userinfo_and_query(broker: BrokerServer, make_client) -> None:
    client = make_client(broker.url)
    url = f"http://{CLIENT_ID}:{CLIENT_SECRET}@127.0.0.1:{broker.port}/auth-broker/request-token?k={CLIENT_SECRET}"
    with pytest.raises(errors.TokenURLNotAllowed) as info:
        client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET))
    assert broker.stats()["count"] == 0
    assert_no_leak(info.value, CLIENT_SECRET)


def test_plain_http_needs_an_http_prefix(broker: BrokerServer, make_client) -> None:
    https_only = make_client(allowed_prefixes=[f"https://127.0.0.1:{broker.port}/"])
    with pytest.raises(errors.TokenURLNotAllowed):
        https_only.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    assert broker.stats()["count"] == 0

    http_allowed = make_client(allowed_prefixes=[f"http://127.0.0.1:{broker.port}/"])
    assert http_allowed.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)).access_token
    assert broker.stats()["count"] == 1


def test_other_port_on_the_same_host_is_refused(broker: BrokerServer, make_client) -> None:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}) as other:
        client = make_client(broker.url)
        with pytest.raises(errors.TokenURLNotAllowed):
            client.request(TokenRequest(other.token_url, CLIENT_ID, CLIENT_SECRET))
        assert other.stats()["count"] == 0


def test_path_prefix_is_enforced(broker: BrokerServer, make_client) -> None:
    client = make_client(allowed_prefixes=[broker.url + "/auth-broker/"])
    assert client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)).access_token
    with pytest.raises(errors.TokenURLNotAllowed):
        client.request(TokenRequest(broker.url + "/token", CLIENT_ID, CLIENT_SECRET))
    assert broker.stats()["count"] == 1


def test_dot_segments_cannot_leave_the_path_prefix(broker: BrokerServer, make_client) -> None:
    client = make_client(allowed_prefixes=[broker.url + "/auth-broker/"])
    with pytest.raises(errors.TokenURLNotAllowed):
        client.request(TokenRequest(broker.url + "/auth-broker/../token", CLIENT_ID, CLIENT_SECRET))
    assert broker.stats()["count"] == 0


@pytest.mark.parametrize(
    "url", ["https://api.autograb.com.au:99999/t", "https://api.autograb.com.au:abc/t", "https://[::1/t"]
)
def test_unparseable_url_is_not_allowed(make_client, url) -> None:
    client = make_client(allowed_prefixes=["https://api.autograb.com.au/"])
    with pytest.raises(errors.TokenURLNotAllowed):
        client.request(TokenRequest(url, CLIENT_ID, CLIENT_SECRET))
