"""Scale and speed benchmark of the real operator process (``make bench``; ``--help`` for options).

The API server is, in this order: the cluster named by ``AUTOTEK_BENCH_KUBECONFIG`` (throwaway
namespaces); a real control plane of its own, started with the tests' module ``tests/controlplane.py``
(etcd with its data on disk, kube-apiserver, kube-controller-manager), whenever the Kubernetes binaries
are in ``$KUBEBUILDER_ASSETS`` or ``.cache/envtest`` (``make envtest``); else the emulator, as its own
process. Each phase group below gets a fresh one, and a fresh token endpoint double (its own process,
one client per credential). On a control plane the operator and the lean loop authenticate as a
ServiceAccount bound to the ClusterRole of manifests/, and the operator's requests are counted by call
by the API server (APF counters of FlowSchemas that match only that ServiceAccount); the CPU of
kube-apiserver and etcd is read from /proc in every phase, as the operator's is.

For each N:

bare      the old bare loop: the first-issue work for N credentials with the kubernetes client and
          an Event (bench/bareloop.py), the baseline of the "ready" ratio
backlog   N credentials and their client Secrets exist, then the operator starts: time from the
          process's start until all N are Ready; CPU per credential, peak RSS, token requests,
          API requests per credential by call, API server and etcd CPU
lean      the lean loop (bench/leanloop.py): the minimum calls per credential with the cheapest client,
          at several concurrencies, each from the same start state as the backlog phase, on the same
          server; the headline ratio is the backlog's throughput / the best lean loop's
ready     N credentials created together -> all Ready=True, with the operator running; its CPU
          and peak RSS; token requests per credential at issue
rotation  the first refresh of all N (short lifetime): CPU per refresh, API requests per refresh,
          token requests per credential per cycle, spread of the refreshes
idle      60 s with N credentials held and none due: CPU as % of one core
restart   SIGTERM, a new operator: token requests it makes, time until every credential is confirmed
dedup     N credentials of ONE client (one client Secret): token requests per credential at issue
bad       N new credentials against a token endpoint answering 503: request rate, concurrency,
          operator RSS and threads
fanout    (largest N only; its own namespace count, --fanout-namespaces, default 1 000) one
          ClusterAutoTekCredential selecting that many labelled namespaces (created before it): time from
          its creation until every namespace's Secret holds the token (the Secrets watched cluster-wide)
          and until its status says provisioned == selected; token requests (1 expected); then, the
          first token short-lived (--fanout-lifetime), the time to rotate all of them (every Secret
          holding the second token); operator CPU per namespace write, peak RSS, API requests, API
          server and etcd CPU
profile   (largest N only) the backlog phase again with py-spy attached (--gil: samples whichever
          thread holds the GIL, i.e. where the Python CPU goes), broken down by call, then a memory
          census of the operator's structures (bench/opwrapper.py; tracemalloc too with --tracemalloc)

Results go to a table on stdout and to JSON (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as bk
import profiling

PHASES = ("bare", "backlog", "lean", "ready", "rotation", "idle", "restart", "dedup", "bad", "fanout", "profile")
LEAN_THREADS = "4,8,16,32"
LONG_LIFETIME = 3600.0
WORKERS = 16  # AUTOTEK_WORKERS default, used by the bare loop too
MAX_CONCURRENT_TOKEN_REQUESTS = 8  # AUTOTEK_MAX_CONCURRENT_TOKEN_REQUESTS default
FANOUT_LABEL = ("autotek.io/token", "true")
FANOUT_TARGET = "autotek-token"


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def mib(kib: float) -> float:
    return round(kib / 1024.0, 1)


# -- measurements ----------------------------------------------------------------------------------


def seed(cluster: bk.Cluster, broker: bk.Broker, name: str, n: int) -> tuple[str, str, float]:
    """Long-lived tokens; a "bench-warm" namespace with one client Secret (for the sentinel) and
    namespace ``name`` with N, all known to the broker: (warm, ns, seconds to create the N)."""
    broker.control(lifetime=LONG_LIFETIME)
    warm = cluster.create_namespace("bench-warm")
    clients, _ = cluster.create_client_secrets(warm, 1)
    broker.add_clients(clients)
    ns = cluster.create_namespace(name)
    clients, seed_s = cluster.create_client_secrets(ns, n)
    broker.add_clients(clients)
    return warm, ns, seed_s


def wait_ready(cluster: bk.Cluster, ns: str, n: int, t0: float, timeout: float, watch: Any = None) -> dict[str, Any]:
    """Wait until all ``n`` credentials of ``ns`` are Ready; times (from ``t0``) to 50 %, 90 %, 100 %.

    ``watch`` (``cluster.ready_watch(ns)``, started before ``t0``) is used and stopped; without one a
    watcher is started now (on a real API server its list sees what became Ready before)."""
    own = watch is None
    w = cluster.ready_watch(ns) if own else watch
    try:
        return w.wait(n, t0, timeout)  # type: ignore[no-any-return]
    finally:
        w.stop()


def cpu_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
    """CPU seconds of each control-plane process between two samples, and as % of one core."""
    out: dict[str, Any] = {}
    for name in sorted(set(before) & set(after)):
        used = after[name] - before[name]
        out[name] = {"cpu_s": round(used, 2), "pct_of_core": round(100.0 * used / seconds, 1) if seconds > 0 else None}
    return out


class LogCounter:
    """Counts lines containing all of ``needles`` in a growing log file, reading only what is new."""

    def __init__(self, path: Path, *needles: str) -> None:
        self.path, self.needles = path, needles
        self.offset, self.total, self.rest = 0, 0, b""

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.total
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        wanted = [x.encode() for x in self.needles]
        self.total += sum(1 for line in lines if all(w in line for w in wanted))
        return self.total


def api_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    keys = set(before) | set(after)
    out = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys)}
    return {k: v for k, v in out.items() if v}


def per(counts: dict[str, int] | None, n: int) -> dict[str, float] | None:
    if counts is None or n <= 0:
        return None
    return {k: round(v / n, 3) for k, v in counts.items()}


def writes(counts: dict[str, int] | None) -> int | None:
    if counts is None:
        return None
    return sum(v for k, v in counts.items() if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE"))


def spread_stats(times: list[float], trials: int = 200) -> dict[str, Any]:
    """Window of the refreshes, and the largest share of them inside any 1 % slice of it."""
    if len(times) < 2:
        return {"refreshes": len(times)}
    times = sorted(times)
    lo, hi = times[0], times[-1]
    width = hi - lo
    n = len(times)

    def max_sliding(ts: list[float], w: float) -> int:
        best, j = 0, 0
        for i in range(len(ts)):
            while ts[i] - ts[j] > w:
                j += 1
            best = max(best, i - j + 1)
        return best

    def max_bins(ts: list[float]) -> int:
        bins = [0] * 100
        for t in ts:
            bins[min(99, int((t - lo) / width * 100))] += 1 if width > 0 else 0
        return max(bins)

    sliding = max_sliding(times, width / 100.0) if width > 0 else n
    binned = max_bins(times) if width > 0 else n
    rng = random.Random(12345)  # noqa: S311 - a reference distribution, not security
    ref = []
    for _ in range(trials):
        sample = sorted(rng.random() for _ in range(n))
        ref.append(max_sliding(sample, (sample[-1] - sample[0]) / 100.0))
    return {
        "refreshes": n,
        "window_s": round(width, 2),
        "max_1pct_share_pct": round(100.0 * sliding / n, 2),
        "max_1pct_share_fixed_bins_pct": round(100.0 * binned / n, 2),
        "uniform_random_reference_pct": round(100.0 * sum(ref) / len(ref) / n, 2),
    }


# -- one N -----------------------------------------------------------------------------------------


class Run:
    """Everything for one N; fills ``self.r``."""

    def __init__(self, args: argparse.Namespace, n: int, workdir: Path, largest: bool) -> None:
        self.args, self.n, self.largest = args, n, largest
        self.workdir = workdir / f"n{n}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = os.environ.get("AUTOTEK_BENCH_KUBECONFIG") or None
        self.r: dict[str, Any] = {"n": n}
        self.phases = set(args.only)

    def on(self, phase: str) -> bool:
        return phase in self.phases

    # -- bare loop ----------------------------------------------------------------------------------

    def bare(self) -> None:
        n = self.n
        cluster = bk.Cluster(self.workdir, "bare", self.kubeconfig, self.args.api)
        broker = bk.Broker(self.workdir, "bare")
        try:
            broker.control(lifetime=LONG_LIFETIME)
            ns = cluster.create_namespace("bench-bare")
            clients, seed_s = cluster.create_client_secrets(ns, n)
            broker.add_clients(clients)
            create_s = cluster.create_credentials(ns, n, broker.token_url)
            proc = subprocess.run(  # noqa: S603 - our own command line
                [
                    bk.python(),
                    str(bk.BENCH / "bareloop.py"),
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "--namespace",
                    ns,
                    "--workers",
                    str(WORKERS),
                ],
                capture_output=True,
                text=True,
                cwd=bk.ROOT,
                timeout=max(600, n * 0.2),
            )
            (self.workdir / "bareloop.log").write_text(proc.stdout + proc.stderr)
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            summary = broker.summary(prefix=ns)
            self.r["bare"] = {
                "client_secrets_seed_s": round(seed_s, 2),
                "create_s": round(create_s, 2),
                "loop_s": round(doc["seconds"], 2),
                "total_s": round(create_s + doc["seconds"], 2),
                "errors": doc["errors"],
                "cpu_s": round(doc["cpu_seconds"], 2),
                "max_rss_mib": mib(doc["max_rss_kib"]),
                "token_requests": summary["count"],
                "emulator_cpu_s": self._cpu(cluster.pid),
            }
            log(f"N={n} bare loop: create {create_s:.2f}s + loop {doc['seconds']:.2f}s, errors {doc['errors']}")
            cluster.delete_namespace(ns, wait=180)
        finally:
            broker.stop()
            cluster.stop()

    # -- backlog and lean loop --------------------------------------------------------------------

    def _seed_backlog(self, cluster: bk.Cluster, broker: bk.Broker, prefix: str) -> tuple[str, float]:
        """A fresh namespace holding N client Secrets and N credentials (known to the broker)."""
        ns = cluster.create_namespace(prefix)
        clients, secrets_s = cluster.create_client_secrets(ns, self.n)
        # The earlier namespaces' clients are done with: the broker's control body stays under its 1 MiB
        # limit at N = 10 000 (it replaces the whole client map).
        broker.clients.clear()
        broker.add_clients(clients)
        creds_s = cluster.create_credentials(ns, self.n, broker.token_url)
        return ns, secrets_s + creds_s

    def backlog_and_lean(self) -> None:
        """One API server for both: the operator started over a backlog, then the lean loop at each
        concurrency, each in a fresh namespace with the same N credentials and client Secrets."""
        n = self.n
        cluster = bk.Cluster(self.workdir, "backlog", self.kubeconfig, self.args.api)
        broker = bk.Broker(self.workdir, "backlog")
        op: bk.Operator | None = None
        try:
            broker.control(lifetime=LONG_LIFETIME)
            if self.on("backlog"):
                ns, seed_s = self._seed_backlog(cluster, broker, "bench-backlog")
                cluster.operator_kubeconfig()  # the ServiceAccount exists before the clock starts
                time.sleep(2.0)  # let the seeding's own load settle
                watch = cluster.ready_watch(ns)
                m0, c0 = cluster.request_counts(), cluster.component_cpu()
                op = bk.Operator(cluster, broker, self.workdir / "operator-backlog.log")
                t0 = op.started
                ready = wait_ready(cluster, ns, n, t0, timeout=max(180.0, n * 0.2), watch=watch)
                t1 = time.time()
                sample = op.watch.sample() or op.watch.last()
                c1 = cluster.component_cpu()
                time.sleep(1.0)  # the requests in flight at the last Ready are counted too
                m1 = cluster.request_counts()
                api = api_delta(m0, m1)
                issue = broker.summary(prefix=ns)
                seconds = ready["t100"]
                cpu = sample.get("cpu", 0.0)
                self.r["backlog"] = {
                    "seed_s": round(seed_s, 2),
                    **{k: v for k, v in ready.items() if k != "poll_interval"},
                    "seconds": seconds,
                    "per_s": round(n / seconds, 1) if seconds else None,
                    "operator_cpu_s": round(cpu, 2),
                    "operator_cpu_ms_per_credential": round(1000.0 * cpu / n, 2),
                    # Without the interpreter's start-up: from the first Ready on, over the other N - 1.
                    "operator_cpu_ms_per_credential_after_first": round(
                        1000.0 * (cpu - op.watch.cpu_at(t0 + ready["t_first"])) / (n - 1), 2
                    )
                    if ready.get("t_first") is not None and n > 1
                    else None,
                    "operator_peak_rss_mib": mib(sample.get("VmHWM", 0)),
                    "operator_rss_mib": mib(sample.get("VmRSS", 0)),
                    "operator_threads": sample.get("threads"),
                    "token_requests": issue["count"],
                    "token_requests_per_credential": issue["clients"],
                    "api_requests": api,
                    "api_requests_per_credential": per(api, n),
                    "server_cpu": cpu_delta(c0, c1, t1 - t0),
                    "workers": int(os.environ.get("AUTOTEK_WORKERS") or WORKERS),
                    "identity": cluster.operator_user(),
                }
                op.stop()
                op = None
                log(
                    f"N={n} backlog: all Ready {seconds}s after the operator's start ({self.r['backlog']['per_s']}/s), "
                    f"CPU {self.r['backlog']['operator_cpu_ms_per_credential']} ms/credential, "
                    f"peak RSS {self.r['backlog']['operator_peak_rss_mib']} MiB, "
                    f"apiserver/etcd {server_cpu(self.r['backlog'])} % of a core"
                )
                if ready["timed_out"]:
                    raise RuntimeError(f"backlog: only {ready['ready']} of {n} became Ready; see operator-backlog.log")
            if self.on("lean"):
                kubeconfig = cluster.operator_kubeconfig()
                runs = []
                for threads in self.args.lean_threads:
                    ns, seed_s = self._seed_backlog(cluster, broker, f"bench-lean{threads}")
                    time.sleep(2.0)
                    m0, c0 = cluster.request_counts(), cluster.component_cpu()
                    t0 = time.time()
                    proc = subprocess.run(  # noqa: S603 - our own command line
                        [
                            bk.python(),
                            str(bk.BENCH / "leanloop.py"),
                            "--kubeconfig",
                            str(kubeconfig),
                            "--namespace",
                            ns,
                            "--threads",
                            str(threads),
                        ],
                        capture_output=True,
                        text=True,
                        cwd=bk.ROOT,
                        timeout=max(600, n * 0.2),
                    )
                    t1 = time.time()
                    c1 = cluster.component_cpu()
                    m1 = cluster.request_counts()
                    (self.workdir / f"leanloop-{threads}.log").write_text(proc.stdout + proc.stderr)
                    doc = json.loads(proc.stdout.strip().splitlines()[-1])
                    api = api_delta(m0, m1)
                    run = {
                        "threads": threads,
                        "seed_s": round(seed_s, 2),
                        "seconds": round(doc["seconds"], 2),
                        "per_s": round(doc["n"] / doc["seconds"], 1) if doc["seconds"] else None,
                        "n": doc["n"],
                        "errors": doc["errors"],
                        "error_samples": doc.get("error_samples"),
                        "cpu_s": round(doc["cpu_seconds"], 2),
                        "cpu_ms_per_credential": doc["per_credential_ms"],
                        "max_rss_mib": mib(doc["max_rss_kib"]),
                        "token_requests": broker.summary(prefix=ns)["count"],
                        "api_requests_per_credential": per(api, n),
                        "server_cpu": cpu_delta(c0, c1, t1 - t0),
                    }
                    runs.append(run)
                    log(
                        f"N={n} lean loop, {threads} threads: {run['seconds']}s ({run['per_s']}/s), "
                        f"errors {run['errors']}, CPU {run['cpu_ms_per_credential']} ms/credential, "
                        f"apiserver/etcd {server_cpu(run)} % of a core"
                    )
                ok = [r for r in runs if r["per_s"] and not r["errors"]]
                best = max(ok, key=lambda r: r["per_s"]) if ok else None
                self.r["lean"] = {"runs": runs, "best": best}
        finally:
            if op is not None:
                op.stop()
            broker.stop()
            cluster.cleanup()
            cluster.stop()

    @staticmethod
    def _cpu(pid: int | None) -> float | None:
        s = bk.proc_sample(pid) if pid else None
        return round(s["cpu"], 2) if s else None

    def rotation_lifetime(self) -> float:
        if self.args.lifetime:
            return float(self.args.lifetime)
        if not self.on("rotation"):
            return LONG_LIFETIME
        # Refreshes begin at ~0.637 L (2/3 minus up to 10 % of the renewal window): L must leave
        # the first issue of all N done by then. The bare loop's time is the estimate; the
        # operator may take up to ~2x it (3.2x + 20 s leaves the first refresh at ~2x + 13 s).
        best = (self.r.get("lean") or {}).get("best") or {}
        base = (
            (self.r.get("bare") or {}).get("total_s") or (best.get("seconds") and 2 * best["seconds"]) or self.n * 0.02
        )
        return float(min(1200, max(30, round(3.2 * base + 20))))

    # -- the operator's phases ---------------------------------------------------------------------

    def operator_phases(self) -> None:
        n, args = self.n, self.args
        cluster = bk.Cluster(self.workdir, "op", self.kubeconfig, self.args.api)
        broker = bk.Broker(self.workdir, "op")
        op: bk.Operator | None = None
        try:
            lifetime = self.rotation_lifetime()
            warm, ns, seed_s = seed(cluster, broker, "bench-op", n)
            log(f"N={n} operator run: client Secrets created in {seed_s:.2f}s; rotation lifetime {lifetime:.0f}s")

            op = bk.Operator(cluster, broker, self.workdir / "operator-1.log")
            # The operator is watching once a sentinel credential has become Ready.
            cluster.create_credentials(warm, 1, broker.token_url)
            sentinel = wait_ready(cluster, warm, 1, time.time(), 60)
            if sentinel["timed_out"]:
                raise RuntimeError(f"the operator did not start; see {op.log_path}")
            startup_sample = op.watch.sample() or {}
            time.sleep(1.0)

            # -- ready ------------------------------------------------------------------------------
            broker.control(lifetime=lifetime)
            cluster.reset_request_counts()
            watch = cluster.ready_watch(ns)
            counts0 = cluster.request_counts()
            comp0 = cluster.component_cpu()
            t0 = time.time()
            create_s = cluster.create_credentials(ns, n, broker.token_url)
            ready = wait_ready(cluster, ns, n, t0, timeout=max(120.0, n * 0.08), watch=watch)
            t_ready = time.time()
            broker.control(lifetime=LONG_LIFETIME)  # tokens issued from now on are not due for an hour
            counts1 = cluster.request_counts()
            issue = broker.summary(prefix=ns)
            sample = op.watch.sample() or {}
            ready_api = api_delta(counts0, counts1)
            self.r["ready"] = {
                "create_s": round(create_s, 2),
                **{k: v for k, v in ready.items() if k != "poll_interval"},
                "seconds": ready["t100"],
                "poll_interval_s": ready.get("poll_interval"),
                "operator_cpu_s": round(sample.get("cpu", 0) - startup_sample.get("cpu", 0), 2),
                "operator_rss_mib": mib(sample.get("VmRSS", 0)),
                "operator_peak_rss_mib": mib(sample.get("VmHWM", 0)),
                "operator_rss_before_mib": mib(startup_sample.get("VmRSS", 0)),
                "token_requests_per_credential": issue["clients"],
                "token_requests": issue["count"],
                "api_requests": ready_api,
                "api_requests_per_credential": per(ready_api, n),
                "emulator_cpu_s": self._cpu(cluster.pid),
                "server_cpu": cpu_delta(comp0, cluster.component_cpu(), time.time() - t0),
                "lists": self._lists(cluster),
            }
            log(
                f"N={n} ready: {ready['t100']}s (50% {ready['t50']}s, 90% {ready['t90']}s), "
                f"operator CPU {self.r['ready']['operator_cpu_s']}s, RSS {mib(sample.get('VmRSS', 0))} MiB"
            )
            if ready["timed_out"]:
                raise RuntimeError(f"only {ready['ready']} of {n} credentials became Ready")

            # -- rotation ---------------------------------------------------------------------------
            if self.on("rotation"):
                self.rotation(cluster, broker, op, ns, t0, t_ready, lifetime)

            # -- idle -------------------------------------------------------------------------------
            if self.on("idle"):
                time.sleep(5.0)
                before_req = broker.summary()["count"]
                c0 = cluster.request_counts()
                cluster.reset_gets()
                i0 = time.time()
                time.sleep(args.idle_seconds)
                i1 = time.time()
                w = op.watch.window(i0, i1)
                idle_api = api_delta(c0, cluster.request_counts())
                self.r["idle"] = {
                    "seconds": round(i1 - i0, 1),
                    "cpu_s": round(w["cpu_seconds"], 3),
                    "cpu_pct_of_core": round(100.0 * w["cpu_seconds"] / (i1 - i0), 2),
                    "token_requests": broker.summary()["count"] - before_req,
                    "api_requests": idle_api,
                    "lists": self._lists(cluster),
                    "rss_mib": mib(w["rss_end_kib"]),
                }
                log(f"N={n} idle: {self.r['idle']['cpu_pct_of_core']}% of a core over {args.idle_seconds:.0f}s")

            final = op.stop()
            self.r["operator_run"] = {
                "cpu_s": round(final.get("cpu", 0), 2),
                "peak_rss_mib": mib(final.get("VmHWM", 0)),
                "rss_end_mib": mib(final.get("VmRSS", 0)),
                "threads_end": final.get("threads"),
                "wall_s": round(time.time() - op.started, 1),
            }
            op = None

            # -- restart ----------------------------------------------------------------------------
            if self.on("restart"):
                self.restart(cluster, broker, ns)
            if self.on("bad") or self.on("dedup"):
                # A third operator at WARNING (the restart phase's one logs at DEBUG).
                before = broker.summary(prefix=ns)["count"]
                op = bk.Operator(cluster, broker, self.workdir / "operator-3.log")
                t3 = time.time()
                cluster.create_credential(warm, "sentinel-3", "cs-00000", broker.token_url)
                if wait_ready(cluster, warm, 2, t3, max(120.0, n * 0.05))["timed_out"]:
                    raise RuntimeError(f"the third operator did not start; see {op.log_path}")
                time.sleep(3.0)
                self.r["restart_3"] = {
                    "token_requests_for_held_credentials": broker.summary(prefix=ns)["count"] - before,
                    "sentinel_ready_after_s": round(time.time() - 3.0 - t3, 1),
                }

            if op is not None and self.on("dedup"):
                self.dedup(cluster, broker, op)
            if op is not None and self.on("bad"):
                self.bad(cluster, broker, op)
            if op is not None:
                final = op.stop()
                self.r["operator_run_2"] = {
                    "cpu_s": round(final.get("cpu", 0), 2),
                    "peak_rss_mib": mib(final.get("VmHWM", 0)),
                    "threads_end": final.get("threads"),
                }
                op = None
            for name in ("operator-1.log", "operator-2.log", "operator-3.log"):
                text = (self.workdir / name).read_text(errors="replace") if (self.workdir / name).exists() else ""
                self.r.setdefault("operator_log_lines", {})[name] = {
                    "warnings": text.count(" WARNING "),
                    "errors": text.count(" ERROR "),
                    "tracebacks": text.count("Traceback"),
                }
        finally:
            if op is not None:
                op.stop()
            broker.stop()
            cluster.cleanup()
            cluster.stop()

    @staticmethod
    def _lists(cluster: bk.Cluster) -> dict[str, int] | None:
        return bk.http_json("GET", cluster.url + "/_bench/lists") if cluster.emulated else None

    def rotation(
        self,
        cluster: bk.Cluster,
        broker: bk.Broker,
        op: bk.Operator,
        ns: str,
        t0: float,
        t_ready: float,
        lifetime: float,
    ) -> None:
        n = self.n
        c0 = cluster.request_counts()
        deadline = t_ready + lifetime + 120 + (t_ready - t0)
        refreshed = 0
        while time.time() < deadline:
            hist = broker.summary(prefix=ns)["clients"]
            refreshed = sum(v for k, v in hist.items() if int(k) >= 2)
            if refreshed >= n:
                break
            time.sleep(1.0 if n > 1000 else 0.5)
        time.sleep(3.0)  # the passes that made the last requests write their Secrets and status
        c1 = cluster.request_counts()
        rows = broker.times(since=t0 - 1)
        by_client: dict[str, list[float]] = {}
        for t, cid, status in rows:
            if cid and cid.startswith(ns + "-") and status == 200:
                by_client.setdefault(cid, []).append(t)
        issues = [min(ts) for ts in by_client.values()]
        refreshes = [sorted(ts)[1] for ts in by_client.values() if len(ts) >= 2]
        hist = broker.summary(prefix=ns)["clients"]
        first_refresh = min(refreshes) if refreshes else None
        last_refresh = max(refreshes) if refreshes else None
        cpu_refresh = None
        if refreshes:
            w = op.watch.window(first_refresh - 0.5, last_refresh + 1.5)  # type: ignore[operator]
            cpu_refresh = w["cpu_seconds"]
        rot_api = api_delta(c0, c1)
        self.r["rotation"] = {
            "lifetime_s": lifetime,
            "refreshed": refreshed,
            "timed_out": refreshed < n,
            "token_requests_per_credential_after_cycle": hist,
            "overlap_with_first_issue": bool(refreshes and issues and min(refreshes) < max(issues)),
            "first_refresh_after_ready_s": round(first_refresh - t_ready, 1) if first_refresh else None,
            "cpu_s": round(cpu_refresh, 2) if cpu_refresh is not None else None,
            "cpu_ms_per_refresh": round(1000.0 * cpu_refresh / len(refreshes), 2) if cpu_refresh else None,
            "api_requests": rot_api,
            "api_requests_per_refresh": per(rot_api, len(refreshes)),
            "api_requests_total_per_refresh": round(sum(rot_api.values()) / len(refreshes), 2)
            if rot_api and refreshes
            else None,
            "spread": spread_stats(refreshes),
            "issue_window_s": round(max(issues) - min(issues), 2) if issues else None,
            "lists": self._lists(cluster),
        }
        log(
            f"N={n} rotation: {refreshed}/{n} refreshed, CPU/refresh "
            f"{self.r['rotation']['cpu_ms_per_refresh']} ms, spread {self.r['rotation']['spread']}"
        )

    def restart(self, cluster: bk.Cluster, broker: bk.Broker, ns: str) -> None:
        """A new operator (at DEBUG, for its per-credential "resumed:" lines) over N held credentials."""
        n = self.n
        cluster.reset_request_counts()
        cluster.reset_gets()
        c0 = cluster.request_counts()
        before = broker.summary()["count"]
        op = bk.Operator(cluster, broker, self.workdir / "operator-2.log", level="DEBUG")
        try:
            resumed = LogCounter(op.log_path, f"{ns}/", ": resumed:")
            confirmed = 0
            t_confirm = None
            deadline = time.time() + max(120.0, n * 0.05)
            while time.time() < deadline:
                confirmed = resumed.count()
                if confirmed >= n:
                    t_confirm = time.time() - op.started
                    break
                time.sleep(0.25 if n <= 1000 else 0.5)
            time.sleep(5.0)  # anything the restarted operator does after looking
            after = broker.summary()["count"]
            api = api_delta(c0, cluster.request_counts())
            sample = op.watch.sample() or {}
            self.r["restart"] = {
                "confirmed": confirmed,
                "seconds_to_confirm_all": round(t_confirm, 2) if t_confirm is not None else None,
                "token_requests": after - before,
                "api_requests": api,
                "api_writes": writes(api),
                "target_secret_gets": cluster.distinct_gets(ns) if cluster.emulated else None,
                "operator_cpu_s": round(sample.get("cpu", 0), 2),
                "operator_rss_mib": mib(sample.get("VmRSS", 0)),
                "how": "per-credential DEBUG 'resumed:' lines of the restarted operator (logging at DEBUG)",
            }
        finally:
            op.stop()
        log(
            f"N={n} restart: {confirmed}/{n} confirmed in {self.r['restart']['seconds_to_confirm_all']}s "
            f"(from process start), token requests {after - before}, API writes {writes(api)}"
        )

    def dedup(self, cluster: bk.Cluster, broker: bk.Broker, op: bk.Operator) -> None:
        n = min(self.n, self.args.dedup_max)
        ns = cluster.create_namespace("bench-dedup")
        clients, _ = cluster.create_client_secrets(ns, 1)  # cs-00000, client <ns>-00000
        broker.add_clients(clients)
        bodies_spec = {"clientSecretRef": {"name": "cs-00000"}, "tokenURL": broker.token_url}
        before = broker.summary(prefix=ns)["count"]
        watch = cluster.ready_watch(ns)
        t0 = time.time()
        bodies = [
            {
                "apiVersion": f"{bk.GROUP}/{bk.VERSION}",
                "kind": "AutoTekCredential",
                "metadata": {"name": f"c-{i:05d}", "namespace": ns},
                "spec": bodies_spec,
            }
            for i in range(n)
        ]
        cluster._create_many(ns, f"{bk.GROUP}/{bk.VERSION}/{bk.PLURAL}", bodies)
        ready = wait_ready(cluster, ns, n, t0, timeout=max(120.0, n * 0.08), watch=watch)
        time.sleep(2.0)
        made = broker.summary(prefix=ns)["count"] - before
        self.r["dedup"] = {
            "credentials": n,
            "token_requests": made,
            "token_requests_per_credential": round(made / n, 4),
            "seconds_to_ready": ready["t100"],
        }
        log(f"N={n} dedup (one client): {made} token requests for {n} credentials, ready in {ready['t100']}s")

    def bad(self, cluster: bk.Cluster, broker: bk.Broker, op: bk.Operator) -> None:
        n, seconds = self.n, self.args.bad_seconds
        ns = cluster.create_namespace("bench-bad")
        clients, _ = cluster.create_client_secrets(ns, n)
        broker.add_clients(clients)
        broker.control(fail={"status": 503, "json": {"error": "temporarily_unavailable"}})
        time.sleep(1.0)
        broker.reset()
        c0 = cluster.request_counts()
        start_sample = op.watch.sample() or {}
        t0 = time.time()
        create_s = cluster.create_credentials(ns, n, broker.token_url)
        per_second: list[int] = []
        last = 0
        while time.time() < t0 + seconds:
            time.sleep(1.0)
            count = broker.summary()["count"]
            per_second.append(count - last)
            last = count
        t1 = time.time()
        summary = broker.summary(prefix=ns)
        rows = broker.times(since=t0 - 1)
        broker.control(fail=None)
        attempts: dict[str, int] = {}
        for _, cid, _ in rows:
            if cid and cid.startswith(ns + "-"):
                attempts[cid] = attempts.get(cid, 0) + 1
        w = op.watch.window(t0, t1)
        api = api_delta(c0, cluster.request_counts())
        total = summary["count"]
        self.r["bad"] = {
            "seconds": round(t1 - t0, 1),
            "create_s": round(create_s, 2),
            "token_requests": total,
            "requests_per_s": round(total / (t1 - t0), 1),
            "peak_requests_per_s": max(per_second) if per_second else 0,
            "requests_per_s_series": per_second,
            "credentials_tried": len(attempts),
            "max_attempts_per_credential": max(attempts.values()) if attempts else 0,
            "max_concurrency": summary["max_concurrency"],
            "max_concurrent_setting": MAX_CONCURRENT_TOKEN_REQUESTS,
            "by_status": summary["by_status"],
            "operator_rss_start_mib": mib(start_sample.get("VmRSS", 0)),
            "operator_rss_max_mib": mib(w["rss_max_kib"]),
            "operator_rss_end_mib": mib(w["rss_end_kib"]),
            "operator_threads_max": w["threads_max"],
            "operator_cpu_pct_of_core": round(100.0 * w["cpu_seconds"] / (t1 - t0), 1),
            "api_requests": api,
            "api_requests_per_failed_attempt": per(api, total),
        }
        log(
            f"N={n} bad input: {self.r['bad']['requests_per_s']} req/s (peak {self.r['bad']['peak_requests_per_s']}), "
            f"max concurrency {summary['max_concurrency']}, RSS max {mib(w['rss_max_kib'])} MiB, "
            f"threads max {w['threads_max']}"
        )

    # -- fan-out: one cluster credential, many namespaces ---------------------------------------------

    def fanout(self) -> None:
        """One ClusterAutoTekCredential selecting ``--fanout-namespaces`` labelled namespaces."""
        k, lifetime = self.args.fanout_namespaces, self.args.fanout_lifetime
        cluster = bk.Cluster(self.workdir, "fanout", self.kubeconfig, self.args.api, cluster_credentials=True)
        broker = bk.Broker(self.workdir, "fanout")
        op: bk.Operator | None = None
        tokens: bk.TokenWatch | None = None
        out: dict[str, Any] = {"namespaces": k, "lifetime_s": lifetime}
        self.r["fanout"] = out
        if cluster.emulated or cluster.target is None:
            out["skipped"] = "needs a real API server (the emulator has no ClusterAutoTekCredential)"
            log(f"fan-out: skipped ({out['skipped']})")
            broker.stop()
            cluster.stop()
            return
        target = cluster.target
        names = [f"bench-fanout-{i:05d}" for i in range(k)]
        try:
            broker.control(lifetime=LONG_LIFETIME)
            op_ns = bk.OPERATOR_SA[0]
            cluster.operator_kubeconfig()  # the ServiceAccount, and its namespace (the operator's own)
            # The cluster credential's client Secret, in the operator's namespace.
            cid = f"fanout-client-{os.urandom(3).hex()}"
            secret = f"s3cret-{os.urandom(6).hex()}"
            broker.add_clients({cid: secret})
            bk.create_many(
                target,
                f"/api/v1/namespaces/{op_ns}/secrets",
                [
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "type": "Opaque",
                        "metadata": {"name": "autotek-client", "namespace": op_ns},
                        "stringData": {"client_id": cid, "client_secret": secret},
                    }
                ],
                threads=1,
            )
            # The namespaces, labelled, before the credential.
            label = {FANOUT_LABEL[0]: FANOUT_LABEL[1]}
            bodies = [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": x, "labels": label}} for x in names
            ]
            ns_s = bk.create_many(target, "/api/v1/namespaces", bodies, threads=32)
            out["namespaces_create_s"] = round(ns_s, 2)
            log(f"fan-out: {k} labelled namespaces created in {ns_s:.2f}s")

            # The operator, watching once a sentinel (namespaced) credential is Ready.
            warm = cluster.create_namespace("bench-warm")
            clients, _ = cluster.create_client_secrets(warm, 1)
            broker.add_clients(clients)
            op = bk.Operator(
                cluster,
                broker,
                self.workdir / "operator-fanout.log",
                extra_env={"POD_NAMESPACE": op_ns, "AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES": op_ns},
            )
            cluster.create_credentials(warm, 1, broker.token_url)
            if wait_ready(cluster, warm, 1, time.time(), 120)["timed_out"]:
                raise RuntimeError(f"fan-out: the operator did not start; see {op.log_path}")
            time.sleep(2.0)
            before = op.watch.sample() or {}
            tokens = bk.TokenWatch(target, FANOUT_TARGET)
            broker.control(lifetime=lifetime)
            m0, c0 = cluster.request_counts(), cluster.component_cpu()
            t0 = time.time()
            catc = {
                "apiVersion": f"{bk.GROUP}/{bk.VERSION}",
                "kind": "ClusterAutoTekCredential",
                "metadata": {"name": "bench-fanout"},
                "spec": {
                    "clientSecretRef": {"namespace": op_ns, "name": "autotek-client"},
                    "namespaceSelector": {"matchLabels": label},
                    "tokenURL": broker.token_url,
                    "target": {"name": FANOUT_TARGET},
                },
            }
            bk.create_many(target, f"/apis/{bk.GROUP}/{bk.VERSION}/{bk.CLUSTER_PLURAL}", [catc], threads=1)
            status_path = f"/apis/{bk.GROUP}/{bk.VERSION}/{bk.CLUSTER_PLURAL}/bench-fanout"

            # -- provisioning: every namespace holds the first token -----------------------------------
            kube = target.connect()
            first: str | None = None
            t_secrets = t_status = None
            status_ns: dict[str, Any] = {}
            deadline = t0 + max(120.0, k * 0.3)
            try:
                while time.time() < deadline and (t_secrets is None or t_status is None):
                    now = time.time()
                    held = tokens.tokens()
                    if first is None and held:
                        first = max(held, key=lambda t: held[t])
                    if t_secrets is None and first is not None and held.get(first, 0) >= k:
                        t_secrets = max(tokens.times_for(first))
                    elif t_secrets is None and len(held) > 1 and sum(held.values()) >= k:
                        # The refresh began before the first token reached every namespace (a lifetime too
                        # short for this many): every namespace holds a token, not all the same one.
                        out["overlap_with_refresh"] = True
                        t_secrets = max(tokens.first_any().values())
                    if t_status is None:
                        status, data = kube.call("GET", status_path)
                        if status == 200:
                            status_ns = (json.loads(data).get("status") or {}).get("namespaces") or {}
                            if status_ns.get("selected") == k and status_ns.get("provisioned") == k:
                                t_status = now
                    time.sleep(0.1)
            finally:
                kube.close()
            t1 = time.time()
            broker.control(lifetime=LONG_LIFETIME)  # the second token is not due for an hour
            s1 = op.watch.sample() or {}
            c1 = cluster.component_cpu()
            time.sleep(1.0)
            m1 = cluster.request_counts()
            issue = broker.summary(prefix=cid)
            times = tokens.times_for(first) if first else []
            end = t_secrets or t1
            w = op.watch.window(t0, end + 0.5)
            api = api_delta(m0, m1)
            out["provision"] = {
                "secrets_all_s": round(t_secrets - t0, 2) if t_secrets else None,
                "secrets_50_90_s": [round(times[int(len(times) * q) - 1] - t0, 2) for q in (0.5, 0.9)]
                if len(times) >= 2
                else None,
                "first_secret_s": round(times[0] - t0, 2) if times else None,
                "status_provisioned_eq_selected_s": round(t_status - t0, 2) if t_status else None,
                "status_namespaces": status_ns,
                "namespaces_holding_token": len(times),
                "timed_out": t_secrets is None or t_status is None,
                "token_requests": issue["count"],
                "operator_cpu_s": round(w["cpu_seconds"], 2),
                "operator_cpu_ms_per_namespace": round(1000.0 * w["cpu_seconds"] / k, 2),
                "operator_rss_before_mib": mib(before.get("VmRSS", 0)),
                "operator_rss_max_mib": mib(w["rss_max_kib"]),
                "operator_peak_rss_mib": mib(s1.get("VmHWM", 0)),
                "operator_threads_max": w["threads_max"],
                "api_requests": api,
                "api_requests_per_namespace": per(api, k),
                "server_cpu": cpu_delta(c0, c1, t1 - t0),
            }
            pv = out["provision"]
            log(
                f"fan-out: {len(times)}/{k} Secrets hold the token {pv['secrets_all_s']}s after the credential's "
                f"creation (status provisioned == selected at {pv['status_provisioned_eq_selected_s']}s), "
                f"token requests {issue['count']}, CPU {pv['operator_cpu_ms_per_namespace']} ms/namespace, "
                f"peak RSS {pv['operator_peak_rss_mib']} MiB"
            )
            if pv["timed_out"]:
                raise RuntimeError(f"fan-out: provisioning not complete; see {op.log_path}")

            # -- rotation: every namespace holds the second token --------------------------------------
            m2, c2 = cluster.request_counts(), cluster.component_cpu()
            deadline = t0 + lifetime + max(120.0, k * 0.3)
            second: str | None = None
            t_rot = None
            c_rot, t_c_rot = c2, t1  # the control plane's CPU from the first Secret with the new token on
            while time.time() < deadline:
                held = tokens.tokens()
                others = {t: n for t, n in held.items() if t != first}
                if others:
                    if second is None:
                        c_rot, t_c_rot = cluster.component_cpu(), time.time()
                    second = max(others, key=lambda t: others[t])
                    if others[second] >= k:
                        t_rot = max(tokens.times_for(second))
                        break
                time.sleep(0.1)
            t3 = time.time()
            time.sleep(1.0)
            s3 = op.watch.sample() or {}
            c3, m3 = cluster.component_cpu(), cluster.request_counts()
            rows = [r for r in broker.times(since=t0 - 1) if r[1] == cid and r[2] == 200]
            req_times = sorted(r[0] for r in rows)
            t_req2 = req_times[1] if len(req_times) >= 2 else None
            rtimes = tokens.times_for(second) if second else []
            rot: dict[str, Any] = {
                "namespaces_holding_new_token": len(rtimes),
                "timed_out": t_rot is None,
                "token_requests_total": broker.summary(prefix=cid)["count"],
                "refresh_request_after_issue_s": round(t_req2 - req_times[0], 1) if t_req2 else None,
            }
            if t_req2 and rtimes:
                start = t_req2
                w = op.watch.window(start - 0.5, (t_rot or t3) + 0.5)
                api = api_delta(m2, m3)
                rot.update(
                    {
                        "all_s": round((t_rot or t3) - start, 2),
                        "first_secret_s": round(rtimes[0] - start, 2),
                        "secrets_50_90_s": [round(rtimes[int(len(rtimes) * q) - 1] - start, 2) for q in (0.5, 0.9)],
                        "operator_cpu_s": round(w["cpu_seconds"], 2),
                        "operator_cpu_ms_per_namespace": round(1000.0 * w["cpu_seconds"] / k, 2),
                        "operator_rss_max_mib": mib(w["rss_max_kib"]),
                        "api_requests": api,
                        "api_requests_per_namespace": per(api, k),
                        "server_cpu": cpu_delta(c_rot, c3, t3 - t_c_rot),
                    }
                )
            rot["operator_peak_rss_mib"] = mib(s3.get("VmHWM", 0))
            out["rotation"] = rot
            log(
                f"fan-out rotation: {len(rtimes)}/{k} Secrets hold the new token {rot.get('all_s')}s after the "
                f"refresh's token request; token requests in all {rot['token_requests_total']}, "
                f"CPU {rot.get('operator_cpu_ms_per_namespace')} ms/namespace, "
                f"peak RSS {rot['operator_peak_rss_mib']} MiB"
            )
            final = op.stop()
            op = None
            out["operator"] = {
                "cpu_s": round(final.get("cpu", 0), 2),
                "peak_rss_mib": mib(final.get("VmHWM", 0)),
                "threads_end": final.get("threads"),
            }
            text = (self.workdir / "operator-fanout.log").read_text(errors="replace")
            out["operator_log_lines"] = {
                "warnings": text.count(" WARNING "),
                "errors": text.count(" ERROR "),
                "tracebacks": text.count("Traceback"),
            }
        finally:
            if tokens is not None:
                tokens.stop()
            if op is not None:
                op.stop()
            broker.stop()
            try:
                out["namespaces_delete_s"] = round(
                    bk.delete_many(target, [f"/api/v1/namespaces/{x}" for x in names]), 2
                )
            except Exception as exc:  # noqa: BLE001 - the plane is thrown away anyway
                out["namespaces_delete_error"] = f"{type(exc).__name__}: {exc}"
            cluster.cleanup()
            cluster.stop()

    # -- profile ------------------------------------------------------------------------------------

    def profile(self) -> None:
        n = self.n
        pyspy = shutil.which("py-spy") or (
            str(Path(sys.executable).parent / "py-spy") if (Path(sys.executable).parent / "py-spy").exists() else None
        )
        cluster = bk.Cluster(self.workdir, "prof", self.kubeconfig, self.args.api)
        broker = bk.Broker(self.workdir, "prof")
        op: bk.Operator | None = None
        spy: subprocess.Popen[bytes] | None = None
        out: dict[str, Any] = {"py_spy": bool(pyspy)}
        try:
            # The backlog phase under py-spy: N credentials and client Secrets exist, then the operator starts.
            broker.control(lifetime=LONG_LIFETIME)
            ns, _ = self._seed_backlog(cluster, broker, "bench-prof")
            cluster.operator_kubeconfig()
            time.sleep(2.0)
            watch = cluster.ready_watch(ns)
            census_out = self.workdir / "census.json"
            op = bk.Operator(
                cluster,
                broker,
                self.workdir / "operator-prof.log",
                wrapper=[str(bk.BENCH / "opwrapper.py")],
                extra_env={
                    "BENCH_CENSUS_OUT": str(census_out),
                    **({"BENCH_TRACEMALLOC": "1"} if self.args.tracemalloc else {}),
                },
            )
            t0 = op.started
            raw = self.workdir / "pyspy.raw"
            if pyspy:
                time.sleep(0.3)  # py-spy needs the interpreter up to attach
                spy = subprocess.Popen(  # noqa: S603 - our own command line
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(op.pid),
                        "--rate",
                        "100",
                        "--gil",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.workdir / "pyspy.log", "w"),
                )
                bk.CHILDREN.append(spy)
            s0: dict[str, float] = {}
            ready = wait_ready(cluster, ns, n, t0, timeout=max(180.0, n * 0.3), watch=watch)
            s1 = op.watch.sample() or {}
            out.update(
                {
                    "seconds_to_ready": ready["t100"],
                    "operator_cpu_s": round(s1.get("cpu", 0) - s0.get("cpu", 0), 2),
                    "peak_rss_mib": mib(s1.get("VmHWM", 0)),
                    "tracemalloc": bool(self.args.tracemalloc),
                }
            )
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                bk.CHILDREN.remove(spy)
                spy = None
                if raw.exists():
                    out["py_spy_summary"] = profiling.summarise(raw)
                    out["py_spy_by_call"] = profiling.by_call(raw)
                    out["py_spy_raw"] = str(raw)
            time.sleep(3.0)
            os.kill(op.pid, signal.SIGUSR1)
            deadline = time.time() + 180
            while time.time() < deadline and not census_out.exists():
                time.sleep(0.5)
            if census_out.exists():
                out["census"] = json.loads(census_out.read_text())
                out["census"]["rss_mib"] = mib((op.watch.sample() or {}).get("VmRSS", 0))
            log(
                f"N={n} profile: ready in {ready['t100']}s under py-spy"
                f"{' and tracemalloc' if self.args.tracemalloc else ''}; "
                f"census {'ok' if 'census' in out else 'missing'}"
            )
        finally:
            if spy is not None:
                bk.stop_process(spy, signal.SIGINT)
            if op is not None:
                op.stop()
            broker.stop()
            cluster.cleanup()
            cluster.stop()
        self.r["profile"] = out

    def run(self) -> dict[str, Any]:
        started = time.time()
        if self.on("bare"):
            self.bare()
        if self.on("backlog") or self.on("lean"):
            self.backlog_and_lean()
        backlog, best = self.r.get("backlog"), (self.r.get("lean") or {}).get("best")
        if backlog and best and backlog.get("per_s") and best.get("per_s"):
            self.r["ratio_backlog_to_lean"] = round(backlog["per_s"] / best["per_s"], 2)
        if self.phases & {"ready", "rotation", "idle", "restart", "dedup", "bad"}:
            self.operator_phases()
        bare, ready = self.r.get("bare"), self.r.get("ready")
        if bare and ready and ready.get("seconds"):
            self.r["ratio_operator_to_bare"] = round(ready["seconds"] / bare["total_s"], 2)
        if self.largest and self.on("fanout"):
            self.fanout()
        if self.largest and self.on("profile"):
            self.profile()
        self.r["wall_s"] = round(time.time() - started, 1)
        return self.r


# -- the code under test ---------------------------------------------------------------------------


def code_identity(src: Path) -> dict[str, Any]:
    """Git commit, whether operator/ differs from it, and a digest of the package's files."""
    pkg = src / "autotek_operator"
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=bk.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: S603, S607
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "operator_dir_modified": bool(git("status", "--porcelain", "--", "operator")),
        "sha256": digest.hexdigest()[:16],
        "path": str(src),
    }


