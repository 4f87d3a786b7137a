"""The token-endpoint double itself: strictness, control API, statistics, CLI."""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from autotek_operator.dev.broker import ABSENT, BrokerConfigError, BrokerServer

from .conftest import CLIENT_ID, CLIENT_SECRET

FORM = {"grant_type": "client_credentials"}


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        yield s


def _basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# -- strictness ------------------------------------------------------------------------------------


def test_issues_a_token(broker: BrokerServer, http) -> None:
    r = http.post(broker.token_url, data={**FORM, "scope": "a b"}, headers=_basic())
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    doc = r.json()
    assert list(doc) == ["access_token", "expires_in", "scope", "token_type"]
    assert doc["access_token"].startswith("at-")
    assert doc["expires_in"] == 120
    assert doc["scope"] == "a b"
    assert doc["token_type"] == "bearer"
    assert broker.tokens == [doc["access_token"]]


def test_token_alias_path(broker: BrokerServer, http) -> None:
    r = http.post(broker.url + "/token", data={**FORM, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    assert r.status_code == 200
    assert r.json()["scope"] == ""


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        pytest.param({"json": FORM, "headers": _basic()}, 400, "invalid_request", id="json-body"),
        pytest.param(
            {"data": "grant_type=client_credentials", "headers": {**_basic(), "Content-Type": "text/plain"}},
            400,
            "invalid_request",
            id="text-plain",
        ),
        pytest.param({"headers": _basic()}, 400, "invalid_request", id="no-body"),
        pytest.param(
            {"data": {"grant_type": "password"}, "headers": _basic()},
            400,
            "unsupported_grant_type",
            id="password-grant",
        ),
        pytest.param(
            {"data": {"grant_type": "client_credentials", "x": "1"}, "headers": _basic()},
            200,
            None,
            id="extra-param-ok",
        ),
        pytest.param(
            {"data": [("grant_type", "client_credentials"), ("grant_type", "client_credentials")], "headers": _basic()},
            400,
            "invalid_request",
            id="repeated-param",
        ),
        pytest.param(
            {"data": {**FORM, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, "headers": _basic()},
            400,
            "invalid_request",
            id="basic-and-post",
        ),
        pytest.param({"data": FORM}, 401, "invalid_client", id="no-credentials"),
        pytest.param({"data": {**FORM, "client_id": CLIENT_ID}}, 401, "invalid_client", id="post-without-secret"),
        pytest.param({"data": FORM, "headers": _basic(secret="nope")}, 401, "invalid_client", id="wrong-secret"),
        pytest.param({"data": FORM, "headers": _basic(client_id="nobody")}, 401, "invalid_client", id="unknown"),
        pytest.param({"data": FORM, "headers": {"Authorization": "Basic !!!"}}, 401, "invalid_client", id="bad-base64"),
        pytest.param(
            {"data": FORM, "headers": {"Authorization": "Bearer x"}}, 401, "invalid_client", id="bearer-scheme"
        ),
        pytest.param(
            {"data": {**FORM, "client_id": CLIENT_ID, "client_secret": "nope"}},
            401,
            "invalid_client",
            id="post-wrong-secret",
        ),
    ],
)
def test_strictness(broker: BrokerServer, http, kwargs, status, error) -> None:
    r = http.post(broker.token_url, **kwargs)
    assert r.status_code == status
    if error:
        assert r.json()["error"] == error
        assert broker.tokens == []
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Basic")


def test_basic_credentials_are_form_decoded(broker: BrokerServer, http) -> None:
    broker.configure(clients={"a b": "c+d:e"})
    # a form-encoded id and secret: "a+b" is "a b", "c%2Bd%3Ae" is "c+d:e"
    assert http.post(broker.token_url, data=FORM, headers=_basic("a+b", "c%2Bd%3Ae")).status_code == 200
    # the same, unencoded: '+' would decode to a space
    assert http.post(broker.token_url, data=FORM, headers=_basic("a b", "c+d:e")).status_code == 401


def test_get_on_the_token_path_is_405(broker: BrokerServer, http) -> None:
    assert http.get(broker.token_url).status_code == 405
    assert http.get(broker.url + "/elsewhere").status_code == 404
    assert http.get(broker.url + "/_health").json() == {"ok": True}


# -- control API -----------------------------------------------------------------------------------


def test_script_then_normal_behaviour(broker: BrokerServer, http) -> None:
    r = http.post(
        broker.url + "/_control",
        json={
            "script": [
                {"status": 503, "headers": {"Retry-After": "2"}, "repeat": 2},
                {"status": 200, "json": {"access_token": "canned", "expires_in": 5}},
                {"status": 418, "body": "teapot"},
            ]
        },
    )
    assert r.status_code == 200
    answers = [http.post(broker.token_url, data=FORM, headers=_basic()) for _ in range(5)]
    assert [a.status_code for a in answers] == [503, 503, 200, 418, 200]
    assert answers[0].headers["Retry-After"] == "2"
    assert answers[2].json() == {"access_token": "canned", "expires_in": 5}
    assert answers[3].text == "teapot"
    assert answers[4].json()["access_token"].startswith("at-")
    assert broker.tokens == [answers[4].json()["access_token"]]  # canned answers are not "issued"


def test_fail_stands_until_cleared_and_script_goes_first(broker: BrokerServer, http) -> None:
    broker.configure(fail={"status": 500, "json": {"error": "server_error"}}, script=[{"status": 429}])
    codes = [http.post(broker.token_url, data=FORM, headers=_basic()).status_code for _ in range(3)]
    assert codes == [429, 500, 500]
    assert http.post(broker.url + "/_control", json={"fail": None}).status_code == 200
    assert http.post(broker.token_url, data=FORM, headers=_basic()).status_code == 200


def test_canned_content_length_is_sent_as_given(broker: BrokerServer, http) -> None:
    broker.configure(fail={"status": 200, "body": "{}", "headers": {"Content-Length": "2"}})
    r = http.post(broker.token_url, data=FORM, headers=_basic())
    assert r.headers["Content-Length"] == "2"
    assert r.headers["Connection"] == "close"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3599", "3599"),
        (None, None),
        (0, 0),
        (-5, -5),
        ("abc", "abc"),
        (1e12, 1e12),
        ({"nested": 1}, {"nested": 1}),
    ],
)
def test_expires_in_raw(broker: BrokerServer, http, raw, expected) -> None:
    assert http.post(broker.url + "/_control", json={"expires_in_raw": raw}).status_code == 200
    doc = http.post(broker.token_url, data=FORM, headers=_basic()).json()
    assert "expires_in" in doc
    assert doc["expires_in"] == expected


