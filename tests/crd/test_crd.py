"""The AutoTekCredential CRD: its shape, its schema, the examples, and agreement with the operator.

Resources are checked by ``crdcheck.admit``, which emulates what kube-apiserver does on create
(unknown fields, pruning, defaulting, OpenAPI validation, list types, CEL rules). Every case that
the schema rejects and that is about spec contents is also given to the operator's own parser,
which must reject it too: the operator double-checks what an API emulator lets through.
"""

from __future__ import annotations

import copy
from typing import Any

import crdcheck
import crdkit
import pytest
import re2
from crdcheck import Problem, admit
from crdkit import Case, operator_rejects

from autotek_operator import constants as c
from autotek_operator import spec as spec_module
from autotek_operator.errors import InvalidSpec
from autotek_operator.spec import parse_spec

DURATION_RE = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_RE = r"^[-._a-zA-Z0-9]+$"

PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ0E=\n-----END CERTIFICATE-----\n"


def resource(spec: Any, name: str = "autotek") -> dict[str, Any]:
    return crdkit.resource("AutoTekCredential", spec, name, namespace="shop")


def minimal(**fields: Any) -> dict[str, Any]:
    """A minimal valid spec with ``fields`` set on top."""
    return {"clientSecretRef": {"name": "autotek-client"}, **fields}


EXAMPLES = crdkit.examples(c.KIND)


# ============================================================================================
# Structure


def test_identity_matches_operator_constants(crd):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert crd["spec"]["group"] == c.GROUP == "autotek.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"] == {
        "kind": c.KIND,
        "listKind": f"{c.KIND}List",
        "plural": c.PLURAL,
        "singular": "autotekcredential",
        "shortNames": ["atc"],
        "categories": ["autotek"],
    }


def test_one_version_served_and_stored_with_status_subresource(crd):
    (version,) = crd["spec"]["versions"]
    assert version["name"] == c.VERSION == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd):
    columns = crdcheck.version_entry(crd)["additionalPrinterColumns"]
    got = {col["name"]: (col["jsonPath"], col["type"], col.get("priority", 0)) for col in columns}
    assert got == {
        "Ready": ('.status.conditions[?(@.type=="Ready")].status', "string", 0),
        "Secret": (".status.secretName", "string", 0),
        "Expires": (".status.expiresAt", "string", 0),
        "Age": (".metadata.creationTimestamp", "date", 0),
        "Reason": ('.status.conditions[?(@.type=="Ready")].reason', "string", 1),
        "Next Refresh": (".status.nextRefreshTime", "string", 1),
    }
    default_view = [col["name"] for col in columns if not col.get("priority")]
    assert default_view == ["Ready", "Secret", "Expires", "Age"]
    assert len(got) == len(columns), "duplicate column names"


def test_every_property_has_a_description(schema):
    missing = crdcheck.missing_descriptions(schema)
    assert not missing, "schema nodes without a description:\n" + "\n".join(missing)
    assert schema.get("description")


def test_missing_descriptions_reports_paths():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "description": "fine"},
            "b": {"type": "object", "description": "fine", "properties": {"c": {"type": "string"}}},
            "d": {"type": "array", "description": "x", "items": {"type": "object", "properties": {}}},
            "e": {"type": "object", "description": "x", "additionalProperties": {"type": "string"}},
            "f": {"type": "string", "description": "   "},
        },
    }
    assert crdcheck.missing_descriptions(schema) == ["b.c", "d[]", "e[*]", "f"]
    assert crdcheck.missing_descriptions({"type": "object", "properties": {"metadata": {"type": "object"}}}) == []


def test_root_metadata_specifies_nothing_the_api_server_forbids(schema):
    assert crdcheck.root_metadata_problems(schema) == []
    assert crdcheck.root_metadata_problems({"properties": {"metadata": {"type": "object", "description": "x"}}}) == [
        "metadata.description"
    ]


def test_schema_is_structural(schema):
    """Every node has a type; properties and additionalProperties are never combined."""
    for path, node in crdcheck.iter_schema(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path or '<root>'} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path} has no items schema"


def test_defaults_are_valid_values(schema):
    for path, node in crdcheck.iter_schema(schema):
        if "default" in node:
            result = admit(node["default"], node)
            assert result.allowed, f"default of {path}: {result.explain()}"


