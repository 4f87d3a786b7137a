"""Unit table for parse_response: every shape of answer a token endpoint can give."""

from __future__ import annotations

import email.utils
import json
from typing import Any

import pytest

from autotek_operator import errors
from autotek_operator.token_client import parse_response

DEFAULT = 900.0
NOW = 1_900_000_000.0
TOKEN = "at-parse-response-Qw3rTy"
SECRET = "s3cr3t-Zq9xKw7Lp"
_MISSING = object()  # a field left out of the answer


def parse(status: int = 200, body: bytes | str | Any = b"", headers: dict[str, str] | None = None):
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    return parse_response(status, headers or {}, body, default_lifetime=DEFAULT, now=NOW, secrets=(SECRET,))


def ok(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"access_token": TOKEN, "token_type": "bearer"}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not _MISSING}


# -- expires_in ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "lifetime", "defaulted"),
    [
        pytest.param(3599, 3599.0, False, id="int"),
        pytest.param("3599", 3599.0, False, id="numeric-string"),
        pytest.param(" 3599 ", 3599.0, False, id="numeric-string-spaces"),
        pytest.param(59.5, 59.5, False, id="float"),
        pytest.param("59.5", 59.5, False, id="float-string"),
        pytest.param(1, 1.0, False, id="one"),
        pytest.param(1e12, 1e12, False, id="1e12-accepted-large"),
        pytest.param(10**15, 1e15, False, id="huge-int"),
        pytest.param(_MISSING, DEFAULT, True, id="missing"),
        pytest.param(None, DEFAULT, True, id="null-as-missing"),
    ],
)
def test_expires_in_accepted(expires_in, lifetime, defaulted) -> None:
    token = parse(body=ok(expires_in=expires_in))
    assert token.lifetime == lifetime
    assert isinstance(token.lifetime, float)
    assert token.lifetime_defaulted is defaulted
    assert token.access_token == TOKEN
    assert token.sent_at is None  # only the client knows when it sent


@pytest.mark.parametrize(
    "expires_in",
    [
        pytest.param(0, id="zero"),
        pytest.param(0.0, id="zero-float"),
        pytest.param("0", id="zero-string"),
        pytest.param(-5, id="negative"),
        pytest.param("-5", id="negative-string"),
        pytest.param("abc", id="abc"),
        pytest.param("", id="empty-string"),
        pytest.param("  ", id="blank-string"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param("NaN", id="NaN-string"),
        pytest.param("nan", id="nan-string"),
        pytest.param("Infinity", id="Infinity-string"),
        pytest.param("-Infinity", id="-Infinity-string"),
        pytest.param("inf", id="inf-string"),
        pytest.param("1e400", id="overflowing-string"),
        pytest.param([3599], id="list"),
        pytest.param({"seconds": 3599}, id="object"),
    ],
)
def test_expires_in_refused(expires_in) -> None:
    with pytest.raises(errors.InvalidTokenResponse) as info:
        parse(body=ok(expires_in=expires_in))
    assert "expires_in" in str(info.value)
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_expires_in_non_finite_json_literals(literal) -> None:
    body = f'{{"access_token": "{TOKEN}", "expires_in": {literal}}}'
    with pytest.raises(errors.InvalidTokenResponse) as info:
        parse(body=body)
    assert TOKEN not in str(info.value)


def test_expires_in_integer_beyond_float_range() -> None:
    body = f'{{"access_token": "{TOKEN}", "expires_in": 1{"0" * 400}}}'
    with pytest.raises(errors.AutoTekError):
        parse(body=body)


# -- access_token, token_type, scope ---------------------------------------------------------------


@pytest.mark.parametrize(
    "access_token",
    [
        pytest.param(_MISSING, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param(None, id="null"),
        pytest.param(12345, id="number"),
        pytest.param(["at-x"], id="list"),
    ],
)
def test_access_token_refused(access_token) -> None:
    with pytest.raises(errors.InvalidTokenResponse) as info:
        parse(body=ok(access_token=access_token, expires_in=60))
    assert "access_token" in str(info.value)


@pytest.mark.parametrize(
    ("token_type", "expected"),
    [
        pytest.param(_MISSING, "bearer", id="missing-defaults-to-bearer"),
        pytest.param("bearer", "bearer", id="bearer"),
        pytest.param("Bearer", "Bearer", id="kept-as-returned"),
    ],
)
def test_token_type(token_type, expected) -> None:
    assert parse(body=ok(token_type=token_type, expires_in=60)).token_type == expected


@pytest.mark.parametrize("token_type", [None, "", "  ", 5, ["bearer"]])
def test_token_type_refused(token_type) -> None:
    with pytest.raises(errors.InvalidTokenResponse):
        parse(body=ok(token_type=token_type, expires_in=60))


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        pytest.param(_MISSING, None, id="missing"),
        pytest.param(None, None, id="null"),
        pytest.param("", "", id="empty"),
        pytest.param("read write", "read write", id="two"),
    ],
)
def test_scope(scope, expected) -> None:
    assert parse(body=ok(scope=scope, expires_in=60)).scope == expected


@pytest.mark.parametrize("scope", [["read"], 5, {"read": True}, True])
def test_scope_not_a_string_refused(scope) -> None:
    with pytest.raises(errors.InvalidTokenResponse) as info:
        parse(body=ok(scope=scope, expires_in=60))
    assert "scope" in str(info.value)


