"""The OAuth 2.0 client-credentials exchange (RFC 6749 §4.4) over ``urllib3`` connection pools.

Errors are classified once, here, where the I/O happens: every failure leaves this module as an
``AutoTekError`` subclass whose message was written by us (never the text of a ``urllib3`` or
socket exception, which can echo URLs, headers and data), so no secret can leak through it.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import heapq
import itertools
import json
import math
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import certifi
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ClosedPoolError, HTTPError, NewConnectionError, ProtocolError
from urllib3.exceptions import SSLError as TLSError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import Timeout

from . import errors
from .spec import AUTH_BASIC

MAX_BODY_BYTES = 1024 * 1024
CREDENTIAL_ERRORS = frozenset({"invalid_client", "invalid_grant", "unauthorized_client"})
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


@dataclass(frozen=True)
class TokenRequest:
    """Everything needed for one exchange. The secret is kept out of repr()."""

    token_url: str
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    auth_method: str = AUTH_BASIC
    scope: str = ""
    extra_params: tuple[tuple[str, str], ...] = ()
    ca_bundle: str = field(default="", repr=False)
    default_lifetime: float = 900.0

    def fingerprint(self) -> str:
        """A stable digest of every field, for telling identical clients apart (never logged)."""
        h = hashlib.sha256()
        for part in (
            self.token_url,
            self.client_id,
            self.client_secret,
            self.auth_method,
            self.scope,
            repr(self.extra_params),
            self.ca_bundle,
            repr(self.default_lifetime),
        ):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()


@dataclass(frozen=True)
class Token:
    """A token as the endpoint issued it. The token itself is kept out of repr()."""

    access_token: str = field(repr=False)
    token_type: str
    lifetime: float
    scope: str | None = None
    sent_at: datetime | None = None
    lifetime_defaulted: bool = False


def safe_url(url: str) -> str:
    """The URL without userinfo, query or fragment: safe to show in messages."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{p.port}" if p.port else ""
    return f"{p.scheme}://{host}{port}{p.path}"


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def url_allowed(url: str, allowed_prefixes: Iterable[str]) -> bool:
    """Whether ``url`` falls under one of the allowed prefixes.

    Compared part by part (scheme, host, port, then path on a segment boundary), so that
    ``https://api.example.com`` does not also allow ``https://api.example.com.evil.net``.
    """
    try:
        u = urlsplit(url)
        u_port = u.port or _default_port(u.scheme)
    except ValueError:
        return False
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return False
    # "/allowed/../elsewhere" would pass a prefix test and then leave the prefix on the wire.
    segments = u.path.split("/")
    if any(seg in (".", "..") or seg.lower().replace("%2e", ".") in (".", "..") for seg in segments):
        return False
    for prefix in allowed_prefixes:
        try:
            p = urlsplit(prefix)
            p_port = p.port or _default_port(p.scheme)
        except ValueError:
            continue
        if p.scheme != u.scheme or (p.hostname or "") != u.hostname or p_port != u_port:
            continue
        base = p.path or "/"
        path = u.path or "/"
        if base.endswith("/"):
            if path.startswith(base) or path + "/" == base:
                return True
        elif path == base or path.startswith(base + "/"):
            return True
    return False


def _parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _parse_lifetime(raw: Any, default_lifetime: float) -> tuple[float, bool]:
    if raw is None:
        return default_lifetime, True
    if isinstance(raw, bool):
        raise errors.InvalidTokenResponse("expires_in is not a number")
    if isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:
            value = math.inf if raw > 0 else -math.inf
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except (ValueError, OverflowError):
            raise errors.InvalidTokenResponse("expires_in is not a number") from None
    else:
        raise errors.InvalidTokenResponse("expires_in is not a number")
    if math.isnan(value):
        raise errors.InvalidTokenResponse("expires_in is not a number")
    if value <= 0:
        raise errors.InvalidTokenResponse("expires_in is zero or negative")
    if math.isinf(value):
        raise errors.InvalidTokenResponse("expires_in is not a finite number")
    return value, False


