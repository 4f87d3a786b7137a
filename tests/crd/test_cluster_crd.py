"""The ClusterAutoTekCredential CRD: its shape, its schema, its agreement with AutoTekCredential's.

The spec is AutoTekCredential's without rolloutRestartTargets, plus clientSecretRef.namespace,
namespaceSelector and namespaces. :func:`shared_spec` cuts both spec schemas down to the part they
share; the two cuts must be identical, so a change to one CRD fails here until it is made in the
other. Every invalid resource of ``test_crd.INVALID`` (moved into a cluster spec) is refused here
too, with the same problem; the cluster kind's own cases are in ``INVALID``. Resources are checked
by ``crdcheck.admit`` (the API server's behaviour, offline); ``test_cluster_crd_server.py`` runs the
same tables against kube-apiserver. Cases about spec contents are also given to the operator's parser.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import crdcheck
import crdkit
import pytest
import test_crd
from crdcheck import admit
from crdkit import Case

from autotek_operator import constants as c
from autotek_operator.spec import parse_spec

DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
REQUIRED_MESSAGE = "spec.namespaceSelector or spec.namespaces is required"


def resource(spec: Any, name: str = "autotek") -> dict[str, Any]:
    return crdkit.resource("ClusterAutoTekCredential", spec, name)


def minimal(**fields: Any) -> dict[str, Any]:
    """A minimal valid cluster spec with ``fields`` set on top."""
    base: dict[str, Any] = {
        "clientSecretRef": {"namespace": "autotek-system", "name": "autotek-client"},
        "namespaces": ["shop"],
    }
    return {**base, **fields}


def selector(**fields: Any) -> dict[str, Any]:
    """A minimal valid cluster spec selecting by ``namespaceSelector=fields`` (no list)."""
    spec = minimal(namespaceSelector=fields)
    del spec["namespaces"]
    return spec


EXAMPLES = crdkit.examples(c.CLUSTER_KIND)


# ============================================================================================
# Structure


def test_identity(cluster_crd, crd):
    assert cluster_crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert cluster_crd["metadata"]["name"] == f"{c.CLUSTER_PLURAL}.{c.GROUP}"
    assert cluster_crd["metadata"]["labels"] == crd["metadata"]["labels"]
    assert cluster_crd["spec"]["group"] == c.GROUP
    assert cluster_crd["spec"]["scope"] == "Cluster"
    assert cluster_crd["spec"]["names"] == {
        "kind": c.CLUSTER_KIND,
        "listKind": f"{c.CLUSTER_KIND}List",
        "plural": c.CLUSTER_PLURAL,
        "singular": "clusterautotekcredential",
        "shortNames": ["catc"],
        "categories": crd["spec"]["names"]["categories"],
    }
    assert cluster_crd["spec"]["names"]["categories"] == ["autotek"]


def test_one_version_served_and_stored_with_status_subresource(cluster_crd):
    (version,) = cluster_crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (c.VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_listed_in_the_crds_kustomization():
    (kustomization,) = crdcheck.load_documents(crdcheck.REPO / "crds" / "kustomization.yaml")
    assert crdcheck.CLUSTER_CRD_PATH.name in kustomization["resources"]


def test_printer_columns(cluster_crd):
    columns = crdcheck.version_entry(cluster_crd)["additionalPrinterColumns"]
    got = {col["name"]: (col["jsonPath"], col["type"], col.get("priority", 0)) for col in columns}
    assert got == {
        "Ready": ('.status.conditions[?(@.type=="Ready")].status', "string", 0),
        "Namespaces": (".status.namespaces.summary", "string", 0),
        "Expires": (".status.expiresAt", "string", 0),
        "Age": (".metadata.creationTimestamp", "date", 0),
        "Reason": ('.status.conditions[?(@.type=="Ready")].reason', "string", 1),
        "Secret": (".status.secretName", "string", 1),
        "Next Refresh": (".status.nextRefreshTime", "string", 1),
    }
    assert [col["name"] for col in columns if not col.get("priority")] == ["Ready", "Namespaces", "Expires", "Age"]
    assert len(got) == len(columns), "duplicate column names"
    assert all(col.get("description") for col in columns)


def test_every_property_has_a_description(cluster_schema):
    missing = crdcheck.missing_descriptions(cluster_schema)
    assert not missing, "schema nodes without a description:\n" + "\n".join(missing)
    assert cluster_schema.get("description")


def test_root_metadata_specifies_nothing_the_api_server_forbids(cluster_schema):
    assert crdcheck.root_metadata_problems(cluster_schema) == []


def test_schema_is_structural(cluster_schema):
    test_crd.test_schema_is_structural(cluster_schema)


def test_defaults_are_valid_values(cluster_schema):
    test_crd.test_defaults_are_valid_values(cluster_schema)


def test_every_rule_compiles_and_has_a_message(cluster_schema):
    rules = crdcheck.all_rules(cluster_schema)
    assert len(rules) >= 14
    for path, rule in rules:
        assert rule.get("message"), f"rule at {path} has no message"
        crdcheck.compile_rule(rule["rule"])


def test_rules_stay_within_the_cost_budget(cluster_schema):
    test_crd.test_rules_stay_within_the_cost_budget(cluster_schema)


def test_selection_fields(cluster_schema):
    ref = crdcheck.schema_at(cluster_schema, "spec.clientSecretRef")
    assert ref["required"] == ["name", "namespace"]
    assert ref["properties"]["namespace"]["pattern"] == DNS_LABEL_RE
    assert ref["properties"]["namespace"]["maxLength"] == 63
    names = crdcheck.schema_at(cluster_schema, "spec.namespaces")
    assert names["x-kubernetes-list-type"] == "set"
    assert names["maxItems"] == 1000
    assert (names["items"]["pattern"], names["items"]["maxLength"]) == (DNS_LABEL_RE, 63)
    sel = crdcheck.schema_at(cluster_schema, "spec.namespaceSelector")
    assert set(sel["properties"]) == {"matchLabels", "matchExpressions"}
    expr = sel["properties"]["matchExpressions"]["items"]
    assert expr["properties"]["operator"]["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert expr["required"] == ["key", "operator"]
    assert expr["properties"]["values"]["items"]["pattern"] == LABEL_VALUE_RE
    assert sel["properties"]["matchLabels"]["additionalProperties"]["pattern"] == LABEL_VALUE_RE
    assert "rolloutRestartTargets" not in crdcheck.schema_at(cluster_schema, "spec")["properties"]


# ============================================================================================
# The shared part of the two spec schemas


#: Fields only the cluster kind has, and the one only the namespaced kind has.
CLUSTER_ONLY = ("clientSecretRef.namespace", "namespaceSelector", "namespaces")
NAMESPACED_ONLY = ("rolloutRestartTargets",)
#: Spec-level rules only the cluster kind has, by message.
CLUSTER_ONLY_RULES = (REQUIRED_MESSAGE,)
#: Descriptions that name the kind, the namespace or the selection, and so differ on purpose
#: (paths below spec; "" is spec itself). Everything else, descriptions included, is identical.
OWN_DESCRIPTIONS = frozenset({"", "clientSecretRef", "clientSecretRef.name", "target.name", "target.deletionPolicy"})


def _drop(spec: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = spec
    for part in parents:
        node = node["properties"][part]
    del node["properties"][leaf]
    if leaf in node.get("required", []):
        node["required"] = [r for r in node["required"] if r != leaf]


def shared_spec(spec: dict[str, Any], *, drop: tuple[str, ...], drop_rules: tuple[str, ...] = ()) -> dict[str, Any]:
    """``spec``'s schema without the fields ``drop``, the spec-level rules ``drop_rules`` and the
    descriptions in OWN_DESCRIPTIONS: the part both kinds must share."""
    out = copy.deepcopy(spec)
    for dotted in drop:
        _drop(out, dotted)
    out["x-kubernetes-validations"] = [r for r in out["x-kubernetes-validations"] if r["message"] not in drop_rules]
    for path, node in crdcheck.iter_schema(out):
        if path in OWN_DESCRIPTIONS:
            node.pop("description", None)
    return out


def shared_parts(namespaced: dict[str, Any], cluster: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ns_spec = crdcheck.schema_at(namespaced, "spec")
    cl_spec = crdcheck.schema_at(cluster, "spec")
    return (
        shared_spec(ns_spec, drop=NAMESPACED_ONLY),
        shared_spec(cl_spec, drop=CLUSTER_ONLY, drop_rules=CLUSTER_ONLY_RULES),
    )


def schema_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Paths (with the differing keyword) where two schemas differ."""
    nodes_a, nodes_b = dict(crdcheck.iter_schema(a)), dict(crdcheck.iter_schema(b))
    out = [f"{p or '<spec>'}: only in one schema" for p in sorted(set(nodes_a) ^ set(nodes_b))]
    for path in sorted(set(nodes_a) & set(nodes_b)):
        na, nb = nodes_a[path], nodes_b[path]
        for key in sorted(set(na) | set(nb)):
            if key in ("properties", "items", "additionalProperties") and isinstance(na.get(key), dict):
                if key == "properties" and set(na[key]) != set(nb.get(key) or {}):
                    out.append(f"{path or '<spec>'}: properties differ")
                continue
            if na.get(key) != nb.get(key):
                out.append(f"{path or '<spec>'}: {key} differs")
    return out


