"""Logging setup: human-readable text by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

#: Lines about one credential start with "<namespace>/<name>: " (the operator's convention).
_CREDENTIAL = re.compile(r"^([a-z0-9][-a-z0-9]*)/([a-z0-9][-a-z0-9.]*): ")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; lines about a credential carry ``namespace`` and ``name`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        match = _CREDENTIAL.match(message) if record.name == "autotek_operator" else None
        if match:
            doc["namespace"], doc["name"] = match.group(1), match.group(2)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The HTTP libraries log URLs and headers at DEBUG; keep them at WARNING at any level.
    for noisy in ("urllib3", "requests", "kubernetes", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf reports every watch event it handles ("Handler ... succeeded") at INFO; the operator
    # logs its own outcomes, so keep kopf's per-object lines for DEBUG.
    if level != "DEBUG":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