def snapshot_code(workdir: Path) -> dict[str, Any]:
    """Copy operator/autotek_operator into the work directory and make every child import it from there."""
    src = workdir / "src"
    shutil.copytree(
        bk.ROOT / "operator" / "autotek_operator",
        src / "autotek_operator",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH", "")]))
    ident = code_identity(src)
    live = code_identity(bk.ROOT / "operator")
    ident["git_head"], ident["operator_dir_modified"] = live["git_head"], live["operator_dir_modified"]
    ident["snapshot"] = True
    return ident


# -- the report ------------------------------------------------------------------------------------


def api_server_description(api: str) -> str:
    if os.environ.get("AUTOTEK_BENCH_KUBECONFIG"):
        return "real cluster (AUTOTEK_BENCH_KUBECONFIG)"
    assets = bk.assets_dir() if api != "emulator" else None
    if assets is None:
        return "emulator (bench/emulator_runner.py, own process)"
    v = bk.versions(assets)
    return (
        f"real control plane per phase group (tests/controlplane.py: {v['kube-apiserver']}, etcd "
        f"{v['etcd'].split()[-1]} with its data on disk, kube-controller-manager; binaries in {assets})"
    )


def g(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return " ".join(f"{k}:{x}" for k, x in v.items())
    return str(v)


def server_cpu(r: dict[str, Any] | None) -> str:
    """ "apiserver % / etcd %" of one core over a phase."""
    sc = (r or {}).get("server_cpu") or {}
    a, e = g(sc, "kube-apiserver", "pct_of_core"), g(sc, "etcd", "pct_of_core")
    return "-" if a is None and e is None else f"{fmt(a)} / {fmt(e)}"


def verbs(counts: dict[str, float] | None) -> str:
    """The per-credential request counts that matter, compactly."""
    if not counts:
        return "-"
    keep = {k: v for k, v in counts.items() if v >= 0.05 and len(k.split()) == 2}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items(), key=lambda kv: -kv[1]))


