"""The token-endpoint double for the benchmark: ``autotek_operator.dev.broker`` with a longer memory.

Run as ``python bench/broker_runner.py --port 0``; prints ``BROKER READY <url>``.

The dev broker keeps the last 1000 token requests in ``/_stats``; at 10 000 credentials the
benchmark needs every request's time, so this runner raises that limit (a module constant, read
when statistics are reset) and adds two compact read-only views on paths the operator never calls:

- ``GET /_bench/summary?prefix=P``: ``{count, count_all, by_status, max_concurrency, in_flight,
  clients: {n: how many clients whose id starts with P made n requests}}`` where ``count`` counts
  the requests of those clients only (all requests without a prefix) -- cheap to poll;
- ``GET /_bench/times?since=T``: ``[[time, client_id, status], ...]`` for requests recorded at or
  after ``T`` (a UNIX time).

Everything else (``/_control``, ``/_stats``, the token endpoint) is the dev broker unchanged.
"""

from __future__ import annotations

import collections
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autotek_operator.dev import broker

broker.REQUEST_LOG_SIZE = 10_000_000

_original_get = broker._Handler.do_GET


def _do_get(self: Any) -> None:
    parts = urlsplit(self.path)
    state = self.server.state
    if parts.path == "/_bench/summary":
        prefix = (parse_qs(parts.query).get("prefix") or [""])[0]
        with state.lock:
            mine = [n for c, n in state.by_client.items() if c.startswith(prefix)]
            hist = collections.Counter(mine)
            doc = {
                "count": sum(mine) if prefix else state.count,
                "count_all": state.count,
                "by_status": dict(state.by_status),
                "max_concurrency": state.max_concurrency,
                "in_flight": state.in_flight,
                "clients": {str(k): v for k, v in sorted(hist.items())},
            }
        self._send_json(200, doc)
    elif parts.path == "/_bench/times":
        since = float((parse_qs(parts.query).get("since") or ["0"])[0])
        with state.lock:
            rows = [[r["time"], r["client_id"], r["status"]] for r in state.requests if r["time"] >= since]
        self._send_json(200, rows)
    else:
        _original_get(self)


broker._Handler.do_GET = _do_get  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(broker.main())