def test_renew_before_percentage_has_no_schema_default(schema):
    # A schema default would make every renewBefore fail the mutual-exclusion rule, since defaults
    # apply before validation; the operator applies 33 itself.
    assert "default" not in crdcheck.schema_at(schema, "spec.refresh.renewBeforePercentage")


def test_schema_defaults_agree_with_operator(schema):
    props = crdcheck.schema_at(schema, "spec")["properties"]
    assert props["tokenURL"]["default"] == c.DEFAULT_TOKEN_URL
    assert props["clientAuthMethod"]["default"] == spec_module.AUTH_BASIC
    assert props["clientSecretRef"]["properties"]["clientIdKey"]["default"] == c.DEFAULT_CLIENT_ID_KEY
    assert props["clientSecretRef"]["properties"]["clientSecretKey"]["default"] == c.DEFAULT_CLIENT_SECRET_KEY
    target = props["target"]["properties"]
    assert target["creationPolicy"]["default"] == spec_module.CREATION_OWNER
    assert target["deletionPolicy"]["default"] == spec_module.DELETION_DELETE
    lifetime = props["refresh"]["properties"]["defaultLifetime"]["default"]
    assert spec_module.parse_duration(lifetime) == c.DEFAULT_LIFETIME_SECONDS


def test_enums_agree_with_operator(schema):
    props = crdcheck.schema_at(schema, "spec")["properties"]
    assert props["clientAuthMethod"]["enum"] == [spec_module.AUTH_BASIC, spec_module.AUTH_POST]
    assert props["target"]["properties"]["creationPolicy"]["enum"] == [
        spec_module.CREATION_OWNER,
        spec_module.CREATION_MERGE,
    ]
    assert props["target"]["properties"]["deletionPolicy"]["enum"] == [
        spec_module.DELETION_DELETE,
        spec_module.DELETION_RETAIN,
    ]
    assert tuple(props["rolloutRestartTargets"]["items"]["properties"]["kind"]["enum"]) == spec_module.RESTART_KINDS


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("spec.clientSecretRef.name", DNS_SUBDOMAIN_RE),
        ("spec.clientSecretRef.clientIdKey", SECRET_KEY_RE),
        ("spec.clientSecretRef.clientSecretKey", SECRET_KEY_RE),
        ("spec.target.name", DNS_SUBDOMAIN_RE),
        ("spec.refresh.renewBefore", DURATION_RE),
        ("spec.refresh.defaultLifetime", DURATION_RE),
    ],
)
def test_patterns(schema, path, pattern):
    node = crdcheck.schema_at(schema, path)
    assert node["pattern"] == pattern
    assert node["maxLength"] <= 253


def test_restart_target_name_pattern(schema):
    node = crdcheck.schema_at(schema, "spec.rolloutRestartTargets")
    assert node["maxItems"] == 20
    assert node["items"]["required"] == ["kind", "name"]
    assert node["items"]["properties"]["name"]["pattern"] == DNS_SUBDOMAIN_RE
    assert node["items"]["properties"]["name"]["maxLength"] == 253


@pytest.mark.parametrize("path", ["spec.refresh.renewBefore", "spec.refresh.defaultLifetime"])
def test_duration_rule_uses_the_schema_pattern(schema, path):
    """The CEL rule and the schema pattern are the same expression, so both layers agree."""
    node = crdcheck.schema_at(schema, path)
    first = node["x-kubernetes-validations"][0]["rule"]
    assert first == "self.matches('" + node["pattern"].replace("\\", "\\\\") + "')"


DURATION_SAMPLES = [
    ("10m", True),
    ("90s", True),
    ("1h30m", True),
    ("1.5h", True),
    ("500ms", True),
    ("2h0m0.5s", True),
    ("0s", True),
    ("", False),
    ("10", False),
    ("m", False),
    ("ten minutes", False),
    ("5x", False),
    ("1d", False),
    ("10us", False),
    ("-5m", False),
    ("+5m", False),
    (".5h", False),
    ("5.m", False),
    ("10 m", False),
    (" 10m", False),
]


@pytest.mark.parametrize(("value", "parseable"), DURATION_SAMPLES)
def test_duration_syntax_agrees_with_operator_parser(schema, value, parseable):
    node = crdcheck.schema_at(schema, "spec.refresh.renewBefore")
    assert bool(re2.search(node["pattern"], value)) is parseable
    assert crdcheck.evaluate_rule(node["x-kubernetes-validations"][0]["rule"], value)[0] is parseable
    try:
        spec_module.parse_duration(value)
    except InvalidSpec:
        operator_parses = False
    else:
        operator_parses = True
    assert operator_parses is parseable


