"""The AutoTekCredential spec, parsed into typed, frozen objects.

The CRD schema already rejects most bad input on a real API server; this parser checks the
same rules again so that a resource that slipped past (an old CRD, an emulator) still ends in
a clear ``InvalidSpec`` instead of a crash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import constants as c
from .errors import InvalidSpec

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+")
#: Longer durations overflow Kubernetes' own duration type (about 290 years); stop well before.
MAX_DURATION_SECONDS = 10 * 365 * 86400.0
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_RESERVED_PARAMS = frozenset({"grant_type", "scope", "client_id", "client_secret"})

AUTH_BASIC = "ClientSecretBasic"
AUTH_POST = "ClientSecretPost"
CREATION_OWNER = "Owner"
CREATION_MERGE = "Merge"
DELETION_DELETE = "Delete"
DELETION_RETAIN = "Retain"
RESTART_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

MIN_DEFAULT_LIFETIME = 10.0


def parse_duration(value: object, where: str = "duration") -> float:
    """Parse a Go-style duration such as ``10m``, ``1h30m`` or ``90s`` into seconds."""
    if not isinstance(value, str) or not _DURATION_FULL.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a duration (use forms like 90s, 10m, 1h30m)")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    if seconds > MAX_DURATION_SECONDS:
        raise InvalidSpec(f"{where} {value!r} is longer than ten years")
    return seconds


@dataclass(frozen=True)
class ClientSecretRef:
    name: str
    client_id_key: str = c.DEFAULT_CLIENT_ID_KEY
    client_secret_key: str = c.DEFAULT_CLIENT_SECRET_KEY
    #: ClusterAutoTekCredential only: the client Secret's namespace (None: the credential's own).
    namespace: str | None = None


SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry of a label selector."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class NamespaceSelection:
    """Which namespaces a ClusterAutoTekCredential writes into: those its label selector matches,
    and those it lists (the union). A selector with no terms matches every namespace, as a
    Kubernetes label selector does; no selector at all matches none."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()
    has_selector: bool = False
    names: frozenset[str] = frozenset()

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace in self.names:
            return True
        if not self.has_selector:
            return False
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )


@dataclass(frozen=True)
class Target:
    name: str
    creation_policy: str = CREATION_OWNER
    deletion_policy: str = DELETION_DELETE
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Extra keys rendered from the token: (key, template) pairs, e.g. (".env", "TOKEN={{ .access_token }}").
    data: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Refresh:
    renew_before_percentage: float | None = None
    renew_before: float | None = None
    default_lifetime: float = float(c.DEFAULT_LIFETIME_SECONDS)

    @property
    def effective_percentage(self) -> float | None:
        """The percentage to use, or None when an absolute ``renewBefore`` applies."""
        if self.renew_before is not None:
            return None
        if self.renew_before_percentage is None:
            return float(c.DEFAULT_RENEW_BEFORE_PERCENTAGE)
        return self.renew_before_percentage


@dataclass(frozen=True)
class RestartTarget:
    kind: str
    name: str


@dataclass(frozen=True)
class CredentialSpec:
    client_secret_ref: ClientSecretRef
    target: Target
    token_url: str = c.DEFAULT_TOKEN_URL
    client_auth_method: str = AUTH_BASIC
    scope: str = ""
    extra_params: tuple[tuple[str, str], ...] = ()
    ca_bundle: str = ""
    refresh: Refresh = field(default_factory=Refresh)
    rollout_restart_targets: tuple[RestartTarget, ...] = ()
    #: ClusterAutoTekCredential only: the namespaces it writes into.
    namespaces: NamespaceSelection | None = None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"{where} must be an object")
    return value


def _string(obj: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key)
    if value is None:
        # An explicit null means "not set", as the API server's pruning would leave it.
        value = default
    if value is None:
        raise InvalidSpec(f"{where}.{key} is required")
    if not isinstance(value, str):
        raise InvalidSpec(f"{where}.{key} must be a string")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    m = _mapping(value, where)
    out: dict[str, str] = {}
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidSpec(f"{where} must map strings to strings")
        out[k] = v
    return out


