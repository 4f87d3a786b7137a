"""A token-endpoint double: a strict OAuth 2.0 client-credentials server (RFC 6749 §4.4).

Used by the demo and by the integration tests, in-process (``BrokerServer``) or as a separate
process (``python -m autotek_operator.dev.broker``). Standard library only.

Token requests (``POST /auth-broker/request-token``, the same handler on ``POST /token``) are checked
the way a strict server would check them:

- ``Content-Type`` must be ``application/x-www-form-urlencoded`` (else 400 ``invalid_request``);
  the body must be a well-formed form with no parameter repeated (else 400 ``invalid_request``);
- ``grant_type`` must be present (else 400 ``invalid_request``) and be ``client_credentials``
  (else 400 ``unsupported_grant_type``);
- the client authenticates with HTTP Basic (id and secret each form-urldecoded after base64 decoding,
  RFC 6749 §2.3.1) or with ``client_id``/``client_secret`` in the body, never both
  (400 ``invalid_request``); no credentials, a malformed Basic header, an unknown client or a wrong
  secret give 401 ``invalid_client`` with ``WWW-Authenticate: Basic``;
- success: 200 ``{"access_token": "at-…", "expires_in": <lifetime>, "scope": <requested or "">,
  "token_type": "bearer"}`` with ``Cache-Control: no-store``. Every token is new and unique.

Run-time control on the same server (JSON in, JSON out):

- ``POST /_control`` with any of
  ``clients`` ({id: secret}, replaces the registered clients),
  ``lifetime`` (number; also clears ``expires_in_raw``),
  ``expires_in_raw`` (any JSON value, sent verbatim as ``expires_in``; the string ``"__absent__"``
  omits the field; applied after ``lifetime`` when both are given),
  ``delay`` (seconds to wait before answering every token request),
  ``script`` (a list of canned responses, replacing any script left; consumed one per token request,
  in order, before normal behaviour resumes),
  ``fail`` (one canned response answering every token request until set to ``null``).
  A canned response is ``{"status": int, "json": any | "body": str, "headers": {str: str},
  "delay": seconds, "repeat": int (default 1)}``; ``script`` takes precedence over ``fail``.
  A canned ``Content-Length`` header is sent as given (and the connection is closed afterwards).
  Unknown keys or ill-typed values: 400 and nothing changes. ``GET /_control`` shows the configuration
  (client ids only, never secrets).
- ``GET /_stats``: ``{count, by_client: {id: n}, by_status: {code: n}, max_concurrency, in_flight,
  requests: [{time, path, client_id, auth_method, status, scope, form_keys, form}], tokens: [...]}``
  where ``requests`` keeps the last 1000 token requests (``auth_method`` is ``basic``, ``post``,
  ``both`` or ``null``; ``form`` is the request body with ``client_secret`` redacted) and ``tokens``
  lists every access token issued. ``POST /_stats/reset`` clears them.
- ``GET /_health``: ``{"ok": true}``.

Nothing is logged per request unless ``verbose`` is set.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hmac
import json
import math
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

TOKEN_PATH = "/auth-broker/request-token"  # noqa: S105 (a path, not a password)
TOKEN_PATHS = (TOKEN_PATH, "/token")
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
#: The ``expires_in_raw`` value that leaves ``expires_in`` out of the answer.
ABSENT = "__absent__"
MAX_REQUEST_BODY = 1024 * 1024
REQUEST_LOG_SIZE = 1000
DEFAULT_LIFETIME = 3600.0
_UNSET: Any = object()
_CONTROL_KEYS = frozenset({"clients", "lifetime", "expires_in_raw", "delay", "script", "fail"})
_CANNED_KEYS = frozenset({"status", "json", "body", "headers", "delay", "repeat"})


class BrokerConfigError(ValueError):
    """A control request or constructor argument the double cannot use."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _header_text(value: Any) -> bool:
    if not isinstance(value, str) or "\r" in value or "\n" in value:
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _canned(value: Any, where: str) -> dict[str, Any]:
    """Validate one canned response and return it normalised."""
    if not isinstance(value, Mapping):
        raise BrokerConfigError(f"{where} must be an object")
    unknown = set(value) - _CANNED_KEYS
    if unknown:
        raise BrokerConfigError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    status = value.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise BrokerConfigError(f"{where}.status must be an HTTP status code")
    if "json" in value and "body" in value:
        raise BrokerConfigError(f"{where} takes json or body, not both")
    if "body" in value and not isinstance(value["body"], str):
        raise BrokerConfigError(f"{where}.body must be a string")
    headers = value.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(_header_text(k) and _header_text(v) for k, v in headers.items()):
        raise BrokerConfigError(f"{where}.headers must map strings to latin-1 strings without line breaks")
    delay = value.get("delay", 0)
    if not _is_number(delay) or delay < 0:
        raise BrokerConfigError(f"{where}.delay must be a number of seconds >= 0")
    repeat = value.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise BrokerConfigError(f"{where}.repeat must be an integer >= 1")
    out: dict[str, Any] = {
        "status": status,
        "headers": dict(headers),
        "delay": float(delay),
        "repeat": repeat,
    }
    if "json" in value:
        out["json"] = value["json"]
    if "body" in value:
        out["body"] = value["body"]
    return out


