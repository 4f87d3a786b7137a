"""Check resources against the autotek.io CRDs the way a Kubernetes API server would.

Without a cluster, this module emulates what kube-apiserver does with a custom resource on create:

1. unknown fields: reported as errors (``kubectl`` sends ``fieldValidation=Strict`` by default) and
   pruned (what the API server stores when a client does not ask for strict validation);
2. ``null`` for a field that is not ``nullable``: replaced by the field's default, else dropped;
3. schema defaults: applied top-down before validation, including inside defaulted objects;
4. OpenAPI v3 validation: via ``jsonschema`` (Draft 4 semantics, which OpenAPI v3.0 follows), with
   ``pattern`` matched by RE2 like Go's ``regexp`` (``$`` is the end of the text, not "before a
   final newline") and the ``date-time`` / ``int32`` / ``int64`` formats checked;
5. ``x-kubernetes-list-type`` ``map`` / ``set``: unique keys / items;
6. ``x-kubernetes-validations``: every CEL rule evaluated with cel-python where its node is present,
   ``self`` bound to that node. A rule cel-python cannot compile raises :class:`RuleCompileError`
   (never a silent skip); a rule that fails to evaluate counts as a rejection, as in Kubernetes.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import re2
import yaml
from celpy import celtypes

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "autotekcredentials.autotek.io.yaml"
CLUSTER_CRD_PATH = REPO / "crds" / "clusterautotekcredentials.autotek.io.yaml"
EXAMPLES_DIR = REPO / "examples"

_K8S_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


# --------------------------------------------------------------------------------------------
# Loading


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All YAML documents in a file, skipping empty ones."""
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    (crd,) = load_documents(path)
    return crd


def version_entry(crd: dict[str, Any], version: str = "v1alpha1") -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v
    raise KeyError(f"CRD has no version {version}")