def test_shared_spec_schemas_are_identical(schema, cluster_schema):
    """Types, patterns, bounds, defaults, enums, rules and descriptions of the fields both kinds have."""
    ns_part, cl_part = shared_parts(schema, cluster_schema)
    differences = schema_differences(ns_part, cl_part)
    assert not differences, (
        "the spec schemas of crds/autotekcredentials.autotek.io.yaml and crds/clusterautotekcredentials."
        "autotek.io.yaml drifted apart; make the change in both:\n" + "\n".join(differences)
    )
    assert ns_part == cl_part
    # The comparison covers the whole shared spec, not a sliver of it.
    assert set(cl_part["properties"]) == {
        "clientSecretRef",
        "tokenURL",
        "clientAuthMethod",
        "scope",
        "extraParams",
        "caBundle",
        "target",
        "refresh",
    }
    assert len(dict(crdcheck.iter_schema(cl_part))) >= 25


@pytest.mark.parametrize(
    ("which", "change"),
    [
        ("namespaced", lambda s: s["properties"]["tokenURL"].update(maxLength=4096)),
        ("cluster", lambda s: s["properties"]["refresh"]["properties"]["defaultLifetime"].update(default="10m")),
        ("namespaced", lambda s: s["properties"]["target"]["properties"]["creationPolicy"]["enum"].append("Adopt")),
        ("cluster", lambda s: s["properties"]["scope"].update(description="another text")),
        ("cluster", lambda s: s["x-kubernetes-validations"].append({"rule": "true", "message": "new"})),
        ("namespaced", lambda s: s["properties"]["clientSecretRef"]["properties"].pop("clientIdKey")),
        ("cluster", lambda s: s["properties"]["extraParams"]["x-kubernetes-validations"][0].update(rule="true")),
    ],
)
def test_a_change_to_one_kind_alone_is_caught(schema, cluster_schema, which, change):
    ns, cl = copy.deepcopy(schema), copy.deepcopy(cluster_schema)
    change(crdcheck.schema_at(ns if which == "namespaced" else cl, "spec"))
    ns_part, cl_part = shared_parts(ns, cl)
    assert ns_part != cl_part
    assert schema_differences(ns_part, cl_part)


