"""Fault-injection kit for the integration tier, and the session's fault table.

- ``FaultServer``: a purpose-built token endpoint on 127.0.0.1, one ``Route`` per credential, each with
  its own behaviour (a token, a canned answer, a delay), switchable from the test process at any time;
  optionally TLS, optionally bound but not listening (connection refused) until ``listen()``.
- ``TCPProxy``: a loopback TCP relay between an operator and the API server that can refuse and drop
  every connection for a while (``down()``/``up()``).
- ``Observer``: one thread that lists the credentials, Secrets and Events of some namespaces a few times
  a second, so that dozens of concurrent scenarios wait on one shared snapshot instead of polling the API
  server each; it also runs the ``Guard`` checks ("a still-valid token is still in its Secret").
- ``ROWS``/``TOTALS``: what each fault test saw, printed as a table by ``conftest.pytest_terminal_summary``
  and written to ``build/fault-table.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import secrets
import socket
import ssl
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import yaml
from harness import GROUP, PLURAL, VERSION
from kubernetes.client.exceptions import ApiException

from autotek_operator.scheduling import BACKOFF, FLOOR_SECONDS, TRANSIENT
from token_client import servers as pki

# -- the fault table ---------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    expected: str
    observed: str
    recovery: str = "-"
    recovered: bool = True
    passed: bool = True


ROWS: list[Row] = []
#: token_checks: Guard checks made; tokens_lost: checks that found a still-valid token missing;
#: secrets_leaked: secret/token values found in the fault operators' logs, Events or status (None: not scanned).
TOTALS: dict[str, Any] = {"token_checks": 0, "tokens_lost": 0, "secrets_leaked": None}
#: Every access token handed out by a FaultServer (also the ones in answers the operator must refuse).
ISSUED: set[str] = set()
_lock = threading.Lock()


def record(row: Row) -> None:
    with _lock:
        ROWS.append(row)


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def totals_line() -> str:
    recovered = sum(1 for r in ROWS if r.recovered)
    leaked = TOTALS["secrets_leaked"]
    return (
        f"faults injected: {len(ROWS)}, recovered: {recovered}, tokens lost: {TOTALS['tokens_lost']} "
        f"(of {TOTALS['token_checks']} checks), secrets leaked: {'not scanned' if leaked is None else leaked}"
    )


#: Column widths of the terminal table; longer cells wrap onto more lines.
WIDTHS = (34, 44, 64, 15)


def table_lines() -> list[str]:
    header = ("fault", "expected", "observed", "recovery")
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, WIDTHS, strict=True)).rstrip(),
        "  ".join("-" * w for w in WIDTHS),
    ]
    for r in ROWS:
        cells = (r.fault + ("" if r.passed else " [FAILED]"), r.expected, r.observed, r.recovery)
        wrapped = [textwrap.wrap(c, w) or [""] for c, w in zip(cells, WIDTHS, strict=True)]
        for i in range(max(len(c) for c in wrapped)):
            parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(wrapped, WIDTHS, strict=True)]
            lines.append("  ".join(parts).rstrip())
    lines.append("  ".join("-" * w for w in WIDTHS))
    lines.append(totals_line())
    return lines


def markdown() -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["# Fault injection", "", "| fault | expected | observed | recovery |", "|---|---|---|---|"]
    for r in ROWS:
        fault = r.fault + ("" if r.passed else " **FAILED**")
        out.append(f"| {esc(fault)} | {esc(r.expected)} | {esc(r.observed)} | {esc(r.recovery)} |")
    out += ["", f"**Total:** {totals_line()}", ""]
    return "\n".join(out)


# -- backoff bounds, derived from the operator's own constants ---------------------------------------


def transient_delay(attempts: int, jitter: float) -> float:
    """The wait after the ``attempts``-th transient failure in a row, for a jitter factor in [0.8, 1.2],
    with the per-credential floor applied (as scheduling.backoff_delay and next_attempt do)."""
    first, cap = BACKOFF[TRANSIENT]
    delay = min(cap, min(cap, first * 2.0 ** min(max(attempts, 1) - 1, 30)) * jitter)
    return max(delay, FLOOR_SECONDS)


def attempts_within(window: float, jitter: float, slack: float = 0.0) -> int:
    """How many requests a credential failing transiently from its first request on makes within
    ``window`` seconds, if every wait is ``transient_delay(n, jitter)`` shortened by ``slack``."""
    t, n = 0.0, 1
    while True:
        t += transient_delay(n, jitter) - slack
        if t > window:
            return n
        n += 1


# -- a private CA ---------------------------------------------------------------------------------------


class CA(pki.CA):
    """A private CA (token_client.servers' own) that also makes TLS server contexts for 127.0.0.1."""

    def server_context(self, workdir: Path, name: str) -> ssl.SSLContext:
        """A TLS server context with a certificate for 127.0.0.1 signed by this CA."""
        cert_pem, key_pem = pki.make_server_cert(self, name=name)
        cert_path, key_path = workdir / f"{name}.crt", workdir / f"{name}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert_path), str(key_path))
        return ctx


def make_ca(name: str) -> CA:
    made = pki.make_ca(name)
    return CA(made.key, made.cert)


# -- a token endpoint with a behaviour per route --------------------------------------------------------


def new_token() -> str:
    token = "ft-" + secrets.token_urlsafe(24)
    with _lock:
        ISSUED.add(token)
    return token


@dataclass
class Canned:
    """One HTTP answer. ``declared_length`` announces a Content-Length other than the body's;
    ``chunked`` sends the body with chunked transfer encoding (no Content-Length at all)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    declared_length: int | None = None

    @classmethod
    def json(cls, status: int, doc: Any, **kw: Any) -> Canned:
        return cls(status, json.dumps(doc).encode(), **kw)


#: A route's ``expires_in`` value that leaves the field out of the answer.
ABSENT: Any = object()


class Route:
    """One credential's token endpoint: ``/t/<name>`` on a FaultServer."""

    def __init__(self, server: FaultServer, name: str, lifetime: Any, scheme: str) -> None:
        self.server, self.name, self.scheme = server, name, scheme
        self.client_id = f"fid-{secrets.token_hex(4)}"
        self.client_secret = f"fcs-{secrets.token_urlsafe(18)}"
        self.lock = threading.Lock()
        #: expires_in of issued tokens: a number, any JSON value sent verbatim, or ABSENT.
        self.expires_in: Any = lifetime
        #: When set, answers every request instead of a token (a Canned, or a function making one).
        self.fault: Canned | Callable[[], Canned] | None = None
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.entered = threading.Event()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.port}/t/{self.name}"

    def times(self) -> list[float]:
        with self.lock:
            return [r["time"] for r in self.requests]

    def statuses(self) -> list[int | None]:
        with self.lock:
            return [r["status"] for r in self.requests]

    def _authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(value.strip(), validate=True).decode()
        except ValueError:
            return False
        cid, _, csecret = raw.partition(":")
        return secrets.compare_digest(unquote_plus(cid), self.client_id) and secrets.compare_digest(
            unquote_plus(csecret), self.client_secret
        )

    def tokens(self) -> list[str | None]:
        """The token each request was answered with (None: not a token of ours)."""
        with self.lock:
            return [r.get("token") for r in self.requests]

    def answer(self, authorization: str | None, rec: dict[str, Any]) -> Canned:
        if self.delay:
            time.sleep(self.delay)
        if not self._authorized(authorization):
            return Canned.json(401, {"error": "invalid_client"}, headers={"WWW-Authenticate": "Basic"})
        fault = self.fault
        if fault is not None:
            return fault() if callable(fault) else fault
        rec["token"] = new_token()
        doc: dict[str, Any] = {"access_token": rec["token"], "token_type": "bearer", "scope": ""}
        if self.expires_in is not ABSENT:
            doc["expires_in"] = self.expires_in
        return Canned.json(200, doc, headers={"Cache-Control": "no-store"})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))
        route = self.server.owner.routes.get(urlsplit(self.path).path)
        if route is None:
            self._send(Canned.json(404, {"error": "not_found"}))
            return
        rec: dict[str, Any] = {"time": time.time(), "status": None}
        with route.lock:
            route.in_flight += 1
            route.requests.append(rec)
        route.entered.set()
        try:
            canned = route.answer(self.headers.get("Authorization"), rec)
            rec["status"] = canned.status
            self._send(canned)
        finally:
            with route.lock:
                route.in_flight -= 1

    def _send(self, c: Canned) -> None:
        self.close_connection = True
        try:
            self.send_response(c.status)
            if c.content_type:
                self.send_header("Content-Type", c.content_type)
            for key, value in c.headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            if c.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(c.body), 65536):
                    piece = c.body[i : i + 65536]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(c.declared_length or len(c.body)))
                self.end_headers()
                self.wfile.write(c.body)
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            pass  # the client gave up (a timeout, a refused body): that is the point of some faults


