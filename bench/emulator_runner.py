"""The Kubernetes API emulator for the benchmark: the dev emulator plus a private ``/_bench/`` API.

Run as ``python bench/emulator_runner.py --port 0 --kubeconfig PATH``; prints ``EMULATOR READY <url>``.

``BenchEmulator`` subclasses ``autotek_operator.dev.emulator.Emulator`` (which is not changed) and
adds, on paths the operator never calls:

- ``POST /_bench/seed`` ``{"resource": "v1/secrets", "namespace": ns, "items": [body, ...]}``: creates
  every item through the emulator's own ``_create`` (server-side metadata, ADDED watch events),
  in one request. Seeding 10 000 objects this way takes well under a second, against tens of
  seconds through the API; it runs on the emulator's event loop, like any request, so it is as
  safe as a burst of POSTs arriving at once.
- ``GET /_bench/ready?namespace=ns``: how many AutoTekCredentials in ``ns`` exist and how many have
  ``Ready=True`` -- the same answer as a LIST, counted server-side so that polling at 10 000
  objects does not serialise megabytes of JSON every half second.
- ``POST /_bench/gets/reset`` and ``GET /_bench/gets?namespace=ns``: the distinct Secrets of ``ns``
  read by a GET since the reset (to tell when a restarted operator has looked at every target);
  ``GET /_bench/lists``: LIST requests, and watches refused as too old (410, which make a client
  list again), by resource, since the same reset.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock

from autotek_operator.dev import emulator as emu

CREDENTIALS = kmock.resource("autotek.io/v1alpha1/autotekcredentials")


class BenchEmulator(emu.Emulator):
    """The dev emulator with the benchmark's private endpoints."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # attrs slots: the subclass has a __dict__, so plain attributes work here.
        self.bench_gets: set[tuple[str | None, str]] = set()
        #: LIST requests and watches refused as too old (410), by plural: relists show up here.
        self.bench_lists: collections.Counter[str] = collections.Counter()

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path.startswith("/_bench/"):
            try:
                return await self._bench(raw)
            except emu.ApiError as e:
                return aiohttp.web.json_response(e.status(), status=e.code)
        return await super().__call__(raw)

    async def _serve(self, rq: Any, raw: aiohttp.web.BaseRequest, watching: bool) -> aiohttp.web.StreamResponse:
        if not watching and rq.method.value == "GET" and rq.subresource is None and rq.resource is not None:
            if rq.name is None:
                self.bench_lists["list " + rq.resource.plural] += 1
            elif rq.resource == emu.SECRETS:
                self.bench_gets.add((rq.namespace, rq.name))
        if watching and rq.resource is not None:
            since = rq.params.get("resourceVersion") or "0"
            if since.isdigit() and since != "0" and int(since) < self._floor:
                self.bench_lists["watch 410 " + rq.resource.plural] += 1
        return await super()._serve(rq, raw, watching)

    async def _bench(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path, method = raw.path, raw.method
        if method == "POST" and path == "/_bench/seed":
            doc = await raw.json()
            res = kmock.resource(doc["resource"])
            ns = doc.get("namespace")
            created = 0
            for item in doc["items"]:
                self._create(res, ns, item)
                created += 1
                if created % 500 == 0:
                    await asyncio.sleep(0)  # let watch streams drain between slices
            return aiohttp.web.json_response({"created": created, "resourceVersion": str(self._rv)})
        if method == "GET" and path == "/_bench/ready":
            ns = raw.query.get("namespace")
            total = ready = 0
            for (res, obj_ns, _), found in self._objects._objects.items():
                if res != CREDENTIALS or obj_ns != ns or found.deleted:
                    continue
                total += 1
                for cond in (found.raw.get("status") or {}).get("conditions") or ():
                    if cond.get("type") == "Ready" and cond.get("status") == "True":
                        ready += 1
                        break
            return aiohttp.web.json_response({"total": total, "ready": ready})
        if method == "GET" and path == "/_bench/lists":
            return aiohttp.web.json_response(dict(self.bench_lists))
        if method == "POST" and path == "/_bench/gets/reset":
            self.bench_gets.clear()
            self.bench_lists.clear()
            return aiohttp.web.json_response({"reset": True})
        if method == "GET" and path == "/_bench/gets":
            ns = raw.query.get("namespace")
            return aiohttp.web.json_response({"distinct": sum(1 for k in self.bench_gets if k[0] == ns)})
        raise emu.ApiError(404, "NotFound", path)


async def _serve_until_signalled(port: int, kubeconfig_path: Path | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with BenchEmulator().serve(port) as url:
        if kubeconfig_path is not None:
            emu.write_kubeconfig(url, kubeconfig_path)
        print(f"EMULATOR READY {url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The API emulator with the benchmark's /_bench/ endpoints.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", type=Path)
    args = parser.parse_args(argv)
    asyncio.run(_serve_until_signalled(args.port, args.kubeconfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