def test_unknown_fields_are_ignored() -> None:
    token = parse(body=ok(expires_in=60, refresh_token="rt-x", id_token="x.y.z", extra={"a": 1}))
    assert token.access_token == TOKEN


# -- bodies that are not a token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"<html>ok</html>", id="html"),
        pytest.param(b"[1, 2, 3]", id="array"),
        pytest.param(b'"at-a-bare-string"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"42", id="number"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'\xef\xbb\xbf{"access_token": "x"}', id="utf8-bom"),
        pytest.param(b'{"access_token": "x"', id="truncated"),
    ],
)
def test_200_that_is_not_a_token(body) -> None:
    with pytest.raises(errors.InvalidTokenResponse) as info:
        parse(body=body)
    assert info.value.retryable


@pytest.mark.parametrize("status", [200, 400])
def test_deeply_nested_json(status) -> None:
    with pytest.raises(errors.AutoTekError):
        parse(status=status, body=b"[" * 200_000)


# -- error answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "exc_type", "oauth_error"),
    [
        (400, {"error": "invalid_client"}, errors.InvalidClient, "invalid_client"),
        (400, {"error": "invalid_grant"}, errors.InvalidClient, "invalid_grant"),
        (400, {"error": "unauthorized_client"}, errors.InvalidClient, "unauthorized_client"),
        (400, {"error": "invalid_request"}, errors.InvalidClient, "invalid_request"),
        (400, {"error": "unsupported_grant_type"}, errors.InvalidClient, "unsupported_grant_type"),
        (400, {"error": "invalid_scope"}, errors.InvalidClient, "invalid_scope"),
        (400, {"error": "temporarily_unavailable"}, errors.TokenEndpointUnavailable, "temporarily_unavailable"),
        (400, {"error": "server_error"}, errors.TokenEndpointUnavailable, "server_error"),
        (400, {"error": 123}, errors.InvalidClient, None),
        (400, {"no": "error"}, errors.InvalidClient, None),
        (400, b"Bad Request", errors.InvalidClient, None),
        (401, {"error": "invalid_client"}, errors.InvalidClient, "invalid_client"),
        (401, b"", errors.InvalidClient, None),
        (403, b"<html>denied</html>", errors.InvalidClient, None),
        (403, {"error": "access_denied"}, errors.InvalidClient, "access_denied"),
        (429, {"error": "slow_down"}, errors.RateLimited, "slow_down"),
        (429, b"", errors.RateLimited, None),
        (500, {"error": "server_error"}, errors.TokenEndpointUnavailable, "server_error"),
        (500, b"", errors.TokenEndpointUnavailable, None),
        (502, b"<html>bad gateway</html>", errors.TokenEndpointUnavailable, None),
        (503, {"error": "temporarily_unavailable"}, errors.TokenEndpointUnavailable, "temporarily_unavailable"),
        (504, b"", errors.TokenEndpointUnavailable, None),
        (302, b"", errors.InvalidTokenResponse, None),
        (404, b"<html>nope</html>", errors.InvalidTokenResponse, None),
        (404, {"error": "not_found"}, errors.InvalidTokenResponse, "not_found"),
        (405, b"", errors.InvalidTokenResponse, None),
        (201, {"access_token": "x"}, errors.InvalidTokenResponse, None),
    ],
)
def test_error_answers(status, body, exc_type, oauth_error) -> None:
    with pytest.raises(errors.AutoTekError) as info:
        parse(status=status, body=body)
    assert type(info.value) is exc_type
    assert info.value.oauth_error == oauth_error
    assert f"HTTP {status}" in str(info.value)


def test_error_description_is_quoted_and_scrubbed() -> None:
    body = {"error": "invalid_client", "error_description": f"secret {SECRET} does not match"}
    with pytest.raises(errors.InvalidClient) as info:
        parse(status=400, body=body)
    assert SECRET not in str(info.value)
    assert "does not match" in str(info.value)
    assert "error=invalid_client" in str(info.value)


def test_long_error_fields_are_truncated() -> None:
    with pytest.raises(errors.InvalidClient) as info:
        parse(status=400, body={"error": "e" * 1000, "error_description": "d" * 5000})
    assert str(info.value).count("e") <= 100 + 20
    assert str(info.value).count("d") <= 300 + 20


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("120", 120.0, id="seconds"),
        pytest.param(" 5 ", 5.0, id="seconds-spaces"),
        pytest.param(email.utils.formatdate(NOW + 90, usegmt=True), 90.0, id="http-date"),
        pytest.param(email.utils.formatdate(NOW - 90, usegmt=True), 0.0, id="http-date-past"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("-5", None, id="negative"),
        pytest.param("", None, id="empty"),
    ],
)
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after(value, expected, status) -> None:
    headers = {} if value is None else {"Retry-After": value}
    with pytest.raises((errors.RateLimited, errors.TokenEndpointUnavailable)) as info:
        parse(status=status, headers=headers)
    if expected is None:
        assert info.value.retry_after is None
    else:
        assert info.value.retry_after == pytest.approx(expected)


def test_retry_after_is_read_case_insensitively() -> None:
    from urllib3 import HTTPHeaderDict  # the headers the client passes

    headers = HTTPHeaderDict({"retry-after": "12"})
    with pytest.raises(errors.RateLimited) as info:
        parse_response(429, headers, b"", default_lifetime=DEFAULT, now=NOW)
    assert info.value.retry_after == 12.0