class _LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 for one ``owner``, over TLS while ``owner.tls`` is a server
    SSLContext (read for every connection, so that it can be swapped at run time), else plain HTTP."""

    daemon_threads = True
    owner: FaultServer | APIProxy

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake first (10 s at the most; then no timeout but the handler's own), then the
        handler on the connection. A failed handshake ends the connection quietly: e.g. the client does
        not trust our certificate, which is the fault under test."""
        tls = self.owner.tls
        conn = request
        if tls is not None:
            request.settimeout(10)
            try:
                conn = tls.wrap_socket(request, server_side=True)
            except OSError:
                return
            conn.settimeout(None)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            if conn is not request:
                try:
                    conn.close()
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Server(_LoopbackServer):
    request_queue_size = 64

    def __init__(self, owner: FaultServer, sock: socket.socket | None) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        if sock is not None:
            self.socket.close()
            self.socket = sock
        else:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(("127.0.0.1", 0))
        self.server_address = self.socket.getsockname()

    def server_bind(self) -> None:  # never resolve our own name (slow); binding is done in __init__
        pass


class FaultServer:
    """A loopback token endpoint whose routes the test reprograms at will.

    ``tls``: a server SSLContext, swappable at run time (None: plain HTTP). ``listening=False``: the port is
    bound but not listening, so connecting is refused until ``listen()``; ``pause()`` goes back to that."""

    def __init__(self, tls: ssl.SSLContext | None = None, listening: bool = True) -> None:
        self.tls = tls
        self.routes: dict[str, Route] = {}
        self._server = _Server(self, None)
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None
        self.listening = False
        if listening:
            self.listen()

    def route(self, name: str, lifetime: Any = 3600, scheme: str | None = None) -> Route:
        r = Route(self, name, lifetime, scheme or ("https" if self.tls is not None else "http"))
        self.routes[f"/t/{name}"] = r
        return r

    def listen(self) -> None:
        self.listening = True
        self._server.server_activate()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"fault-server-{self.port}",
        )
        self._thread.start()

    def pause(self) -> None:
        """Stop listening, keeping the port bound: connections are refused again."""
        self.listening = False
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._server = _Server(self, sock)

    def prefix(self, scheme: str | None = None) -> str:
        return f"{scheme or ('https' if self.tls is not None else 'http')}://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.listening:
            self._server.shutdown()
        self._server.server_close()