def openapi_schema(crd: dict[str, Any], version: str = "v1alpha1") -> dict[str, Any]:
    return version_entry(crd, version)["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------------------------
# Walking a schema


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def iter_schema(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path: ``spec.extraParams[*]`` for map values, ``x[]`` for items."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from iter_schema(sub, _join(path, name))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_schema(schema["additionalProperties"], f"{path}[*]")
    if isinstance(schema.get("items"), dict):
        yield from iter_schema(schema["items"], f"{path}[]")


# kube-apiserver forbids anything but ``type: object`` on the root ``metadata`` (a description
# there fails CRD validation: "must not specify anything other than name and generateName").
UNDESCRIBABLE = frozenset({"metadata"})


def missing_descriptions(schema: dict[str, Any]) -> list[str]:
    """Paths of schema nodes below the root that have no non-empty ``description``."""
    return [
        p
        for p, node in iter_schema(schema)
        if p and p not in UNDESCRIBABLE and not str(node.get("description", "")).strip()
    ]


def root_metadata_problems(schema: dict[str, Any]) -> list[str]:
    """What kube-apiserver would refuse on the root ``metadata`` schema (only name/generateName may be set)."""
    meta = dict((schema.get("properties") or {}).get("metadata") or {})
    props = meta.pop("properties", {}) or {}
    meta.pop("type", None)
    out = [f"metadata.{key}" for key in meta]
    out += [f"metadata.properties.{key}" for key in props if key not in ("name", "generateName")]
    return out


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema node for a dotted property path such as ``spec.refresh.renewBefore``."""
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def all_rules(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every ``x-kubernetes-validations`` entry with the path of the node it sits on."""
    return [(p, rule) for p, node in iter_schema(schema) for rule in node.get("x-kubernetes-validations", [])]


# --------------------------------------------------------------------------------------------
# Pruning and defaulting


def _declares_fields(schema: dict[str, Any]) -> bool:
    return "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields")


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of fields the schema does not declare (what strict field validation rejects)."""
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for key, value in obj.items():
            if key in props:
                out += unknown_fields(value, props[key], _join(path, key))
            elif isinstance(schema.get("additionalProperties"), dict):
                out += unknown_fields(value, schema["additionalProperties"], _join(path, key))
            elif _declares_fields(schema):
                out.append(_join(path, key))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def prune(obj: Any, schema: dict[str, Any]) -> Any:
    """A copy of ``obj`` without the fields the schema does not declare, as the API server stores it."""
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            if key in props:
                out[key] = prune(value, props[key])
            elif isinstance(extra, dict):
                out[key] = prune(value, extra)
            elif not _declares_fields(schema):
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return copy.deepcopy(obj)


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """A copy of ``obj`` with schema defaults applied the way kube-apiserver applies them.

    For each declared property of an object: when it is missing, or ``null`` without ``nullable``,
    its ``default`` is set; then every value is defaulted recursively (so ``default: {}`` brings
    the nested defaults along); finally ``null`` values of non-nullable fields without a default
    are dropped. Map values and list items are defaulted with their own schemas.
    """
    obj = copy.deepcopy(obj)
    _default_in_place(obj, schema)
    return obj


def _default_in_place(obj: Any, schema: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for key, prop in props.items():
            if "default" in prop and (key not in obj or (obj[key] is None and not prop.get("nullable"))):
                obj[key] = copy.deepcopy(prop["default"])
        extra = schema.get("additionalProperties")
        for key in list(obj):
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is None:
                continue
            if obj[key] is None and not sub.get("nullable"):
                del obj[key]
            else:
                _default_in_place(obj[key], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _default_in_place(item, schema["items"])


# --------------------------------------------------------------------------------------------
# OpenAPI v3 -> JSON Schema


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """Translate the Kubernetes OpenAPI v3 subset into JSON Schema (Draft 4).

    ``x-kubernetes-*`` keys are dropped (list types and CEL rules are checked separately),
    ``nullable: true`` admits ``null``, ``x-kubernetes-int-or-string`` becomes ``anyOf``.
    """
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII)
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    dt.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    return True


@FORMATS.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


OpenAPIValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


# --------------------------------------------------------------------------------------------
# CEL


class RuleCompileError(Exception):
    """cel-python cannot compile a rule: the emulation cannot judge it, so the check fails."""


_CEL_ENV = celpy.Environment()


@functools.cache
def compile_rule(rule: str) -> Any:
    try:
        return _CEL_ENV.program(_CEL_ENV.compile(rule))
    except Exception as exc:
        raise RuleCompileError(f"cel-python cannot compile rule {rule!r}: {exc}") from exc


def evaluate_rule(rule: str, value: Any) -> tuple[bool, str]:
    """(passed, detail) for one rule with ``self`` bound to ``value``; an evaluation error fails."""
    program = compile_rule(rule)
    try:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
    except Exception as exc:
        return False, f"evaluation error: {exc}"
    if isinstance(result, celpy.evaluation.CELEvalError):
        return False, f"evaluation error: {result.args}"
    if not isinstance(result, celtypes.BoolType):
        return False, f"rule returned {type(result).__name__}, not bool"
    return bool(result), ""


# --------------------------------------------------------------------------------------------
# Admission


@dataclass(frozen=True)
class Problem:
    path: str  # dotted path of the offending node ("" for the object itself)
    kind: str  # a JSON Schema keyword (required, enum, pattern, ...), "rule", "unknown", "duplicate"
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: [{self.kind}] {self.message}"


@dataclass
class Admission:
    stored: Any  # the object as the API server would store it (pruned, defaulted)
    problems: list[Problem] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        return "\n".join(map(str, self.problems)) or "admitted"


def _error_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _type_matches(value: Any, schema: dict[str, Any]) -> bool:
    expected = schema.get("type")
    if expected is None:
        return True
    if isinstance(value, bool) and expected != "boolean":
        return False
    return isinstance(value, _K8S_TYPES.get(expected, (object,)))


def _walk_values(obj: Any, schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Every present value with its path and schema node (values of the wrong type are not entered)."""
    if obj is None or not _type_matches(obj, schema):
        return
    yield path, obj, schema
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if key in props:
                yield from _walk_values(value, props[key], _join(path, key))
            elif isinstance(extra, dict):
                yield from _walk_values(value, extra, _join(path, key))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from _walk_values(item, schema["items"], f"{path}[{i}]")


def list_type_problems(obj: Any, schema: dict[str, Any]) -> list[Problem]:
    out = []
    for path, value, node in _walk_values(obj, schema):
        list_type = node.get("x-kubernetes-list-type")
        if not isinstance(value, list) or list_type not in ("map", "set"):
            continue
        keys = node.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for i, item in enumerate(value):
            if list_type == "map":
                ident = repr([item.get(k) if isinstance(item, dict) else item for k in keys])
            else:
                ident = repr(item)
            if ident in seen:
                out.append(Problem(f"{path}[{i}]", "duplicate", f"duplicate entry {ident}"))
            seen.add(ident)
    return out


def rule_problems(obj: Any, schema: dict[str, Any]) -> list[Problem]:
    """Evaluate every CEL rule on every present node it applies to."""
    out = []
    for path, value, node in _walk_values(obj, schema):
        for rule in node.get("x-kubernetes-validations", []):
            passed, detail = evaluate_rule(rule["rule"], value)
            if not passed:
                message = rule.get("message") or f"failed rule: {rule['rule']}"
                out.append(Problem(path, "rule", f"{message} ({detail})" if detail else message))
    return out


def admit(obj: Any, schema: dict[str, Any], *, strict: bool = True) -> Admission:
    """Emulate a create request: unknown fields, pruning, defaulting, schema validation, CEL rules."""
    problems = [Problem(p, "unknown", "unknown field") for p in unknown_fields(obj, schema)] if strict else []
    stored = apply_defaults(prune(obj, schema), schema)
    validator = OpenAPIValidator(to_jsonschema(schema), format_checker=FORMATS)
    for error in sorted(validator.iter_errors(stored), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(Problem(_error_path(error.absolute_path), str(error.validator), error.message))
    problems += list_type_problems(stored, schema)
    problems += rule_problems(stored, schema)
    return Admission(stored, problems)
