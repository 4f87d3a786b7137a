"""Plumbing for bench.py: child processes, /proc sampling, the API server, the token endpoint."""

from __future__ import annotations

import base64
import http.client
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CRD_FILE = ROOT / "crds" / "autotekcredentials.autotek.io.yaml"
CLUSTER_CRD_FILE = ROOT / "crds" / "clusterautotekcredentials.autotek.io.yaml"
CLUSTER_PLURAL = "clusterautotekcredentials"
GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
#: Objects per seeding request to the emulator (each request stays well under aiohttp's 1 MiB).
SEED_BATCH = 2000

#: Every child process started by this module, so that an interrupted run can still end them.
CHILDREN: list[subprocess.Popen[Any]] = []
#: Every control plane started by this module (stopped by stop_all_children too).
PLANES: list[Any] = []
#: Environment: a folder with kube-apiserver and etcd (controller-runtime's envtest layout).
ASSETS_ENV = "KUBEBUILDER_ASSETS"
DEFAULT_ASSETS = ROOT / ".cache" / "envtest"


# -- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# -- /proc ---------------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds (utime+stime), RSS, peak RSS (VmHWM) and thread count of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat
    out: dict[str, float] = {"t": time.time(), "cpu": cpu}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])  # KiB
        elif key == "Threads":
            out["threads"] = int(value)
    return out


class ProcWatch:
    """Samples one process every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"procwatch-{pid}", daemon=True)
        self._lock = threading.Lock()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> dict[str, float] | None:
        s = proc_sample(self.pid)
        if s is not None:
            with self._lock:
                self.samples.append(s)
        return s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu_at(self, t: float) -> float:
        """CPU seconds at time ``t``, interpolated between samples."""
        with self._lock:
            samples = list(self.samples)
        if not samples:
            return 0.0
        times = [s["t"] for s in samples]
        i = bisect_left(times, t)
        if i <= 0:
            return samples[0]["cpu"]
        if i >= len(samples):
            return samples[-1]["cpu"]
        a, b = samples[i - 1], samples[i]
        frac = (t - a["t"]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
        return a["cpu"] + frac * (b["cpu"] - a["cpu"])

    def window(self, t0: float, t1: float) -> dict[str, float]:
        with self._lock:
            inside = [s for s in self.samples if t0 <= s["t"] <= t1]
        return {
            "cpu_seconds": self.cpu_at(t1) - self.cpu_at(t0),
            "rss_max_kib": max((s.get("VmRSS", 0) for s in inside), default=0),
            "threads_max": max((s.get("threads", 0) for s in inside), default=0),
            "rss_end_kib": inside[-1].get("VmRSS", 0) if inside else 0,
        }

    def last(self) -> dict[str, float]:
        with self._lock:
            return dict(self.samples[-1]) if self.samples else {}


# -- processes -----------------------------------------------------------------------------------


def python() -> str:
    return sys.executable


def start_with_ready_line(
    cmd: list[str], marker: str, log_path: Path, env: dict[str, str] | None = None, timeout: float = 60.0
) -> tuple[subprocess.Popen[str], str]:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)  # noqa: S603
    CHILDREN.append(proc)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(marker):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    stop_process(proc, signal.SIGKILL)
    raise RuntimeError(f"{cmd!r} did not become ready; see {log_path}")


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def stop_all_children() -> None:
    for proc in list(reversed(CHILDREN)):
        stop_process(proc, signal.SIGTERM, timeout=10)
    for plane in list(reversed(PLANES)):
        stop_plane(plane)


def http_json(method: str, url: str, doc: Any = None, timeout: float = 120.0) -> Any:
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310 - loopback URLs we started
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we started
        body = resp.read()
    return json.loads(body) if body else None


# -- a real control plane (tests/controlplane.py) -------------------------------------------------


def assets_dir() -> Path | None:
    """The Kubernetes binaries to start a control plane from: ``KUBEBUILDER_ASSETS``, else
    ``.cache/envtest`` (``make envtest``), when they hold kube-apiserver and etcd; else None."""
    given = os.environ.get(ASSETS_ENV)
    folder = Path(given) if given else DEFAULT_ASSETS
    if all((folder / name).is_file() for name in ("kube-apiserver", "etcd")):
        return folder.resolve()
    return None


def controlplane_module() -> Any:
    """``tests/controlplane.py``, imported (the tests' own module, not a copy)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import controlplane

    return controlplane


def start_plane(assets: Path, workdir: Path) -> Any:
    """etcd (data on disk under ``workdir``), kube-apiserver and kube-controller-manager."""
    cp = controlplane_module()
    plane = cp.ControlPlane(assets, workdir, ready_timeout=120.0)
    PLANES.append(plane)
    try:
        plane.start()
    except BaseException:
        PLANES.remove(plane)
        raise
    return plane


def stop_plane(plane: Any) -> None:
    try:
        plane.stop()
    finally:
        if plane in PLANES:
            PLANES.remove(plane)
        shutil.rmtree(plane.workdir / "etcd", ignore_errors=True)  # large, and useless once stopped


def versions(assets: Path) -> dict[str, str]:
    cp = controlplane_module()
    return {name: cp.binary_version(assets / name) for name in ("kube-apiserver", "etcd")}


# -- a lean Kubernetes client: one keep-alive connection per thread, raw JSON ----------------------


class KubeTarget:
    """Where and how to reach an API server, from a kubeconfig (client certificate or bearer token)."""

    def __init__(self, kubeconfig: Path, workdir: Path | None = None) -> None:
        import yaml

        doc = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = doc.get("current-context")
        ctx = next(c for c in doc["contexts"] if c["name"] == ctx_name)["context"]
        cluster = next(c for c in doc["clusters"] if c["name"] == ctx["cluster"])["cluster"]
        user = next(u for u in doc["users"] if u["name"] == ctx["user"])["user"]
        url = urllib.parse.urlsplit(cluster["server"])
        self.https = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.https else 80)
        self.headers: dict[str, str] = {"Accept": "application/json"}
        if user.get("token"):
            self.headers["Authorization"] = "Bearer " + user["token"]
        self.context: ssl.SSLContext | None = None
        if self.https:
            if cluster.get("insecure-skip-tls-verify"):
                ctx_ssl = ssl.create_default_context()
                ctx_ssl.check_hostname = False
                ctx_ssl.verify_mode = ssl.CERT_NONE
            elif cluster.get("certificate-authority-data"):
                ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
                ctx_ssl = ssl.create_default_context(cadata=ca)
            else:
                ctx_ssl = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
            cert = user.get("client-certificate-data")
            key = user.get("client-key-data")
            if cert and key:
                tmp = Path(tempfile.mkdtemp(prefix="leankube-", dir=workdir))
                (tmp / "c.pem").write_bytes(base64.b64decode(cert))
                (tmp / "k.pem").write_bytes(base64.b64decode(key))
                (tmp / "k.pem").chmod(0o600)
                ctx_ssl.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
                shutil.rmtree(tmp, ignore_errors=True)
            elif user.get("client-certificate") and user.get("client-key"):
                ctx_ssl.load_cert_chain(user["client-certificate"], user["client-key"])
            self.context = ctx_ssl

    def connect(self, timeout: float = 60.0) -> LeanKube:
        return LeanKube(self, timeout)