def test_expires_in_absent_and_lifetime_restores(broker: BrokerServer, http) -> None:
    broker.configure(expires_in_raw=ABSENT)
    assert "expires_in" not in http.post(broker.token_url, data=FORM, headers=_basic()).json()
    http.post(broker.url + "/_control", json={"lifetime": 2.5})
    assert http.post(broker.token_url, data=FORM, headers=_basic()).json()["expires_in"] == 2.5
    http.post(broker.url + "/_control", json={"lifetime": 7, "expires_in_raw": "7"})  # raw applies last
    assert http.post(broker.token_url, data=FORM, headers=_basic()).json()["expires_in"] == "7"


def test_clients_are_replaced(broker: BrokerServer, http) -> None:
    http.post(broker.url + "/_control", json={"clients": {"new": "secret2"}})
    assert http.post(broker.token_url, data=FORM, headers=_basic()).status_code == 401
    assert http.post(broker.token_url, data=FORM, headers=_basic("new", "secret2")).status_code == 200
    shown = http.get(broker.url + "/_control").json()
    assert shown["clients"] == ["new"]
    assert "secret2" not in str(shown)


def test_delay_and_canned_delay(broker: BrokerServer, http) -> None:
    broker.configure(delay=0.1, script=[{"status": 200, "json": {"access_token": "x"}, "delay": 0.4}])

    def timed(call) -> float:
        started = time.monotonic()
        call()
        return time.monotonic() - started

    scripted = timed(lambda: http.post(broker.token_url, data=FORM, headers=_basic()))
    normal = timed(lambda: http.post(broker.token_url, data=FORM, headers=_basic()))
    control = timed(lambda: http.get(broker.url + "/_stats"))
    assert scripted >= 0.5  # the standing delay plus the canned one
    assert 0.1 <= normal < scripted - 0.2
    assert control < 0.1  # the control plane is never delayed


@pytest.mark.parametrize(
    "doc",
    [
        {"unknown": 1},
        {"clients": ["a"]},
        {"clients": {"a": 1}},
        {"lifetime": "60"},
        {"lifetime": True},
        {"delay": -1},
        {"script": {"status": 500}},
        {"script": [{"status": 99}]},
        {"script": [{"status": 200, "json": {}, "body": ""}]},
        {"script": [{"status": 200, "repeat": 0}]},
        {"script": [{"status": 200, "headers": {"a": 1}}]},
        {"script": [{"status": 200, "headers": {"X-Split": "a\r\nX-Injected: 1"}}]},
        {"script": [{"status": 200, "headers": {"X-Text": "日本"}}]},
        {"delay": float("inf")},
        {"script": [{"status": 200, "bogus": 1}]},
        {"fail": "500"},
        {"lifetime": 5, "delay": "bad"},  # all or nothing: the lifetime is not applied either
    ],
)
def test_control_rejects_bad_documents_atomically(broker: BrokerServer, http, doc) -> None:
    before = http.get(broker.url + "/_control").json()
    r = http.post(broker.url + "/_control", data=json.dumps(doc))  # json.dumps: Infinity too
    assert r.status_code == 400
    assert "error" in r.json()
    assert http.get(broker.url + "/_control").json() == before
    with pytest.raises(BrokerConfigError):
        broker.configure(**doc)


