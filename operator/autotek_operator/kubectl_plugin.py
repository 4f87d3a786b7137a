"""``kubectl autotek``: a kubectl plugin for AutoTekCredentials and ClusterAutoTekCredentials
(installed as ``kubectl-autotek``).

- ``kubectl autotek status [-A]``: a table of credentials with readiness, expiry and next refresh;
  ``status --cluster`` the same for ClusterAutoTekCredentials, with their namespace counts;
  ``status catc/NAME`` one cluster credential with its failed namespaces and their reasons.
- ``kubectl autotek refresh NAME``: ask the operator for a new token now (the annotation
  ``autotek.io/refresh-requested-at``) and wait until it reports the outcome.
- ``kubectl autotek check NAME``: a dry token exchange from this machine, explained step by step;
  nothing is written to the cluster, and neither the token nor the client secret is ever printed.
  ``check -f FILE --spec-only`` validates a credential's spec offline, with no cluster at all.

A credential is named as ``NAME`` or ``atc/NAME`` (an AutoTekCredential in the namespace of ``-n``),
or ``catc/NAME`` or ``--cluster NAME`` (a ClusterAutoTekCredential), the way kubectl names resources.

Exit codes: 0 success; 1 the refresh or check failed (or the credential does not exist); 2 a usage
error, or ``refresh`` timed out; 3 the Kubernetes API server could not be used (kubeconfig,
connection, permissions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from . import __version__, errors
from . import config as config_mod
from . import constants as c
from .spec import CredentialSpec, NamespaceSelection, parse_spec
from .target import unb64
from .timefmt import format_time, parse_time
from .token_client import Token, TokenClient, TokenRequest, safe_url, url_allowed

Obj = dict[str, Any]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 2
EXIT_API = 3

#: (connect, read) seconds for each Kubernetes API call.
API_TIMEOUT = (5.0, 30.0)
POLL_INTERVAL = 0.5
#: Failures the operator reports before it makes any token request (so a refresh request is never
#: marked as handled in status.lastRefreshRequest): waiting for the refresh would be pointless.
BLOCKING_REASONS = frozenset(
    {
        c.REASON_INVALID_SPEC,
        c.REASON_TOKEN_URL_NOT_ALLOWED,
        c.REASON_TARGET_CONFLICT,
        c.REASON_TARGET_NOT_FOUND,
        c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED,
        c.REASON_NO_NAMESPACES_SELECTED,
    }
)
#: Where a ClusterAutoTekCredential's client Secret may live when neither --client-secret-namespace
#: nor $AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES says: the namespace manifests/ and the chart install into.
DEFAULT_CLUSTER_CREDENTIAL_NAMESPACES = ("autotek-system",)
#: Namespaces named in full by ``check`` before it only counts the rest.
SHOWN_NAMESPACES = 10

#: What to do about each failure reason (the README's table, in short).
ADVICE: dict[str, str] = {
    c.REASON_INVALID_SPEC: "fix the field named above; the operator makes no token request until then",
    c.REASON_CLIENT_SECRET_NOT_FOUND: "create the Secret in the credential's namespace; the operator retries at once",
    c.REASON_CLIENT_SECRET_KEY_MISSING: (
        "add the key to the Secret, or point spec.clientSecretRef.clientIdKey/clientSecretKey at the right one"
    ),
    c.REASON_TOKEN_URL_NOT_ALLOWED: (
        "use an allowed token URL, or ask the operator's admin to add a prefix to AUTOTEK_ALLOWED_TOKEN_URLS"
    ),
    c.REASON_INVALID_CLIENT: (
        "go through AutoTek's checklist; fixing the client Secret makes the operator retry at once"
    ),
    c.REASON_RATE_LIMITED: "nothing to fix: the broker is rate limiting; the operator waits for Retry-After",
    c.REASON_TOKEN_ENDPOINT_UNAVAILABLE: (
        "check connectivity, DNS, proxies and spec.caBundle; the operator retries with backoff"
    ),
    c.REASON_INVALID_TOKEN_RESPONSE: "check that spec.tokenURL points at the token endpoint itself",
    c.REASON_TARGET_CONFLICT: (
        "pick another spec.target.name, or use creationPolicy: Merge for a Secret you manage yourself"
    ),
    c.REASON_TARGET_NOT_FOUND: "creationPolicy Merge writes only into an existing Secret: create it first",
    c.REASON_EXPIRED: "see lastFailureReason and the Events (kubectl describe atc NAME)",
    c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED: (
        "move the client Secret into a namespace listed in the operator's AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES "
        "(by default its own namespace), or ask the operator's admin to list its namespace"
    ),
    c.REASON_NO_NAMESPACES_SELECTED: (
        "label a namespace to match spec.namespaceSelector or list one in spec.namespaces; "
        "no token is requested until a namespace is selected"
    ),
    c.REASON_NAMESPACES_NOT_PROVISIONED: (
        "see status.failedNamespaces (kubectl autotek status catc/NAME); the other namespaces have the token"
    ),
    c.REASON_WRITE_FAILED: "the API server refused the Secret write: see the operator's logs and RBAC",
}


class CommandError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class APIError(CommandError):
    """The Kubernetes API server could not be used."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_API)


# -- naming a credential -----------------------------------------------------------------------