class KeepAlive:
    """One keep-alive HTTP(S) connection, opened on first use and again after the server closed it;
    a request that fails on a connection is retried once on a new one. Not thread-safe (one per thread)."""

    conn: http.client.HTTPConnection | None = None

    def _new(self) -> http.client.HTTPConnection:
        raise NotImplementedError

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._new()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class LeanKube(KeepAlive):
    """One keep-alive HTTP(S) connection to the API server; not thread-safe (one per thread)."""

    def __init__(self, target: KubeTarget, timeout: float = 60.0) -> None:
        self.target, self.timeout = target, timeout

    def _new(self) -> http.client.HTTPConnection:
        t = self.target
        if t.https:
            return http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout, context=t.context)
        return http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)

    def call(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = dict(self.target.headers)
        if body is not None:
            headers["Content-Type"] = content_type
        return self.request(method, path, body, headers)

    def json(self, method: str, path: str, doc: Any = None, content_type: str = "application/json") -> Any:
        status, data = self.call(method, path, json.dumps(doc).encode() if doc is not None else None, content_type)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def create_many(target: KubeTarget, path: str, bodies: list[dict[str, Any]], threads: int = 16) -> float:
    """POST every body to ``path``, ``threads`` keep-alive connections at once; seconds taken."""
    started = time.monotonic()
    chunks = [bodies[i::threads] for i in range(threads)]
    failures: list[str] = []

    def worker(chunk: list[dict[str, Any]]) -> None:
        kube = target.connect()
        try:
            for body in chunk:
                status, data = kube.call("POST", path, json.dumps(body).encode())
                if status not in (201, 409):
                    failures.append(f"HTTP {status}: {data[:200]!r}")
        finally:
            kube.close()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(worker, chunks))
    if failures:
        raise RuntimeError(f"{len(failures)} creates failed, e.g. {failures[0]}")
    return time.monotonic() - started


