"""TLS: always verified; caBundle pins a private CA for one credential."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest

from autotek_operator import errors
from autotek_operator.dev.broker import BrokerServer
from autotek_operator.token_client import TokenRequest

from .conftest import CLIENT_ID, CLIENT_SECRET
from .servers import PKI, assert_no_leak, make_server_cert


@pytest.fixture
def tls_broker(pki: PKI) -> Iterator[BrokerServer]:
    with BrokerServer({CLIENT_ID: CLIENT_SECRET}, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as b:
        yield b


def _req(broker: BrokerServer, ca_bundle: str = "") -> TokenRequest:
    return TokenRequest(broker.token_url, CLIENT_ID, CLIENT_SECRET, ca_bundle=ca_bundle)


def test_private_ca_bundle_succeeds(tls_broker: BrokerServer, pki: PKI, make_client) -> None:
    assert tls_broker.url.startswith("https://127.0.0.1:")
    token = make_client(tls_broker.url).request(_req(tls_broker, pki.ca.pem))
    assert token.access_token in tls_broker.tokens


def test_bundle_with_several_certificates(tls_broker: BrokerServer, pki: PKI, make_client) -> None:
    bundle = pki.other_ca.pem + "\n" + pki.ca.pem
    assert make_client(tls_broker.url).request(_req(tls_broker, bundle)).access_token


def test_system_trust_alone_fails(tls_broker: BrokerServer, make_client) -> None:
    with pytest.raises(errors.TokenEndpointUnavailable) as info:
        make_client(tls_broker.url).request(_req(tls_broker))
    assert "TLS" in str(info.value)
    assert info.value.retryable
    assert tls_broker.stats()["count"] == 0  # no request got through the failed handshake
    assert_no_leak(info.value, CLIENT_SECRET)


def test_a_different_ca_fails(tls_broker: BrokerServer, pki: PKI, make_client) -> None:
    with pytest.raises(errors.TokenEndpointUnavailable) as info:
        make_client(tls_broker.url).request(_req(tls_broker, pki.other_ca.pem))
    assert "TLS" in str(info.value)
    assert tls_broker.stats()["count"] == 0
    assert_no_leak(info.value, CLIENT_SECRET)


def test_bundles_do_not_leak_between_requests(tls_broker: BrokerServer, pki: PKI, make_client) -> None:
    client = make_client(tls_broker.url)
    with pytest.raises(errors.TokenEndpointUnavailable):
        client.request(_req(tls_broker))
    assert client.request(_req(tls_broker, pki.ca.pem)).access_token
    with pytest.raises(errors.TokenEndpointUnavailable):
        client.request(_req(tls_broker))  # the pinned CA of the previous request does not carry over
    with pytest.raises(errors.TokenEndpointUnavailable):
        client.request(_req(tls_broker, pki.other_ca.pem))
    assert tls_broker.stats()["count"] == 1


@contextlib.contextmanager
def broker_for_another_address(pki: PKI, tmp_path: Path) -> Iterator[BrokerServer]:
    """A token endpoint on 127.0.0.1 whose certificate, signed by the test CA, names 127.0.0.2 only."""
    cert_pem, key_pem = make_server_cert(pki.ca, ips=["127.0.0.2"])
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    with BrokerServer(
        {CLIENT_ID: CLIENT_SECRET}, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem")
    ) as broker:
        yield broker


def test_certificate_for_another_address_fails(pki: PKI, make_client, tmp_path) -> None:
    with broker_for_another_address(pki, tmp_path) as broker:
        with pytest.raises(errors.TokenEndpointUnavailable) as info:
            make_client(broker.url).request(_req(broker, pki.ca.pem))
        assert "TLS" in str(info.value)
        assert broker.stats()["count"] == 0


@pytest.mark.parametrize(
    "bundle",
    [
        pytest.param("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", id="bad-der"),
        pytest.param("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n", id="bad-base64"),
        pytest.param("not a certificate at all", id="no-pem"),
    ],
)
def test_invalid_pem_is_invalid_spec(tls_broker: BrokerServer, make_client, bundle) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        make_client(tls_broker.url).request(_req(tls_broker, bundle))
    assert info.value.retry_class == "permanent"
    assert tls_broker.stats()["count"] == 0
    assert_no_leak(info.value, CLIENT_SECRET)


def test_ca_bundle_does_not_apply_to_plain_http(broker: BrokerServer, pki: PKI, make_client) -> None:
    # Plain http on loopback (explicitly allowed) ignores caBundle rather than failing.
    assert make_client(broker.url).request(_req(broker, pki.ca.pem)).access_token


# -- what is trusted: certifi's bundle without caBundle, only caBundle with one ------------------


def test_without_ca_bundle_certifi_s_bundle_is_trusted(pki: PKI, make_client) -> None:
    client = make_client("https://token.example.com")
    pool = client._session("https://token.example.com:443", "")
    assert pool.ca_certs == certifi.where()
    assert pool.cert_reqs == "CERT_REQUIRED"
    assert pool.assert_hostname is None  # the hostname is checked
    assert pool.conn_kw.get("ssl_context") is None  # a context made for each connection from that bundle
    pinned = client._session("https://token.example.com:443", pki.ca.pem)
    assert pinned is not pool
    assert pinned.ca_certs is None
    assert pinned.conn_kw["ssl_context"] is client._context_for(pki.ca.pem)


def test_certifi_s_bundle_is_what_verifies_without_ca_bundle(
    tls_broker: BrokerServer, pki: PKI, make_client, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    # Were certifi's bundle our test CA, the server would be trusted without caBundle...
    monkeypatch.setattr(certifi, "where", lambda: str(pki.files["ca"]))
    assert make_client(tls_broker.url).request(_req(tls_broker)).access_token
    # ...and its name still checked.
    with broker_for_another_address(pki, tmp_path) as other:
        with pytest.raises(errors.TokenEndpointUnavailable, match="TLS"):
            make_client(other.url).request(_req(other))
        assert other.stats()["count"] == 0


def test_a_ca_bundle_is_the_only_trust(
    tls_broker: BrokerServer, pki: PKI, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even were the server's CA in certifi's bundle, a caBundle without it is refused.
    monkeypatch.setattr(certifi, "where", lambda: str(pki.files["ca"]))
    client = make_client(tls_broker.url)
    assert client.request(_req(tls_broker)).access_token
    with pytest.raises(errors.TokenEndpointUnavailable, match="TLS"):
        client.request(_req(tls_broker, pki.other_ca.pem))
    assert client.request(_req(tls_broker, pki.ca.pem)).access_token
    # Nothing was added to the bundle's context along the way.
    assert client._context_for(pki.other_ca.pem).cert_store_stats()["x509_ca"] == 1
    assert client._context_for(pki.ca.pem).cert_store_stats()["x509_ca"] == 1
    assert tls_broker.stats()["count"] == 2