#: The spellings kubectl accepts before the slash in ``TYPE/NAME``, for each kind.
NAMESPACED_TYPES = frozenset(
    {"atc", "autotekcredential", "autotekcredentials", f"{c.PLURAL}.{c.GROUP}", f"autotekcredential.{c.GROUP}"}
)
CLUSTER_TYPES = frozenset(
    {
        "catc",
        "clusterautotekcredential",
        "clusterautotekcredentials",
        f"{c.CLUSTER_PLURAL}.{c.GROUP}",
        f"clusterautotekcredential.{c.GROUP}",
    }
)


@dataclass(frozen=True)
class Ref:
    """A credential: ``namespace`` None for a ClusterAutoTekCredential."""

    name: str
    namespace: str | None = None

    @property
    def cluster(self) -> bool:
        return self.namespace is None

    @property
    def kind(self) -> str:
        return c.CLUSTER_KIND if self.cluster else c.KIND

    def __str__(self) -> str:
        return f"catc/{self.name}" if self.namespace is None else f"{self.namespace}/{self.name}"

    def not_found(self) -> CommandError:
        where = "" if self.namespace is None else f' in namespace "{self.namespace}"'
        return CommandError(f'{self.kind} "{self.name}" not found{where}', EXIT_FAILED)


def parse_ref(text: str, *, cluster: bool, namespace: str) -> Ref:
    """``NAME``, ``atc/NAME`` or ``catc/NAME`` (any spelling kubectl accepts for the type, any case)
    as a Ref; ``cluster`` (--cluster) makes a bare NAME a ClusterAutoTekCredential."""
    kind, slash, name = text.rpartition("/")
    if not slash:
        return Ref(name) if cluster else Ref(name, namespace)
    if not name:
        raise CommandError(f"no name after the type in {text!r}", EXIT_USAGE)
    if kind.lower() in CLUSTER_TYPES:
        return Ref(name)
    if kind.lower() in NAMESPACED_TYPES:
        if cluster:
            raise CommandError(
                f"--cluster names a ClusterAutoTekCredential, but {text!r} is an AutoTekCredential", EXIT_USAGE
            )
        return Ref(name, namespace)
    raise CommandError(f"unknown type {kind!r} in {text!r}: use atc/NAME or catc/NAME", EXIT_USAGE)


# -- time ------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """A duration the way kubectl prints ages (apimachinery's HumanDuration): 45s, 3m10s, 41m, 5h2m, 3d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years, days = divmod(hours // 24, 365)
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


def expires_in(expires_at: object, now: datetime) -> str:
    """``41m`` until a future instant, ``expired 3m ago`` for a past one, ``-`` when unknown."""
    when = parse_time(expires_at)
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    if delta > 0:
        return human_duration(delta)
    return f"expired {human_duration(-delta)} ago"


def relative(at: object, now: datetime) -> str:
    """``in 23m`` for a future instant, ``2m ago`` for a past one (``now`` within a second), ``-`` when unknown."""
    when = parse_time(at)
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    if delta > 0:
        return f"in {human_duration(delta)}"
    return f"{human_duration(-delta)} ago"


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- output ------------------------------------------------------------------------------------


class Out:
    """Plain text on stdout; green/red words only when stdout is a terminal and NO_COLOR is unset."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.colour = bool(isatty and isatty()) and "NO_COLOR" not in os.environ

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def good(self, text: str) -> str:
        return f"\033[32m{text}\033[0m" if self.colour else text

    def bad(self, text: str) -> str:
        return f"\033[31m{text}\033[0m" if self.colour else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns left-aligned and three spaces apart, as ``kubectl get`` prints them."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return lines


def fingerprint(value: str) -> str:
    """A short, one-way fingerprint to compare a secret with a value one expects, never the value."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]


def hints_for(reason: str) -> list[str]:
    """Advice lines for a failure reason; AutoTek's checklist, numbered, for InvalidClient."""
    lines = []
    if reason == c.REASON_INVALID_CLIENT:
        lines.append("AutoTek's checklist:")
        lines.extend(f"  {i}. {hint}" for i, hint in enumerate(c.TROUBLESHOOTING_HINTS, 1))
    advice = ADVICE.get(reason)
    if advice:
        lines.append(f"what to do: {advice}")
    return lines


# -- the Kubernetes API ------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    api_client: Any
    namespace: str
    server: str


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def connect(kubeconfig: str | None, context: str | None) -> Connection:
    """An API client for the kubeconfig (``--kubeconfig``, else $KUBECONFIG, else ~/.kube/config) and
    context (``--context``, else the current one), and that context's namespace (else ``default``).

    With no kubeconfig at all inside a Pod, the Pod's service account is used."""
    import kubernetes

    from_env = os.environ.get("KUBECONFIG", "")
    path = kubeconfig or from_env or "~/.kube/config"
    paths = [os.path.expanduser(p) for p in path.split(os.pathsep) if p]
    cfg = kubernetes.client.Configuration()
    namespace = "default"
    if not any(os.path.exists(p) for p in paths):
        sa_ns = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        if kubeconfig is None and not from_env and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                with open(sa_ns) as f:
                    namespace = f.read().strip() or namespace
            except (kubernetes.config.ConfigException, OSError) as exc:
                raise APIError(f"cannot use the in-cluster configuration: {_one_line(str(exc))}") from None
        else:
            raise APIError(f"no kubeconfig found at {path} (use --kubeconfig or set KUBECONFIG)")
    else:
        try:
            contexts, current = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=path
            )
            name = context or (current or {}).get("name")
            chosen = next((ctx for ctx in contexts if ctx.get("name") == name), None)
            if chosen is None:
                raise APIError(f'context "{name}" not found in the kubeconfig {path}')
            namespace = (chosen.get("context") or {}).get("namespace") or namespace
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=name, client_configuration=cfg, persist_config=False
            )
        except kubernetes.config.ConfigException as exc:
            raise APIError(f"cannot load the kubeconfig {path}: {_one_line(str(exc))}") from None
        except (OSError, ValueError) as exc:
            raise APIError(f"cannot read the kubeconfig {path}: {type(exc).__name__}") from None
    cfg.retries = False
    return Connection(kubernetes.client.ApiClient(configuration=cfg), namespace, str(cfg.host))