def test_own_descriptions_really_differ(schema, cluster_schema):
    """Each description allowed to differ does (a stale entry would hide a drift)."""
    ns_nodes = dict(crdcheck.iter_schema(crdcheck.schema_at(schema, "spec")))
    cl_nodes = dict(crdcheck.iter_schema(crdcheck.schema_at(cluster_schema, "spec")))
    for path in OWN_DESCRIPTIONS:
        assert ns_nodes[path]["description"] != cl_nodes[path]["description"], path
        assert "ClusterAutoTekCredential" not in ns_nodes[path]["description"]


# ============================================================================================
# Invalid resources: the namespaced kind's table, moved into a cluster spec


#: Namespaced cases that do not carry over: fields this kind does not have, or has on purpose.
NOT_CARRIED_OVER = {
    "clientSecretRef.namespace",  # the cluster kind has the field
    "rolloutRestartTargets kind Pod",  # the cluster kind has no rolloutRestartTargets (see INVALID)
    "rolloutRestartTargets without name",
    "rolloutRestartTargets bad name",
    "too many rolloutRestartTargets",
}


def as_cluster_spec(spec: Any) -> Any:
    """A namespaced case's spec as a cluster spec: the client Secret's namespace and a selection added."""
    if not isinstance(spec, dict):
        return copy.deepcopy(spec)
    out = copy.deepcopy(spec)
    out.setdefault("namespaces", ["shop"])
    if isinstance(out.get("clientSecretRef"), dict):
        out["clientSecretRef"].setdefault("namespace", "autotek-system")
    return out