def test_every_rule_compiles_with_cel_python(schema):
    rules = crdcheck.all_rules(schema)
    assert len(rules) >= 9
    failures = []
    for path, rule in rules:
        assert rule.get("message"), f"rule at {path} has no message"
        try:
            crdcheck.compile_rule(rule["rule"])
        except crdcheck.RuleCompileError as exc:
            failures.append(f"{path}: {exc}")
    assert not failures, "\n".join(failures)


def _bounded(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind == "string":
        return "maxLength" in node or "enum" in node or "format" in node
    if kind == "array":
        return "maxItems" in node
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return "maxProperties" in node
    return True


def test_rules_stay_within_the_cost_budget(schema):
    """Strings, lists and maps a rule reads, and lists/maps above a rule, are bounded."""
    nodes = dict(crdcheck.iter_schema(schema))
    for path, _rule in crdcheck.all_rules(schema):
        assert _bounded(nodes[path]), f"{path} carries a rule but is unbounded"
        for prefix, node in nodes.items():
            if prefix and path.startswith((f"{prefix}.", f"{prefix}[")):
                assert node.get("type") != "array" or "maxItems" in node, f"{prefix} above a rule"


# ============================================================================================
# The emulation itself


DEFAULTING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "default": "A"},
        "b": {"type": "string"},
        "n": {"type": "string", "nullable": True, "default": "N"},
        "o": {
            "type": "object",
            "default": {},
            "properties": {"x": {"type": "integer", "default": 1}, "y": {"type": "integer"}},
        },
        "p": {"type": "object", "properties": {"x": {"type": "integer", "default": 2}}},
        "m": {
            "type": "object",
            "additionalProperties": {"type": "object", "properties": {"z": {"type": "string", "default": "Z"}}},
        },
        "l": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string", "default": "K"}}}},
    },
}


def test_defaults_fill_missing_fields_recursively():
    assert crdcheck.apply_defaults({}, DEFAULTING_SCHEMA) == {"a": "A", "n": "N", "o": {"x": 1}}


def test_defaults_keep_given_values_and_reach_into_maps_and_lists():
    obj = {"a": "given", "o": {"x": 5}, "p": {}, "m": {"k1": {}, "k2": {"z": "set"}}, "l": [{}, {"k": "v"}]}
    assert crdcheck.apply_defaults(obj, DEFAULTING_SCHEMA) == {
        "a": "given",
        "n": "N",
        "o": {"x": 5},
        "p": {"x": 2},
        "m": {"k1": {"z": "Z"}, "k2": {"z": "set"}},
        "l": [{"k": "K"}, {"k": "v"}],
    }
    assert obj["p"] == {}, "the input must not change"


def test_nulls_are_defaulted_or_dropped_unless_nullable():
    obj = {"a": None, "b": None, "n": None, "o": {"y": None}}
    assert crdcheck.apply_defaults(obj, DEFAULTING_SCHEMA) == {"a": "A", "n": None, "o": {"x": 1}}


def test_pruning_drops_undeclared_fields_only():
    schema = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object"},
            "s": {"type": "object", "properties": {"k": {"type": "string"}}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    obj = {"metadata": {"labels": {"a": "b"}}, "s": {"k": "v", "junk": 1}, "m": {"any": "x"}, "top": 1}
    assert crdcheck.prune(obj, schema) == {"metadata": {"labels": {"a": "b"}}, "s": {"k": "v"}, "m": {"any": "x"}}
    assert crdcheck.unknown_fields(obj, schema) == ["s.junk", "top"]


def test_nullable_and_int_or_string_translate_to_json_schema():
    out = crdcheck.to_jsonschema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "a": {"type": "string", "nullable": True, "enum": ["x"]},
                "b": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    assert out == {
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"], "enum": ["x", None]},
            "b": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    }


def test_patterns_use_go_semantics_where_dollar_is_the_end_of_text():
    schema = {"type": "string", "pattern": "^abc$"}
    assert admit("abc", schema).allowed
    assert not admit("abc\n", schema).allowed


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2026-11-28T04:10:00Z", True),
        ("2026-11-28T04:10:00.123+10:00", True),
        ("2026-13-28T04:10:00Z", False),
        ("yesterday", False),
    ],
)
def test_date_time_format_is_checked(value, ok):
    assert admit(value, {"type": "string", "format": "date-time"}).allowed is ok


