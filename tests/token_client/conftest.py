"""Fixtures for the token client tests: a broker double, client factories, a fake clock, a PKI."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest

from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenClient

from .servers import PKI, make_ca, make_server_cert

CLIENT_ID = "client-1"
CLIENT_SECRET = "s3cr3t-Zq9xKw7Lp"  # distinctive, so that a leak is found by a substring search
LIFETIME = 120


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> dt.datetime:
        self.calls += 1
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC))


@pytest.fixture
def broker() -> Iterator[BrokerServer]:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}, lifetime=LIFETIME) as b:
        yield b


ClientFactory = Callable[..., TokenClient]


@pytest.fixture
def make_client(clock: FakeClock) -> ClientFactory:
    """``make_client(*base_urls, timeout=2.0, max_concurrent=8)``: a client allowed to reach those bases."""

    def factory(*base_urls: str, timeout: float = 2.0, max_concurrent: int = 8, **kwargs: object) -> TokenClient:
        prefixes = kwargs.pop("allowed_prefixes", None) or [u.rstrip("/") + "/" for u in base_urls]
        return TokenClient(
            allowed_prefixes=prefixes,  # type: ignore[arg-type]
            timeout=timeout,
            max_concurrent=max_concurrent,
            clock=clock,
            **kwargs,  # type: ignore[arg-type]
        )

    return factory


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = make_ca("autotek test CA")
    other = make_ca("some other CA")
    cert_pem, key_pem = make_server_cert(ca)
    d = tmp_path_factory.mktemp("pki")
    cert, key = d / "server.pem", d / "server.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    (d / "ca.pem").write_text(ca.pem)
    return PKI(ca=ca, other_ca=other, server_cert=cert, server_key=key, files={"ca": d / "ca.pem"})
