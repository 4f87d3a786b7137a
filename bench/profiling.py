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


#: What a worker's pass spends its time on, by the call on the stack (first match wins, innermost
#: first): (label, file fragment, function names).
CALLS = (
    ("token request (TokenClient)", "token_client.py", ("request", "_post", "_exchange")),
    ("GET a Secret (the client Secret)", "kube.py", ("get_secret",)),
    ("create the target Secret", "kube.py", ("create_secret",)),
    ("patch/replace the target Secret", "kube.py", ("patch_secret", "replace_secret")),
    ("post the Event", "kube.py", ("create_event",)),
    ("patch the credential's status", "kube.py", ("patch_credential_status",)),
    ("other Kubernetes calls", "kube.py", ()),
)


def by_call(raw_path: Path) -> dict[str, Any]:
    """Samples by what they were doing: for the worker threads (a ``run_pass`` frame on the stack) the
    API call or token request under way, else the pass's own code; for the rest, which thread kind."""
    counts: collections.Counter[str] = collections.Counter()
    total = workers = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            if m is not None:
                frames.append((m["func"].rsplit(".", 1)[-1], m["file"]))
        ours = [(f, p) for f, p in frames if "autotek_operator" in p]
        if any(f == "run_pass" and "reconcile.py" in p for f, p in ours):
            workers += count
            label = "the pass's own code (parse, status, target data, scheduling)"
            for lbl, frag, funcs in CALLS:  # the most specific call on the stack wins
                if any(frag in p and (not funcs or f in funcs) for f, p in ours):
                    label = lbl
                    break
            counts["worker: " + label] += count
        elif any(p.endswith("autotek_operator/events.py") for _, p in frames):
            counts["Event recorder thread (posting Events, off the path to Ready)"] += count
        elif any("importlib" in p for _, p in frames):
            counts["start-up (imports)"] += count
        elif any(p.endswith("autotek_operator/watch.py") for _, p in frames):
            counts["watch threads (list, watch streams, parsing)"] += count
        elif any(x in "/" + p for _, p in frames for x in ("/kopf/", "/asyncio/", "/runtime.py")):
            counts["event loop (runtime, kopf, asyncio)"] += count
        else:
            counts["other"] += count
    return {
        "samples": total,
        "worker_samples": workers,
        "rows": [
            {
                "what": k,
                "samples": v,
                "pct_of_all": round(100.0 * v / total, 1) if total else 0.0,
                "pct_of_workers": round(100.0 * v / workers, 1) if workers and k.startswith("worker: ") else None,
            }
            for k, v in counts.most_common()
        ],
    }