def test_control_rejects_non_json(broker: BrokerServer, http) -> None:
    assert http.post(broker.url + "/_control", data=b"{nope").status_code == 400
    assert http.post(broker.url + "/_control", json=[1]).status_code == 400


def test_stats_and_reset(broker: BrokerServer, http) -> None:
    http.post(broker.token_url, data={**FORM, "scope": "s", "audience": "x"}, headers=_basic())
    http.post(broker.url + "/token", data={**FORM, "client_id": CLIENT_ID, "client_secret": "bad"})
    http.post(broker.token_url, data=FORM)
    stats = http.get(broker.url + "/_stats").json()
    assert stats["count"] == 3
    assert stats["by_client"] == {CLIENT_ID: 2}
    assert stats["by_status"] == {"200": 1, "401": 2}
    assert stats["max_concurrency"] == 1
    assert stats["in_flight"] == 0
    assert len(stats["tokens"]) == 1
    first, second, third = stats["requests"]
    assert set(first) >= {"time", "client_id", "auth_method", "status", "scope", "form_keys"}
    assert abs(first["time"] - time.time()) < 10
    assert (first["auth_method"], first["status"], first["scope"]) == ("basic", 200, "s")
    assert first["form_keys"] == ["grant_type", "scope", "audience"]
    assert (second["auth_method"], second["client_id"], second["status"]) == ("post", CLIENT_ID, 401)
    assert second["form"]["client_secret"] == "<redacted>"
    assert (third["auth_method"], third["client_id"]) == (None, None)
    assert CLIENT_SECRET not in str(stats)

    reset = http.post(broker.url + "/_stats/reset")
    assert reset.status_code == 200
    assert http.get(broker.url + "/_stats").json() == {
        "count": 0,
        "by_client": {},
        "by_status": {},
        "max_concurrency": 0,
        "in_flight": 0,
        "requests": [],
        "tokens": [],
    }


def test_request_log_keeps_the_last_thousand(broker: BrokerServer) -> None:
    broker.state.requests.extend({"status": 200, "n": i} for i in range(1500))
    assert len(broker.stats()["requests"]) == 1000
    assert broker.stats()["requests"][-1]["n"] == 1499


def test_stop_closes_kept_alive_connections(http) -> None:
    broker = BrokerServer({CLIENT_ID: CLIENT_SECRET}).start()
    url = broker.token_url
    assert http.post(url, data=FORM, headers=_basic()).status_code == 200  # leaves a pooled connection
    broker.stop()
    with pytest.raises(requests.ConnectionError):
        http.post(url, data=FORM, headers=_basic())


def test_in_process_is_quiet(broker: BrokerServer, http, capfd) -> None:
    http.post(broker.token_url, data=FORM, headers=_basic())
    http.post(broker.token_url, data=FORM)
    http.get(broker.url + "/_stats")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_tls_arguments_go_together() -> None:
    with pytest.raises(BrokerConfigError):
        BrokerServer(tls_cert="/nonexistent.pem")


# -- CLI -------------------------------------------------------------------------------------------


def _start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotek_operator.dev.broker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=15)
    except queue.Empty:
        proc.kill()
        raise AssertionError("the broker CLI did not print BROKER READY") from None
    return proc, line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli(http, sig) -> None:
    proc, line = _start_cli("--port", "0", "--client", "cli-id:sec:ret", "--client", "other:x", "--lifetime", "60")
    try:
        assert line.startswith("BROKER READY http://127.0.0.1:")
        url = line.split()[2]
        r = http.post(url + "/auth-broker/request-token", data=FORM, headers=_basic("cli-id", "sec:ret"))
        assert r.status_code == 200
        assert r.json()["expires_in"] == 60
        assert http.post(url + "/token", data=FORM, headers=_basic("other", "x")).status_code == 200
        assert http.get(url + "/_stats").json()["count"] == 2
    finally:
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
    rest, err = proc.communicate()
    assert rest == ""  # exactly one line on stdout
    assert err == ""  # quiet by default


def test_cli_tls(pki) -> None:
    proc, line = _start_cli("--client", "a:b", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    try:
        url = line.split()[2]
        assert url.startswith("https://127.0.0.1:")
        r = requests.post(url + "/token", data=FORM, headers=_basic("a", "b"), verify=str(pki.files["ca"]))
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.communicate()