def ready_of(obj: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or ()
    )


class _StreamWatch:
    """List, then watch from the list's resourceVersion on one keep-alive connection (one stream:
    cheaper for the API server than a LIST per poll at 10 000 objects); subclasses note what they see."""

    def __init__(self, target: KubeTarget, thread_name: str) -> None:
        self.target = target
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listed = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        self._listed.wait(60)

    def _path(self, query: str = "") -> str:
        """The collection's path, with ``query`` (``key=value&...``) appended."""
        raise NotImplementedError

    def _seen(self, obj: dict[str, Any], now: float) -> None:
        """An object listed, added or modified."""
        raise NotImplementedError

    def _gone(self, obj: dict[str, Any], now: float) -> None:
        """An object deleted."""
        raise NotImplementedError

    def _run(self) -> None:
        kube = self.target.connect()
        rv = ""
        try:
            doc = kube.json("GET", self._path())
            now = time.time()
            for obj in doc.get("items", []):
                self._seen(obj, now)
            rv = doc["metadata"]["resourceVersion"]
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            self.error = f"list: {exc}"
        finally:
            kube.close()
            self._listed.set()
        while not self._stop.is_set() and rv:
            conn = self.target.connect(timeout=30.0)._new()
            self._conn = conn
            try:
                conn.request(
                    "GET",
                    self._path(f"watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=300"),
                    headers=self.target.headers,
                )
                resp = conn.getresponse()
                if resp.status != 200:
                    self.error = f"watch: HTTP {resp.status}"
                    return
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        self._seen(obj, time.time())
                    elif ev.get("type") == "DELETED":
                        self._gone(obj, time.time())
                    elif ev.get("type") == "ERROR":
                        self.error = f"watch error: {obj.get('message')}"
                        return
            except (OSError, http.client.HTTPException, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.5)
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(2)
            except OSError:
                pass
        self._thread.join(5)