class Cluster:
    """The few read calls and the one annotation patch the plugin makes, with errors as one line."""

    def __init__(self, conn: Connection) -> None:
        from kubernetes.client import CoreV1Api, CustomObjectsApi

        self.conn = conn
        self.core = CoreV1Api(conn.api_client)
        self.custom = CustomObjectsApi(conn.api_client)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj | None:
        """Run one API call; the JSON object it returns, None for a 404, else APIError."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            resp = fn(*args, _preload_content=False, _request_timeout=API_TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            detail = exc.reason or ""
            try:
                body = json.loads(exc.body or "")
                if isinstance(body, dict) and isinstance(body.get("message"), str):
                    detail = body["message"]
            except (TypeError, ValueError):
                pass
            raise APIError(f"{what}: the API server answered HTTP {exc.status}: {_one_line(detail)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise APIError(
                f"{what}: cannot reach the API server at {self.conn.server} ({type(exc).__name__})"
            ) from None
        try:
            doc = json.loads(resp.data)
        except ValueError:
            raise APIError(f"{what}: the API server's answer is not JSON") from None
        if not isinstance(doc, dict):
            raise APIError(f"{what}: the API server's answer is not an object")
        return doc

    def credential(self, namespace: str, name: str) -> Obj | None:
        return self._call(
            f"get {c.PLURAL} {namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            namespace,
            c.PLURAL,
            name,
        )

    def credentials(self, namespace: str | None) -> list[Obj]:
        if namespace is None:
            what = f"list {c.PLURAL} in all namespaces"
            doc = self._call(what, self.custom.list_cluster_custom_object, c.GROUP, c.VERSION, c.PLURAL)
        else:
            what = f"list {c.PLURAL} in namespace {namespace}"
            doc = self._call(what, self.custom.list_namespaced_custom_object, c.GROUP, c.VERSION, namespace, c.PLURAL)
        if doc is None:
            raise APIError(f"{what}: the server does not serve {c.API_VERSION} {c.PLURAL}; is the CRD installed?")
        items = doc.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def annotate(self, namespace: str, name: str, key: str, value: str) -> Obj | None:
        return self._call(
            f"patch {c.PLURAL} {namespace}/{name}",
            self.custom.patch_namespaced_custom_object,
            c.GROUP,
            c.VERSION,
            namespace,
            c.PLURAL,
            name,
            {"metadata": {"annotations": {key: value}}},
            _content_type="application/merge-patch+json",
        )

    def secret(self, namespace: str, name: str) -> Obj | None:
        return self._call(f"get secrets {namespace}/{name}", self.core.read_namespaced_secret, name, namespace)

    def get(self, ref: Ref) -> Obj | None:
        """The credential ``ref`` names, of either kind; None if it does not exist."""
        if ref.namespace is not None:
            return self.credential(ref.namespace, ref.name)
        return self._call(
            f"get {c.CLUSTER_PLURAL} {ref.name}",
            self.custom.get_cluster_custom_object,
            c.GROUP,
            c.VERSION,
            c.CLUSTER_PLURAL,
            ref.name,
        )

    def cluster_credentials(self) -> list[Obj]:
        what = f"list {c.CLUSTER_PLURAL}"
        doc = self._call(what, self.custom.list_cluster_custom_object, c.GROUP, c.VERSION, c.CLUSTER_PLURAL)
        if doc is None:
            raise APIError(
                f"{what}: the server does not serve {c.API_VERSION} {c.CLUSTER_PLURAL}; is the CRD installed?"
            )
        return [item for item in doc.get("items") or [] if isinstance(item, dict)]

    def annotate_ref(self, ref: Ref, key: str, value: str) -> Obj | None:
        """Set one annotation on the credential ``ref`` names; None if it does not exist."""
        if ref.namespace is not None:
            return self.annotate(ref.namespace, ref.name, key, value)
        return self._call(
            f"patch {c.CLUSTER_PLURAL} {ref.name}",
            self.custom.patch_cluster_custom_object,
            c.GROUP,
            c.VERSION,
            c.CLUSTER_PLURAL,
            ref.name,
            {"metadata": {"annotations": {key: value}}},
            _content_type="application/merge-patch+json",
        )

    def namespaces(self) -> list[Obj]:
        doc = self._call("list namespaces", self.core.list_namespace)
        return [item for item in (doc or {}).get("items") or [] if isinstance(item, dict)]


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def ready_condition(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for cond in _status(obj).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == c.CONDITION_READY:
            return cond
    return {}


def _get_credential(cluster: Cluster, ref: Ref) -> Obj:
    obj = cluster.get(ref)
    if obj is None:
        raise ref.not_found()
    return obj


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def namespace_counts(obj: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(selected, provisioned, failed) from a ClusterAutoTekCredential's status.namespaces."""
    counts = _status(obj).get("namespaces")
    counts = counts if isinstance(counts, Mapping) else {}
    return _count(counts.get("selected")), _count(counts.get("provisioned")), _count(counts.get("failed"))


