"""The global bound on concurrent token requests, as the server sees it."""

from __future__ import annotations

import threading
import time

import pytest

from autotek_operator import errors
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import Token, TokenRequest

from .conftest import CLIENT_ID, CLIENT_SECRET

DELAY = 0.3


def _hammer(client, broker: BrokerServer, threads: int) -> tuple[list[Token], list[BaseException], float]:
    tokens: list[Token] = []
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        try:
            tokens.append(client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)))
        except BaseException as exc:  # collected and asserted on below
            failures.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    began = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    return tokens, failures, time.monotonic() - began


def test_at_most_max_concurrent_requests_in_flight(broker: BrokerServer, make_client) -> None:
    broker.configure(delay=DELAY)
    client = make_client(broker.url, max_concurrent=2)

    tokens, failures, elapsed = _hammer(client, broker, 6)

    assert failures == []
    assert len({t.access_token for t in tokens}) == 6
    stats = broker.stats()
    assert stats["count"] == 6
    assert stats["max_concurrency"] == 2
    assert stats["in_flight"] == 0
    assert elapsed >= 3 * DELAY - 0.05  # three waves of two


def test_the_server_does_measure_concurrency(broker: BrokerServer, make_client) -> None:
    # The control case: without a tight bound the same load does overlap more than two requests.
    broker.configure(delay=DELAY)
    client = make_client(broker.url, max_concurrent=6)
    tokens, failures, _ = _hammer(client, broker, 6)
    assert failures == []
    assert len(tokens) == 6
    assert broker.stats()["max_concurrency"] > 2


def test_a_failed_request_gives_its_slot_back(broker: BrokerServer, make_client) -> None:
    client = make_client(broker.url, max_concurrent=1, timeout=0.3)
    broker.configure(script=[{"status": 200, "json": {"access_token": "at-slow"}, "delay": 1.0}])
    with pytest.raises(errors.TokenEndpointUnavailable):
        client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    broker.configure(fail={"status": 503})
    with pytest.raises(errors.TokenEndpointUnavailable):
        client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET))
    broker.configure(fail=None)
    assert client.request(TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET)).access_token