class ReadyWatch(_StreamWatch):
    """List + watch the credentials of one namespace and note when each became Ready."""

    def __init__(self, target: KubeTarget, ns: str) -> None:
        self.ns = ns
        self.ready: dict[str, float] = {}
        self.total = 0
        self._names: set[str] = set()
        super().__init__(target, f"readywatch-{ns}")

    def _path(self, query: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.ns}/{PLURAL}"
        return f"{path}?{query}" if query else path

    def _seen(self, obj: dict[str, Any], now: float) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            self._names.add(name)
            self.total = len(self._names)
            if ready_of(obj):
                self.ready.setdefault(name, now)
            else:
                self.ready.pop(name, None)

    def _gone(self, obj: dict[str, Any], now: float) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            self._names.discard(name)
            self.total = len(self._names)
            self.ready.pop(name, None)

    def count(self) -> tuple[int, int]:
        with self._lock:
            return self.total, len(self.ready)

    def wait(self, n: int, t0: float, timeout: float) -> dict[str, Any]:
        """Wait until ``n`` are Ready; times (from ``t0``) at which 50 %, 90 % and 100 % were."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.count()[1] < n and not self.error:
            time.sleep(0.05)
        with self._lock:
            times = sorted(self.ready.values())
        marks: dict[str, Any] = {}
        for key, share in (("t50", 0.5), ("t90", 0.9), ("t100", 1.0)):
            k = max(1, int(-(-share * n // 1)))
            marks[key] = round(times[k - 1] - t0, 2) if len(times) >= k else None
        marks["t_first"] = round(times[0] - t0, 2) if times else None
        return {**marks, "ready": len(times), "timed_out": len(times) < n, "watch_error": self.error}


class TokenWatch(_StreamWatch):
    """List + watch, across all namespaces, the Secrets named ``name``: which token (the ``access_token``
    value) each namespace holds, and when each namespace first held each token."""

    def __init__(self, target: KubeTarget, name: str) -> None:
        self.name = name
        #: namespace -> the access_token (base64, as stored) its Secret holds now
        self.holds: dict[str, str] = {}
        #: (namespace, token) -> when that namespace was first seen holding that token
        self.first_seen: dict[tuple[str, str], float] = {}
        #: token -> how many namespaces hold it now
        self.holders: dict[str, int] = {}
        #: (time, namespace) of every ADDED or MODIFIED event
        self.events: list[tuple[float, str]] = []
        super().__init__(target, f"tokenwatch-{name}")

    def _path(self, query: str = "") -> str:
        path = f"/api/v1/secrets?fieldSelector=metadata.name%3D{urllib.parse.quote(self.name)}"
        return f"{path}&{query}" if query else path

    def _seen(self, obj: dict[str, Any], now: float) -> None:
        self._hold(obj["metadata"]["namespace"], (obj.get("data") or {}).get("access_token") or "", now)

    def _gone(self, obj: dict[str, Any], now: float) -> None:
        self._hold(obj["metadata"]["namespace"], "", now)

    def _hold(self, ns: str, token: str, now: float) -> None:
        with self._lock:
            old = self.holds.pop(ns, None)
            if old is not None:
                self.holders[old] -= 1
            if token:
                self.holds[ns] = token
                self.holders[token] = self.holders.get(token, 0) + 1
                self.first_seen.setdefault((ns, token), now)
                self.events.append((now, ns))

    def tokens(self) -> dict[str, int]:
        """token -> namespaces holding it now (tokens nobody holds left out)."""
        with self._lock:
            return {t: k for t, k in self.holders.items() if k > 0}

    def times_for(self, token: str) -> list[float]:
        """When each namespace holding ``token`` now first held it, sorted."""
        with self._lock:
            return sorted(self.first_seen[(ns, t)] for ns, t in self.holds.items() if t == token)

    def first_any(self) -> dict[str, float]:
        """namespace -> when its Secret first held any token (namespaces holding one now)."""
        with self._lock:
            out: dict[str, float] = {}
            for (ns, _), t in self.first_seen.items():
                if ns in self.holds:
                    out[ns] = min(t, out.get(ns, t))
            return out

    def writes_between(self, t0: float, t1: float) -> int:
        with self._lock:
            return sum(1 for t, _ in self.events if t0 <= t <= t1)


def delete_many(target: KubeTarget, paths: list[str], threads: int = 16) -> float:
    """DELETE every path, ``threads`` keep-alive connections at once (not waiting for finalizers)."""
    started = time.monotonic()
    chunks = [paths[i::threads] for i in range(threads)]

    def worker(chunk: list[str]) -> None:
        kube = target.connect()
        try:
            for path in chunk:
                kube.call("DELETE", path)
        finally:
            kube.close()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(worker, chunks))
    return time.monotonic() - started


# -- the API server's own counters ---------------------------------------------------------------


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_request_totals(text: str) -> dict[str, int]:
    """``apiserver_request_total`` from /metrics, summed by "VERB resource[/subresource]" (and, for
    answers other than 2xx, also by "VERB resource code")."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition("} ")
        labels = dict(_LABEL.findall(labels_text))
        resource = labels.get("resource", "")
        if not resource:
            continue
        sub = labels.get("subresource", "")
        key = f"{labels.get('verb', '?')} {resource}{'/' + sub if sub else ''}"
        n = int(float(value))
        out[key] = out.get(key, 0) + n
        code = labels.get("code", "")
        if code and not code.startswith("2"):
            out[f"{key} {code}"] = out.get(f"{key} {code}", 0) + n
    return out


def parse_flowcontrol(text: str, flow_schema: str) -> dict[str, int]:
    """APF counters of one FlowSchema: dispatched and rejected requests (by reason)."""
    out: dict[str, int] = {"dispatched": 0, "rejected": 0}
    for line in text.splitlines():
        for metric, key in (
            ("apiserver_flowcontrol_dispatched_requests_total{", "dispatched"),
            ("apiserver_flowcontrol_rejected_requests_total{", "rejected"),
        ):
            if line.startswith(metric) and f'flow_schema="{flow_schema}"' in line:
                out[key] += int(float(line.rpartition(" ")[2]))
    return out


# -- the token endpoint --------------------------------------------------------------------------


