"""Table tests of the spec parser: defaults, every field, and every way a spec can be invalid."""

from __future__ import annotations

import copy
from functools import reduce
from typing import Any

import pytest

from autotek_operator import constants as c
from autotek_operator.errors import InvalidSpec
from autotek_operator.spec import (
    ClientSecretRef,
    CredentialSpec,
    Refresh,
    RestartTarget,
    Target,
    parse_duration,
    parse_spec,
)

NAME = "autotek"
MINIMAL: dict[str, Any] = {"clientSecretRef": {"name": "autotek-client"}}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
DELETE = object()


def spec_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted paths set (``refresh__renewBefore="10m"``) or removed (DELETE)."""
    spec = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


def attr(obj: object, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), obj)




# --- parse_duration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("10m", 600.0, id="minutes"),
        pytest.param("1h30m", 5400.0, id="hours-minutes"),
        pytest.param("1.5h", 5400.0, id="fractional-hours"),
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("2h0m0s", 7200.0, id="go-string-form"),
        pytest.param("1m30s", 90.0, id="minutes-seconds"),
        pytest.param("0.5s", 0.5, id="fractional-seconds"),
        pytest.param("1s500ms", 1.5, id="seconds-milliseconds"),
        pytest.param("0s", 0.0, id="zero"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10", id="no-unit"),
        pytest.param("m", id="no-number"),
        pytest.param("1d", id="days-unit"),
        pytest.param("ten minutes", id="words"),
        pytest.param("1h-5m", id="negative-part"),
        pytest.param("-5m", id="negative"),
        pytest.param("", id="empty"),
        pytest.param(" 10m", id="leading-space"),
        pytest.param("10 m", id="inner-space"),
        pytest.param(".5h", id="leading-dot"),
        pytest.param(None, id="none"),
        pytest.param(600, id="int"),
        pytest.param(
            "10m\n",
            id="trailing-newline",
        ),
    ],
)
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(InvalidSpec):
        parse_duration(text)


# --- defaults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("client_secret_ref.name", "autotek-client", id="ref-name"),
        pytest.param("client_secret_ref.client_id_key", "client_id", id="client-id-key"),
        pytest.param("client_secret_ref.client_secret_key", "client_secret", id="client-secret-key"),
        pytest.param("token_url", "https://api.autograb.com.au/auth-broker/request-token", id="token-url"),
        pytest.param("client_auth_method", "ClientSecretBasic", id="auth-method"),
        pytest.param("scope", "", id="scope"),
        pytest.param("extra_params", (), id="extra-params"),
        pytest.param("ca_bundle", "", id="ca-bundle"),
        pytest.param("target.name", NAME, id="target-name-is-metadata-name"),
        pytest.param("target.creation_policy", "Owner", id="creation-policy"),
        pytest.param("target.deletion_policy", "Delete", id="deletion-policy"),
        pytest.param("target.labels", {}, id="template-labels"),
        pytest.param("target.annotations", {}, id="template-annotations"),
        pytest.param("refresh.renew_before_percentage", None, id="percentage-unset"),
        pytest.param("refresh.renew_before", None, id="renew-before-unset"),
        pytest.param("refresh.effective_percentage", 33.0, id="effective-percentage"),
        pytest.param("refresh.default_lifetime", 900.0, id="default-lifetime"),
        pytest.param("rollout_restart_targets", (), id="restart-targets"),
    ],
)
def test_defaults(path: str, expected: Any) -> None:
    assert attr(parse_spec(MINIMAL, name=NAME), path) == expected


def test_defaults_match_constants() -> None:
    parsed = parse_spec(MINIMAL, name=NAME)
    assert parsed.token_url == c.DEFAULT_TOKEN_URL
    assert parsed.refresh.effective_percentage == c.DEFAULT_RENEW_BEFORE_PERCENTAGE
    assert parsed.refresh.default_lifetime == c.DEFAULT_LIFETIME_SECONDS


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(spec_with(target=None), id="target-null"),
        pytest.param(spec_with(target={}), id="target-empty"),
        pytest.param(spec_with(target__template=None), id="template-null"),
        pytest.param(spec_with(refresh=None), id="refresh-null"),
        pytest.param(spec_with(refresh={}), id="refresh-empty"),
        pytest.param(spec_with(refresh__renewBefore=None), id="renew-before-null"),
        pytest.param(spec_with(refresh__renewBeforePercentage=None), id="percentage-null"),
        pytest.param(spec_with(extraParams=None), id="extra-params-null"),
        pytest.param(spec_with(extraParams={}), id="extra-params-empty"),
        pytest.param(spec_with(rolloutRestartTargets=None), id="restart-targets-null"),
        pytest.param(spec_with(rolloutRestartTargets=[]), id="restart-targets-empty"),
        # A real API server prunes nulls of non-nullable fields; an emulator may not, and the SPEC's
        # own example writes `renewBefore: null` to mean "unset". A null should read as "unset".
        pytest.param(
            spec_with(tokenURL=None),
            id="token-url-null",
        ),
        pytest.param(
            spec_with(target__name=None),
            id="target-name-null",
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime=None),
            id="default-lifetime-null",
        ),
    ],
)
def test_empty_or_null_optional_fields_mean_defaults(spec: dict[str, Any]) -> None:
    assert parse_spec(spec, name=NAME) == parse_spec(MINIMAL, name=NAME)


# --- every field set ------------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "clientSecretRef": {"name": "client", "clientIdKey": "id.txt", "clientSecretKey": "SECRET_key-1"},
    "tokenURL": "https://auth.example.com:8443/oauth2/token?tenant=a",
    "clientAuthMethod": "ClientSecretPost",
    "scope": "read write",
    "extraParams": {"resource": "https://api.example.com", "audience": "autotek"},
    "caBundle": PEM,
    "target": {
        "name": "token.secret",
        "creationPolicy": "Merge",
        "deletionPolicy": "Retain",
        "template": {"labels": {"team": "shop"}, "annotations": {"note": "x"}},
    },
    "refresh": {"renewBeforePercentage": 50, "defaultLifetime": "1h"},
    "rolloutRestartTargets": [
        {"kind": "Deployment", "name": "web"},
        {"kind": "StatefulSet", "name": "db"},
        {"kind": "DaemonSet", "name": "agent"},
    ],
}


def test_every_field_set() -> None:
    assert parse_spec(FULL, name=NAME) == CredentialSpec(
        client_secret_ref=ClientSecretRef(
            name="client", client_id_key="id.txt", client_secret_key="SECRET_key-1"
        ),
        target=Target(
            name="token.secret",
            creation_policy="Merge",
            deletion_policy="Retain",
            labels={"team": "shop"},
            annotations={"note": "x"},
        ),
        token_url="https://auth.example.com:8443/oauth2/token?tenant=a",
        client_auth_method="ClientSecretPost",
        scope="read write",
        # sorted by name, so that equal specs give equal request bodies
        extra_params=(("audience", "autotek"), ("resource", "https://api.example.com")),
        ca_bundle=PEM,
        refresh=Refresh(renew_before_percentage=50.0, renew_before=None, default_lifetime=3600.0),
        rollout_restart_targets=(
            RestartTarget("Deployment", "web"),
            RestartTarget("StatefulSet", "db"),
            RestartTarget("DaemonSet", "agent"),
        ),
    )


@pytest.mark.parametrize(
    ("spec", "path", "expected"),
    [
        pytest.param(spec_with(refresh__renewBefore="10m"), "refresh.renew_before", 600.0, id="renew-before"),
        pytest.param(
            spec_with(refresh__renewBefore="10m"),
            "refresh.effective_percentage",
            None,
            id="renew-before-no-pct",
        ),
        pytest.param(
            spec_with(refresh__renewBefore="10m"),
            "refresh.renew_before_percentage",
            None,
            id="renew-before-only",
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=1), "refresh.effective_percentage", 1.0, id="pct-1"
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=99), "refresh.effective_percentage", 99.0, id="pct-99"
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime="10s"), "refresh.default_lifetime", 10.0, id="lifetime-10s"
        ),
        pytest.param(
            spec_with(tokenURL="http://127.0.0.1:8080/t"), "token_url", "http://127.0.0.1:8080/t", id="http"
        ),
        pytest.param(
            spec_with(tokenURL="https://[::1]:8443/t"), "token_url", "https://[::1]:8443/t", id="ipv6"
        ),
        pytest.param(spec_with(caBundle=""), "ca_bundle", "", id="ca-bundle-empty"),
        pytest.param(spec_with(scope=""), "scope", "", id="scope-empty"),
        pytest.param(spec_with(target__name="other"), "target.name", "other", id="target-name"),
        pytest.param(
            spec_with(clientSecretRef__name="a" * 253), "client_secret_ref.name", "a" * 253, id="name-253"
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=[{"kind": "Deployment", "name": "web"}]),
            "rollout_restart_targets",
            (RestartTarget("Deployment", "web"),),
            id="one-restart-target",
        ),
    ],
)
def test_valid_values(spec: dict[str, Any], path: str, expected: Any) -> None:
    assert attr(parse_spec(spec, name=NAME), path) == expected


# --- invalid specs --------------------------------------------------------------------------------



@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param([], "spec", id="spec-list"),
        pytest.param("spec", "spec", id="spec-string"),
        pytest.param(None, "spec.clientSecretRef", id="spec-null"),
        pytest.param({}, "spec.clientSecretRef", id="missing-client-secret-ref"),
        pytest.param({"clientSecretRef": "autotek-client"}, "spec.clientSecretRef", id="ref-not-object"),
        pytest.param(spec_with(clientSecretRef__namespace="other"), "namespace", id="ref-namespace"),
        pytest.param(spec_with(clientSecretRef__namespace=None), "namespace", id="ref-namespace-null"),
        pytest.param(
            spec_with(clientSecretRef__name=DELETE), "spec.clientSecretRef.name", id="ref-name-missing"
        ),
        pytest.param(spec_with(clientSecretRef__name=7), "spec.clientSecretRef.name", id="ref-name-int"),
        pytest.param(spec_with(clientSecretRef__name=""), "spec.clientSecretRef.name", id="ref-name-empty"),
        pytest.param(
            spec_with(clientSecretRef__name="Bad_Name"), "spec.clientSecretRef.name", id="ref-name-bad"
        ),
        pytest.param(
            spec_with(clientSecretRef__name="-lead"), "spec.clientSecretRef.name", id="ref-name-dash"
        ),
        pytest.param(
            spec_with(clientSecretRef__name="a" * 254), "spec.clientSecretRef.name", id="ref-name-254"
        ),
        pytest.param(
            spec_with(clientSecretRef__name="autotek-client\n"),
            "spec.clientSecretRef.name",
            id="ref-name-trailing-newline",
        ),
        pytest.param(
            spec_with(clientSecretRef__clientIdKey="a/b"),
            "spec.clientSecretRef.clientIdKey",
            id="id-key-slash",
        ),
        pytest.param(
            spec_with(clientSecretRef__clientIdKey=""), "spec.clientSecretRef.clientIdKey", id="id-key-empty"
        ),
        pytest.param(
            spec_with(clientSecretRef__clientSecretKey="a b"),
            "spec.clientSecretRef.clientSecretKey",
            id="secret-key-space",
        ),
        pytest.param(
            spec_with(clientSecretRef__clientSecretKey=1),
            "spec.clientSecretRef.clientSecretKey",
            id="secret-key-int",
        ),
        pytest.param(
            # Kubernetes rejects '.', '..' and a leading '..' as Secret keys (IsConfigMapKey).
            spec_with(clientSecretRef__clientIdKey=".."),
            "spec.clientSecretRef.clientIdKey",
            id="id-key-dotdot",
        ),
        pytest.param(spec_with(tokenURL="ftp://api.example.com/t"), "spec.tokenURL", id="url-ftp"),
        pytest.param(spec_with(tokenURL="/auth-broker/request-token"), "spec.tokenURL", id="url-relative"),
        pytest.param(spec_with(tokenURL="https:///token"), "spec.tokenURL", id="url-no-host"),
        pytest.param(
            spec_with(tokenURL="https://user:pw@api.example.com/t"), "spec.tokenURL", id="url-userinfo"
        ),
        pytest.param(
            spec_with(tokenURL="https://user@api.example.com/t"), "spec.tokenURL", id="url-user-only"
        ),
        pytest.param(
            spec_with(tokenURL="https://api.example.com/t#frag"), "spec.tokenURL", id="url-fragment"
        ),
        pytest.param(spec_with(tokenURL=42), "spec.tokenURL", id="url-int"),
        pytest.param(
            spec_with(tokenURL="https://[::1/token"),
            "spec.tokenURL",
            id="url-unclosed-bracket",
        ),
        pytest.param(
            spec_with(tokenURL="https://exa\uff03mple.com/t"),
            "spec.tokenURL",
            id="url-nfkc-netloc",
        ),
        pytest.param(spec_with(clientAuthMethod="PrivateKeyJWT"), "spec.clientAuthMethod", id="auth-method"),
        pytest.param(
            spec_with(clientAuthMethod="clientsecretbasic"), "spec.clientAuthMethod", id="auth-method-case"
        ),
        pytest.param(spec_with(scope=["read"]), "spec.scope", id="scope-list"),
        pytest.param(spec_with(scope=5), "spec.scope", id="scope-int"),
        pytest.param(spec_with(extraParams={"audience": 1}), "spec.extraParams", id="extra-int-value"),
        pytest.param(spec_with(extraParams={"audience": None}), "spec.extraParams", id="extra-null-value"),
        pytest.param(spec_with(extraParams={"audience": ["a"]}), "spec.extraParams", id="extra-list-value"),
        pytest.param(spec_with(extraParams=["audience"]), "spec.extraParams", id="extra-list"),
        pytest.param(
            spec_with(extraParams={"grant_type": "password"}), "grant_type", id="reserved-grant-type"
        ),
        pytest.param(spec_with(extraParams={"scope": "x"}), "scope", id="reserved-scope"),
        pytest.param(spec_with(extraParams={"client_id": "x"}), "client_id", id="reserved-client-id"),
        pytest.param(
            spec_with(extraParams={"client_secret": "x"}), "client_secret", id="reserved-client-secret"
        ),
        pytest.param(spec_with(caBundle="not a certificate"), "spec.caBundle", id="ca-bundle-not-pem"),
        pytest.param(
            spec_with(caBundle="-----BEGIN PRIVATE KEY-----\n"), "spec.caBundle", id="ca-bundle-key"
        ),
        pytest.param(spec_with(caBundle=True), "spec.caBundle", id="ca-bundle-bool"),
        pytest.param(spec_with(target="autotek-token"), "spec.target", id="target-not-object"),
        pytest.param(spec_with(target__name="Bad_Name"), "spec.target.name", id="target-name-bad"),
        pytest.param(
            spec_with(target__creationPolicy="Orphan"), "spec.target.creationPolicy", id="creation-policy"
        ),
        pytest.param(
            spec_with(target__deletionPolicy="Orphan"), "spec.target.deletionPolicy", id="deletion-policy"
        ),
        pytest.param(spec_with(target__template="x"), "spec.target.template", id="template-not-object"),
        pytest.param(
            spec_with(target__template__labels={"a": 1}),
            "spec.target.template.labels",
            id="template-labels-int",
        ),
        pytest.param(
            spec_with(target__template__labels=["a"]),
            "spec.target.template.labels",
            id="template-labels-list",
        ),
        pytest.param(
            spec_with(target__template__annotations={"a": True}),
            "spec.target.template.annotations",
            id="template-annotations-bool",
        ),
        pytest.param(spec_with(refresh="10m"), "spec.refresh", id="refresh-not-object"),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=0), "spec.refresh.renewBeforePercentage", id="pct-0"
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=100), "spec.refresh.renewBeforePercentage", id="pct-100"
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=-1),
            "spec.refresh.renewBeforePercentage",
            id="pct-negative",
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=True),
            "spec.refresh.renewBeforePercentage",
            id="pct-bool",
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage="33"),
            "spec.refresh.renewBeforePercentage",
            id="pct-string",
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=float("nan")),
            "spec.refresh.renewBeforePercentage",
            id="pct-nan",
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=0.5), "spec.refresh.renewBeforePercentage", id="pct-half"
        ),
        pytest.param(
            spec_with(refresh__renewBeforePercentage=33, refresh__renewBefore="10m"),
            "mutually exclusive",
            id="pct-and-renew-before",
        ),
        pytest.param(spec_with(refresh__renewBefore="0s"), "spec.refresh.renewBefore", id="renew-before-0s"),
        pytest.param(
            spec_with(refresh__renewBefore="0m0s"), "spec.refresh.renewBefore", id="renew-before-0m0s"
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime="5s"), "spec.refresh.defaultLifetime", id="lifetime-5s"
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime="9999ms"),
            "spec.refresh.defaultLifetime",
            id="lifetime-under-10s",
        ),
        pytest.param(
            spec_with(refresh__renewBefore="10"),
            "spec.refresh.renewBefore",
            id="renew-before-no-unit",
        ),
        pytest.param(
            spec_with(refresh__renewBefore=600),
            "spec.refresh.renewBefore",
            id="renew-before-int",
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime="1d"),
            "spec.refresh.defaultLifetime",
            id="lifetime-days",
        ),
        pytest.param(
            spec_with(refresh__defaultLifetime=""),
            "spec.refresh.defaultLifetime",
            id="lifetime-empty",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets="Deployment/web"),
            "spec.rolloutRestartTargets",
            id="restarts-string",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets={"kind": "Deployment", "name": "web"}),
            "spec.rolloutRestartTargets",
            id="restarts-object",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets={}),
            "spec.rolloutRestartTargets",
            id="restarts-empty-object",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=["web"]), "spec.rolloutRestartTargets[0]", id="restart-not-object"
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=[{"kind": "Pod", "name": "web"}]),
            "spec.rolloutRestartTargets[0].kind",
            id="restart-kind-pod",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=[{"name": "web"}]),
            "spec.rolloutRestartTargets[0].kind",
            id="restart-kind-missing",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=[{"kind": "Deployment", "name": "web"}, {"kind": "Deployment"}]),
            "spec.rolloutRestartTargets[1].name",
            id="restart-name-missing",
        ),
        pytest.param(
            spec_with(rolloutRestartTargets=[{"kind": "Deployment", "name": "Web_1"}]),
            "spec.rolloutRestartTargets[0].name",
            id="restart-name-bad",
        ),
    ],
)
def test_invalid_spec(spec: Any, field: str) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(spec, name=NAME)
    assert field in str(raised.value)
    assert raised.value.reason == c.REASON_INVALID_SPEC
    assert raised.value.retry_class == "permanent"


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        pytest.param({"clientSecretRef": {"name": "c"}, "target": {"name": "c"}}, "x", id="explicit"),
        pytest.param({"clientSecretRef": {"name": "autotek"}}, "autotek", id="defaulted-from-metadata-name"),
    ],
)
def test_target_must_not_be_the_client_secret(spec: Any, name: str) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.target\.name must differ"):
        parse_spec(spec, name=name)
