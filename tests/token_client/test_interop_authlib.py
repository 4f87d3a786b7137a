"""Interoperability with an OAuth 2.0 authorization server this project did not write: Authlib's.

Authlib's Flask ``AuthorizationServer`` with the ``ClientCredentialsGrant``, an in-memory client
model and a bearer token generator with a test-chosen lifetime, served by werkzeug on loopback.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from flask import Flask
from werkzeug.serving import make_server

from autotek_operator import errors
from autotek_operator.spec import AUTH_BASIC, AUTH_POST
from autotek_operator.token_client import TokenRequest

from .servers import assert_no_leak

EXPIRES_IN = 1234
TOKEN_PATH = "/oauth/token"

BASIC_ID, BASIC_SECRET = "basic-client", "b4sic-S3cret-Lm2"
POST_ID, POST_SECRET = "post-client", "p0st-S3cret-Nq7"
AWKWARD_ID, AWKWARD_SECRET = "awk:ward+é", "a:b+c%d/é日本=&?"
SPACE_ID, SPACE_SECRET = "space client", "pass word"


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    auth_method: str  # "client_secret_basic" or "client_secret_post"
    scopes: frozenset[str] = field(default_factory=frozenset)

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        return " ".join(s for s in scope.split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class ClientCredentials(ClientCredentialsGrant):
    # Authlib's default accepts only client_secret_basic; the client model decides per client.
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


@dataclass
class AuthlibServer:
    url: str
    issued: list[dict]
    requests: list[dict]


@pytest.fixture(scope="module")
def authlib_server() -> Iterator[AuthlibServer]:
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http, on loopback only
    clients = {
        c.client_id: c
        for c in (
            Client(BASIC_ID, BASIC_SECRET, "client_secret_basic", frozenset({"read", "write"})),
            Client(POST_ID, POST_SECRET, "client_secret_post"),
            Client(AWKWARD_ID, AWKWARD_SECRET, "client_secret_basic"),
            Client(SPACE_ID, SPACE_SECRET, "client_secret_basic"),
        )
    }
    issued: list[dict] = []
    seen: list[dict] = []

    app = Flask("authlib-interop")
    server = AuthorizationServer(app, query_client=clients.get, save_token=lambda token, request: issued.append(token))
    server.register_grant(ClientCredentials)
    server.register_token_generator(
        "default",
        BearerTokenGenerator(
            access_token_generator=lambda **kw: "authlib-" + secrets.token_urlsafe(24),
            expires_generator=lambda client, grant_type: EXPIRES_IN,
        ),
    )

    @app.post(TOKEN_PATH)
    def issue_token():
        from flask import request

        seen.append({"form_keys": list(request.form.keys()), "authorization": "Authorization" in request.headers})
        return server.create_token_response()

    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield AuthlibServer(f"http://127.0.0.1:{http.server_port}", issued, seen)
    finally:
        http.shutdown()
        mp.undo()


def _request(server: AuthlibServer, client_id: str, secret: str, method: str = AUTH_BASIC, scope: str = ""):
    return TokenRequest(server.url + TOKEN_PATH, client_id, secret, auth_method=method, scope=scope)


def test_client_secret_basic(authlib_server: AuthlibServer, make_client, clock) -> None:
    token = make_client(authlib_server.url).request(_request(authlib_server, BASIC_ID, BASIC_SECRET))
    assert token.access_token == authlib_server.issued[-1]["access_token"]
    assert token.access_token.startswith("authlib-")
    assert token.lifetime == EXPIRES_IN
    assert token.lifetime_defaulted is False
    assert token.token_type == "Bearer"
    assert token.sent_at == clock.now
    assert authlib_server.requests[-1] == {"form_keys": ["grant_type"], "authorization": True}


def test_client_secret_post(authlib_server: AuthlibServer, make_client) -> None:
    token = make_client(authlib_server.url).request(_request(authlib_server, POST_ID, POST_SECRET, AUTH_POST))
    assert token.access_token == authlib_server.issued[-1]["access_token"]
    assert token.lifetime == EXPIRES_IN
    assert authlib_server.requests[-1] == {
        "form_keys": ["grant_type", "client_id", "client_secret"],
        "authorization": False,
    }


def test_scope_is_sent_and_returned(authlib_server: AuthlibServer, make_client) -> None:
    token = make_client(authlib_server.url).request(_request(authlib_server, BASIC_ID, BASIC_SECRET, scope="read"))
    assert token.scope == "read"
    assert authlib_server.issued[-1]["scope"] == "read"


def test_awkward_characters_in_basic_credentials(authlib_server: AuthlibServer, make_client) -> None:
    token = make_client(authlib_server.url).request(_request(authlib_server, AWKWARD_ID, AWKWARD_SECRET))
    assert token.access_token == authlib_server.issued[-1]["access_token"]


def test_space_in_basic_credentials(authlib_server: AuthlibServer, make_client) -> None:
    assert make_client(authlib_server.url).request(_request(authlib_server, SPACE_ID, SPACE_SECRET)).access_token


@pytest.mark.parametrize(
    ("client_id", "secret", "method"),
    [
        pytest.param(BASIC_ID, "wrong", AUTH_BASIC, id="basic-wrong-secret"),
        pytest.param(POST_ID, "wrong", AUTH_POST, id="post-wrong-secret"),
        pytest.param("nobody", "x", AUTH_BASIC, id="basic-unknown-client"),
        pytest.param("nobody", "x", AUTH_POST, id="post-unknown-client"),
        pytest.param(BASIC_ID, BASIC_SECRET, AUTH_POST, id="basic-client-using-post"),
        pytest.param(POST_ID, POST_SECRET, AUTH_BASIC, id="post-client-using-basic"),
    ],
)
def test_refused_credentials_are_invalid_client(
    authlib_server: AuthlibServer, make_client, client_id, secret, method
) -> None:
    before = len(authlib_server.issued)
    with pytest.raises(errors.InvalidClient) as info:
        make_client(authlib_server.url).request(_request(authlib_server, client_id, secret, method))
    assert info.value.oauth_error == "invalid_client"
    assert len(authlib_server.issued) == before
    assert_no_leak(info.value, secret, *(t["access_token"] for t in authlib_server.issued))