def _oauth_error(body: bytes) -> tuple[str | None, str | None]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    code = doc.get("error")
    desc = doc.get("error_description")
    return (
        code if isinstance(code, str) else None,
        desc if isinstance(desc, str) else None,
    )


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove each secret from ``text``, also in the encodings a server might echo back."""
    for s in secrets:
        if s:
            for form in {s, quote(s, safe=""), quote_plus(s)}:
                text = text.replace(form, "***")
    return text


def parse_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    default_lifetime: float,
    now: float,
    secrets: Iterable[str] = (),
) -> Token:
    """Turn an HTTP answer from a token endpoint into a Token, or raise a typed error."""
    secrets = tuple(secrets)
    retry_after = _parse_retry_after(headers.get("Retry-After"), now)
    if status == 200:
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise errors.InvalidTokenResponse("the token endpoint answered 200 with a body that is not JSON") from None
        if not isinstance(doc, dict):
            raise errors.InvalidTokenResponse("the token endpoint answered 200 with JSON that is not an object")
        access_token = doc.get("access_token")
        if not isinstance(access_token, str) or not access_token.strip():
            raise errors.InvalidTokenResponse("the token response has no access_token")
        token_type = doc.get("token_type", "bearer")
        if not isinstance(token_type, str) or not token_type.strip():
            raise errors.InvalidTokenResponse("the token response has an invalid token_type")
        lifetime, defaulted = _parse_lifetime(doc.get("expires_in"), default_lifetime)
        scope = doc.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise errors.InvalidTokenResponse("the token response has a scope that is not a string")
        return Token(
            access_token=access_token,
            token_type=token_type,
            lifetime=lifetime,
            scope=scope,
            lifetime_defaulted=defaulted,
        )

    code, desc = _oauth_error(body)
    detail = f"HTTP {status}"
    if code:
        detail += f", error={_scrub(code, secrets)[:100]}"
    if desc:
        detail += f": {_scrub(desc, secrets)[:300]}"
    if status == 429:
        raise errors.RateLimited(
            f"the token endpoint is rate limiting ({detail})", retry_after=retry_after, oauth_error=code
        )
    if status >= 500 or code in TRANSIENT_ERRORS:
        raise errors.TokenEndpointUnavailable(
            f"the token endpoint failed ({detail})", retry_after=retry_after, oauth_error=code
        )
    if status in (401, 403) or (status == 400 and (code in CREDENTIAL_ERRORS or code is None)):
        raise errors.InvalidClient(f"the token endpoint refused the client credentials ({detail})", oauth_error=code)
    if status == 400:
        raise errors.InvalidClient(f"the token endpoint rejected the request ({detail})", oauth_error=code)
    if 300 <= status < 400:
        raise errors.InvalidTokenResponse(f"the token endpoint redirected ({detail}); redirects are not followed")
    raise errors.InvalidTokenResponse(f"the token endpoint answered {detail}", oauth_error=code)


def basic_authorization(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: form-urlencode id and secret, then base64 ``id:secret``.

    Spaces become ``%20`` rather than ``+``: both are valid form encoding, and ``%20`` is also
    read correctly by servers that decode with plain percent-decoding (Authlib, for one)."""
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


# -- a whole-request deadline ------------------------------------------------------------------
# The connect and read timeouts bound each connect and each read, so a server that drips bytes
# slowly could hold a request for ever. The connections a request takes from its session's pool
# (opened for it or kept alive from an earlier request) are recorded (per thread), and the
# client's watchdog thread shuts their sockets down when the request's deadline passes.

_tracking = threading.local()


def _record(conn: HTTPConnection) -> None:
    """Put ``conn`` in the current request's list (the deadline watchdog's), noting whether it
    is a kept-alive connection being reused (it has a socket already)."""
    conns: list[HTTPConnection] | None = getattr(_tracking, "conns", None)
    if conns is not None and conn not in conns:
        conns.append(conn)
        if getattr(conn, "sock", None) is not None:
            _tracking.reused = True


