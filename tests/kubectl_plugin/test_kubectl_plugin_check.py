"""``kubectl autotek check``: a dry token exchange against the broker double, explained."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from autotek_operator import constants as c


def setup(kube: Any, broker: Any, ns: str, client: Any, secret: str | None = None, **spec: Any) -> None:
    data = {"client_id": client.client_id, "client_secret": client.client_secret if secret is None else secret}
    kube.put_secret(ns, "autotek-client", data)
    kube.create_credential(
        ns, "autotek", {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url, **spec}
    )


def no_leaks(text: str, broker: Any, client: Any) -> None:
    secrets = [client.client_secret, *broker.tokens]
    secrets += [base64.b64encode(s.encode()).decode() for s in secrets]
    for s in secrets:
        assert s not in text


def test_success_with_the_allow_list_from_the_environment(
    run: Any, kube: Any, broker: Any, client: Any, ns: str, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(kube, broker, ns, client)
    monkeypatch.setenv("AUTOTEK_ALLOWED_TOKEN_URLS", broker.url + "/")
    written = server.writes(kube, ns)
    r = run("-n", ns, "check", "autotek")
    assert r.code == 0, r.text
    assert "the broker issued a bearer token valid for 3599 s; scope ''" in r.out
    assert f"client_id '{client.client_id}'" in r.out
    assert re.search(r"client_secret \(sha256:[0-9a-f]{8}\)", r.out)
    assert f"allowed by {broker.url}/ (AUTOTEK_ALLOWED_TOKEN_URLS)" in r.out
    assert "the target Secret autotek was not changed" in r.out
    assert broker.stats()["count"] == 1
    assert len(broker.tokens) == 1
    no_leaks(r.text, broker, client)
    # Nothing was written to the cluster.
    assert written() == {}


def test_success_with_the_flag_and_a_scope(run: Any, kube: Any, broker: Any, client: Any, ns: str) -> None:
    setup(kube, broker, ns, client, scope="vehicles:read", clientAuthMethod="ClientSecretPost")
    r = run(
        "check",
        "autotek",
        "-n",
        ns,
        "--allowed-token-url",
        "https://elsewhere.example/",
        "--allowed-token-url",
        broker.url + "/",
    )
    assert r.code == 0, r.text
    assert "ClientSecretPost, scope 'vehicles:read'" in r.out
    assert "scope 'vehicles:read'" in r.out.splitlines()[-2]
    assert "(--allowed-token-url)" in r.out
    assert broker.stats()["requests"][0]["auth_method"] == "post"
    no_leaks(r.text, broker, client)


def test_wrong_secret(run: Any, kube: Any, broker: Any, client: Any, ns: str) -> None:
    wrong = "cs-wrong-" + client.client_secret[::-1]
    setup(kube, broker, ns, client, secret=wrong)
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "FAILED: InvalidClient" in r.out
    assert "HTTP 401" in r.out
    assert "AutoTek's checklist:" in r.out
    for i, hint in enumerate(c.TROUBLESHOOTING_HINTS, 1):
        assert f"{i}. {hint}" in r.out
    assert broker.stats()["count"] == 1
    assert wrong not in r.text
    no_leaks(r.text, broker, client)


def test_secret_with_a_trailing_newline_gets_a_note(run: Any, kube: Any, broker: Any, client: Any, ns: str) -> None:
    setup(kube, broker, ns, client, secret=client.client_secret + "\n")
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "client_secret starts or ends with whitespace or a newline" in r.out
    assert "InvalidClient" in r.out


def test_missing_secret(run: Any, kube: Any, broker: Any, ns: str) -> None:
    kube.create_credential(ns, "autotek", {"clientSecretRef": {"name": "nowhere"}, "tokenURL": broker.token_url})
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "FAILED: ClientSecretNotFound" in r.out
    assert f"Secret nowhere not found in namespace {ns}" in r.out
    assert broker.stats()["count"] == 0


def test_missing_key(run: Any, kube: Any, broker: Any, client: Any, ns: str) -> None:
    kube.put_secret(ns, "autotek-client", {"client_id": client.client_id, "secret": client.client_secret})
    kube.create_credential(ns, "autotek", {"clientSecretRef": {"name": "autotek-client"}, "tokenURL": broker.token_url})
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "FAILED: ClientSecretKeyMissing" in r.out
    assert "Secret autotek-client has no key client_secret (its keys: client_id, secret)" in r.out
    assert broker.stats()["count"] == 0
    no_leaks(r.text, broker, client)


def test_disallowed_url_makes_no_request(
    run: Any, kube: Any, broker: Any, client: Any, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(kube, broker, ns, client)
    monkeypatch.delenv("AUTOTEK_ALLOWED_TOKEN_URLS", raising=False)
    r = run("-n", ns, "check", "autotek")
    assert r.code == 1
    assert "FAILED: TokenURLNotAllowed" in r.out
    assert (
        f"{broker.token_url} is not under any allowed prefix (the operator's default): https://api.autograb.com.au/"
        in r.out
    )
    assert "no request was made" in r.out
    assert broker.stats()["count"] == 0

    # A prefix on another port of the same host does not allow it either.
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", "http://127.0.0.1:1/")
    assert r.code == 1
    assert "(--allowed-token-url): http://127.0.0.1:1/" in r.out
    assert broker.stats()["count"] == 0


def test_invalid_spec(run: Any, kube: Any, broker: Any, client: Any, ns: str, server: Any) -> None:
    if server.real:
        pytest.skip("a real API server refuses this spec (CRD validation; see tests/crd/test_crd_server.py), so "
                    "the plugin's own check of it needs the emulator, which does not validate, as an old CRD would not")
    # The emulator does not validate against the CRD, as an old CRD would not.
    setup(kube, broker, ns, client, refresh={"renewBefore": "soon"})
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", broker.url + "/")
    assert r.code == 1
    assert "spec" in r.out and "FAILED: InvalidSpec" in r.out
    assert "spec.refresh.renewBefore 'soon' is not a duration" in r.out
    assert "what to do: fix the field named above" in r.out
    assert broker.stats()["count"] == 0


def test_endpoint_failures(run: Any, kube: Any, broker: Any, client: Any, ns: str) -> None:
    setup(kube, broker, ns, client)
    allowed = ("--allowed-token-url", broker.url + "/")
    broker.configure(fail={"status": 429, "json": {"error": "slow_down"}, "headers": {"Retry-After": "30"}})
    r = run("-n", ns, "check", "autotek", *allowed)
    assert r.code == 1
    assert "FAILED: RateLimited" in r.out

    broker.configure(fail={"status": 503, "body": "down"})
    r = run("-n", ns, "check", "autotek", *allowed)
    assert r.code == 1
    assert "FAILED: TokenEndpointUnavailable" in r.out
    assert "this check ran from this machine" in r.out

    broker.configure(fail={"status": 200, "json": {"token_type": "bearer", "expires_in": 60}})
    r = run("-n", ns, "check", "autotek", *allowed)
    assert r.code == 1
    assert "FAILED: InvalidTokenResponse" in r.out
    assert "no access_token" in r.out


def test_bad_allow_list_is_a_usage_error(
    run: Any, kube: Any, broker: Any, client: Any, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(kube, broker, ns, client)
    r = run("-n", ns, "check", "autotek", "--allowed-token-url", "ftp://x/")
    assert r.code == 2
    monkeypatch.setenv("AUTOTEK_ALLOWED_TOKEN_URLS", "api.autograb.com.au")
    r = run("-n", ns, "check", "autotek")
    assert r.code == 2
    assert "AUTOTEK_ALLOWED_TOKEN_URLS" in r.err
    assert broker.stats()["count"] == 0