# -- a TCP proxy in front of the API server ---------------------------------------------------------------


def shut_down(socks: Iterable[socket.socket]) -> None:
    """Shut each socket down both ways, so that its peer sees the connection end at once; a socket closed
    or disconnected already is passed over."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TCPProxy:
    """Relays 127.0.0.1:<port> to ``upstream``; ``down()`` closes the listener (connections are refused)
    and drops every open connection; ``up()`` listens on the same port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        #: (time, what) for every connection accepted and every down()/up().
        self.log: list[tuple[float, str]] = []
        self._start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.settimeout(0.1)
        return sock

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, args=(self._listener, self._stop), daemon=True, name="api-proxy"
        )
        self._thread.start()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self.log.append((time.time(), "accepted"))
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shut_down((src, dst))
            with self._lock:
                for s in (src, dst):
                    if s in self._conns:
                        self._conns.discard(s)
                        s.close()

    def down(self) -> None:
        self.log.append((time.time(), "down"))
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        shut_down(conns)

    def up(self) -> None:
        self.log.append((time.time(), "up"))
        self._listener = self._listen(self.port)
        self._start()

    def stop(self) -> None:
        self.down()


# -- watching the API server for many scenarios at once ---------------------------------------------------


def decode(secret: dict[str, Any] | None) -> dict[str, str] | None:
    if secret is None:
        return None
    out = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v).decode()
        except ValueError:
            out[k] = "<undecodable>"
    return out


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class Snapshot:
    seq: int
    #: Wall-clock times just before the credentials and the Secrets were listed, and just after.
    t_creds: float
    t_secrets: float
    t_done: float
    creds: dict[tuple[str, str], dict[str, Any]]
    secrets: dict[tuple[str, str], dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]

    def cred(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.creds.get((ns, name))

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return dict((self.cred(ns, name) or {}).get("status") or {})

    def ready(self, ns: str, name: str) -> dict[str, Any] | None:
        for cond in self.status(ns, name).get("conditions") or []:
            if cond.get("type") == "Ready":
                return dict(cond)
        return None

    def data(self, ns: str, name: str) -> dict[str, str] | None:
        return decode(self.secrets.get((ns, name)))

    def token(self, ns: str, name: str) -> str | None:
        return (self.data(ns, name) or {}).get("access_token")

    def events_for(self, ns: str, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events.get(ns, [])
            if (e.get("involvedObject") or {}).get("name") == name and (reason is None or e.get("reason") == reason)
        ]


@dataclass
class Guard:
    """Checks on every snapshot that the Secret still holds a token that is still valid, or a newer one."""

    ns: str
    secret: str
    token: str
    expires_at: float
    label: str
    active: bool = True
    checks: int = 0
    losses: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.active = False


def consistent(secret: dict[str, Any] | None) -> str | None:
    """Why a target Secret is not one complete token (None: it is)."""
    data = decode(secret)
    if secret is None or data is None:
        return "no Secret"
    token = data.get("access_token")
    if not token:
        return "no access_token"
    if data.get("authorization") != f"Bearer {token}":
        return "authorization is not 'Bearer <access_token>'"
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    if data.get("expires_at") != annotations.get("autotek.io/expires-at"):
        return "expires_at differs from the autotek.io/expires-at annotation"
    return None


class Observer:
    """Lists credentials, Secrets and Events of ``namespaces`` every ``interval`` seconds."""

    def __init__(self, cluster: Any, namespaces: Iterable[str], interval: float = 0.3) -> None:
        self.cluster = cluster
        self.namespaces = list(namespaces)
        self.interval = interval
        self.cond = threading.Condition()
        self.snap: Snapshot | None = None
        self.guards: list[Guard] = []
        #: Functions called with every snapshot, in the observer's thread (their exceptions are kept).
        self.visitors: list[Callable[[Snapshot], None]] = []
        self.visitor_errors: list[str] = []
        self.stopping = threading.Event()
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._events_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-observer")
        self._thread.start()

    def _list(self, fn: Callable[..., Any], *args: Any) -> list[dict[str, Any]]:
        resp = fn(*args, _preload_content=False, _request_timeout=10)
        items: list[dict[str, Any]] = json.loads(resp.data).get("items", [])
        return items

    def _run(self) -> None:
        seq = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                t_creds = time.time()
                creds = {}
                for ns in self.namespaces:
                    for item in self._list(
                        self.cluster.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL
                    ):
                        creds[(ns, item["metadata"]["name"])] = item
                t_secrets = time.time()
                secrets_ = {}
                for ns in self.namespaces:
                    for item in self._list(self.cluster.core.list_namespaced_secret, ns):
                        secrets_[(ns, item["metadata"]["name"])] = item
                if time.time() - self._events_at > 1.0:
                    self._events = {
                        ns: self._list(self.cluster.core.list_namespaced_event, ns) for ns in self.namespaces
                    }
                    self._events_at = time.time()
                seq += 1
                snap = Snapshot(seq, t_creds, t_secrets, time.time(), creds, secrets_, self._events)
            except (ApiException, OSError, ValueError) as exc:
                print(f"fault observer: listing failed: {exc!r}")
                time.sleep(self.interval)
                continue
            self._check_guards(snap)
            for visit in list(self.visitors):
                try:
                    visit(snap)
                except AssertionError as exc:
                    self.visitor_errors.append(str(exc))
            with self.cond:
                self.snap = snap
                self.cond.notify_all()
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def _check_guards(self, snap: Snapshot) -> None:
        with self.cond:
            guards = [g for g in self.guards if g.active]
        for g in guards:
            # The token must be valid for the whole listing to count (margin for clock rounding).
            if snap.t_done >= g.expires_at - 0.5:
                g.active = False
                continue
            g.checks += 1
            secret = snap.secrets.get((g.ns, g.secret))
            data = decode(secret) or {}
            token = data.get("access_token")
            problem = None
            if secret is None:
                problem = "the Secret is gone"
            elif token != g.token:
                newer = parse_time(data.get("expires_at"))
                if consistent(secret) is None and newer is not None and newer >= g.expires_at:
                    g.token, g.expires_at = token or "", newer  # a rotation: follow the newer token
                else:
                    problem = "the Secret holds another, older or incomplete token"
            with _lock:
                TOTALS["token_checks"] += 1
                if problem:
                    TOTALS["tokens_lost"] += 1
                    g.losses.append(
                        f"{g.label}: {problem} at {snap.t_secrets:.1f}, "
                        f"{g.expires_at - snap.t_secrets:.1f}s before expiry"
                    )

    def guard(self, ns: str, secret: str, label: str) -> Guard:
        """Guard the token now in ``ns/secret`` until it expires (or ``stop()``)."""
        snap = self.latest()
        data = snap.data(ns, secret) or {}
        expires = parse_time(data.get("expires_at"))
        assert data.get("access_token") and expires, f"{label}: no token to guard in {ns}/{secret}"
        g = Guard(ns, secret, data["access_token"], expires, label)
        with self.cond:
            self.guards.append(g)
        return g

    def latest(self, timeout: float = 30) -> Snapshot:
        """The first snapshot listed after this call."""
        result: Snapshot = self.wait("a snapshot", lambda s: s, timeout)
        return result

    def wait(self, what: str, fn: Callable[[Snapshot], Any], timeout: float, after: float | None = None) -> Any:
        """Evaluate ``fn`` on each new snapshot listed after ``after`` (default: now) until it returns
        something truthy; fail after ``timeout`` seconds."""
        after = time.time() if after is None else after
        deadline = time.monotonic() + timeout
        seen = -1
        last: Any = None
        with self.cond:
            while True:
                if self.stopping.is_set():
                    raise AssertionError(f"stopped while waiting for {what}")
                snap = self.snap
                if snap is not None and snap.seq != seen and snap.t_creds >= after:
                    seen = snap.seq
                    last = fn(snap)
                    if last:
                        return last
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
                self.cond.wait(min(remaining, 1.0))

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        self._thread.join(5)


# -- an HTTP(S) proxy in front of the API server that can cut watches and expire resourceVersions ----------


_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
    "trailer",
}