ROWS: list[tuple[str, Any]] = [
    ("backlog: operator start -> all Ready (s)", lambda r: g(r, "backlog", "seconds")),
    ("  credentials per second", lambda r: g(r, "backlog", "per_s")),
    (
        "lean loop, best (threads): s, per second",
        lambda r: (
            f"{fmt(g(r, 'lean', 'best', 'seconds'))}, {fmt(g(r, 'lean', 'best', 'per_s'))} "
            f"({fmt(g(r, 'lean', 'best', 'threads'))})"
        ),
    ),
    (
        "  lean loop per s, each thread count",
        lambda r: " ".join(f"{x['threads']}:{fmt(x['per_s'])}" for x in (g(r, "lean", "runs") or [])) or "-",
    ),
    ("RATIO backlog / lean loop throughput", lambda r: g(r, "ratio_backlog_to_lean")),
    (
        "backlog: operator CPU/credential (ms), all / after 1st",
        lambda r: (
            f"{fmt(g(r, 'backlog', 'operator_cpu_ms_per_credential'))} / "
            f"{fmt(g(r, 'backlog', 'operator_cpu_ms_per_credential_after_first'))}"
        ),
    ),
    ("lean loop CPU per credential (ms)", lambda r: g(r, "lean", "best", "cpu_ms_per_credential")),
    ("backlog: operator peak RSS (MiB)", lambda r: g(r, "backlog", "operator_peak_rss_mib")),
    ("backlog: token req/credential {n: creds}", lambda r: g(r, "backlog", "token_requests_per_credential")),
    ("backlog: apiserver / etcd CPU (% of a core)", lambda r: server_cpu(g(r, "backlog"))),
    ("lean best: apiserver / etcd CPU (% of a core)", lambda r: server_cpu(g(r, "lean", "best"))),
    ("credentials created (s)", lambda r: g(r, "ready", "create_s")),
    ("time to all Ready, operator (s)", lambda r: g(r, "ready", "seconds")),
    ("  50% / 90% Ready (s)", lambda r: f"{fmt(g(r, 'ready', 't50'))} / {fmt(g(r, 'ready', 't90'))}"),
    ("bare loop: create + loop (s)", lambda r: f"{fmt(g(r, 'bare', 'create_s'))} + {fmt(g(r, 'bare', 'loop_s'))}"),
    ("ratio operator / bare loop", lambda r: g(r, "ratio_operator_to_bare")),
    ("operator CPU in ready phase (s)", lambda r: g(r, "ready", "operator_cpu_s")),
    ("bare loop CPU (s)", lambda r: g(r, "bare", "cpu_s")),
    ("operator peak RSS, whole run (MiB)", lambda r: g(r, "operator_run", "peak_rss_mib")),
    ("operator RSS after ready (MiB)", lambda r: g(r, "ready", "operator_rss_mib")),
    ("operator CPU, whole run (s)", lambda r: g(r, "operator_run", "cpu_s")),
    ("rotation lifetime L (s)", lambda r: g(r, "rotation", "lifetime_s")),
    ("CPU per refresh (ms)", lambda r: g(r, "rotation", "cpu_ms_per_refresh")),
    ("API requests per refresh", lambda r: g(r, "rotation", "api_requests_total_per_refresh")),
    ("idle CPU, % of one core", lambda r: g(r, "idle", "cpu_pct_of_core")),
    ("token req/credential at issue {n: creds}", lambda r: g(r, "ready", "token_requests_per_credential")),
    ("token req/credential after 1 cycle", lambda r: g(r, "rotation", "token_requests_per_credential_after_cycle")),
    ("refresh window (s)", lambda r: g(r, "rotation", "spread", "window_s")),
    ("max share in a 1% slice (%)", lambda r: g(r, "rotation", "spread", "max_1pct_share_pct")),
    ("  same for uniform random (%)", lambda r: g(r, "rotation", "spread", "uniform_random_reference_pct")),
    (
        "restart: token requests (2nd / 3rd start)",
        lambda r: (
            f"{fmt(g(r, 'restart', 'token_requests'))} / "
            f"{fmt(g(r, 'restart_3', 'token_requests_for_held_credentials'))}"
        ),
    ),
    ("restart: all confirmed after (s)", lambda r: g(r, "restart", "seconds_to_confirm_all")),
    ("restart: API writes", lambda r: g(r, "restart", "api_writes")),
    ("dedup: token req/credential, 1 client", lambda r: g(r, "dedup", "token_requests_per_credential")),
    (
        "bad: token requests/s (peak)",
        lambda r: f"{fmt(g(r, 'bad', 'requests_per_s'))} ({fmt(g(r, 'bad', 'peak_requests_per_s'))})",
    ),
    (
        "bad: max concurrency (limit)",
        lambda r: f"{fmt(g(r, 'bad', 'max_concurrency'))} ({fmt(g(r, 'bad', 'max_concurrent_setting'))})",
    ),
    ("bad: max attempts per credential", lambda r: g(r, "bad", "max_attempts_per_credential")),
    ("bad: operator RSS max (MiB)", lambda r: g(r, "bad", "operator_rss_max_mib")),
    ("bad: operator threads max", lambda r: g(r, "bad", "operator_threads_max")),
    ("fanout: namespaces", lambda r: g(r, "fanout", "namespaces")),
    (
        "fanout: all Secrets hold the token / status says so (s)",
        lambda r: (
            f"{fmt(g(r, 'fanout', 'provision', 'secrets_all_s'))} / "
            f"{fmt(g(r, 'fanout', 'provision', 'status_provisioned_eq_selected_s'))}"
        ),
    ),
    ("fanout: token requests to provision", lambda r: g(r, "fanout", "provision", "token_requests")),
    (
        "fanout: CPU per namespace write, provision (ms)",
        lambda r: g(r, "fanout", "provision", "operator_cpu_ms_per_namespace"),
    ),
    ("fanout: rotate all, from the refresh's request (s)", lambda r: g(r, "fanout", "rotation", "all_s")),
    ("fanout: token requests in all (issue + refresh)", lambda r: g(r, "fanout", "rotation", "token_requests_total")),
    (
        "fanout: CPU per namespace write, rotation (ms)",
        lambda r: g(r, "fanout", "rotation", "operator_cpu_ms_per_namespace"),
    ),
    ("fanout: operator peak RSS (MiB)", lambda r: g(r, "fanout", "rotation", "operator_peak_rss_mib")),
    ("fanout: apiserver / etcd CPU, provision", lambda r: server_cpu(g(r, "fanout", "provision"))),
]