CARRIED = [
    Case(f"namespaced: {case.id}", as_cluster_spec(case.spec), case.expect, case.operator)
    for case in test_crd.INVALID
    if case.id not in NOT_CARRIED_OVER
]


def test_not_carried_over_names_only_known_cases():
    assert set(NOT_CARRIED_OVER) <= {case.id for case in test_crd.INVALID}
    assert len(CARRIED) == len(test_crd.INVALID) - len(NOT_CARRIED_OVER)


OWN = [
    Case(
        "no selection",
        {"clientSecretRef": {"namespace": "autotek-system", "name": "autotek-client"}},
        (("spec", "rule", REQUIRED_MESSAGE),),
    ),
    Case(
        "empty namespaces list and no selector",
        minimal(namespaces=[]),
        (("spec", "rule", REQUIRED_MESSAGE),),
        operator="an empty list selects nothing: the operator reports NoNamespacesSelected",
    ),
    Case(
        "missing clientSecretRef.namespace",
        {"clientSecretRef": {"name": "autotek-client"}, "namespaces": ["shop"]},
        (("spec.clientSecretRef", "required", "'namespace'"),),
    ),
    Case(
        "clientSecretRef.namespace not a DNS label",
        minimal(clientSecretRef={"namespace": "Autotek_System", "name": "autotek-client"}),
        (("spec.clientSecretRef.namespace", "pattern", ""),),
    ),
    Case(
        "clientSecretRef.namespace too long",
        minimal(clientSecretRef={"namespace": "a" * 64, "name": "autotek-client"}),
        (("spec.clientSecretRef.namespace", "maxLength", ""),),
    ),
    Case("namespace name with a dot", minimal(namespaces=["shop.eu"]), (("spec.namespaces[0]", "pattern", ""),)),
    Case("namespace name upper case", minimal(namespaces=["shop", "Shop"]), (("spec.namespaces[1]", "pattern", ""),)),
    Case("namespace name too long", minimal(namespaces=["a" * 64]), (("spec.namespaces[0]", "maxLength", ""),)),
    Case(
        "namespace listed twice",
        minimal(namespaces=["shop", "shop"]),
        (("spec.namespaces[1]", "duplicate", ""),),
        operator="schema-only",
    ),
    Case("namespaces not a list", minimal(namespaces="shop"), (("spec.namespaces", "type", "array"),)),
    Case(
        "too many namespaces",
        minimal(namespaces=[f"ns-{i}" for i in range(1001)]),
        (("spec.namespaces", "maxItems", ""),),
    ),
    Case(
        "In without values",
        selector(matchExpressions=[{"key": "env", "operator": "In"}]),
        (("spec.namespaceSelector.matchExpressions[0]", "rule", "must not be empty when the operator is In"),),
    ),
    Case(
        "NotIn with empty values",
        selector(matchExpressions=[{"key": "env", "operator": "NotIn", "values": []}]),
        (("spec.namespaceSelector.matchExpressions[0]", "rule", "must not be empty when the operator is In"),),
    ),
    Case(
        "Exists with values",
        selector(matchExpressions=[{"key": "env", "operator": "Exists", "values": ["x"]}]),
        (("spec.namespaceSelector.matchExpressions[0]", "rule", "must be empty when the operator is Exists"),),
    ),
    Case(
        "DoesNotExist with values",
        selector(matchExpressions=[{"key": "env", "operator": "DoesNotExist", "values": ["x"]}]),
        (("spec.namespaceSelector.matchExpressions[0]", "rule", "must be empty when the operator is Exists"),),
    ),
    Case(
        "unknown selector operator",
        selector(matchExpressions=[{"key": "env", "operator": "Gt", "values": ["1"]}]),
        (("spec.namespaceSelector.matchExpressions[0].operator", "enum", ""),),
    ),
    Case(
        "expression without operator",
        selector(matchExpressions=[{"key": "env"}]),
        (("spec.namespaceSelector.matchExpressions[0]", "required", "'operator'"),),
    ),
    Case(
        "expression without key",
        selector(matchExpressions=[{"operator": "Exists"}]),
        (("spec.namespaceSelector.matchExpressions[0]", "required", "'key'"),),
    ),
    Case(
        "expression key invalid",
        selector(matchExpressions=[{"key": "bad key", "operator": "Exists"}]),
        (("spec.namespaceSelector.matchExpressions[0].key", "pattern", ""),),
    ),
    Case(
        "expression value invalid",
        selector(matchExpressions=[{"key": "env", "operator": "In", "values": ["not ok"]}]),
        (("spec.namespaceSelector.matchExpressions[0].values[0]", "pattern", ""),),
    ),
    Case(
        "matchLabels key invalid",
        selector(matchLabels={"bad key!": "x"}),
        (("spec.namespaceSelector.matchLabels", "rule", "valid label keys"),),
    ),
    Case(
        "matchLabels key name part too long",
        selector(matchLabels={"autotek.io/" + "a" * 64: "x"}),
        (("spec.namespaceSelector.matchLabels", "rule", "valid label keys"),),
    ),
    Case(
        "matchLabels value invalid",
        selector(matchLabels={"env": "-prod"}),
        (("spec.namespaceSelector.matchLabels.env", "pattern", ""),),
    ),
    Case(
        "matchLabels value too long",
        selector(matchLabels={"env": "a" * 64}),
        (("spec.namespaceSelector.matchLabels.env", "maxLength", ""),),
    ),
    Case(
        "matchLabels value not a string",
        selector(matchLabels={"env": 1}),
        (("spec.namespaceSelector.matchLabels.env", "type", ""),),
    ),
    Case(
        "selector unknown field",
        selector(namespaces=["shop"]),
        (("spec.namespaceSelector.namespaces", "unknown", "unknown field"),),
    ),
    Case(
        "rolloutRestartTargets",
        minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": "web"}]),
        (("spec.rolloutRestartTargets", "unknown", "unknown field"),),
    ),
    Case(
        "too many matchExpressions",
        selector(matchExpressions=[{"key": f"k{i}", "operator": "Exists"} for i in range(33)]),
        (("spec.namespaceSelector.matchExpressions", "maxItems", ""),),
        operator="schema-only",
    ),
    Case(
        "too many matchLabels",
        selector(matchLabels={f"k{i}": "v" for i in range(33)}),
        (("spec.namespaceSelector.matchLabels", "maxProperties", ""),),
        operator="schema-only",
    ),
]

