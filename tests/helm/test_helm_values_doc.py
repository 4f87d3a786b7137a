"""values.yaml, values.schema.json and the values table in docs/operations.md stay in step.

A leaf is a key of values.yaml whose value is not a mapping the schema describes key by key
(``image.tag`` is a leaf, ``image`` is not; ``affinity`` and ``resources.limits`` are leaves, since
their contents are Kubernetes' and not ours).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from helm.helmkit import CHART, REPO

DOC = REPO / "docs" / "operations.md"
TABLE_HEADING = "### Helm values"


def values() -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def leaves(tree: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        sub = node.get("properties", {}).get(key)
        assert sub is not None, f"{path} is in values.yaml but not in values.schema.json"
        if isinstance(value, dict) and value and "properties" in sub:
            yield from leaves(value, sub, f"{path}.")
        else:
            yield path, value


def documented() -> dict[str, str]:
    """Rows of the values table: key -> default cell."""
    text = DOC.read_text()
    assert TABLE_HEADING in text, f"{DOC.name} has no section {TABLE_HEADING!r}"
    section = text.split(TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            assert m[1] not in rows, f"{m[1]} is in the table twice"
            assert m[3].strip(), f"{m[1]} has no meaning in the table"
            rows[m[1]] = m[2]
    return rows


def comments() -> dict[str, str]:
    """The comment lines right above each key of values.yaml, by dotted path."""
    out: dict[str, str] = {}
    stack: list[str] = []
    pending: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if m:
            stack = [*stack[: len(m[1]) // 2], m[2]]
            out[".".join(stack)] = " ".join(p for p in pending if not p.startswith("--"))
        pending = []
    return out


def test_every_value_is_in_the_schema_and_the_table_and_back() -> None:
    leaf = dict(leaves(values(), schema()))
    rows = documented()
    assert sorted(set(leaf) - set(rows)) == [], f"values missing from the table in docs/operations.md ({TABLE_HEADING})"
    assert sorted(set(rows) - set(leaf)) == [], "the table in docs/operations.md lists values that values.yaml lacks"


def test_the_table_shows_the_defaults() -> None:
    leaf = dict(leaves(values(), schema()))
    wrong = {}
    for key, cell in documented().items():
        m = re.fullmatch(r"`(.*)`", cell.strip())
        if not m or yaml.safe_load(m[1]) != leaf.get(key):
            wrong[key] = (cell, leaf.get(key))
    assert not wrong, f"defaults in docs/operations.md differ from values.yaml (table cell, values.yaml): {wrong}"


def test_every_value_is_commented_in_values_yaml() -> None:
    found = comments()
    bare = [key for key, _ in leaves(values(), schema()) if not found.get(key)]
    assert bare == [], f"values without a comment above them in values.yaml: {bare}"


def test_every_schema_property_has_a_default_in_values_yaml() -> None:
    """The schema describes nothing that values.yaml lacks (global is Helm's own)."""

    def paths(node: dict[str, Any], tree: Any, prefix: str = "") -> Iterator[str]:
        for key, sub in node.get("properties", {}).items():
            if isinstance(tree, dict) and key not in tree and f"{prefix}{key}" != "global" and tree:
                yield f"{prefix}{key}"
            elif isinstance(tree, dict) and isinstance(tree.get(key), dict) and tree.get(key):
                yield from paths(sub, tree[key], f"{prefix}{key}.")

    assert list(paths(schema(), values())) == [], "values.schema.json has properties values.yaml does not set"
