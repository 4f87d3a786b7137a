"""Identical clients share token requests: in-flight requests are joined, recent tokens reused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from fakes import T0, Clock, FakeKube, b64, unb64

from autotek_operator import errors
from autotek_operator.reconcile import CredentialState, Deps, run_pass
from autotek_operator.token_client import SharedTokens, Token, TokenRequest


class SlowClient:
    timeout = 5.0

    def __init__(self, clock: Clock, delay: float = 0.0, fail: errors.AutoTekError | None = None) -> None:
        self.clock, self.delay, self.fail = clock, delay, fail
        self.count = 0
        self.lock = threading.Lock()

    def check_allowed(self, url: str) -> None:
        pass

    def request(self, req: TokenRequest) -> Token:
        with self.lock:
            self.count += 1
            n = self.count
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        return Token(access_token=f"tok-{n}", token_type="bearer", lifetime=3600, sent_at=self.clock())


def req(client_id: str = "id", secret: str = "s") -> TokenRequest:
    return TokenRequest(token_url="https://api.example/token", client_id=client_id, client_secret=secret)


def always(_: Token) -> bool:
    return True


def test_concurrent_identical_requests_make_one() -> None:
    clock = Clock()
    client = SlowClient(clock, delay=0.3)
    shared = SharedTokens(client, clock)  # type: ignore[arg-type]
    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(lambda _: shared.request(req(), always).access_token, range(8)))
    assert client.count == 1
    assert set(tokens) == {"tok-1"}
    assert shared.shared == 7


def test_forced_requests_are_not_shared() -> None:
    clock = Clock()
    client = SlowClient(clock)
    shared = SharedTokens(client, clock)  # type: ignore[arg-type]
    assert shared.request(req()).access_token == "tok-1"
    assert shared.request(req()).access_token == "tok-2"
    assert client.count == 2


def test_recent_token_reused_only_when_acceptable() -> None:
    clock = Clock()
    client = SlowClient(clock)
    shared = SharedTokens(client, clock)  # type: ignore[arg-type]
    shared.request(req(), always)
    assert shared.request(req(), always).access_token == "tok-1"
    assert shared.request(req(), lambda t: False).access_token == "tok-2"
    assert client.count == 2


def test_different_clients_never_share() -> None:
    clock = Clock()
    client = SlowClient(clock)
    shared = SharedTokens(client, clock)  # type: ignore[arg-type]
    shared.request(req("a"), always)
    shared.request(req("b"), always)
    shared.request(req("a", "other-secret"), always)
    assert client.count == 3


def test_a_failure_is_shared_with_those_waiting() -> None:
    clock = Clock()
    client = SlowClient(clock, delay=0.3, fail=errors.TokenEndpointUnavailable("down"))
    shared = SharedTokens(client, clock)  # type: ignore[arg-type]

    def attempt(_: Any) -> str:
        try:
            shared.request(req(), always)
        except errors.TokenEndpointUnavailable as exc:
            return exc.message
        return "no error"

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(attempt, range(5)))
    assert results == ["down"] * 5
    assert client.count == 1


def test_credentials_of_one_client_share_a_refresh_cycle() -> None:
    clock = Clock()
    kube = FakeKube()
    kube.put_secret("shop", "client", {"client_id": "id", "client_secret": "s"})
    client = SlowClient(clock)
    deps = Deps(kube=kube, tokens=SharedTokens(client, clock), clock=clock, rand=lambda: 0.5)  # type: ignore[arg-type]
    states = []
    for i in range(5):
        body = {"metadata": {"namespace": "shop", "name": f"c{i}", "uid": f"u{i}", "generation": 1},
                "spec": {"clientSecretRef": {"name": "client"}}}
        states.append(run_pass(CredentialState.from_body(body), deps))
        clock.advance(1)
    assert client.count == 1  # one issue for five credentials
    assert {unb64(kube.secrets[("shop", f"c{i}")]["data"]["access_token"]) for i in range(5)} == {"tok-1"}
    # A refresh cycle: each credential comes due (jitter apart); the first fetches, the rest reuse.
    for _ in range(2):
        due = min(st.next_refresh for st in states if st.next_refresh is not None)
        clock.now = due
        for i, st in enumerate(states):
            if st.next_refresh is not None and st.next_refresh <= clock.now + timedelta(seconds=60):
                clock.now = max(clock.now, st.next_refresh)
                states[i] = run_pass(st, deps)
    assert client.count == 3
    assert b64("tok-3") == kube.secrets[("shop", "c4")]["data"]["access_token"]
    assert all(st.next_refresh and st.next_refresh > T0 + timedelta(seconds=3600) for st in states)