def test_a_rule_cel_python_cannot_compile_fails_loudly():
    schema = {"type": "string", "x-kubernetes-validations": [{"rule": "self.(", "message": "m"}]}
    with pytest.raises(crdcheck.RuleCompileError):
        admit("x", schema)


def test_a_rule_that_errors_while_evaluating_rejects():
    schema = {
        "type": "string",
        "x-kubernetes-validations": [{"rule": "duration(self) > duration('0s')", "message": "m"}],
    }
    (problem,) = admit("not a duration", schema).problems
    assert problem.kind == "rule"
    assert "evaluation error" in problem.message


def test_rules_skip_absent_nodes_and_report_their_message():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string", "x-kubernetes-validations": [{"rule": "self == 'ok'", "message": "must be ok"}]}
        },
    }
    assert admit({}, schema).allowed
    assert admit({"s": "ok"}, schema).allowed
    assert admit({"s": "no"}, schema).problems == [Problem("s", "rule", "must be ok")]


def test_list_map_keys_must_be_unique(schema):
    status = {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Ready", "status": "False"}]}
    result = admit({**resource(minimal()), "status": status}, schema)
    assert [(p.path, p.kind) for p in result.problems] == [("status.conditions[1]", "duplicate")]


# ============================================================================================
# Examples


def test_examples_exist():
    names = {name for name, _ in EXAMPLES}
    assert {"credential.yaml", "credential-minimal.yaml", "credential-merge.yaml"} <= names


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_credentials_are_admitted(schema, filename, doc):
    result = admit(doc, schema)
    assert result.allowed, f"{filename}:\n{result.explain()}"
    assert doc["apiVersion"] == c.API_VERSION
    assert doc["metadata"]["namespace"] == "shop"


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_operator_accepts_example_credentials(schema, filename, doc):
    name = doc["metadata"]["name"]
    raw = parse_spec(doc["spec"], name=name)
    stored = parse_spec(admit(doc, schema).stored["spec"], name=name)
    assert raw == stored, "schema defaults and operator defaults differ"


def _example(filename: str) -> dict[str, Any]:
    (doc,) = crdcheck.load_documents(crdcheck.EXAMPLES_DIR / filename)
    return doc


def test_full_example_sets_every_spec_field(schema):
    doc = _example("credential.yaml")
    declared = set(crdcheck.schema_at(schema, "spec")["properties"])
    assert set(doc["spec"]) == declared
    assert doc["spec"]["refresh"] == {"renewBeforePercentage": 33, "defaultLifetime": "15m"}
    parsed = parse_spec(doc["spec"], name=doc["metadata"]["name"])
    assert parsed.target.name == "autotek-token"
    assert parsed.token_url == c.DEFAULT_TOKEN_URL


def test_minimal_example_gets_every_default(schema):
    doc = _example("credential-minimal.yaml")
    assert doc["spec"] == {"clientSecretRef": {"name": "autotek-client"}}
    assert admit(doc, schema).stored["spec"] == {
        "clientSecretRef": {"name": "autotek-client", "clientIdKey": "client_id", "clientSecretKey": "client_secret"},
        "tokenURL": "https://api.autograb.com.au/auth-broker/request-token",
        "clientAuthMethod": "ClientSecretBasic",
        "target": {"creationPolicy": "Owner", "deletionPolicy": "Delete"},
        "refresh": {"defaultLifetime": "15m"},
    }
    parsed = parse_spec(doc["spec"], name=doc["metadata"]["name"])
    assert parsed.target.name == doc["metadata"]["name"]
    assert parsed.refresh.effective_percentage == c.DEFAULT_RENEW_BEFORE_PERCENTAGE
    assert parsed.refresh.default_lifetime == c.DEFAULT_LIFETIME_SECONDS


def test_merge_example():
    doc = _example("credential-merge.yaml")
    parsed = parse_spec(doc["spec"], name=doc["metadata"]["name"])
    assert parsed.target.creation_policy == "Merge"
    assert parsed.target.deletion_policy == "Retain"
    assert parsed.refresh.renew_before == 600
    assert parsed.refresh.effective_percentage is None


def test_client_secret_example_has_the_default_keys():
    secret = _example("client-secret.yaml")
    assert (secret["kind"], secret["metadata"]["name"], secret["metadata"]["namespace"]) == (
        "Secret",
        "autotek-client",
        "shop",
    )
    assert set(secret["stringData"]) == {c.DEFAULT_CLIENT_ID_KEY, c.DEFAULT_CLIENT_SECRET_KEY}


def test_pod_example_mounts_the_token_securely():
    pod = _example("pod.yaml")
    assert (pod["kind"], pod["metadata"]["namespace"]) == ("Pod", "shop")
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (volume,) = spec["volumes"]
    assert volume["secret"]["secretName"] == _example("credential.yaml")["spec"]["target"]["name"]
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        (mount,) = container["volumeMounts"]
        assert (mount["name"], mount["mountPath"], mount["readOnly"]) == (volume["name"], "/var/run/autotek", True)
        assert "subPath" not in mount, "subPath mounts do not see rotated tokens"
        assert "/var/run/autotek/authorization" in " ".join(container["command"])


# ============================================================================================
# Invalid resources


def _duration_problems(path: str, rule_text: str = "must be a duration") -> tuple[tuple[str, str, str], ...]:
    return ((path, "pattern", "does not match"), (path, "rule", rule_text))


INVALID = [
    Case("missing clientSecretRef", {}, (("spec", "required", "'clientSecretRef'"),)),
    Case("missing clientSecretRef.name", {"clientSecretRef": {}}, (("spec.clientSecretRef", "required", "'name'"),)),
    # The schema has no namespace field. A real API server prunes unknown fields (kubectl's
    # default strict field validation rejects them instead); see also
    # test_client_secret_ref_namespace_is_not_part_of_the_api.
    Case(
        "clientSecretRef.namespace",
        {"clientSecretRef": {"name": "autotek-client", "namespace": "other"}},
        (("spec.clientSecretRef.namespace", "unknown", "unknown field"),),
    ),
    Case("bad clientAuthMethod", minimal(clientAuthMethod="PrivateKeyJWT"), (("spec.clientAuthMethod", "enum", ""),)),
    Case(
        "bad creationPolicy", minimal(target={"creationPolicy": "Adopt"}), (("spec.target.creationPolicy", "enum", ""),)
    ),
    Case(
        "bad deletionPolicy",
        minimal(target={"deletionPolicy": "Orphan"}),
        (("spec.target.deletionPolicy", "enum", ""),),
    ),
    Case(
        "renewBeforePercentage 0",
        minimal(refresh={"renewBeforePercentage": 0}),
        (("spec.refresh.renewBeforePercentage", "minimum", ""),),
    ),
    Case(
        "renewBeforePercentage 100",
        minimal(refresh={"renewBeforePercentage": 100}),
        (("spec.refresh.renewBeforePercentage", "maximum", ""),),
    ),
    Case(
        "renewBeforePercentage -5",
        minimal(refresh={"renewBeforePercentage": -5}),
        (("spec.refresh.renewBeforePercentage", "minimum", ""),),
    ),
    Case(
        "renewBeforePercentage 33.5",
        minimal(refresh={"renewBeforePercentage": 33.5}),
        (("spec.refresh.renewBeforePercentage", "type", "integer"),),
        operator="reject",
    ),
    Case(
        "renewBeforePercentage true",
        minimal(refresh={"renewBeforePercentage": True}),
        (("spec.refresh.renewBeforePercentage", "type", "integer"),),
    ),
    Case(
        "renewBefore and renewBeforePercentage",
        minimal(refresh={"renewBefore": "10m", "renewBeforePercentage": 33}),
        (("spec.refresh", "rule", "mutually exclusive"),),
    ),
    Case(
        "renewBefore ten minutes",
        minimal(refresh={"renewBefore": "ten minutes"}),
        _duration_problems("spec.refresh.renewBefore"),
    ),
    Case(
        "renewBefore 0s",
        minimal(refresh={"renewBefore": "0s"}),
        (("spec.refresh.renewBefore", "rule", "longer than zero"),),
    ),
    Case(
        "defaultLifetime 5x",
        minimal(refresh={"defaultLifetime": "5x"}),
        _duration_problems("spec.refresh.defaultLifetime"),
    ),
    Case(
        "defaultLifetime 9s",
        minimal(refresh={"defaultLifetime": "9s"}),
        (("spec.refresh.defaultLifetime", "rule", "at least 10s"),),
    ),
    Case(
        "defaultLifetime 9999ms",
        minimal(refresh={"defaultLifetime": "9999ms"}),
        (("spec.refresh.defaultLifetime", "rule", "at least 10s"),),
    ),
    Case(
        "renewBefore trailing newline",
        minimal(refresh={"renewBefore": "10m\n"}),
        _duration_problems("spec.refresh.renewBefore"),
    ),
    Case(
        "renewBefore non-ASCII digits",
        minimal(refresh={"renewBefore": "\u0661\u0660m"}),
        _duration_problems("spec.refresh.renewBefore"),
        operator="reject",
    ),
    Case(
        "renewBefore too large for Kubernetes",
        minimal(refresh={"renewBefore": "99999999999h"}),
        (("spec.refresh.renewBefore", "rule", "evaluation error"),),
        operator="reject",
    ),
    Case("tokenURL ftp", minimal(tokenURL="ftp://x"), (("spec.tokenURL", "pattern", ""),)),
    Case("tokenURL relative", minimal(tokenURL="/token"), (("spec.tokenURL", "pattern", ""),)),
    Case("tokenURL without host", minimal(tokenURL="https:///token"), (("spec.tokenURL", "pattern", ""),)),
    Case(
        "tokenURL with credentials",
        minimal(tokenURL="https://user:pw@api.autograb.com.au/token"),
        (("spec.tokenURL", "pattern", ""),),
    ),
    Case(
        "tokenURL with fragment",
        minimal(tokenURL="https://api.autograb.com.au/token#x"),
        (("spec.tokenURL", "pattern", ""),),
    ),
    Case(
        "extraParams grant_type",
        minimal(extraParams={"audience": "a", "grant_type": "password"}),
        (("spec.extraParams", "rule", "must not set grant_type"),),
    ),
    Case(
        "extraParams client_secret",
        minimal(extraParams={"client_secret": "x"}),
        (("spec.extraParams", "rule", "must not set"),),
    ),
    Case(
        "extraParams non-string value",
        minimal(extraParams={"audience": 1}),
        (("spec.extraParams.audience", "type", ""),),
    ),
    Case("caBundle not PEM", minimal(caBundle="not a certificate"), (("spec.caBundle", "rule", "PEM"),)),
    Case(
        "rolloutRestartTargets kind Pod",
        minimal(rolloutRestartTargets=[{"kind": "Pod", "name": "web"}]),
        (("spec.rolloutRestartTargets[0].kind", "enum", ""),),
    ),
    Case(
        "rolloutRestartTargets without name",
        minimal(rolloutRestartTargets=[{"kind": "Deployment"}]),
        (("spec.rolloutRestartTargets[0]", "required", "'name'"),),
    ),
    Case(
        "rolloutRestartTargets bad name",
        minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": "Web"}]),
        (("spec.rolloutRestartTargets[0].name", "pattern", ""),),
    ),
    Case("target name Bad_Name", minimal(target={"name": "Bad_Name"}), (("spec.target.name", "pattern", ""),)),
    Case(
        "target name trailing newline",
        minimal(target={"name": "autotek-token\n"}),
        (("spec.target.name", "pattern", ""),),
    ),
    Case("target name too long", minimal(target={"name": "a" * 254}), (("spec.target.name", "maxLength", ""),)),
    Case(
        "clientSecretRef name empty",
        {"clientSecretRef": {"name": ""}},
        (("spec.clientSecretRef.name", "pattern", ""),),
    ),
    Case(
        "clientSecretRef name trailing newline",
        {"clientSecretRef": {"name": "autotek-client\n"}},
        (("spec.clientSecretRef.name", "pattern", ""),),
    ),
    Case(
        "clientIdKey with a slash",
        {"clientSecretRef": {"name": "autotek-client", "clientIdKey": "a/b"}},
        (("spec.clientSecretRef.clientIdKey", "pattern", ""),),
    ),
    Case(
        "clientSecretKey trailing newline",
        {"clientSecretRef": {"name": "autotek-client", "clientSecretKey": "secret\n"}},
        (("spec.clientSecretRef.clientSecretKey", "pattern", ""),),
    ),
    Case(
        "clientIdKey is '..'",
        {"clientSecretRef": {"name": "autotek-client", "clientIdKey": ".."}},
        (("spec.clientSecretRef.clientIdKey", "rule", "must not be '.'"),),
    ),
    Case(
        "clientSecretKey is '.'",
        {"clientSecretRef": {"name": "autotek-client", "clientSecretKey": "."}},
        (("spec.clientSecretRef.clientSecretKey", "rule", "must not be '.'"),),
    ),
    Case(
        "clientSecretKey starts with '..'",
        {"clientSecretRef": {"name": "autotek-client", "clientSecretKey": "..data"}},
        (("spec.clientSecretRef.clientSecretKey", "rule", "start with '..'"),),
        operator="reject",
    ),
    Case(
        "template label not a string",
        minimal(target={"template": {"labels": {"a": 1}}}),
        (("spec.target.template.labels.a", "type", ""),),
    ),
    Case("spec 42", 42, (("spec", "type", "object"),)),
    Case(
        "target is the client Secret",
        minimal(target={"name": "autotek-client"}),
        (("spec", "rule", "must differ from clientSecretRef.name"),),
    ),
    # Template keys are checked again when rendered: a bad one is left out and reported, so that
    # it cannot stop rotation; the operator's parser accepts them on purpose.
    Case(
        "template data key is a token key",
        minimal(target={"template": {"data": {"access_token": "x"}}}),
        (("spec.target.template.data", "rule", "token keys"),),
        operator="schema-only",
    ),
    Case(
        "template data key invalid",
        minimal(target={"template": {"data": {"a/b": "x"}}}),
        (("spec.target.template.data", "rule", "valid Secret keys"),),
        operator="schema-only",
    ),
    Case("scope too long", minimal(scope="s" * 1025), (("spec.scope", "maxLength", ""),), operator="schema-only"),
    Case(
        "too many extraParams",
        minimal(extraParams={f"p{i}": "v" for i in range(33)}),
        (("spec.extraParams", "maxProperties", ""),),
        operator="schema-only",
    ),
    Case(
        "too many rolloutRestartTargets",
        minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": f"d{i}"} for i in range(21)]),
        (("spec.rolloutRestartTargets", "maxItems", ""),),
        operator="schema-only",
    ),
]


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_invalid_resource_is_rejected_with_reason(schema, case):
    crdkit.assert_refused_with_reason(resource(copy.deepcopy(case.spec)), schema, case)


@pytest.mark.parametrize("case", crdkit.operator_params(INVALID))
def test_operator_rejects_what_the_schema_rejects(case):
    assert operator_rejects(copy.deepcopy(case.spec)), f"parse_spec accepted {case.spec!r}"


def test_schema_only_limits_are_listed():
    """The size limits the operator does not check exist only for the CEL cost budget; template keys
    are checked by the operator when it renders them (a bad one is reported, not fatal)."""
    assert {case.id for case in INVALID if case.operator == "schema-only"} == {
        "scope too long",
        "too many extraParams",
        "too many rolloutRestartTargets",
        "template data key is a token key",
        "template data key invalid",
    }


def test_client_secret_ref_namespace_is_not_part_of_the_api(schema):
    """References are same-namespace by construction: there is no field to point elsewhere.

    An unknown field is rejected under strict field validation (kubectl's default) and pruned
    otherwise, so what the operator reads never carries a namespace; the operator refuses one anyway.
    """
    ref = crdcheck.schema_at(schema, "spec.clientSecretRef")
    assert "namespace" not in ref["properties"]
    assert "additionalProperties" not in ref and not ref.get("x-kubernetes-preserve-unknown-fields")
    obj = resource({"clientSecretRef": {"name": "autotek-client", "namespace": "other"}})
    lenient = admit(obj, schema, strict=False)
    assert lenient.allowed, lenient.explain()
    assert "namespace" not in lenient.stored["spec"]["clientSecretRef"]
    assert parse_spec(lenient.stored["spec"], name="autotek").client_secret_ref.name == "autotek-client"
    assert operator_rejects(obj["spec"])


# ============================================================================================
# Valid variants: both the schema and the operator accept them


VALID = [
    ("renewBefore 1h30m", minimal(refresh={"renewBefore": "1h30m"})),
    ("renewBefore 1.5h", minimal(refresh={"renewBefore": "1.5h"})),
    ("renewBefore 500ms", minimal(refresh={"renewBefore": "500ms"})),
    ("renewBefore null beside a percentage", minimal(refresh={"renewBefore": None, "renewBeforePercentage": 33})),
    ("renewBeforePercentage 1", minimal(refresh={"renewBeforePercentage": 1})),
    ("renewBeforePercentage 99", minimal(refresh={"renewBeforePercentage": 99})),
    ("defaultLifetime 10s", minimal(refresh={"defaultLifetime": "10s"})),
    ("defaultLifetime 10000ms", minimal(refresh={"defaultLifetime": "10000ms"})),
    ("defaultLifetime 1h", minimal(refresh={"defaultLifetime": "1h"})),
    ("ClientSecretPost", minimal(clientAuthMethod="ClientSecretPost")),
    ("tokenURL loopback http", minimal(tokenURL="http://127.0.0.1:8080/token")),
    ("tokenURL IPv6", minimal(tokenURL="https://[::1]:8443/oauth2/token")),
    ("tokenURL with query", minimal(tokenURL="https://auth.example.com/oauth2/token?tenant=shop")),
    ("extraParams audience", minimal(extraParams={"audience": "https://api.autograb.com.au", "resource": "x"})),
    ("scope", minimal(scope="read write")),
    ("caBundle PEM", minimal(caBundle=PEM)),
    ("dotted names", {"clientSecretRef": {"name": "a.b-c.d", "clientIdKey": "CLIENT.id", "clientSecretKey": "-_."}}),
    (
        "target with template",
        minimal(target={"name": "t", "template": {"labels": {"app": "shop"}, "annotations": {"team": "x/y"}}}),
    ),
    (
        "every restart kind",
        minimal(
            rolloutRestartTargets=[
                {"kind": "Deployment", "name": "web"},
                {"kind": "StatefulSet", "name": "db"},
                {"kind": "DaemonSet", "name": "agent.v1"},
            ]
        ),
    ),
    (
        "twenty restart targets",
        minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": f"d{i}"} for i in range(20)]),
    ),
    ("thirty-two extraParams", minimal(extraParams={f"p{i}": "v" for i in range(32)})),
]


@pytest.mark.parametrize(("label", "spec"), VALID, ids=[label for label, _ in VALID])
def test_valid_variant_is_admitted_and_parsed(schema, label, spec):
    result = admit(resource(copy.deepcopy(spec)), schema)
    assert result.allowed, result.explain()
    assert parse_spec(result.stored["spec"], name="autotek") == parse_spec(copy.deepcopy(spec), name="autotek")


def test_null_default_lifetime_means_unset(schema):
    """The API server defaults a null defaultLifetime; the operator reads a raw null as unset too."""
    spec = minimal(refresh={"defaultLifetime": None})
    result = admit(resource(spec), schema)
    assert result.allowed
    assert result.stored["spec"]["refresh"] == {"defaultLifetime": "15m"}
    assert parse_spec(spec, name="autotek").refresh.default_lifetime == c.DEFAULT_LIFETIME_SECONDS


# ============================================================================================
# Status


STATUS = {
    "observedGeneration": 3,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "TokenIssued",
            "message": "token valid until 2026-11-28T04:10:00Z",
            "lastTransitionTime": "2026-11-28T03:10:00Z",
            "observedGeneration": 3,
        }
    ],
    "secretName": "autotek-token",
    "tokenType": "bearer",
    "lastRefreshTime": "2026-11-28T03:10:00Z",
    "expiresAt": "2026-11-28T04:10:00Z",
    "nextRefreshTime": "2026-11-28T03:50:00Z",
    "lastFailureTime": "2026-11-28T03:00:00Z",
    "lastFailureReason": "TokenEndpointUnavailable",
    "failedAttempts": 0,
    "clientSecretVersion": "12345",
    "lastRefreshRequest": "2026-11-28T03:09:58Z",
    "pendingRestarts": [
        {"kind": "Deployment", "name": "web", "since": "2026-11-28T03:10:00Z", "dueAt": "2026-11-28T03:12:00Z"}
    ],
}


def test_status_fields(schema):
    assert set(crdcheck.schema_at(schema, "status")["properties"]) == set(STATUS)
    conditions = crdcheck.schema_at(schema, "status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_status_example_is_admitted(schema):
    result = admit({**resource(minimal()), "status": STATUS}, schema)
    assert result.allowed, result.explain()


@pytest.mark.parametrize(
    ("change", "path", "kind"),
    [
        ({"conditions": [{"type": "Ready", "status": "Yes"}]}, "status.conditions[0].status", "enum"),
        ({"conditions": [{"status": "True"}]}, "status.conditions[0]", "required"),
        ({"expiresAt": "soon"}, "status.expiresAt", "format"),
        ({"failedAttempts": -1}, "status.failedAttempts", "minimum"),
        ({"observedGeneration": "3"}, "status.observedGeneration", "type"),
    ],
)
def test_bad_status_is_rejected(schema, change, path, kind):
    result = admit({**resource(minimal()), "status": {**STATUS, **change}}, schema)
    assert any(p.path == path and p.kind == kind for p in result.problems), result.explain()