class _APIHandler(BaseHTTPRequestHandler):
    server: _APIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        query = url.query
        watching = "watch=true" in query or "watch=1" in query
        listing = not watching and "limit=" in query
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        verdict = owner.verdict(url.path, query, watching, listing)
        if verdict is not None:
            status, reason = verdict
            doc = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": reason,
                "reason": "Expired" if status == 410 else "ServiceUnavailable",
                "code": status,
            }
            self._reply(status, json.dumps(doc).encode())
            return
        conn = owner.upstream_connection(timeout=120 if watching else 30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            if not watching:
                self._reply(resp.status, resp.read(), resp.getheaders())
                return
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            with owner.lock:
                if owner.cutting:  # cut while this stream was being opened
                    return
                owner.streams.add(self.connection)
            try:
                while True:
                    chunk = resp.read1(65536)
                    if not chunk or owner.cutting:
                        break
                    self.wfile.write(chunk)
                    self.wfile.flush()
            finally:
                with owner.lock:
                    owner.streams.discard(self.connection)
        except (OSError, ssl.SSLError):
            self.close_connection = True
        finally:
            conn.close()

    def _reply(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        sent_type = False
        for key, value in headers:
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
                sent_type = sent_type or key.lower() == "content-type"
        if not sent_type:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _APIServer(_LoopbackServer):
    def __init__(self, owner: APIProxy) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _APIHandler)


class APIProxy:
    """An HTTP(S) relay on 127.0.0.1 between one operator and the API server, speaking HTTP so that it can
    do to list and watch requests what a busy API server does:

    - ``cut()``: the open watch streams end, and every list and watch request is answered 503 (as while the
      API server restarts or a load balancer drains);
    - ``expire()``: lists pass again, but a watch resumed from a resourceVersion given before it is answered
      410 Gone until that collection has been listed anew: the resourceVersion has left the API server's
      watch cache (or etcd was compacted), which is how a watch ends up "broken past a 410" on a real
      cluster. Events of that gap are never delivered: only a new list shows what changed.

    Everything else (reads and writes of single objects) passes through unchanged, with the caller's own
    credentials. ``kubeconfig`` is the operator's, rewritten to point here (with ``ca`` as the server's CA).
    """

    def __init__(self, kubeconfig: Path, dst: Path, ca: CA, workdir: Path) -> None:
        doc = yaml.safe_load(kubeconfig.read_text())
        current = next(x for x in doc["contexts"] if x["name"] == doc["current-context"])["context"]["cluster"]
        cluster = next(x for x in doc["clusters"] if x["name"] == current)["cluster"]
        url = urlsplit(cluster["server"])
        self.scheme, self.host, self.port_up = url.scheme, url.hostname or "127.0.0.1", url.port
        self.upstream_tls: ssl.SSLContext | None = None
        self.tls: ssl.SSLContext | None = None
        if self.scheme == "https":
            self.upstream_tls = ssl.create_default_context()
            if cluster.get("certificate-authority-data"):
                self.upstream_tls.load_verify_locations(
                    cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
                )
            elif cluster.get("certificate-authority"):
                self.upstream_tls.load_verify_locations(cafile=cluster["certificate-authority"])
            self.server_name = cluster.get("tls-server-name") or self.host
            self.tls = ca.server_context(workdir, "api-proxy")
        self.lock = threading.Lock()
        self.streams: set[Any] = set()
        self.cutting = False
        #: While expiring: the collections (paths) listed since expire(); None when not expiring.
        self.relisted: set[str] | None = None
        #: (time, path, status) of every request answered by the proxy itself (503 and 410).
        self.answered: list[tuple[float, str, int]] = []
        self._server = _APIServer(self)
        self.port = int(self._server.server_address[1])
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="api-proxy-http"
        ).start()
        cluster["server"] = f"{self.scheme}://127.0.0.1:{self.port}{url.path}"
        cluster.pop("tls-server-name", None)
        if self.tls is not None:
            cluster.pop("certificate-authority", None)
            cluster["certificate-authority-data"] = base64.b64encode(ca.pem.encode()).decode()
        dst.write_text(yaml.safe_dump(doc))
        self.kubeconfig = dst

    def upstream_connection(self, timeout: float) -> Any:
        if self.upstream_tls is not None:
            return http.client.HTTPSConnection(self.host, self.port_up, timeout=timeout, context=self.upstream_tls)
        return http.client.HTTPConnection(self.host, self.port_up, timeout=timeout)

    def verdict(self, path: str, query: str, watching: bool, listing: bool) -> tuple[int, str] | None:
        """(status, message) for a request the proxy answers itself; None: pass it through."""
        with self.lock:
            answer = None
            if (watching or listing) and self.cutting:
                answer = (503, "the API server is not serving lists and watches right now")
            elif listing and self.relisted is not None:
                self.relisted.add(path)
            elif watching and self.relisted is not None and "resourceVersion=" in query and path not in self.relisted:
                answer = (410, "too old resource version")
            if answer is not None:
                self.answered.append((time.time(), path, answer[0]))
            return answer

    def cut(self) -> None:
        with self.lock:
            self.cutting = True
            streams = list(self.streams)
        shut_down(streams)

    def expire(self) -> None:
        with self.lock:
            self.cutting = False
            self.relisted = set()

    def expired(self) -> list[str]:
        """The paths of the watches answered 410."""
        return [p for _, p, s in self.answered if s == 410]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