def failed_namespaces(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = _status(obj).get("failedNamespaces")
    return [item for item in items or () if isinstance(item, Mapping)] if isinstance(items, list) else []


# -- status ------------------------------------------------------------------------------------


STATUS_HEADER = ("NAME", "READY", "REASON", "SECRET", "EXPIRES IN", "NEXT REFRESH", "FAILURES")


def status_rows(items: Sequence[Mapping[str, Any]], now: datetime, all_namespaces: bool) -> list[list[str]]:
    rows = []
    for obj in items:
        meta = obj.get("metadata") or {}
        status = _status(obj)
        cond = ready_condition(obj)
        attempts = status.get("failedAttempts")
        failures = str(attempts) if isinstance(attempts, int) else "0"
        if isinstance(attempts, int) and attempts > 0 and status.get("lastFailureReason"):
            failures += f" ({status['lastFailureReason']})"
        row = [
            str(meta.get("name", "")),
            str(cond.get("status") or "-"),
            str(cond.get("reason") or "-"),
            str(status.get("secretName") or "-"),
            expires_in(status.get("expiresAt"), now),
            relative(status.get("nextRefreshTime"), now),
            failures,
        ]
        if all_namespaces:
            row.insert(0, str(meta.get("namespace", "")))
        rows.append(row)
    rows.sort(key=lambda r: (r[0], r[1]) if all_namespaces else (r[0],))
    return rows


CLUSTER_HEADER = ["NAME", "READY", "REASON", "NAMESPACES", "FAILED", "SECRET", "EXPIRES IN", "NEXT REFRESH", "FAILURES"]


def cluster_status_rows(items: Sequence[Mapping[str, Any]], now: datetime) -> list[list[str]]:
    """One row per ClusterAutoTekCredential: NAMESPACES is provisioned/selected, FAILED the failed count."""
    rows = []
    for obj in items:
        (row,) = status_rows([obj], now, False)
        selected, provisioned, failed = namespace_counts(obj)
        summary = "-" if selected is None else f"{provisioned or 0}/{selected}"
        row[3:3] = [summary, "-" if failed is None else str(failed)]
        rows.append(row)
    rows.sort(key=lambda r: r[0])
    return rows


def cluster_detail(obj: Mapping[str, Any]) -> list[str]:
    """The lines below the row of one ClusterAutoTekCredential: its condition, counts and failed namespaces."""
    lines = []
    cond = ready_condition(obj)
    if cond.get("message"):
        lines.append(f"Ready: {cond.get('status')} ({cond.get('reason')}): {_one_line(str(cond['message']))}")
    selected, provisioned, failed = namespace_counts(obj)
    if selected is None:
        lines.append("Namespaces: not reported yet")
    else:
        lines.append(f"Namespaces: {selected} selected, {provisioned or 0} provisioned, {failed or 0} failed")
    listed = failed_namespaces(obj)
    if listed:
        lines.append("Failed namespaces:")
        rows = [
            [str(f.get("namespace") or "-"), str(f.get("reason") or "-"), _one_line(str(f.get("message") or ""), 160)]
            for f in listed
        ]
        lines += ["  " + line for line in table(["NAMESPACE", "REASON", "MESSAGE"], rows)]
        if failed is not None and failed > len(listed):
            lines.append(f"  ... and {failed - len(listed)} more (the status lists the first {len(listed)})")
    return lines


def cmd_status(args: argparse.Namespace, cluster: Cluster, out: Out, now: datetime) -> int:
    if args.name is not None:
        ref = parse_ref(args.name, cluster=args.cluster, namespace=args.namespace)
        obj = _get_credential(cluster, ref)
        if ref.cluster:
            for line in table(CLUSTER_HEADER, cluster_status_rows([obj], now)):
                out.line(line)
            for line in cluster_detail(obj):
                out.line(line)
        else:
            for line in table(STATUS_HEADER, status_rows([obj], now, False)):
                out.line(line)
        return EXIT_OK
    if args.cluster:
        items = cluster.cluster_credentials()
        if not items:
            out.line("No ClusterAutoTekCredentials found.")
            return EXIT_OK
        for line in table(CLUSTER_HEADER, cluster_status_rows(items, now)):
            out.line(line)
        return EXIT_OK
    namespace = None if args.all_namespaces else args.namespace
    items = cluster.credentials(namespace)
    if not items:
        out.line(
            "No AutoTekCredentials found."
            if namespace is None
            else f"No AutoTekCredentials found in namespace {namespace}."
        )
        return EXIT_OK
    header = list(STATUS_HEADER)
    if namespace is None:
        header.insert(0, "NAMESPACE")
    for line in table(header, status_rows(items, now, namespace is None)):
        out.line(line)
    return EXIT_OK


# -- refresh -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Before:
    """The status fields that show progress, as they were before the refresh was requested."""

    last_refresh_time: object = None
    last_failure_time: object = None
    failed_attempts: object = None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Before:
        s = _status(obj)
        return cls(s.get("lastRefreshTime"), s.get("lastFailureTime"), s.get("failedAttempts"))


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""
    message: str = ""


def _since(value: object, requested_at: datetime, before_value: object) -> bool:
    """Whether a status timestamp was written after the request: not earlier than it, or (in case the
    operator's clock runs behind this machine's) simply different from what it was before."""
    when = parse_time(value)
    if when is None:
        return False
    return when >= requested_at or value != before_value


def refresh_outcome(obj: Mapping[str, Any], value: str, requested_at: datetime, before: Before) -> Outcome | None:
    """What the status says about the refresh requested with annotation ``value``; None: not yet known."""
    status = _status(obj)
    cond = ready_condition(obj)
    handled = status.get("lastRefreshRequest") == value
    reason = status.get("lastFailureReason")
    failed_since = bool(reason) and (
        _since(status.get("lastFailureTime"), requested_at, before.last_failure_time)
        or status.get("failedAttempts") != before.failed_attempts
    )
    # A ClusterAutoTekCredential's token may be refreshed while some namespaces did not get it
    # (Ready=False, NamespacesNotProvisioned): the exchange succeeded; the report says where it is missing.
    token_ok = cond.get("status") == "True" or cond.get("reason") == c.REASON_NAMESPACES_NOT_PROVISIONED
    if handled and token_ok and not reason:
        if _since(status.get("lastRefreshTime"), requested_at, before.last_refresh_time):
            return Outcome(True)
    if failed_since and (handled or reason in BLOCKING_REASONS):
        return Outcome(False, str(reason), str(cond.get("message") or ""))
    return None


def _annotation_value(current: object, now: Callable[[], datetime]) -> tuple[str, datetime]:
    """The current UTC second as RFC 3339, different from the annotation's current value."""
    while True:
        when = now().replace(microsecond=0)
        value = format_time(when)
        if value != current:
            return value, when
        time.sleep(max(0.05, 1.0 - now().microsecond / 1e6))


def cmd_refresh(args: argparse.Namespace, cluster: Cluster, out: Out, now: Callable[[], datetime]) -> int:
    ref = parse_ref(args.name, cluster=args.cluster, namespace=args.namespace)
    obj = _get_credential(cluster, ref)
    before = Before.of(obj)
    current = ((obj.get("metadata") or {}).get("annotations") or {}).get(c.ANN_REFRESH_REQUESTED_AT)
    value, requested_at = _annotation_value(current, now)
    if cluster.annotate_ref(ref, c.ANN_REFRESH_REQUESTED_AT, value) is None:
        raise ref.not_found()
    if args.no_wait:
        out.line(f"refresh requested for {ref} ({c.ANN_REFRESH_REQUESTED_AT}={value})")
        return EXIT_OK

    deadline = time.monotonic() + args.timeout
    last_error = ""
    while True:
        try:
            obj = _get_credential(cluster, ref)
            last_error = ""
        except APIError as exc:
            last_error = exc.message  # keep waiting: the API server may be back in a moment
        else:
            outcome = refresh_outcome(obj, value, requested_at, before)
            if outcome is not None:
                return _report_refresh(out, obj, ref, outcome, now())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(POLL_INTERVAL, remaining))
    detail = f"; last error: {last_error}" if last_error else ""
    describe = (
        f"kubectl describe catc {ref.name}" if ref.cluster else f"kubectl describe atc {ref.name} -n {ref.namespace}"
    )
    raise CommandError(
        f"timed out after {args.timeout:g}s waiting for the operator to refresh {ref} "
        f"({c.ANN_REFRESH_REQUESTED_AT}={value}); is the operator running? "
        f"See '{describe}' and the operator's logs{detail}",
        EXIT_TIMEOUT,
    )


