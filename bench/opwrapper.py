"""``python bench/opwrapper.py run``: the operator's own entry point, plus a memory census on SIGUSR1.

Used only by the profile phase (the other phases run ``python -m autotek_operator run`` itself).
On SIGUSR1 the main thread -- the operator's event loop, so nothing runs meanwhile -- writes
to ``BENCH_CENSUS_OUT`` (JSON):

- the deep size (objects reachable, each counted once, modules/classes/functions excluded) of the
  operator's own structures: ``Runtime.states`` (and per field of ``CredentialState``), its
  indexes, ``secret_versions``, the heap, the shared-token cache, the Prometheus registry, and
  kopf's per-object memories;
- the live objects by type (count and shallow bytes), from the garbage collector;
- with ``BENCH_TRACEMALLOC=1`` (tracemalloc started before any import; slow: 3-4x CPU), the top
  allocation sites by line and by file.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import tracemalloc
import types
from collections import Counter
from collections.abc import Iterable
from typing import Any

if os.environ.get("BENCH_TRACEMALLOC") == "1":
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))

_SKIP = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def deep_size(roots: Iterable[Any], seen: set[int]) -> tuple[int, int]:
    """(bytes, objects) reachable from ``roots`` and not in ``seen`` (which is updated)."""
    total = count = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj, 0)
        count += 1
        stack.extend(gc.get_referents(obj))
    return total, count


def _module(obj: Any) -> str:
    name = type(obj).__dict__.get("__module__") if isinstance(type(obj).__dict__, dict) else None
    name = name if isinstance(name, str) else getattr(type(obj), "__module__", "")
    return name if isinstance(name, str) else ""


def _describe(ref: Any) -> str:
    """A hint of what a referrer is: for a dict, a few of its keys."""
    if isinstance(ref, dict):
        return " keys=" + ",".join(sorted(str(k)[:24] for k in list(ref)[:4]))
    return ""


def _shape(x: Any) -> str:
    """An item's shape without its content (no secret can show): type, and for tuples their members' types."""
    if isinstance(x, tuple):
        return "(" + ", ".join(type(y).__qualname__ for y in x) + ")"
    return type(x).__qualname__


def _census() -> dict[str, Any]:
    from autotek_operator import handlers

    started = time.monotonic()
    out: dict[str, Any] = {}
    # First what the garbage collector sees, before this census allocates anything big.
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = _module(obj) + "." + type(obj).__qualname__
        by_type[name] += 1
        bytes_by_type[name] += sys.getsizeof(obj, 0)
    out["gc_objects_by_type"] = [
        {"type": t, "count": by_type[t], "kib": round(b / 1024, 1)} for t, b in bytes_by_type.most_common(25)
    ]
    out["gc_tracked_objects"] = sum(by_type.values())
    # Who holds the sets and dicts, by bytes: one pass maps each object to a holder, then a set's
    # or dict's holder is followed through plain dicts (an instance's __dict__) to its owner.
    everything = gc.get_objects()
    holder: dict[int, Any] = {}
    for obj in everything:
        for ref in gc.get_referents(obj):
            if isinstance(ref, (set, dict)) and id(ref) not in holder:
                holder[id(ref)] = obj
    holders: dict[str, list[dict[str, Any]]] = {}
    for kind in (set, dict):
        owners: Counter[str] = Counter()
        owner_bytes: Counter[str] = Counter()
        for obj in everything:
            if type(obj) is not kind:
                continue
            h = holder.get(id(obj))
            for _ in range(3):
                if isinstance(h, dict) and id(h) in holder:
                    h = holder[id(h)]
                else:
                    break
            name = "(none)" if h is None else _module(h) + "." + type(h).__qualname__
            owners[name] += 1
            owner_bytes[name] += sys.getsizeof(obj, 0)
        holders[kind.__name__] = [
            {"holder": k, "count": owners[k], "kib": round(b / 1024, 1)} for k, b in owner_bytes.most_common(8)
        ]
    # The largest sets and dicts themselves: their length and what their items are.
    big = sorted((o for o in everything if type(o) in (set, dict)), key=lambda o: sys.getsizeof(o, 0), reverse=True)[:6]
    out["largest_sets_and_dicts"] = [
        {
            "type": type(o).__name__,
            "len": len(o),
            "kib": round(sys.getsizeof(o, 0) / 1024, 1),
            "item_types": dict(Counter(type(x).__qualname__ for x in list(o)[:1000]).most_common(3)),
            "sample": [_shape(x) for x in list(o)[:3]],
        }
        for o in big
    ]
    del everything, holder, big
    out["set_and_dict_holders"] = holders
    rt = handlers.STATE.runtime
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        REGISTRY = None
    kopf_roots = [
        o
        for o in gc.get_objects()
        if _module(o).startswith("kopf.") and type(o).__name__ in ("ResourceMemories", "ResourceMemory")
    ]
    # What modules hold statically is shared, not charged to credentials; the structures
    # measured below are fenced off from that pass.
    fence = {id(x) for x in (rt, REGISTRY, *kopf_roots) if x is not None}
    shared_seen: set[int] = set(fence)
    deep_size([sys.modules], shared_seen)
    sizes: dict[str, dict[str, Any]] = {}
    if rt is not None:
        n = max(1, len(rt.states))
        out["credentials"] = len(rt.states)
        seen = shared_seen - fence
        # Field by field over all states, so that each field's share is visible.
        fields = [f for f in rt.states[next(iter(rt.states))].__dataclass_fields__] if rt.states else []
        for name in fields:
            b, c = deep_size((getattr(st, name) for st in rt.states.values()), seen)
            sizes[f"states.{name}"] = {"kib": round(b / 1024, 1), "objects": c, "bytes_per_credential": round(b / n)}
        b, c = deep_size([rt.states], seen)
        sizes["states (dict, keys, dataclass shells)"] = {
            "kib": round(b / 1024, 1),
            "objects": c,
            "bytes_per_credential": round(b / n),
        }
        for attr in ("secret_versions", "client_index", "target_index", "refs", "_heap", "_due", "pending"):
            if hasattr(rt, attr):
                b, c = deep_size([getattr(rt, attr)], seen)
                sizes[f"runtime.{attr}"] = {
                    "kib": round(b / 1024, 1),
                    "objects": c,
                    "bytes_per_credential": round(b / n),
                }
        tokens = getattr(rt.deps, "tokens", None)
        if tokens is not None and hasattr(tokens, "_recent"):
            b, c = deep_size([tokens._recent], seen)
            sizes["shared tokens cache"] = {
                "kib": round(b / 1024, 1),
                "objects": c,
                "bytes_per_credential": round(b / n),
            }
        if REGISTRY is not None:
            b, c = deep_size([REGISTRY], seen)
            sizes["prometheus registry"] = {
                "kib": round(b / 1024, 1),
                "objects": c,
                "bytes_per_credential": round(b / n),
            }
        b, c = deep_size(kopf_roots, seen)
        sizes["kopf ResourceMemories"] = {"kib": round(b / 1024, 1), "objects": c, "bytes_per_credential": round(b / n)}
        out["structures"] = sizes
    out["census_seconds"] = round(time.monotonic() - started, 2)
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot().filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),))
        current, peak = tracemalloc.get_traced_memory()

        def top(key: str, limit: int) -> list[dict[str, Any]]:
            return [
                {
                    "where": str(s.traceback[0]) if key == "lineno" else s.traceback[0].filename,
                    "kib": round(s.size / 1024, 1),
                    "blocks": s.count,
                }
                for s in snapshot.statistics(key)[:limit]
            ]

        out["tracemalloc"] = {
            "traced_kib": current // 1024,
            "traced_peak_kib": peak // 1024,
            "by_line": top("lineno", 30),
            "by_file": top("filename", 20),
        }
    return out


def _dump(signum: int, frame: Any) -> None:
    try:
        doc = _census()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports it
        doc = {"error": f"{type(exc).__name__}: {exc}"}
    path = os.environ.get("BENCH_CENSUS_OUT", "census.json")
    with open(path + ".tmp", "w") as out:
        json.dump(doc, out, indent=1)
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    from autotek_operator.__main__ import main

    sys.exit(main(sys.argv[1:]))