class Broker:
    """bench/broker_runner.py as a child process."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.proc, self.url = start_with_ready_line(
            [python(), str(BENCH / "broker_runner.py"), "--port", "0"], "BROKER READY", workdir / f"broker-{tag}.log"
        )
        self.token_url = self.url + "/auth-broker/request-token"
        self.clients: dict[str, str] = {}

    def control(self, **changes: Any) -> None:
        http_json("POST", self.url + "/_control", changes)

    def add_clients(self, clients: dict[str, str]) -> None:
        self.clients.update(clients)
        self.control(clients=self.clients)

    def summary(self, prefix: str = "") -> dict[str, Any]:
        return http_json("GET", self.url + "/_bench/summary?prefix=" + urllib.parse.quote(prefix))  # type: ignore[no-any-return]

    def times(self, since: float = 0.0) -> list[list[Any]]:
        return http_json("GET", f"{self.url}/_bench/times?since={since}")  # type: ignore[no-any-return]

    def reset(self) -> None:
        http_json("POST", self.url + "/_stats/reset", {})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


# -- the API server ------------------------------------------------------------------------------


def client_id_for(ns: str, i: int) -> str:
    return f"{ns}-{i:05d}"


#: Per-call counters of the operator's own requests on our control plane: one APF FlowSchema per
#: (verb, resource) of interest, all matching only the operator's ServiceAccount and all sending it to
#: the same priority level as before ("workload-low", where "service-accounts" sends it), so that APF's
#: per-FlowSchema ``dispatched`` counter counts exactly that identity's requests by call and nothing
#: about how they are served changes. (label, verb, API group, resource); the last one catches the rest.
COUNTED_CALLS = (
    ("GET secrets", "get", "", "secrets"),
    ("POST secrets", "create", "", "secrets"),
    ("PATCH secrets", "patch", "", "secrets"),
    ("PUT secrets", "update", "", "secrets"),
    ("DELETE secrets", "delete", "", "secrets"),
    ("LIST secrets", "list", "", "secrets"),
    ("WATCH secrets", "watch", "", "secrets"),
    ("PATCH autotekcredentials/status", "patch", GROUP, "autotekcredentials/status"),
    ("GET autotekcredentials", "get", GROUP, "autotekcredentials"),
    ("LIST autotekcredentials", "list", GROUP, "autotekcredentials"),
    ("WATCH autotekcredentials", "watch", GROUP, "autotekcredentials"),
    ("POST events", "create", "*", "events"),
    ("* leases", "*", "coordination.k8s.io", "leases"),
    ("PATCH clusterautotekcredentials/status", "patch", GROUP, "clusterautotekcredentials/status"),
    ("* clusterautotekcredentials", "*", GROUP, "clusterautotekcredentials"),
    ("* namespaces", "*", "", "namespaces"),
    ("other", "*", "*", "*"),
)
OPERATOR_SA = ("autotek-system", "autotek-operator")


def flow_schema_name(i: int) -> str:
    return f"bench-operator-{i:02d}"


def counted_flow_schemas() -> list[dict[str, Any]]:
    ns, sa = OPERATOR_SA
    out = []
    for i, (_, verb, group, resource) in enumerate(COUNTED_CALLS):
        rule: dict[str, Any] = {
            "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": sa, "namespace": ns}}],
            "resourceRules": [
                {
                    "verbs": [verb],
                    "apiGroups": [group],
                    "resources": [resource],
                    "namespaces": ["*"],
                    "clusterScope": True,
                }
            ],
        }
        if resource == "*":
            rule["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
        out.append(
            {
                "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
                "kind": "FlowSchema",
                "metadata": {"name": flow_schema_name(i)},
                "spec": {
                    "priorityLevelConfiguration": {"name": "workload-low"},
                    "matchingPrecedence": 1000 + i,
                    "distinguisherMethod": {"type": "ByUser"},
                    "rules": [rule],
                },
            }
        )
    return out


def operator_counts(text: str) -> dict[str, int]:
    """The operator ServiceAccount's requests by call, from the counting FlowSchemas' APF counters."""
    names = {f'flow_schema="{flow_schema_name(i)}"': label for i, (label, *_) in enumerate(COUNTED_CALLS)}
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith(
            ("apiserver_flowcontrol_dispatched_requests_total{", "apiserver_flowcontrol_rejected_requests_total{")
        ):
            continue
        for needle, label in names.items():
            if needle in line:
                key = label if "dispatched" in line[:40] else f"{label} rejected"
                out[key] = out.get(key, 0) + int(float(line.rpartition(" ")[2]))
    return out


class Cluster:
    """The API server: the cluster of AUTOTEK_BENCH_KUBECONFIG, else a real control plane of its own
    (``tests/controlplane.py``: etcd with its data on disk, kube-apiserver, kube-controller-manager)
    when the Kubernetes binaries are there, else bench/emulator_runner.py as a child process.

    On a control plane the operator (and the lean loop) authenticate as a ServiceAccount bound to the
    ClusterRole of manifests/ (``tests/integration/rbac.py``); the bench itself is admin."""

    def __init__(
        self, workdir: Path, tag: str, kubeconfig: str | None, api: str = "auto", cluster_credentials: bool = False
    ) -> None:
        import kubernetes

        #: Also the ClusterAutoTekCredential CRD, and the operator bound to the rendering's other ClusterRoles
        #: (autotek-operator-cluster-credentials) too.
        self.cluster_credentials = cluster_credentials

        self.proc: subprocess.Popen[str] | None = None
        self.plane: Any = None
        self.namespaces: list[str] = []
        self.workdir = workdir
        self._operator_kubeconfig: Path | None = None
        self._rbac: Any = None
        assets = assets_dir() if api in ("auto", "plane") else None
        if api == "plane" and assets is None:
            raise RuntimeError(f"no Kubernetes binaries in ${ASSETS_ENV} or {DEFAULT_ASSETS} (make envtest)")
        if kubeconfig:
            self.kubeconfig = Path(kubeconfig)
            self.emulated = False
            self.url = ""
        elif assets is not None:
            self.plane = start_plane(assets, workdir / f"plane-{tag}")
            self.kubeconfig = self.plane.admin_kubeconfig
            self.emulated = False
            self.url = self.plane.url
        else:
            self.kubeconfig = workdir / f"kubeconfig-{tag}"
            self.proc, self.url = start_with_ready_line(
                [python(), str(BENCH / "emulator_runner.py"), "--port", "0", "--kubeconfig", str(self.kubeconfig)],
                "EMULATOR READY",
                workdir / f"emulator-{tag}.log",
            )
            self.emulated = True
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=config)
        config.connection_pool_maxsize = 32
        config.retries = False
        self.api = kubernetes.client.ApiClient(configuration=config)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        #: The lean client's view (admin); None when the kubeconfig has neither certificate nor token.
        self.target: KubeTarget | None
        try:
            self.target = KubeTarget(self.kubeconfig, workdir)
            if not self.target.headers.get("Authorization") and self.target.https and self.plane is None:
                kc = self.kubeconfig.read_text()
                if "client-certificate" not in kc:
                    self.target = None  # exec plugins and the like: the kubernetes client only
        except (KeyError, StopIteration, ValueError, OSError, ssl.SSLError):
            self.target = None
        if not self.emulated:
            self._install_crd(CRD_FILE)
            if cluster_credentials:
                self._install_crd(CLUSTER_CRD_FILE)

    @property
    def real(self) -> bool:
        return not self.emulated

    def components(self) -> dict[str, int]:
        """pid of each control-plane process (etcd, kube-apiserver, kube-controller-manager)."""
        return dict(self.plane.pids()) if self.plane is not None else {}

    def component_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each control-plane process (or the emulator)."""
        out = {}
        pids = self.components() or ({"emulator": self.proc.pid} if self.proc is not None else {})
        for name, pid in pids.items():
            sample = proc_sample(pid)
            if sample is not None:
                out[name] = sample["cpu"]
        return out

    def operator_kubeconfig(self) -> Path:
        """Whom the operator (and the lean loop) authenticate as: on our own control plane a ServiceAccount
        bound to the ClusterRole of manifests/ (rendered with kubectl kustomize), else the bench's kubeconfig."""
        if self.plane is None:
            return self.kubeconfig
        if self._operator_kubeconfig is None:
            integration = str(ROOT / "tests" / "integration")
            if integration not in sys.path:
                sys.path.insert(0, integration)
            import rbac

            # rbac.py would take a TokenRequest from a test session's plane if this named one.
            os.environ.pop("AUTOTEK_TEST_CONTROLPLANE", None)
            self._rbac = rbac.Rbac(self.kubeconfig, self.api, "bench", self.workdir, namespace=OPERATOR_SA[0])
            role = rbac.one(self._rbac.rendered(), "ClusterRole", "autotek-operator")
            companions = rbac.companion_roles(self._rbac.rendered()) if self.cluster_credentials else []
            identity = self._rbac.service_account(OPERATOR_SA[1], shared_cluster_roles=[rbac.bare(role), *companions])
            self._operator_kubeconfig = identity.kubeconfig
            assert self.target is not None
            kube = self.target.connect()
            try:
                for fs in counted_flow_schemas():
                    status, data = kube.call(
                        "POST", "/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", json.dumps(fs).encode()
                    )
                    if status not in (201, 409):
                        raise RuntimeError(f"creating FlowSchema {fs['metadata']['name']}: {status} {data[:200]!r}")
            finally:
                kube.close()
        return self._operator_kubeconfig

    def operator_user(self) -> str:
        return f"system:serviceaccount:{OPERATOR_SA[0]}:{OPERATOR_SA[1]}" if self.plane is not None else "admin"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _install_crd(self, path: Path) -> None:
        import yaml
        from kubernetes.client import ApiextensionsV1Api
        from kubernetes.client.exceptions import ApiException

        ext = ApiextensionsV1Api(self.api)
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conds = ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                return
            time.sleep(0.5)
        raise RuntimeError("the CRD did not become established")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self.plane is not None:
            stop_plane(self.plane)
            self.plane = None

    # -- namespaces and objects ------------------------------------------------------------------

    def create_namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.namespaces.append(name)
        return name

    def delete_namespace(self, name: str, wait: float = 0.0) -> None:
        """Delete a namespace (a real cluster only; the emulator process is simply dropped)."""
        from kubernetes.client.exceptions import ApiException

        if self.emulated:
            return
        try:
            self.core.delete_namespace(name)
        except ApiException:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(name)
            except ApiException as exc:
                if exc.status == 404:
                    return
            time.sleep(1.0)

    def cleanup(self) -> None:
        if self.plane is not None:  # the whole plane goes
            self.namespaces.clear()
            return
        for ns in self.namespaces:
            self.delete_namespace(ns)
        self.namespaces.clear()

    def _create_many(self, ns: str, resource: str, bodies: list[dict[str, Any]], threads: int = 16) -> float:
        """Create ``bodies``: one seeding request on the emulator, a thread pool of POSTs on a cluster."""
        started = time.monotonic()
        if self.target is not None and not self.emulated:
            group = "api/v1" if resource == "v1/secrets" else f"apis/{GROUP}/{VERSION}"
            plural = "secrets" if resource == "v1/secrets" else PLURAL
            return create_many(self.target, f"/{group}/namespaces/{ns}/{plural}", bodies, threads)
        if self.emulated:
            for i in range(0, len(bodies), SEED_BATCH):  # aiohttp takes bodies up to 1 MiB
                batch = {"resource": resource, "namespace": ns, "items": bodies[i : i + SEED_BATCH]}
                http_json("POST", self.url + "/_bench/seed", batch, timeout=600)
            return time.monotonic() - started

        def one(body: dict[str, Any]) -> None:
            if resource == "v1/secrets":
                self.core.create_namespaced_secret(ns, body, _preload_content=False)
            else:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, _preload_content=False)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, bodies))
        return time.monotonic() - started

    def create_client_secrets(self, ns: str, n: int) -> tuple[dict[str, str], float]:
        clients: dict[str, str] = {}
        bodies = []
        for i in range(n):
            cid = client_id_for(ns, i)
            secret = f"s3cret-{i}-{uuid.uuid4().hex[:8]}"
            clients[cid] = secret
            bodies.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {"name": f"cs-{i:05d}", "namespace": ns},
                    "data": {
                        "client_id": base64.b64encode(cid.encode()).decode(),
                        "client_secret": base64.b64encode(secret.encode()).decode(),
                    },
                }
            )
        return clients, self._create_many(ns, "v1/secrets", bodies)

    def create_credentials(self, ns: str, n: int, token_url: str) -> float:
        bodies = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "AutoTekCredential",
                "metadata": {"name": f"c-{i:05d}", "namespace": ns},
                "spec": {"clientSecretRef": {"name": f"cs-{i:05d}"}, "tokenURL": token_url},
            }
            for i in range(n)
        ]
        return self._create_many(ns, f"{GROUP}/{VERSION}/{PLURAL}", bodies)

    def create_credential(self, ns: str, name: str, client_secret: str, token_url: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AutoTekCredential",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clientSecretRef": {"name": client_secret}, "tokenURL": token_url},
        }
        self._create_many(ns, f"{GROUP}/{VERSION}/{PLURAL}", [body])

    def ready_count(self, ns: str) -> tuple[int, int]:
        """(credentials, of which Ready=True) in ``ns``."""
        if self.emulated:
            doc = http_json("GET", f"{self.url}/_bench/ready?namespace={ns}")
            return int(doc["total"]), int(doc["ready"])
        resp = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False)
        items = json.loads(resp.data).get("items", [])
        ready = sum(
            1
            for obj in items
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (obj.get("status") or {}).get("conditions") or ()
            )
        )
        return len(items), ready

    def ready_watch(self, ns: str) -> ReadyWatch | PollReady:
        """Something whose ``wait(n, t0, timeout)`` says when ``n`` credentials of ``ns`` were Ready:
        a watch on a real API server (start it before t0), a server-side count on the emulator."""
        if self.target is not None and not self.emulated:
            return ReadyWatch(self.target, ns)
        return PollReady(self, ns)

    # -- request counters ----------------------------------------------------------------------

    def metrics_text(self) -> str | None:
        if self.emulated or self.target is None:
            return None
        kube = self.target.connect()
        try:
            status, data = kube.call("GET", "/metrics")
        finally:
            kube.close()
        return data.decode(errors="replace") if status == 200 else None

    def request_counts(self) -> dict[str, int] | None:
        """Requests by "VERB resource[/subresource]": the emulator's counters; on our control plane the
        operator ServiceAccount's own requests (APF counters of COUNTED_CALLS' FlowSchemas: exact, and
        nobody else's); on another cluster ``apiserver_request_total`` (every client's requests)."""
        if not self.emulated:
            text = self.metrics_text()
            if text is None:
                return None
            if self._operator_kubeconfig is not None and self.plane is not None:
                return operator_counts(text)
            return parse_request_totals(text)
        return http_json("GET", self.url + "/_emulator/stats")["requests"]  # type: ignore[no-any-return]

    def reset_request_counts(self) -> None:
        if self.emulated:
            http_json("POST", self.url + "/_emulator/stats/reset", {})

    def reset_gets(self) -> None:
        if self.emulated:
            http_json("POST", self.url + "/_bench/gets/reset", {})

    def distinct_gets(self, ns: str) -> int:
        return int(http_json("GET", f"{self.url}/_bench/gets?namespace={ns}")["distinct"])