def _clients(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BrokerConfigError("clients must map client ids to secrets (strings)")
    return dict(value)


class _Refusal(Exception):
    """An OAuth error answer, raised while checking a token request."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class _State:
    """Configuration and statistics, shared by all handler threads."""

    def __init__(self, clients: Mapping[str, str], lifetime: float, delay: float, verbose: bool) -> None:
        self.lock = threading.Lock()
        self.clients = _clients(clients)
        if not _is_number(lifetime):
            raise BrokerConfigError("lifetime must be a number")
        if not _is_number(delay) or delay < 0:
            raise BrokerConfigError("delay must be a number of seconds >= 0")
        self.lifetime: float = lifetime
        self.expires_in_raw: Any = _UNSET
        self.delay = float(delay)
        self.script: collections.deque[dict[str, Any]] = collections.deque()
        self.fail: dict[str, Any] | None = None
        self.verbose = verbose
        self._reset_stats_locked()

    # -- configuration -------------------------------------------------------------------------

    def configure(self, doc: Mapping[str, Any]) -> None:
        """Apply a control document atomically: everything is validated before anything changes."""
        if not isinstance(doc, Mapping):
            raise BrokerConfigError("the control document must be a JSON object")
        unknown = set(doc) - _CONTROL_KEYS
        if unknown:
            raise BrokerConfigError(f"unknown control keys: {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        if "clients" in doc:
            changes["clients"] = _clients(doc["clients"])
        if "lifetime" in doc:
            if not _is_number(doc["lifetime"]):
                raise BrokerConfigError("lifetime must be a number")
            changes["lifetime"] = doc["lifetime"]
        if "expires_in_raw" in doc:
            changes["expires_in_raw"] = doc["expires_in_raw"]
        if "delay" in doc:
            if not _is_number(doc["delay"]) or doc["delay"] < 0:
                raise BrokerConfigError("delay must be a number of seconds >= 0")
            changes["delay"] = float(doc["delay"])
        if "script" in doc:
            if not isinstance(doc["script"], list):
                raise BrokerConfigError("script must be a list of canned responses")
            changes["script"] = [_canned(item, f"script[{i}]") for i, item in enumerate(doc["script"])]
        if "fail" in doc:
            changes["fail"] = None if doc["fail"] is None else _canned(doc["fail"], "fail")
        with self.lock:
            if "clients" in changes:
                self.clients = changes["clients"]
            if "lifetime" in changes:
                self.lifetime = changes["lifetime"]
                self.expires_in_raw = _UNSET
            if "expires_in_raw" in changes:
                self.expires_in_raw = changes["expires_in_raw"]
            if "delay" in changes:
                self.delay = changes["delay"]
            if "script" in changes:
                self.script = collections.deque(changes["script"])
            if "fail" in changes:
                self.fail = changes["fail"]

    def describe(self) -> dict[str, Any]:
        with self.lock:
            doc: dict[str, Any] = {
                "clients": sorted(self.clients),
                "lifetime": self.lifetime,
                "delay": self.delay,
                "script": [dict(item) for item in self.script],
                "fail": self.fail,
            }
            if self.expires_in_raw is not _UNSET:
                doc["expires_in_raw"] = self.expires_in_raw
            return doc

    def next_canned(self) -> dict[str, Any] | None:
        """The canned answer for the next token request, consuming the script; None: behave normally."""
        with self.lock:
            if self.script:
                head = self.script[0]
                if head["repeat"] <= 1:
                    self.script.popleft()
                else:
                    head["repeat"] -= 1
                return head
            return self.fail

    # -- statistics ----------------------------------------------------------------------------

    def _reset_stats_locked(self) -> None:
        self.count = 0
        self.by_client: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[str] = collections.Counter()
        self.in_flight = getattr(self, "in_flight", 0)
        self.max_concurrency = self.in_flight
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self.tokens: list[str] = []

    def reset_stats(self) -> None:
        with self.lock:
            self._reset_stats_locked()

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_concurrency = max(self.max_concurrency, self.in_flight)

    def leave(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.in_flight -= 1
            self.count += 1
            if record.get("client_id") is not None:
                self.by_client[record["client_id"]] += 1
            self.by_status[str(record["status"])] += 1
            self.requests.append(record)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "count": self.count,
                "by_client": dict(self.by_client),
                "by_status": dict(self.by_status),
                "max_concurrency": self.max_concurrency,
                "in_flight": self.in_flight,
                "requests": [dict(r) for r in self.requests],
                "tokens": list(self.tokens),
            }

    # -- the token endpoint proper ---------------------------------------------------------------

    def issue(
        self,
        content_type: str | None,
        authorization: str | None,
        form: list[tuple[str, str]] | None,
        body_error: str | None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Check one token request; return (status, JSON answer, extra headers)."""
        try:
            return 200, self._issue(content_type, authorization, form, body_error), {}
        except _Refusal as r:
            headers = {"WWW-Authenticate": 'Basic realm="autotek-broker-double"'} if r.status == 401 else {}
            return r.status, {"error": r.error, "error_description": r.description}, headers

    def _issue(
        self,
        content_type: str | None,
        authorization: str | None,
        form: list[tuple[str, str]] | None,
        body_error: str | None,
    ) -> dict[str, Any]:
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if media_type != FORM_CONTENT_TYPE:
            raise _Refusal(400, "invalid_request", f"Content-Type must be {FORM_CONTENT_TYPE}")
        if form is None:
            raise _Refusal(400, "invalid_request", body_error or "the body is not a valid form")
        params: dict[str, str] = {}
        for key, value in form:
            if key in params:
                raise _Refusal(400, "invalid_request", f"parameter {key} is repeated")
            params[key] = value
        grant_type = params.get("grant_type")
        if grant_type is None:
            raise _Refusal(400, "invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            raise _Refusal(400, "unsupported_grant_type", "only grant_type=client_credentials is supported")
        in_body = "client_id" in params or "client_secret" in params
        if authorization is not None and in_body:
            raise _Refusal(400, "invalid_request", "more than one client authentication method was used")
        if authorization is not None:
            client_id, client_secret = _decode_basic(authorization)
        elif in_body:
            body_id, body_secret = params.get("client_id"), params.get("client_secret")
            if not body_id or body_secret is None:
                raise _Refusal(401, "invalid_client", "client_id and client_secret are both required")
            client_id, client_secret = body_id, body_secret
        else:
            raise _Refusal(401, "invalid_client", "client authentication is required")
        with self.lock:
            expected = self.clients.get(client_id)
        if expected is None or not hmac.compare_digest(client_secret.encode("utf-8"), expected.encode("utf-8")):
            raise _Refusal(401, "invalid_client", "client authentication failed")

        token = "at-" + secrets.token_urlsafe(24)
        doc: dict[str, Any] = {"access_token": token}
        with self.lock:
            raw, lifetime = self.expires_in_raw, self.lifetime
            self.tokens.append(token)
        if raw is _UNSET:
            doc["expires_in"] = int(lifetime) if float(lifetime).is_integer() else lifetime
        elif raw != ABSENT:
            doc["expires_in"] = raw
        doc["scope"] = params.get("scope", "")
        doc["token_type"] = "bearer"  # noqa: S105
        return doc


def _decode_basic(authorization: str) -> tuple[str, str]:
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _Refusal(401, "invalid_client", "only the Basic authentication scheme is supported")
    try:
        raw = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _Refusal(401, "invalid_client", "the Basic credentials are not valid base64") from None
    encoded_id, sep, encoded_secret = raw.partition(":")
    if not sep:
        raise _Refusal(401, "invalid_client", "the Basic credentials have no ':'")
    try:
        return unquote_plus(encoded_id, errors="strict"), unquote_plus(encoded_secret, errors="strict")
    except UnicodeDecodeError:
        raise _Refusal(401, "invalid_client", "the Basic credentials are not form-encoded UTF-8") from None


def _parse_form(body: bytes) -> tuple[list[tuple[str, str]] | None, str | None]:
    if not body:
        return [], None
    try:
        text = body.decode("ascii")
        return parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict"), None
    except UnicodeDecodeError:
        return None, "the form body must be ASCII (percent-encoded UTF-8)"
    except ValueError:
        return None, "the body is not a valid form"


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "autotek-broker-double/1"
    sys_version = ""
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.state.verbose:
            super().log_message(format, *args)

    # -- plumbing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an unreadable one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            size = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                    if n < 0:
                        raise ValueError(n)
                except ValueError:
                    self._send_json(400, {"error": "invalid_request", "error_description": "bad chunks"})
                    self.close_connection = True
                    return None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                size += n
                if size > MAX_REQUEST_BODY:
                    self._send_json(413, {"error": "invalid_request", "error_description": "body too large"})
                    self.close_connection = True
                    return None
                chunks.append(self.rfile.read(n))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdecimal() or int(length) > MAX_REQUEST_BODY:
            self._send_json(
                413 if length.strip().isdecimal() else 400,
                {"error": "invalid_request", "error_description": "unusable Content-Length"},
            )
            self.close_connection = True
            return None
        return self.rfile.read(int(length))

    def _send(self, status: int, body: bytes, headers: Mapping[str, str], content_type: str | None) -> None:
        try:
            self.send_response(status)
            names = {k.lower() for k in headers}
            if content_type and "content-type" not in names:
                self.send_header("Content-Type", content_type)
            if "content-length" in names:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def _send_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode("utf-8"), headers or {}, "application/json")

    def _json_body(self) -> Any:
        body = self._read_body()
        if body is None:
            return _UNSET
        try:
            return json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError):
            self._send_json(400, {"error": "the body is not JSON"})
            return _UNSET

    # -- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        if path == "/_stats":
            self._send_json(200, state.stats())
        elif path == "/_control":
            self._send_json(200, state.describe())
        elif path == "/_health":
            self._send_json(200, {"ok": True})
        elif path in TOKEN_PATHS:
            self._send_json(405, {"error": "invalid_request", "error_description": "use POST"}, {"Allow": "POST"})
        else:
            self._send_json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        if path in TOKEN_PATHS:
            self._token(path)
        elif path == "/_control":
            doc = self._json_body()
            if doc is _UNSET:
                return
            try:
                state.configure(doc)
            except BrokerConfigError as exc:
                self._send_json(400, {"error": str(exc)})
                return
            self._send_json(200, state.describe())
        elif path == "/_stats/reset":
            if self._read_body() is None:
                return
            state.reset_stats()
            self._send_json(200, state.stats())
        else:
            if self._read_body() is not None:
                self._send_json(404, {"error": "not_found"})

    def _token(self, path: str) -> None:
        # Statistics are recorded just before the answer is written, so that a client that has read
        # its answer always finds its request in /_stats, and in_flight never counts a finished request.
        state = self.server.state
        state.enter()
        record: dict[str, Any] = {
            "time": time.time(),
            "path": path,
            "client_id": None,
            "auth_method": None,
            "status": 400,
            "scope": None,
            "form_keys": [],
            "form": {},
        }
        recorded = False

        def finish(status: int) -> None:
            nonlocal recorded
            record["status"] = status
            state.leave(record)
            recorded = True

        try:
            body = self._read_body()
            if body is None:
                return
            form, body_error = _parse_form(body)
            self._describe(record, form)
            canned = state.next_canned()
            if state.delay:
                time.sleep(state.delay)
            if canned is not None:
                if canned["delay"]:
                    time.sleep(canned["delay"])
                ctype: str | None = "application/json"
                if "json" in canned:
                    body_out = json.dumps(canned["json"]).encode("utf-8")
                else:
                    body_out = canned.get("body", "").encode("utf-8")
                    ctype = "text/plain; charset=utf-8" if body_out else None
                finish(canned["status"])
                self._send(canned["status"], body_out, canned["headers"], ctype)
                return
            status, doc, headers = state.issue(
                self.headers.get("Content-Type"), self.headers.get("Authorization"), form, body_error
            )
            headers.update({"Cache-Control": "no-store", "Pragma": "no-cache"})
            finish(status)
            self._send_json(status, doc, headers)
        finally:
            if not recorded:
                state.leave(record)

    def _describe(self, record: dict[str, Any], form: list[tuple[str, str]] | None) -> None:
        """Fill the statistics record from the request, leniently (canned answers skip the checks)."""
        pairs = form or []
        record["form_keys"] = [k for k, _ in pairs]
        record["form"] = {k: ("<redacted>" if k == "client_secret" else v) for k, v in pairs}
        params = dict(pairs)
        record["scope"] = params.get("scope")
        authorization = self.headers.get("Authorization")
        in_body = "client_id" in params or "client_secret" in params
        if authorization is not None:
            record["auth_method"] = "both" if in_body else "basic"
            try:
                record["client_id"] = _decode_basic(authorization)[0]
            except _Refusal:
                pass
        elif in_body:
            record["auth_method"] = "post"
        if record["client_id"] is None and "client_id" in params:
            record["client_id"] = params["client_id"]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: _State, ssl_context: ssl.SSLContext | None) -> None:
        self.state = state
        self.ssl_context = ssl_context
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve our own name (socket.getfqdn), which can be slow.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        if self.ssl_context is not None:
            request.settimeout(10)
            try:
                conn = self.ssl_context.wrap_socket(request, server_side=True)
            except OSError:  # includes ssl.SSLError: e.g. the client does not trust our certificate
                return
        with self.connections_lock:
            self.connections.add(conn)
        try:
            _Handler(conn, client_address, self)
        finally:
            with self.connections_lock:
                self.connections.discard(conn)
            if conn is not request:
                try:
                    conn.close()
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.state.verbose:
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class BrokerServer:
    """The token-endpoint double, served from a background thread.

    ``clients`` maps client ids to secrets; ``lifetime`` is the ``expires_in`` of issued tokens;
    ``port=0`` picks a free port. With ``tls_cert``/``tls_key`` (PEM files) it serves https.
    """

    def __init__(
        self,
        clients: Mapping[str, str] | None = None,
        lifetime: float = DEFAULT_LIFETIME,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        *,
        delay: float = 0.0,
        verbose: bool = False,
    ) -> None:
        self.state = _State(clients or {}, lifetime, delay, verbose)
        self.host = host
        self._requested_port = port
        self._ssl_context: ssl.SSLContext | None = None
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise BrokerConfigError("tls_cert and tls_key go together")
            self._ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl_context.load_cert_chain(tls_cert, tls_key)
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> BrokerServer:
        if self._server is not None:
            return self
        self._server = _HTTPServer((self.host, self._requested_port), self.state, self._ssl_context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="broker-double",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the broker double is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash, e.g. ``http://127.0.0.1:41234``."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    # -- the control API, in-process -------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Same keys and rules as ``POST /_control``."""
        self.state.configure(changes)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def reset_stats(self) -> None:
        self.state.reset_stats()

    @property
    def tokens(self) -> list[str]:
        with self.state.lock:
            return list(self.state.tokens)


def _client_arg(value: str) -> tuple[str, str]:
    client_id, sep, secret = value.partition(":")
    if not sep or not client_id:
        raise argparse.ArgumentTypeError("expected ID:SECRET (the id cannot contain ':')")
    return client_id, secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autotek_operator.dev.broker",
        description="A local OAuth 2.0 client-credentials token endpoint for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--client",
        action="append",
        type=_client_arg,
        default=[],
        metavar="ID:SECRET",
        help="a client that may request tokens (repeatable)",
    )
    parser.add_argument(
        "--lifetime",
        type=float,
        default=DEFAULT_LIFETIME,
        help="expires_in of issued tokens, in seconds (default 3600)",
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before every token answer")
    parser.add_argument("--tls-cert", help="PEM certificate (chain) file; serves https with --tls-key")
    parser.add_argument("--tls-key", help="PEM private key file")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    broker = BrokerServer(
        dict(args.client),
        lifetime=args.lifetime,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        delay=args.delay,
        verbose=args.verbose,
    )
    broker.start()
    try:
        print(f"BROKER READY {broker.url}", flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
