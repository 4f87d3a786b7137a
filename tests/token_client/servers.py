"""Purpose-built loopback servers and helpers for the token client tests.

``RawServer`` speaks just enough HTTP/1.1 to read one request per connection and then hands the
socket to a test-supplied ``respond(conn, request)`` that writes whatever bytes the test needs
(slow drips, oversize bodies, lying headers).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import json
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Respond = Callable[[socket.socket, RawRequest, threading.Event], None]


def read_request(conn: socket.socket, buf: bytes = b"") -> tuple[RawRequest, bytes] | None:
    """One HTTP/1.1 request from ``conn``, after what ``buf`` already holds of it: the request and
    the bytes that came after it. None when the peer closes before the head is complete; a body the
    peer cut short is returned as far as it came (shorter than its Content-Length)."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return RawRequest(method, path, headers, rest[:length]), rest[length:]


class LoopbackServer:
    """A loopback TCP server: a thread accepts connections and hands each, numbered from 1, to
    ``_handle`` on a thread of its own; leaving the ``with`` block stops it and closes them all."""

    def __init__(self, scheme: str = "http") -> None:
        self.connections = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._conns: list[socket.socket] = []

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn, number), daemon=True).start()

    def _handle(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError


class RawServer(LoopbackServer):
    """A loopback TCP server; each connection's first request is passed to ``respond``."""

    def __init__(self, respond: Respond) -> None:
        super().__init__()
        self.respond = respond
        self.requests: list[RawRequest] = []

    def _handle(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(10)
        try:
            got = read_request(conn)
            if got is None:
                return
            req = got[0]
            self.requests.append(req)
            self.respond(conn, req, self.stopping)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


def drip(conn: socket.socket, data: bytes, interval: float, stopping: threading.Event) -> None:
    """Send ``data`` one byte at a time, ``interval`` seconds apart, until done or stopping."""
    for i in range(len(data)):
        if stopping.is_set():
            return
        conn.sendall(data[i : i + 1])
        time.sleep(interval)


class KeepAliveServer(LoopbackServer):
    """A loopback HTTP/1.1 token endpoint (https with ``tls``: a (cert, key) file pair) that keeps
    connections open and counts them: ``connections`` is how many TCP connections were accepted,
    ``served`` lists (connection number, request number on it) per answered request.

    ``behave(conn_no, req_no)`` decides each request's fate: ``"answer"`` (a 200 token answer
    without ``Connection: close``), ``"hang up"`` (read it, close the connection unanswered, as a
    server that times out idle connections may do just as a request arrives) or ``"drip"`` (the
    answer one byte every 0.2 s)."""

    def __init__(self, tls: tuple[Path, Path] | None = None, behave: Callable[[int, int], str] | None = None) -> None:
        super().__init__("https" if tls else "http")
        self.behave = behave or (lambda conn_no, req_no: "answer")
        self.served: list[tuple[int, int]] = []
        self._ctx: ssl.SSLContext | None = None
        if tls is not None:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(str(tls[0]), str(tls[1]))

    def _handle(self, raw: socket.socket, number: int) -> None:
        conn = raw
        try:
            conn.settimeout(10)
            if self._ctx is not None:
                conn = self._ctx.wrap_socket(raw, server_side=True)
            buf = b""
            for req_no in itertools.count(1):
                got = read_request(conn, buf)
                if got is None:
                    return
                req, buf = got
                if len(req.body) < int(req.headers.get("content-length", "0")):
                    return  # closed in the middle of the body
                fate = self.behave(number, req_no)
                if fate == "hang up":
                    return
                with self._lock:
                    self.served.append((number, req_no))
                body = json.dumps({"access_token": f"at-{number}-{req_no}", "expires_in": 60}).encode()
                answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                    len(body),
                    body,
                )
                if fate == "drip":
                    drip(conn, answer, 0.2, self.stopping)
                    return
                conn.sendall(answer)
        except (OSError, ssl.SSLError, ValueError):  # ValueError: not an HTTP request line
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


# -- a throwaway PKI ---------------------------------------------------------------------------


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass
class PKI:
    ca: CA
    other_ca: CA
    server_cert: Path
    server_key: Path
    files: dict[str, Path] = field(default_factory=dict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(name: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


def make_server_cert(
    ca: CA, ips: Iterable[str] = ("127.0.0.1",), dns: Iterable[str] = (), name: str = "broker-double"
) -> tuple[bytes, bytes]:
    """A serving certificate for ``ips`` and ``dns`` names signed by ``ca``: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- leak checks -------------------------------------------------------------------------------


def rendered(exc: BaseException) -> str:
    """What a log line can show of an exception: str, repr, and every message of the chain a
    traceback would print (causes, and contexts unless suppressed with ``from None``)."""
    parts = [str(exc), repr(exc), repr(exc.args)]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.extend(traceback.format_exception_only(current))
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return "\n".join(parts)


def assert_no_leak(exc: BaseException, *needles: str) -> None:
    text = rendered(exc)
    for needle in needles:
        if needle:
            assert needle not in text, f"{type(exc).__name__} shows a secret or a token"