def _enum(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise InvalidSpec(f"{where} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _dns_name(value: str, where: str) -> str:
    if not value or len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a valid Kubernetes object name")
    return value


def _secret_key(value: str, where: str) -> str:
    if not value or len(value) > 253 or value == "." or value.startswith("..") or not _SECRET_KEY.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a valid Secret key")
    return value


def _token_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidSpec("spec.tokenURL is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidSpec("spec.tokenURL must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidSpec("spec.tokenURL must not carry credentials in the URL")
    if parts.fragment:
        raise InvalidSpec("spec.tokenURL must not have a fragment")
    return value


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")
#: At most this many names in spec.namespaces (the CRD says the same).
MAX_NAMESPACES = 1000


def _namespace_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a valid namespace name (a DNS label: lower case, digits, '-')")
    return value


def _label_key(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 317 or not _LABEL_KEY.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a valid label key")
    return value


def _label_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
        raise InvalidSpec(f"{where} {value!r} is not a valid label value")
    return value


def parse_selection(s: Mapping[str, Any]) -> NamespaceSelection:
    """``spec.namespaceSelector`` and ``spec.namespaces`` of a ClusterAutoTekCredential."""
    raw_selector = s.get("namespaceSelector")
    raw_names = s.get("namespaces")
    if raw_selector is None and raw_names is None:
        raise InvalidSpec("spec.namespaceSelector or spec.namespaces is required")
    names: set[str] = set()
    if raw_names is not None:
        if not isinstance(raw_names, list):
            raise InvalidSpec("spec.namespaces must be a list of namespace names")
        if len(raw_names) > MAX_NAMESPACES:
            raise InvalidSpec(f"spec.namespaces lists more than {MAX_NAMESPACES} namespaces")
        names = {_namespace_name(n, f"spec.namespaces[{i}]") for i, n in enumerate(raw_names)}
    if raw_selector is None:
        return NamespaceSelection(names=frozenset(names))
    sel = _mapping(raw_selector, "spec.namespaceSelector")
    unknown = sorted(set(sel) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise InvalidSpec(f"spec.namespaceSelector has unknown field(s) {', '.join(map(str, unknown))}")
    labels = _string_map(sel.get("matchLabels"), "spec.namespaceSelector.matchLabels")
    for k, v in labels.items():
        _label_key(k, "spec.namespaceSelector.matchLabels key")
        _label_value(v, f"spec.namespaceSelector.matchLabels[{k}]")
    raw_expr = sel.get("matchExpressions")
    if raw_expr is None:
        raw_expr = []
    if not isinstance(raw_expr, list):
        raise InvalidSpec("spec.namespaceSelector.matchExpressions must be a list")
    expressions = []
    for i, item in enumerate(raw_expr):
        where = f"spec.namespaceSelector.matchExpressions[{i}]"
        m = _mapping(item, where)
        key = _label_key(m.get("key"), f"{where}.key")
        op = _enum(_string(m, "operator", where), SELECTOR_OPERATORS, f"{where}.operator")
        values = m.get("values")
        if values is None:
            values = []
        if not isinstance(values, list):
            raise InvalidSpec(f"{where}.values must be a list")
        if op in ("In", "NotIn") and not values:
            raise InvalidSpec(f"{where}: operator {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise InvalidSpec(f"{where}: operator {op} takes no values")
        expressions.append(
            Requirement(key, op, frozenset(_label_value(v, f"{where}.values[{j}]") for j, v in enumerate(values)))
        )
    return NamespaceSelection(
        match_labels=tuple(sorted(labels.items())),
        expressions=tuple(expressions),
        has_selector=True,
        names=frozenset(names),
    )


def parse_spec(spec: Any, *, name: str, cluster: bool = False) -> CredentialSpec:
    """Turn a raw ``spec`` (as the API returns it) into a CredentialSpec, or raise InvalidSpec.

    ``cluster``: the spec of a ClusterAutoTekCredential (clientSecretRef.namespace, the namespace
    selection, no rolloutRestartTargets)."""
    s = _mapping(spec, "spec")

    ref_raw = s.get("clientSecretRef")
    if ref_raw is None:
        raise InvalidSpec("spec.clientSecretRef is required")
    ref = _mapping(ref_raw, "spec.clientSecretRef")
    client_namespace: str | None = None
    if cluster:
        client_namespace = _namespace_name(
            _string(ref, "namespace", "spec.clientSecretRef"), "spec.clientSecretRef.namespace"
        )
    elif "namespace" in ref:
        raise InvalidSpec("spec.clientSecretRef has no namespace field: the Secret must be in the same namespace")
    client_secret_ref = ClientSecretRef(
        namespace=client_namespace,
        name=_dns_name(_string(ref, "name", "spec.clientSecretRef"), "spec.clientSecretRef.name"),
        client_id_key=_secret_key(
            _string(ref, "clientIdKey", "spec.clientSecretRef", c.DEFAULT_CLIENT_ID_KEY),
            "spec.clientSecretRef.clientIdKey",
        ),
        client_secret_key=_secret_key(
            _string(ref, "clientSecretKey", "spec.clientSecretRef", c.DEFAULT_CLIENT_SECRET_KEY),
            "spec.clientSecretRef.clientSecretKey",
        ),
    )

    token_url = _token_url(_string(s, "tokenURL", "spec", c.DEFAULT_TOKEN_URL))
    auth_method = _enum(
        _string(s, "clientAuthMethod", "spec", AUTH_BASIC), (AUTH_BASIC, AUTH_POST), "spec.clientAuthMethod"
    )
    scope = _string(s, "scope", "spec", "")
    extra = _string_map(s.get("extraParams"), "spec.extraParams")
    reserved = sorted(_RESERVED_PARAMS.intersection(extra))
    if reserved:
        raise InvalidSpec(f"spec.extraParams must not set {', '.join(reserved)}")
    ca_bundle = _string(s, "caBundle", "spec", "")
    if ca_bundle and "-----BEGIN CERTIFICATE-----" not in ca_bundle:
        raise InvalidSpec("spec.caBundle must hold PEM certificates")

    t = _mapping(s.get("target"), "spec.target")
    template = _mapping(t.get("template"), "spec.target.template")
    target = Target(
        name=_dns_name(_string(t, "name", "spec.target", name), "spec.target.name"),
        creation_policy=_enum(
            _string(t, "creationPolicy", "spec.target", CREATION_OWNER),
            (CREATION_OWNER, CREATION_MERGE),
            "spec.target.creationPolicy",
        ),
        deletion_policy=_enum(
            _string(t, "deletionPolicy", "spec.target", DELETION_DELETE),
            (DELETION_DELETE, DELETION_RETAIN),
            "spec.target.deletionPolicy",
        ),
        labels=_string_map(template.get("labels"), "spec.target.template.labels"),
        annotations=_string_map(template.get("annotations"), "spec.target.template.annotations"),
        # Keys and templates are checked when rendered, so that a bad one costs only itself.
        data=tuple(sorted(_string_map(template.get("data"), "spec.target.template.data").items())),
    )

    if target.name == client_secret_ref.name:
        # Writing the token into the client Secret would change it, which asks for a new token.
        raise InvalidSpec("spec.target.name must differ from spec.clientSecretRef.name")

    r = _mapping(s.get("refresh"), "spec.refresh")
    pct_raw = r.get("renewBeforePercentage")
    before_raw = r.get("renewBefore")
    if pct_raw is not None and before_raw is not None:
        raise InvalidSpec("spec.refresh.renewBeforePercentage and spec.refresh.renewBefore are mutually exclusive")
    pct: float | None = None
    if pct_raw is not None:
        if isinstance(pct_raw, bool) or not isinstance(pct_raw, int) or not 1 <= pct_raw <= 99:
            raise InvalidSpec("spec.refresh.renewBeforePercentage must be a whole number from 1 to 99")
        pct = float(pct_raw)
    before: float | None = None
    if before_raw is not None:
        before = parse_duration(before_raw, "spec.refresh.renewBefore")
        if before <= 0:
            raise InvalidSpec("spec.refresh.renewBefore must be longer than zero")
    lifetime_raw = r.get("defaultLifetime")
    default_lifetime = parse_duration("15m" if lifetime_raw is None else lifetime_raw, "spec.refresh.defaultLifetime")
    if default_lifetime < MIN_DEFAULT_LIFETIME:
        raise InvalidSpec("spec.refresh.defaultLifetime must be at least 10s")
    refresh = Refresh(renew_before_percentage=pct, renew_before=before, default_lifetime=default_lifetime)

    restart_raw = s.get("rolloutRestartTargets")
    if restart_raw is None:
        restart_raw = []
    if cluster and restart_raw:
        raise InvalidSpec("spec.rolloutRestartTargets is not supported by ClusterAutoTekCredential")
    if not isinstance(restart_raw, list):
        raise InvalidSpec("spec.rolloutRestartTargets must be a list")
    restarts = []
    for i, item in enumerate(restart_raw):
        where = f"spec.rolloutRestartTargets[{i}]"
        m = _mapping(item, where)
        restarts.append(
            RestartTarget(
                kind=_enum(_string(m, "kind", where), RESTART_KINDS, f"{where}.kind"),
                name=_dns_name(_string(m, "name", where), f"{where}.name"),
            )
        )

    return CredentialSpec(
        client_secret_ref=client_secret_ref,
        target=target,
        token_url=token_url,
        client_auth_method=auth_method,
        scope=scope,
        extra_params=tuple(sorted(extra.items())),
        ca_bundle=ca_bundle,
        refresh=refresh,
        rollout_restart_targets=tuple(restarts),
        namespaces=parse_selection(s) if cluster else None,
    )