def table(results: list[dict[str, Any]]) -> str:
    header = ["N", *[str(r["n"]) for r in results]]
    rows = [[label, *[fmt(fn(r)) for r in results]] for label, fn in ROWS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def rss_slope(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    pts = [(r["n"], g(r, "ready", "operator_rss_mib")) for r in results if g(r, "ready", "operator_rss_mib")]
    pts += []
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
    peaks = [(r["n"], g(r, "operator_run", "peak_rss_mib")) for r in results if g(r, "operator_run", "peak_rss_mib")]
    out = {"points_mib": pts, "kib_per_credential": round(slope * 1024, 1), "intercept_mib": round(my - slope * mx, 1)}
    if len(peaks) >= 2:
        pmx = sum(p[0] for p in peaks) / len(peaks)
        pmy = sum(p[1] for p in peaks) / len(peaks)
        ps = sum((x - pmx) * (y - pmy) for x, y in peaks) / sum((x - pmx) ** 2 for x, _ in peaks)
        out["peak_kib_per_credential"] = round(ps * 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Scale and speed benchmark of the real operator process.",
        epilog="phases: " + ", ".join(PHASES) + ". Env AUTOTEK_BENCH_KUBECONFIG: run against that cluster "
        "(the CRD is applied, throwaway namespaces are used) instead of the emulator.",
    )
    parser.add_argument("--n", default=None, help="comma-separated N list (default 100,1000,10000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=50,200, short phases (~3 min)")
    parser.add_argument("--only", default=",".join(PHASES), help="comma-separated phases to run (default all)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"), help="JSON output")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle phase length (default 60, quick 10)")
    parser.add_argument("--bad-seconds", type=float, default=None, help="bad-input phase length (default 60, quick 15)")
    parser.add_argument(
        "--lifetime",
        type=float,
        default=None,
        help="token lifetime for the rotation phase (default: from the bare loop's time, 3.2x + 20 s, at least 30 s)",
    )
    parser.add_argument(
        "--api",
        choices=("auto", "plane", "emulator"),
        default="auto",
        help="the API server: a real control plane from $KUBEBUILDER_ASSETS or .cache/envtest when there "
        "(auto, the default; plane insists), or the emulator; AUTOTEK_BENCH_KUBECONFIG overrides both",
    )
    parser.add_argument(
        "--lean-threads",
        default=None,
        help=f"concurrencies of the lean loop, each from the same start state (default {LEAN_THREADS}; quick 8,32)",
    )
    parser.add_argument(
        "--fanout-namespaces",
        type=int,
        default=1000,
        help="namespaces the fan-out phase's one cluster credential selects (default 1000; the phase runs "
        "once, with the largest N, whatever N is)",
    )
    parser.add_argument(
        "--fanout-lifetime",
        type=float,
        default=60.0,
        help="lifetime of the fan-out phase's first token (default 60 s; the refresh comes at about 2/3 of it)",
    )
    parser.add_argument("--dedup-max", type=int, default=1000, help="credentials in the dedup phase: min(N, this)")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="profile phase with tracemalloc too (3-4x slower operator; off by default)",
    )
    parser.add_argument("--workdir", default=None, help="where logs go (default: a new directory under /tmp)")
    parser.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="run the operator from the live work tree (default: from a copy taken at the start, so that "
        "edits made while the benchmark runs do not mix two versions into one result)",
    )
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = "50,200" if args.quick else "100,1000,10000"
    ns_list = [int(x) for x in args.n.split(",") if x.strip()]
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    args.lean_threads = [int(x) for x in (args.lean_threads or ("8,32" if args.quick else LEAN_THREADS)).split(",")]
    args.idle_seconds = args.idle_seconds or (10.0 if args.quick else 60.0)
    args.bad_seconds = args.bad_seconds or (15.0 if args.quick else 60.0)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="autotek-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(workdir) if args.snapshot else code_identity(bk.ROOT / "operator")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    command = "python bench/bench.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    doc: dict[str, Any] = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": bk.machine_info(),
        "api_server": api_server_description(args.api),
        "load_start": bk.loadavg(),
        "settings": {
            "workers": WORKERS,
            "max_concurrent_token_requests": MAX_CONCURRENT_TOKEN_REQUESTS,
            "idle_seconds": args.idle_seconds,
            "bad_seconds": args.bad_seconds,
            "phases": args.only,
            "tracemalloc_in_profile": args.tracemalloc,
        },
        "workdir": str(workdir),
        "operator_code": code,
        "results": [],
    }
    log(f"{command}; logs in {workdir}; machine {doc['machine']}; load {doc['load_start']}")
    status = 0
    try:
        for n in ns_list:
            doc["results"].append(Run(args, n, workdir, largest=n == max(ns_list)).run())
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception as exc:  # noqa: BLE001 - report what was measured so far
        log(f"failed: {type(exc).__name__}: {exc}")
        doc["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    finally:
        bk.stop_all_children()
    doc["load_end"] = bk.loadavg()
    doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc["memory_slope"] = rss_slope(doc["results"])
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    print()
    print(f"command: {command}")
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"API server: {doc['api_server']}"
    )
    print(f"load average: start {doc['load_start']}, end {doc['load_end']}")
    oc = doc["operator_code"]
    print(
        f"operator code: {oc['git_head']}{' + local changes' if oc['operator_dir_modified'] else ''} "
        f"(sha256 {oc['sha256']}{', run from a copy taken at the start' if oc.get('snapshot') else ''})"
    )
    print(table(doc["results"]))
    for r in doc["results"]:
        if g(r, "backlog", "api_requests_per_credential"):
            per_cred = verbs(g(r, "backlog", "api_requests_per_credential"))
            print(f"N={r['n']} backlog, API requests per credential: {per_cred}")
        if g(r, "lean", "best", "api_requests_per_credential"):
            per_cred = verbs(g(r, "lean", "best", "api_requests_per_credential"))
            print(f"N={r['n']} lean loop, API requests per credential: {per_cred}")
    if doc["memory_slope"]:
        print(
            f"RSS after ready vs N: {doc['memory_slope']['kib_per_credential']} KiB per credential "
            f"(intercept {doc['memory_slope']['intercept_mib']} MiB)"
        )
    prof = next((r["profile"] for r in doc["results"] if "profile" in r), None)
    if prof and prof.get("py_spy_summary"):
        print(
            f"profile (N={doc['results'][-1]['n']}, py-spy --gil, "
            f"{prof['py_spy_summary']['samples']} samples): self time by package:"
        )
        for row in prof["py_spy_summary"]["by_package_self"][:12]:
            print(f"  {row['pct']:5.1f}%  {row['function']}")
        if prof.get("py_spy_by_call"):
            print("  by call (% of all samples / of the workers' samples):")
            for row in prof["py_spy_by_call"]["rows"]:
                print(f"  {row['pct_of_all']:5.1f}% / {fmt(row['pct_of_workers']):>5}  {row['what']}")
    print(f"JSON: {args.out}; logs: {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
