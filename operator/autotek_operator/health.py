"""Liveness (``/healthz``) and readiness (``/readyz``), served on the operator's event loop.

Both answer from the event loop itself, so an answer at all shows the loop is not stuck. Liveness
also fails once the scheduler has died. Readiness means the replica can do its job: its watches
have completed a list of every watched namespace, and leader election has an answer (leading or
following: a follower is ready too, ready to take over). A replica that cannot reach the API
server to renew or contend for the Lease is not ready.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp.web

log = logging.getLogger("autotek_operator")

#: () -> (ok, details): details are shown in the answer, never anything secret.
Check = Callable[[], tuple[bool, dict[str, Any]]]


def _answer(check: Check) -> Callable[[aiohttp.web.Request], Any]:
    async def handler(_: aiohttp.web.Request) -> aiohttp.web.Response:
        ok, details = check()
        return aiohttp.web.Response(
            status=200 if ok else 503, text=json.dumps(details, sort_keys=True), content_type="application/json"
        )

    return handler


async def serve(port: int, *, live: Check, ready: Check, host: str = "0.0.0.0") -> aiohttp.web.AppRunner:  # noqa: S104 - probes come from the kubelet
    """Start the probe server; stop it with ``await runner.cleanup()``."""
    app = aiohttp.web.Application()
    app.router.add_get("/healthz", _answer(live))
    app.router.add_get("/readyz", _answer(ready))
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    log.debug("probes served on port %d (/healthz, /readyz)", port)
    return runner