def _report_refresh(out: Out, obj: Mapping[str, Any], ref: Ref, outcome: Outcome, now: datetime) -> int:
    status = _status(obj)
    expires = status.get("expiresAt")
    if outcome.ok:
        where = f"in Secret {status.get('secretName')}"
        if ref.cluster:
            selected, provisioned, _failed = namespace_counts(obj)
            where += f" in {provisioned or 0}/{selected if selected is not None else '?'} selected namespaces"
        out.line(
            f"{out.good('token refreshed')} for {ref}; valid until {expires} ({expires_in(expires, now)}), {where}"
        )
        if ref.cluster and ready_condition(obj).get("status") != "True":
            out.line(f"{out.bad('not every namespace has it')}: {ready_condition(obj).get('reason')}")
            for line in cluster_detail(obj):
                out.line(f"  {line}")
            return EXIT_FAILED
        return EXIT_OK
    out.line(f"{out.bad('refresh failed')} for {ref}: {outcome.reason}")
    if outcome.message:
        out.line(f"  {outcome.message}")
    if ready_condition(obj).get("status") == "True" and expires:
        out.line(f"  the previous token stays in Secret {status.get('secretName')} until {expires}")
    for hint in hints_for(outcome.reason):
        out.line(f"  {hint}")
    return EXIT_FAILED


# -- check -------------------------------------------------------------------------------------


class _Steps:
    """The lines of ``check``: one per step, ``ok`` or ``FAILED`` with an explanation below."""

    WIDTH = 15

    def __init__(self, out: Out) -> None:
        self.out = out

    def ok(self, step: str, text: str) -> None:
        self.out.line(f"  {step.ljust(self.WIDTH)}{self.out.good('ok')}: {text}")

    def note(self, text: str) -> None:
        self.out.line(f"  {''.ljust(self.WIDTH)}note: {text}")

    def failed(self, step: str, reason: str, message: str, extra: Sequence[str] = ()) -> int:
        self.out.line(f"  {step.ljust(self.WIDTH)}{self.out.bad('FAILED')}: {reason}")
        for text in (message, *extra, *hints_for(reason)):
            self.out.line(f"    {text}")
        return EXIT_FAILED