class _TrackedHTTPPool(HTTPConnectionPool):
    """A pool that records every connection a request takes from it (new or kept alive) for
    that request's deadline."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _record(conn)  # type: ignore[arg-type]
        return conn


class _TrackedHTTPSPool(HTTPSConnectionPool):
    """``_TrackedHTTPPool`` for https."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _record(conn)  # type: ignore[arg-type]
        return conn


def _abort(conns: list[HTTPConnection]) -> None:
    for conn in list(conns):
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Watch:
    """One request's deadline, as registered with a ``_Watchdog``.

    ``done`` is set when the request finished (cancelled) or the deadline passed; ``fired`` only
    in the latter case. Both are written with the watchdog's lock held."""

    __slots__ = ("conns", "done", "fired")

    def __init__(self, conns: list[HTTPConnection]) -> None:
        self.conns = conns
        self.done = False
        self.fired = False


class _Watchdog:
    """Enforces the deadlines of one client's requests with a single daemon thread.

    Deadlines wait in a heap ordered by time; the thread, started with the first request, sleeps
    until the earliest one (without a timeout while there is none) and shuts down the sockets of
    each request whose deadline passed. It is woken only by a deadline earlier than the one it
    sleeps until, which with one timeout for all requests is rare. A finished request is
    cancelled: its entry is dropped when it reaches the top of the heap, or sooner, in one sweep,
    once cancelled entries are more than half the heap. Sockets are shut down with the lock held,
    so once ``cancel`` has returned the watchdog no longer touches that request's connections
    (which the thread's next request may open again). The thread ends when ``close`` is called
    (when its client is collected)."""

    THREAD_NAME = "autotek-token-deadline"

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._cancelled = 0  # cancelled entries still in the heap
        self._sleeping_until = math.inf  # the deadline the thread sleeps until
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, deadline: float, conns: list[HTTPConnection]) -> _Watch:
        """Shut down the sockets of ``conns`` at ``deadline`` (``time.monotonic``) unless cancelled."""
        entry = _Watch(conns)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), entry))
            if deadline < self._sleeping_until:
                self._cond.notify()  # the thread must wake sooner than it planned
        return entry

    def cancel(self, entry: _Watch) -> None:
        """The request is over: never act on ``entry``. A deadline already acted on stays acted on."""
        with self._cond:
            if entry.done:
                return
            entry.done = True
            self._cancelled += 1
            if self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].done]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                heap = self._heap
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                    self._cancelled -= 1
                if not heap:
                    self._sleeping_until = math.inf
                    self._cond.wait()
                    continue
                earliest = heap[0][0]
                remaining = earliest - time.monotonic()
                if remaining > 0:
                    self._sleeping_until = earliest
                    self._cond.wait(remaining)
                    continue
                entry = heapq.heappop(heap)[2]
                entry.done = entry.fired = True
                _abort(entry.conns)


class _StaleConnection(Exception):
    """A kept-alive connection failed before any answer (the server had closed it): try a new one."""


def _close(conns: list[HTTPConnection]) -> None:
    for conn in conns:
        try:
            conn.close()
        except OSError:
            pass


def _origin(url: str) -> str:
    """``scheme://host:port`` of an allowed URL: the unit a kept-alive connection may serve."""
    p = urlsplit(url)
    return f"{p.scheme}://{(p.hostname or '').lower()}:{p.port or _default_port(p.scheme)}"


def _target(url: str) -> str:
    """The request target sent for ``url``: its path (``/`` if empty) and query, no fragment."""
    p = urlsplit(url)
    return (p.path or "/") + (f"?{p.query}" if p.query else "")