INVALID = CARRIED + OWN


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_invalid_resource_is_rejected_with_reason(cluster_schema, case):
    crdkit.assert_refused_with_reason(resource(copy.deepcopy(case.spec)), cluster_schema, case)


@pytest.mark.parametrize("case", crdkit.operator_params(INVALID))
def test_operator_rejects_what_the_schema_rejects(case):
    assert crdkit.operator_rejects(copy.deepcopy(case.spec), cluster=True), (
        f"parse_spec(cluster=True) accepted {case.spec!r}"
    )


# ============================================================================================
# Valid variants


OWN_VALID = [
    ("namespaces only", minimal()),
    ("selector only", selector(matchLabels={"autotek.io/token": "true"})),
    ("selector and namespaces", minimal(namespaceSelector={"matchLabels": {"team": "shop"}})),
    ("empty selector selects every namespace", selector()),
    (
        "every operator",
        selector(
            matchExpressions=[
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "example.com/tier", "operator": "NotIn", "values": ["batch"]},
                {"key": "autotek.io/token", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist", "values": []},
            ]
        ),
    ),
    ("label key with prefix and empty value", selector(matchLabels={"a.b-c.example.com/Name_1.x": ""})),
    ("label key name of 63 characters", selector(matchLabels={"k" * 63: "v" * 63})),
    ("thousand namespaces", minimal(namespaces=[f"ns-{i}" for i in range(1000)])),
    ("thirty-two expressions", selector(matchExpressions=[{"key": f"k{i}", "operator": "Exists"} for i in range(32)])),
    (
        "client Secret in another allowed namespace",
        minimal(clientSecretRef={"namespace": "platform-secrets", "name": "autotek-client", "clientIdKey": "id"}),
    ),
    (
        "full spec",
        minimal(
            tokenURL="https://auth.example.com/oauth2/token",
            clientAuthMethod="ClientSecretPost",
            scope="read",
            extraParams={"audience": "x"},
            caBundle=test_crd.PEM,
            target={
                "name": "autotek-token",
                "creationPolicy": "Merge",
                "deletionPolicy": "Retain",
                "template": {
                    "labels": {"a": "b"},
                    "annotations": {"c": "d"},
                    "data": {".env": "TOKEN={{ .access_token }}"},
                },
            },
            refresh={"renewBefore": "10m", "defaultLifetime": "1h"},
        ),
    ),
]