def _allow_list(flags: Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    """The allowed token URL prefixes and where they came from."""
    if flags:
        for prefix in flags:
            if not prefix.startswith(("https://", "http://")):
                raise CommandError(f"--allowed-token-url must start with https:// or http://: {prefix!r}", EXIT_USAGE)
        return tuple(flags), "--allowed-token-url"
    raw = os.environ.get(config_mod.ENV["allowed_token_urls"], "")
    try:
        settings = config_mod.from_env({config_mod.ENV["allowed_token_urls"]: raw})
    except config_mod.ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    source = "AUTOTEK_ALLOWED_TOKEN_URLS" if raw.strip() else "the operator's default"
    return settings.allowed_token_urls, source


def _whitespace_note(key: str, value: str) -> str | None:
    if value != value.strip():
        return (
            f"{key} starts or ends with whitespace or a newline (made with echo instead of echo -n?); "
            "the operator sends it exactly as stored"
        )
    return None


def _describe_token(token: Token, spec: CredentialSpec) -> str:
    lifetime = f"{token.lifetime:.0f}" if token.lifetime == int(token.lifetime) else f"{token.lifetime:g}"
    text = f"the broker issued a {token.token_type} token valid for {lifetime} s"
    if token.lifetime_defaulted:
        text = (
            f"the broker issued a {token.token_type} token without expires_in (the operator assumes "
            f"spec.refresh.defaultLifetime, {spec.refresh.default_lifetime:.0f} s)"
        )
    if token.scope is None:
        return text + "; no scope in the answer"
    return text + f"; scope {token.scope!r}"


def _client_secret_namespaces(flags: Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    """The namespaces a ClusterAutoTekCredential's client Secret may be in, and where they came from."""
    if flags:
        return tuple(flags), "--client-secret-namespace"
    env = config_mod.ENV["cluster_credential_namespaces"]
    raw = os.environ.get(env, "")
    allowed = tuple(part.strip() for part in raw.split(",") if part.strip())
    if allowed:
        return allowed, env
    return DEFAULT_CLUSTER_CREDENTIAL_NAMESPACES, "the operator's default in manifests/ and the chart"


def _from_file(path: str, name: str | None, *, cluster: bool, namespace: str) -> tuple[Ref, Obj]:
    """The one credential in a YAML file (``-``: stdin), or the one ``name`` names there."""
    import yaml

    try:
        if path == "-":
            docs = list(yaml.safe_load_all(sys.stdin))
        else:
            with open(path, encoding="utf-8") as f:
                docs = list(yaml.safe_load_all(f))
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or type(exc).__name__}", EXIT_USAGE) from None
    except yaml.YAMLError as exc:
        raise CommandError(f"{path} is not YAML: {_one_line(str(exc))}", EXIT_USAGE) from None
    found: list[tuple[Ref, Obj]] = []
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("apiVersion") != c.API_VERSION:
            continue
        if doc.get("kind") not in (c.KIND, c.CLUSTER_KIND):
            continue
        meta = doc.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        doc_name = str(meta.get("name") or "")
        doc_ns = str(meta.get("namespace") or namespace)
        doc_ref = Ref(doc_name) if doc["kind"] == c.CLUSTER_KIND else Ref(doc_name, doc_ns)
        found.append((doc_ref, doc))
    if name is not None:
        want = parse_ref(name, cluster=cluster, namespace=namespace)
        found = [(r, d) for r, d in found if r.name == want.name and r.cluster == want.cluster]
    if len(found) != 1:
        what = f"{len(found)} credentials" if found else "no AutoTekCredential or ClusterAutoTekCredential"
        hint = "; name one (NAME, atc/NAME or catc/NAME)" if len(found) > 1 else ""
        raise CommandError(f"{path} holds {what}{' named ' + name if name else ''}{hint}", EXIT_FAILED)
    return found[0]


def _describe_selection(selection: NamespaceSelection) -> str:
    parts = []
    if selection.has_selector:
        terms = [f"{k}={v}" for k, v in selection.match_labels]
        terms += [
            f"{r.key} {r.operator}" + (f" ({', '.join(sorted(r.values))})" if r.values else "")
            for r in selection.expressions
        ]
        parts.append(f"namespaces labelled {', '.join(terms)}" if terms else "every namespace (an empty selector)")
    if selection.names:
        parts.append(f"{len(selection.names)} listed by name")
    return " and ".join(parts) or "no namespace"


def _terminating(namespace: Mapping[str, Any]) -> bool:
    meta = namespace.get("metadata") or {}
    return bool(meta.get("deletionTimestamp")) or (namespace.get("status") or {}).get("phase") == "Terminating"


def _check_selection(steps: _Steps, cluster: Cluster, selection: NamespaceSelection) -> int | None:
    """The namespaces a cluster credential selects now; a failure's exit code, or None to go on."""
    try:
        listed = cluster.namespaces()
    except APIError as exc:
        steps.note(f"the selection was not checked: {exc.message}")
        return None
    selected = []
    for item in listed:
        meta = item.get("metadata") or {}
        name, labels = str(meta.get("name") or ""), meta.get("labels") or {}
        if not _terminating(item) and selection.selects(name, labels):
            selected.append(name)
    selected.sort()
    if not selected:
        return steps.failed(
            "namespaces",
            c.REASON_NO_NAMESPACES_SELECTED,
            f"no namespace is selected now ({_describe_selection(selection)})",
        )
    shown = ", ".join(selected[:SHOWN_NAMESPACES])
    more = f" and {len(selected) - SHOWN_NAMESPACES} more" if len(selected) > SHOWN_NAMESPACES else ""
    steps.ok("namespaces", f"{len(selected)} selected now: {shown}{more}")
    missing = sorted(selection.names - {str((i.get("metadata") or {}).get("name")) for i in listed})
    if missing:
        steps.note(f"listed but not (yet) existing: {', '.join(missing[:SHOWN_NAMESPACES])}")
    return None


def cmd_check(args: argparse.Namespace, cluster: Cluster | None, out: Out, now: Callable[[], datetime]) -> int:
    allowed, allowed_source = _allow_list(args.allowed_token_url)
    if args.filename is not None:
        cred, obj = _from_file(args.filename, args.name, cluster=args.cluster, namespace=args.namespace)
        origin = f" from {args.filename}"
    else:
        if args.name is None:
            raise CommandError("check needs NAME (atc/NAME, catc/NAME) or -f FILE", EXIT_USAGE)
        cred = parse_ref(args.name, cluster=args.cluster, namespace=args.namespace)
        assert cluster is not None
        obj = _get_credential(cluster, cred)
        origin = ""
    name = cred.name
    steps = _Steps(out)
    shown_name = name if cred.cluster else f"{cred.namespace}/{name}"
    nothing = "nothing is requested or written" if args.spec_only else "nothing is written to the cluster"
    out.line(f"Checking {cred.kind} {shown_name}{origin} (a dry run: {nothing})")

    # 1. The spec, as the operator parses it.
    try:
        spec = parse_spec(obj.get("spec"), name=name, cluster=cred.cluster)
    except errors.InvalidSpec as exc:
        return steps.failed("spec", exc.reason, exc.message)
    scope = f"scope {spec.scope!r}" if spec.scope else "no scope"
    steps.ok("spec", f"token URL {safe_url(spec.token_url)}, {spec.client_auth_method}, {scope}")
    ref = spec.client_secret_ref
    secret_ns = ref.namespace if cred.cluster and ref.namespace else str(cred.namespace)
    if cred.cluster and spec.namespaces is not None:
        steps.ok("selection", f"{_describe_selection(spec.namespaces)}; target Secret {spec.target.name}")
        # The operator never reads a client Secret outside the namespaces it allows.
        namespaces, source = _client_secret_namespaces(args.client_secret_namespace)
        if secret_ns not in namespaces:
            return steps.failed(
                "client Secret",
                c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED,
                f"namespace {secret_ns} is not one of {', '.join(namespaces)} ({source}); the Secret was not read",
                [
                    "(the operator's AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES is what counts in the cluster; "
                    "mirror it here with --client-secret-namespace)"
                ],
            )
        steps.ok("client Secret", f"namespace {secret_ns} is allowed ({source})")
    if args.spec_only:
        out.line("Spec only: no Secret was read and no token was requested.")
        return EXIT_OK
    if cluster is None:  # only --spec-only runs without a cluster
        raise CommandError("check -f FILE without --spec-only needs a cluster", EXIT_USAGE)
    if cred.cluster and spec.namespaces is not None:
        failed = _check_selection(steps, cluster, spec.namespaces)
        if failed is not None:
            return failed

    # 2. The client Secret, read the way the operator reads it.
    secret = cluster.secret(secret_ns, ref.name)
    if secret is None:
        return steps.failed(
            "client Secret", c.REASON_CLIENT_SECRET_NOT_FOUND, f"Secret {ref.name} not found in namespace {secret_ns}"
        )
    data = secret.get("data") or {}
    values: dict[str, str] = {}
    for key in (ref.client_id_key, ref.client_secret_key):
        if key not in data:
            present = ", ".join(sorted(data)) or "none"
            return steps.failed(
                "client Secret",
                c.REASON_CLIENT_SECRET_KEY_MISSING,
                f"Secret {ref.name} has no key {key} (its keys: {present})",
            )
        value = unb64(data.get(key))
        if not value:
            return steps.failed(
                "client Secret",
                c.REASON_CLIENT_SECRET_KEY_MISSING,
                f"Secret {ref.name} key {key} is empty or not UTF-8 text",
            )
        values[key] = value
    client_id, client_secret = values[ref.client_id_key], values[ref.client_secret_key]
    steps.ok(
        "client Secret",
        f"{ref.name} has {ref.client_id_key} {client_id!r} and {ref.client_secret_key} ({fingerprint(client_secret)})",
    )
    for key, value in ((ref.client_id_key, client_id), (ref.client_secret_key, client_secret)):
        note = _whitespace_note(key, value)
        if note:
            steps.note(note)

    # 3. The allow-list: a refused URL gets no request, as in the operator.
    shown = safe_url(spec.token_url)
    if not url_allowed(spec.token_url, allowed):
        return steps.failed(
            "token URL",
            c.REASON_TOKEN_URL_NOT_ALLOWED,
            f"{shown} is not under any allowed prefix ({allowed_source}): {', '.join(allowed)}",
            [
                "no request was made; the operator refuses it the same way when its own allow-list says so",
                "(the operator's AUTOTEK_ALLOWED_TOKEN_URLS is what counts in the cluster; "
                "mirror it here with --allowed-token-url)",
            ],
        )
    prefix = next(p for p in allowed if url_allowed(spec.token_url, (p,)))
    steps.ok("token URL", f"allowed by {prefix} ({allowed_source})")

    # 4. The exchange itself.
    client = TokenClient(allowed_prefixes=allowed, timeout=args.timeout, max_concurrent=1, clock=now)
    request = TokenRequest(
        token_url=spec.token_url,
        client_id=client_id,
        client_secret=client_secret,
        auth_method=spec.client_auth_method,
        scope=spec.scope,
        extra_params=spec.extra_params,
        ca_bundle=spec.ca_bundle,
        default_lifetime=spec.refresh.default_lifetime,
    )
    try:
        token = client.request(request)
    except errors.AutoTekError as exc:
        extra = []
        if isinstance(exc, errors.TokenEndpointUnavailable):
            extra.append("(this check ran from this machine; the operator's network may differ)")
        return steps.failed("token request", exc.reason, exc.message, extra)
    steps.ok("token request", _describe_token(token, spec))
    if cred.cluster:
        out.line(f"The token was discarded: no Secret {spec.target.name} was changed in any namespace.")
    else:
        out.line(f"The token was discarded: the target Secret {spec.target.name} was not changed.")
    return EXIT_OK


# -- the command line --------------------------------------------------------------------------


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Given before or after the subcommand; after it, a flag is set only when present.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--kubeconfig", default=default, help="path to the kubeconfig (default: $KUBECONFIG)")
    parser.add_argument("--context", default=default, help="the kubeconfig context to use")
    parser.add_argument(
        "-n",
        "--namespace",
        default=default,
        help="the namespace (default: the context's namespace, else default)",
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl autotek",
        description="Inspect, refresh and check AutoTekCredentials and ClusterAutoTekCredentials "
        "(autotek.io/v1alpha1). Name a credential as NAME or atc/NAME (in the namespace of -n), or as "
        "catc/NAME or --cluster NAME (a ClusterAutoTekCredential).",
        epilog="exit codes: 0 ok; 1 the refresh or check failed, or no such credential; "
        "2 usage error or refresh timed out; 3 the Kubernetes API server could not be used",
    )
    parser.add_argument("--version", action="version", version=f"kubectl-autotek {__version__}")
    _global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser(
        "status",
        help="a table of credentials: readiness, expiry, next refresh, failures",
        description="Without NAME: a table of the AutoTekCredentials in the namespace (-A: in every namespace), "
        "or with --cluster of the ClusterAutoTekCredentials, with their namespaces provisioned/selected. "
        "With NAME: that credential only; for catc/NAME also its failed namespaces and their reasons.",
    )
    _global_flags(status, top=False)
    status.add_argument("name", metavar="NAME", nargs="?", help="one credential: NAME, atc/NAME or catc/NAME")
    status.add_argument("-A", "--all-namespaces", action="store_true", help="list credentials in every namespace")
    status.add_argument("--cluster", action="store_true", help="ClusterAutoTekCredentials instead")

    refresh = sub.add_parser(
        "refresh",
        help="ask the operator for a new token now and wait for it",
        description=f"Sets the annotation {c.ANN_REFRESH_REQUESTED_AT} to the current UTC time and waits "
        "until the operator reports a new token (exit 0), a failure (exit 1) or the timeout passes (exit 2).",
    )
    _global_flags(refresh, top=False)
    refresh.add_argument("name", metavar="NAME", help="the credential: NAME, atc/NAME or catc/NAME")
    refresh.add_argument("--cluster", action="store_true", help="NAME is a ClusterAutoTekCredential")
    refresh.add_argument("--timeout", type=_positive, default=60.0, help="seconds to wait for the outcome (default 60)")
    refresh.add_argument("--no-wait", action="store_true", help="only request the refresh; do not wait")

    check = sub.add_parser(
        "check",
        help="a dry token exchange from this machine, explained; writes nothing",
        description="Reads the credential and its client Secret, checks the token URL against the "
        "allow-list and performs one token exchange from this machine, explaining each step. The "
        "token is discarded; neither it nor the client secret is printed. For a ClusterAutoTekCredential "
        "it also checks that the client Secret's namespace is allowed (before reading it) and lists the "
        "namespaces selected now. With -f FILE --spec-only it validates a spec offline, without a cluster.",
    )
    _global_flags(check, top=False)
    check.add_argument("name", metavar="NAME", nargs="?", help="the credential: NAME, atc/NAME or catc/NAME")
    check.add_argument("--cluster", action="store_true", help="NAME is a ClusterAutoTekCredential")
    check.add_argument(
        "-f", "--filename", metavar="FILE", help="read the credential from a YAML file (- for stdin), not the cluster"
    )
    check.add_argument(
        "--spec-only",
        action="store_true",
        help="only validate the spec (and a cluster credential's client Secret namespace); with -f, no cluster "
        "is needed",
    )
    check.add_argument(
        "--client-secret-namespace",
        action="append",
        metavar="NS",
        help="a namespace cluster credentials may read client Secrets from (repeatable); default: "
        "$AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES, else autotek-system",
    )
    check.add_argument(
        "--allowed-token-url",
        action="append",
        metavar="PREFIX",
        help="an allowed token URL prefix (repeatable); default: $AUTOTEK_ALLOWED_TOKEN_URLS, "
        "else the operator's default https://api.autograb.com.au/",
    )
    check.add_argument(
        "--timeout", type=_positive, default=10.0, help="seconds to connect to and read from the token endpoint"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Out()
    try:
        if args.command == "check" and args.filename is not None and args.spec_only:
            args.namespace = args.namespace or "default"
            return cmd_check(args, None, out, utcnow)  # offline: no kubeconfig needed
        conn = connect(args.kubeconfig, args.context)
        if args.namespace is None:
            args.namespace = conn.namespace
        cluster = Cluster(conn)
        if args.command == "status":
            return cmd_status(args, cluster, out, utcnow())
        if args.command == "refresh":
            return cmd_refresh(args, cluster, out, utcnow)
        return cmd_check(args, cluster, out, utcnow)
    except CommandError as exc:
        print(f"kubectl-autotek: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