def _failure(exc: BaseException) -> str:
    """What kind of transport failure ``exc`` is: ``"timeout"``, ``"tls"``, ``"connect"`` (no
    connection, or it broke before or while answering) or ``"other"``."""
    if isinstance(exc, NewConnectionError):
        return "connect"  # a refusal (urllib3 derives it from its connect timeout error)
    if isinstance(exc, Urllib3Timeout | TimeoutError):
        return "timeout"
    if isinstance(exc, TLSError | ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(exc, ProtocolError | ClosedPoolError | OSError):
        return "connect"
    return "other"


def _transport_error(
    exc: BaseException, where: str, deadline_passed: bool, reading: bool = False
) -> errors.AutoTekError:
    """A typed error with our own text for a transport failure (whose own text may hold URLs or data)."""
    kind = _failure(exc)
    if deadline_passed or kind == "timeout":
        return errors.TokenEndpointUnavailable(f"the token endpoint {where} timed out")
    if reading:
        return errors.TokenEndpointUnavailable(f"reading the answer from {where} failed")
    if kind == "tls":
        return errors.TokenEndpointUnavailable(f"TLS verification with {where} failed")
    if kind == "connect":
        return errors.TokenEndpointUnavailable(f"could not connect to the token endpoint {where}")
    return errors.TokenEndpointUnavailable(f"the request to the token endpoint {where} failed")


class TokenClient:
    """Performs token requests: allow-list, TLS, timeouts, body cap, global concurrency bound.

    Each request must finish within ``2 * timeout`` as a whole; one watchdog thread per client
    enforces that. Each thread keeps its own sessions (a connection pool of one connection), one
    per (origin: scheme, host and port; CA bundle), at most ``SESSIONS_PER_THREAD``, the least
    recently used dropped (and its connection closed) first. A session holds at most one
    kept-alive connection, used only for URLs of its own origin that passed the allow-list,
    verified against its own CA bundle (without one, certifi's): a connection is never reused
    for another host, port, scheme or ``caBundle``. Nothing else outlives a request: no cookies
    are kept, and no proxy or netrc settings are read from the environment. Redirects are never
    followed. A connection is closed instead of kept when its request failed or ran out of time;
    a kept connection the server closed meanwhile is replaced by a fresh one, once.
    """

    #: How many sessions (distinct origin and ``caBundle`` pairs) each thread keeps.
    SESSIONS_PER_THREAD = 16

    def __init__(
        self,
        *,
        allowed_prefixes: Iterable[str],
        timeout: float = 10.0,
        max_concurrent: int = 8,
        clock: Callable[[], datetime],
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.timeout = timeout
        self.max_body = max_body
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max(1, max_concurrent))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._contexts_lock = threading.Lock()
        self._local = threading.local()  # .sessions: (origin, CA bundle digest or "") -> session
        self._watchdog = _Watchdog()
        # The watchdog's thread ends with the client (at exit, being a daemon, it just stops).
        weakref.finalize(self, self._watchdog.close).atexit = False
        #: Called after each attempt with (result class, seconds); wired to metrics.
        self.observer: Callable[[str, float], None] | None = None

    def check_allowed(self, url: str) -> None:
        if not url_allowed(url, self.allowed_prefixes):
            try:
                shown = safe_url(url)
            except ValueError:
                shown = "(unparseable)"
            raise errors.TokenURLNotAllowed(
                f"token URL {shown} is not allowed by this operator's AUTOTEK_ALLOWED_TOKEN_URLS"
            )

    def _context_for(self, ca_bundle: str) -> ssl.SSLContext:
        key = hashlib.sha256(ca_bundle.encode()).hexdigest()
        with self._contexts_lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                try:
                    ctx = ssl.create_default_context(cadata=ca_bundle)
                except (ssl.SSLError, ValueError):
                    raise errors.InvalidSpec("spec.caBundle could not be loaded as PEM certificates") from None
                self._contexts[key] = ctx
            return ctx

    def _session(self, origin: str, ca_bundle: str) -> HTTPConnectionPool:
        """This thread's session for ``origin`` (scheme://host:port) and ``ca_bundle``, made on first use."""
        key = (origin, hashlib.sha256(ca_bundle.encode()).hexdigest() if ca_bundle else "")
        sessions: dict[tuple[str, str], HTTPConnectionPool] | None = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        session = sessions.pop(key, None)
        if session is None:
            session = self._new_session(origin, ca_bundle)
            while len(sessions) >= self.SESSIONS_PER_THREAD:
                sessions.pop(next(iter(sessions))).close()
        sessions[key] = session  # (re)inserted last: the dict is in least recently used order
        return session

    def _new_session(self, origin: str, ca_bundle: str) -> HTTPConnectionPool:
        """A pool of one connection to ``origin``, which keeps no state between requests but
        that kept-alive connection: no cookies, no proxies, nothing from the environment. Every
        connection a request uses is recorded for its deadline (tracked pools), kept ones too.
        https is verified, with hostname checking, against ``ca_bundle`` only when it is given,
        else against certifi's bundle."""
        context = self._context_for(ca_bundle) if ca_bundle else None  # an unusable bundle fails alike
        scheme, _, rest = origin.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "https":
            return _TrackedHTTPPool(host, int(port), maxsize=1, block=False, retries=False)
        trust: dict[str, Any] = {"ssl_context": context} if context is not None else {"ca_certs": certifi.where()}
        return _TrackedHTTPSPool(
            host, int(port), maxsize=1, block=False, retries=False, cert_reqs="CERT_REQUIRED", **trust
        )

    def request(self, req: TokenRequest) -> Token:
        """Exchange the client credentials for a token, or raise a typed AutoTekError."""
        self.check_allowed(req.token_url)
        form: list[tuple[str, str]] = [("grant_type", "client_credentials")]
        if req.scope:
            form.append(("scope", req.scope))
        form.extend(req.extra_params)
        # With these, the connection adds Host, Content-Length and "Accept-Encoding: identity":
        # answers are asked for, and read, as they are, never compressed.
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "autotek-operator",
            "Connection": "keep-alive",
        }
        if req.auth_method == AUTH_BASIC:
            headers["Authorization"] = basic_authorization(req.client_id, req.client_secret)
        else:
            form.extend([("client_id", req.client_id), ("client_secret", req.client_secret)])
        secrets: tuple[str, ...] = ()
        if req.client_secret:
            basic = basic_authorization(req.client_id, req.client_secret).removeprefix("Basic ")
            secrets = (req.client_secret, basic, basic.rstrip("="), req.client_id)
        where = safe_url(req.token_url)
        with self._slots:
            session = self._session(_origin(req.token_url), req.ca_bundle)
            sent_at = self._clock()
            started = time.monotonic()
            result = "error"
            try:
                status, resp_headers, body = self._post(session, _target(req.token_url), form, headers, where)
                token = parse_response(
                    status,
                    resp_headers,
                    body,
                    default_lifetime=req.default_lifetime,
                    now=time.time(),
                    secrets=secrets,
                )
                result = "success"
                return Token(
                    access_token=token.access_token,
                    token_type=token.token_type,
                    lifetime=token.lifetime,
                    scope=token.scope,
                    sent_at=sent_at,
                    lifetime_defaulted=token.lifetime_defaulted,
                )
            except errors.AutoTekError as exc:
                result = exc.reason
                raise
            finally:
                if self.observer is not None:
                    self.observer(result, time.monotonic() - started)

    def _post(
        self,
        session: HTTPConnectionPool,
        target: str,
        form: list[tuple[str, str]],
        headers: dict[str, str],
        where: str,
    ) -> tuple[int, Mapping[str, str], bytes]:
        body = urlencode(form).encode("ascii")
        timeout = Timeout(connect=self.timeout, read=self.timeout)
        deadline = time.monotonic() + self.timeout * 2
        conns: list[HTTPConnection] = []
        watch = self._watchdog.watch(deadline, conns)
        _tracking.conns = conns
        answered = False
        try:
            for retry in (True, False):
                _tracking.reused = False
                try:
                    result = self._exchange(session, target, body, headers, timeout, where, deadline, watch, retry)
                except _StaleConnection:
                    _close(conns)  # the server closed the kept connection: once more, on a new one
                    continue
                answered = True
                return result
            raise AssertionError("unreachable")  # the second attempt never raises _StaleConnection
        finally:
            self._watchdog.cancel(watch)  # from here on the watchdog leaves these connections alone
            _tracking.conns = None
            _tracking.reused = False
            if not answered or watch.fired:
                _close(conns)  # only a connection whose request went well is kept for the next

    def _exchange(
        self,
        session: HTTPConnectionPool,
        target: str,
        body: bytes,
        headers: dict[str, str],
        timeout: Timeout,
        where: str,
        deadline: float,
        watch: _Watch,
        retry_stale: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            resp = session.urlopen(
                "POST",
                target,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                timeout=timeout,
                preload_content=False,
                decode_content=False,
                release_conn=False,
            )
        except (HTTPError, OSError) as exc:
            # The pool has closed the connection and taken its place back.
            if retry_stale and getattr(_tracking, "reused", False) and not watch.fired and _failure(exc) == "connect":
                raise _StaleConnection from None
            raise _transport_error(exc, where, watch.fired) from None
        kept = False
        try:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isascii() and length.isdigit() and int(length) > self.max_body:
                raise errors.InvalidTokenResponse(
                    f"the token endpoint's answer is larger than {self.max_body} bytes; refused unread"
                )
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in resp.stream(65536, decode_content=False):
                    size += len(chunk)
                    if size > self.max_body:
                        raise errors.InvalidTokenResponse(
                            f"the token endpoint's answer is larger than {self.max_body} bytes; refused"
                        )
                    if time.monotonic() > deadline:
                        raise errors.TokenEndpointUnavailable(f"the token endpoint {where} timed out")
                    chunks.append(chunk)
            except (HTTPError, OSError) as exc:
                raise _transport_error(exc, where, watch.fired, reading=True) from None
            if watch.fired:
                raise errors.TokenEndpointUnavailable(f"the token endpoint {where} timed out")
            kept = True
            return resp.status, resp.headers, b"".join(chunks)
        finally:
            if not kept:
                resp.close()  # closes the connection: never kept half read
            # Back to its pool, once (a response read to its end may have put it back already):
            # kept alive after a full answer, closed (to be opened afresh) after a failure.
            resp.release_conn()


@dataclass
class _Flight:
    """One token request in progress, which identical requests wait for instead of repeating."""

    done: threading.Event = field(default_factory=threading.Event)
    token: Token | None = None
    error: errors.AutoTekError | None = None


class SharedTokens:
    """Credentials with identical client settings share their token requests.

    Requests with the same fingerprint (token URL, client id and secret, auth method, scope,
    parameters, CA) that arrive while one is in flight wait for it; and a token fetched a moment
    ago is handed to another credential when the caller says it will do (``reusable``), so that N
    credentials of one client make one request per refresh cycle instead of N.
    """

    #: Forget remembered tokens this long after they expire.
    PURGE_EVERY = 60.0

    def __init__(self, client: TokenClient, clock: Callable[[], datetime]) -> None:
        self.client = client
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[str, Token] = {}
        self._flights: dict[str, _Flight] = {}
        self._purged = time.monotonic()
        self.shared = 0  # how many requests were answered without a request of their own

    def check_allowed(self, url: str) -> None:
        self.client.check_allowed(url)

    def request(self, req: TokenRequest, reusable: Callable[[Token], bool] | None = None) -> Token:
        """A token for ``req``: a recent or in-flight one if ``reusable`` accepts it, else a new one."""
        key = req.fingerprint()
        while True:
            with self._lock:
                self._purge()
                recent = self._recent.get(key)
                if recent is not None and reusable is not None and reusable(recent):
                    self.shared += 1
                    return recent
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = _Flight()
                    break
            flight.done.wait(self.client.timeout * 3)
            if reusable is not None and flight.token is not None and reusable(flight.token):
                with self._lock:
                    self.shared += 1
                return flight.token
            if reusable is not None and flight.error is not None:
                raise flight.error
            # A new token was wanted (or the flight vanished): go round and request one.
        try:
            flight.token = self.client.request(req)
            with self._lock:
                self._recent[key] = flight.token
            return flight.token
        except errors.AutoTekError as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _purge(self) -> None:
        if time.monotonic() - self._purged < self.PURGE_EVERY:
            return
        self._purged = time.monotonic()
        now = self._clock()
        for key, token in list(self._recent.items()):
            sent = token.sent_at or now
            if (now - sent).total_seconds() > min(token.lifetime, 86400.0):
                del self._recent[key]