CARRIED_VALID = [
    (f"namespaced: {label}", as_cluster_spec(spec))
    for label, spec in test_crd.VALID
    if "rolloutRestartTargets" not in spec
]

VALID = OWN_VALID + CARRIED_VALID


@pytest.mark.parametrize(("label", "spec"), VALID, ids=[label for label, _ in VALID])
def test_valid_variant_is_admitted_and_parsed(cluster_schema, label, spec):
    result = admit(resource(copy.deepcopy(spec)), cluster_schema)
    assert result.allowed, result.explain()
    stored = parse_spec(result.stored["spec"], name="autotek", cluster=True)
    assert stored == parse_spec(copy.deepcopy(spec), name="autotek", cluster=True)
    assert stored.client_secret_ref.namespace == spec["clientSecretRef"]["namespace"]


def test_valid_table_carries_the_namespaced_variants():
    assert len(CARRIED_VALID) >= len(test_crd.VALID) - 2


def test_minimal_spec_gets_the_namespaced_defaults(cluster_schema, schema):
    stored = admit(resource(minimal()), cluster_schema).stored["spec"]
    namespaced = admit(test_crd.resource(test_crd.minimal()), schema).stored["spec"]
    assert stored == {
        **namespaced,
        "namespaces": ["shop"],
        "clientSecretRef": {**namespaced["clientSecretRef"], "namespace": "autotek-system"},
    }


def test_unknown_fields_are_pruned(cluster_schema):
    """Without strict field validation the API server drops what the schema does not declare."""
    spec = minimal(rolloutRestartTargets=[{"kind": "Deployment", "name": "web"}], junk=1)
    spec["clientSecretRef"]["extra"] = "x"
    spec["namespaceSelector"] = {"matchLabels": {"a": "b"}, "namespaces": ["x"]}
    result = admit(resource(spec), cluster_schema, strict=False)
    assert result.allowed, result.explain()
    assert "rolloutRestartTargets" not in result.stored["spec"] and "junk" not in result.stored["spec"]
    assert "extra" not in result.stored["spec"]["clientSecretRef"]
    assert result.stored["spec"]["namespaceSelector"] == {"matchLabels": {"a": "b"}}
    strict = admit(resource(spec), cluster_schema)
    assert {p.path for p in strict.problems if p.kind == "unknown"} == {
        "spec.rolloutRestartTargets",
        "spec.junk",
        "spec.clientSecretRef.extra",
        "spec.namespaceSelector.namespaces",
    }


# ============================================================================================
# Status


STATUS = {
    **{k: v for k, v in test_crd.STATUS.items() if k != "pendingRestarts"},
    "conditions": [
        {
            "type": "Ready",
            "status": "False",
            "reason": "NamespacesNotProvisioned",
            "message": "2 of 1000 selected namespaces not provisioned: shop (TargetConflict), web (TargetNotFound)",
            "lastTransitionTime": "2026-11-28T03:10:00Z",
            "observedGeneration": 3,
        }
    ],
    "namespaces": {"selected": 1000, "provisioned": 998, "failed": 2, "summary": "998/1000"},
    "failedNamespaces": [
        {"namespace": "shop", "reason": "TargetConflict", "message": "Secret shop/autotek-token is not ours"},
        {"namespace": "web", "reason": "TargetNotFound", "message": "no Secret web/autotek-token"},
    ],
}