class PollReady:
    """ReadyWatch's interface on the emulator (or a cluster the lean client cannot reach): polling."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns

    def count(self) -> tuple[int, int]:
        return self.cluster.ready_count(self.ns)

    def wait(self, n: int, t0: float, timeout: float) -> dict[str, Any]:
        fast = self.cluster.emulated
        interval = (0.1 if n <= 1000 else 0.25 if n <= 5000 else 0.5) if fast else (0.5 if n <= 1000 else 1.0)
        marks: dict[str, float | None] = {"t50": None, "t90": None, "t100": None}
        ready = 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, ready = self.count()
            now = time.time() - t0
            for key, share in (("t50", 0.5), ("t90", 0.9), ("t100", 1.0)):
                if marks[key] is None and ready >= share * n:
                    marks[key] = round(now, 2)
            if ready >= n:
                break
            time.sleep(interval)
        return {**marks, "ready": ready, "timed_out": ready < n, "poll_interval": interval}

    def stop(self) -> None:
        pass


# -- the operator --------------------------------------------------------------------------------


class Operator:
    """``python -m autotek_operator run`` as a child process (or under bench/opwrapper.py)."""

    def __init__(
        self,
        cluster: Cluster,
        broker: Broker,
        log_path: Path,
        *,
        level: str = "WARNING",
        wrapper: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.operator_kubeconfig()),
            "AUTOTEK_ALLOWED_TOKEN_URLS": broker.url + "/",
            "AUTOTEK_METRICS_PORT": "0",
            "AUTOTEK_HEALTH_PORT": "0",
            "AUTOTEK_LOG_LEVEL": level,
            **({"AUTOTEK_WATCH_TIMEOUT": "10"} if cluster.emulated else {}),
            **(extra_env or {}),
        }
        cmd = [python(), *(wrapper or ["-m", "autotek_operator"]), "run"]
        self.log_path = log_path
        self.started = time.time()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # noqa: S603
        CHILDREN.append(self.proc)
        self.watch = ProcWatch(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> dict[str, float]:
        """SIGTERM; returns the last /proc sample taken just before."""
        final = self.watch.sample() or self.watch.last()
        self.watch.stop()
        stop_process(self.proc)
        return final
