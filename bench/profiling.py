"""Summaries of py-spy's raw (collapsed-stack) output: where the operator's samples went."""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Package groups, first match wins (by a fragment of the file path).
GROUPS = (
    ("autotek_operator", "autotek_operator (operator code)"),
    ("/kopf/", "kopf"),
    ("/kubernetes/", "kubernetes client"),
    ("/urllib3/", "urllib3"),
    ("/requests/", "requests"),
    ("/prometheus_client/", "prometheus_client"),
    ("/aiohttp/", "aiohttp"),
    ("/json/", "json"),
    ("/asyncio/", "asyncio"),
    ("/logging/", "logging"),
    ("/concurrent/", "concurrent.futures"),
    ("/threading.py", "threading"),
    ("/selectors.py", "selectors"),
    ("/random.py", "random"),
    ("/http/", "http.client"),
    ("/ssl.py", "ssl"),
    ("/socket.py", "socket"),
    ("/copy.py", "copy"),
    ("/email/", "email (header parsing)"),
    ("/dateutil/", "dateutil"),
)


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "operator/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _group(path: str) -> str:
    probe = "/" + path
    for fragment, name in GROUPS:
        if fragment in probe:
            return name
    return "other: " + _short(path).split("/")[0]


def summarise(raw_path: Path, top: int = 25) -> dict[str, Any]:
    """Self and cumulative shares by function, and self shares by package, from ``py-spy -f raw``."""
    self_counts: collections.Counter[str] = collections.Counter()
    cum_counts: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    op_cum: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            if m is None:
                frames.append((frame.strip(), ""))
            else:
                frames.append((f"{m['func']} ({_short(m['file'])})", m["file"]))
        if not frames:
            continue
        leaf, leaf_file = frames[-1]
        self_counts[leaf] += count
        groups[_group(leaf_file)] += count
        for name in {f for f, _ in frames}:
            cum_counts[name] += count
        # The innermost operator frame on the stack: which of the operator's functions led here.
        for name, path in reversed(frames):
            if "autotek_operator" in path:
                op_cum[name] += count
                break

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "pct": round(100.0 * v / total, 1)} for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "by_package_self": rows(groups),
        "top_cumulative": rows(cum_counts),
        "top_self": rows(self_counts),
        "innermost_operator_frame": rows(op_cum),
    }