def test_status_fields(cluster_schema, schema):
    namespaced = set(crdcheck.schema_at(schema, "status")["properties"])
    assert set(crdcheck.schema_at(cluster_schema, "status")["properties"]) == set(STATUS)
    assert set(STATUS) == (namespaced - {"pendingRestarts"}) | {"namespaces", "failedNamespaces"}
    assert crdcheck.schema_at(cluster_schema, "status.failedNamespaces")["maxItems"] == c.MAX_FAILED_NAMESPACES
    conditions = crdcheck.schema_at(cluster_schema, "status.conditions")
    assert conditions == crdcheck.schema_at(schema, "status.conditions") | {"description": conditions["description"]}


def test_status_conditions_name_the_cluster_reasons(cluster_schema):
    text = re.sub(r"\s+", " ", crdcheck.schema_at(cluster_schema, "status.conditions")["description"])
    for reason in (
        c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED,
        c.REASON_NAMESPACES_NOT_PROVISIONED,
        c.REASON_NO_NAMESPACES_SELECTED,
        c.REASON_INVALID_SPEC,
        c.REASON_EXPIRED,
    ):
        assert reason in text


def test_status_example_is_admitted(cluster_schema):
    result = admit({**resource(minimal()), "status": STATUS}, cluster_schema)
    assert result.allowed, result.explain()


@pytest.mark.parametrize(
    ("change", "path", "kind"),
    [
        (
            {"failedNamespaces": [{"namespace": f"n{i}", "reason": "TargetConflict"} for i in range(21)]},
            "status.failedNamespaces",
            "maxItems",
        ),
        ({"failedNamespaces": [{"namespace": "shop"}]}, "status.failedNamespaces[0]", "required"),
        ({"namespaces": {"selected": -1}}, "status.namespaces.selected", "minimum"),
        ({"namespaces": {"failed": "2"}}, "status.namespaces.failed", "type"),
        ({"pendingRestarts": []}, "status.pendingRestarts", "unknown"),
        ({"expiresAt": "soon"}, "status.expiresAt", "format"),
    ],
)
def test_bad_status_is_rejected(cluster_schema, change, path, kind):
    result = admit({**resource(minimal()), "status": {**STATUS, **change}}, cluster_schema)
    assert any(p.path == path and p.kind == kind for p in result.problems), result.explain()


# ============================================================================================
# Examples


def test_cluster_example_exists():
    assert "cluster-credential.yaml" in {name for name, _ in EXAMPLES}


@pytest.mark.parametrize(("filename", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_is_admitted_and_parsed(cluster_schema, filename, doc):
    result = admit(doc, cluster_schema)
    assert result.allowed, f"{filename}:\n{result.explain()}"
    assert doc["apiVersion"] == c.API_VERSION
    assert "namespace" not in doc["metadata"]
    name = doc["metadata"]["name"]
    assert parse_spec(doc["spec"], name=name, cluster=True) == parse_spec(
        result.stored["spec"], name=name, cluster=True
    )


def test_example_client_secret_is_in_the_default_allowed_namespace():
    docs = crdcheck.load_documents(crdcheck.EXAMPLES_DIR / "cluster-credential.yaml")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (credential,) = [d for d in docs if d["kind"] == c.CLUSTER_KIND]
    ref = credential["spec"]["clientSecretRef"]
    assert (secret["metadata"]["namespace"], secret["metadata"]["name"]) == (ref["namespace"], ref["name"])
    assert ref["namespace"] == "autotek-system"
    assert set(secret["stringData"]) == {c.DEFAULT_CLIENT_ID_KEY, c.DEFAULT_CLIENT_SECRET_KEY}


def test_consumer_example_is_selected_and_mounts_the_target():
    (credential,) = [
        d
        for d in crdcheck.load_documents(crdcheck.EXAMPLES_DIR / "cluster-credential.yaml")
        if d["kind"] == c.CLUSTER_KIND
    ]
    docs = crdcheck.load_documents(crdcheck.EXAMPLES_DIR / "cluster-credential-consumer.yaml")
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    selection = parse_spec(credential["spec"], name=credential["metadata"]["name"], cluster=True).namespaces
    assert selection is not None
    assert selection.selects(namespace["metadata"]["name"], namespace["metadata"]["labels"])
    assert not selection.selects("unlabelled", {})
    assert pod["metadata"]["namespace"] == namespace["metadata"]["name"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["secret"]["secretName"] == credential["spec"]["target"]["name"]
    for container in pod["spec"]["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert all("subPath" not in m for m in container["volumeMounts"])
