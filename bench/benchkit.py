"""Plumbing for bench.py: child processes, /proc sampling, the API server, the token endpoint."""

from __future__ import annotations

import base64
import json
import os
import platform
import signal
import subprocess
import sys
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
GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
#: Objects per seeding request to the emulator (each request stays well under aiohttp's 1 MiB).
SEED_BATCH = 2000

#: Every child process started by this module, so that an interrupted run can still end them.
CHILDREN: list[subprocess.Popen[Any]] = []


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


def http_json(method: str, url: str, doc: Any = None, timeout: float = 120.0) -> Any:
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310 - loopback URLs we started
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we started
        body = resp.read()
    return json.loads(body) if body else None


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


class Cluster:
    """The API server: a real one (AUTOTEK_BENCH_KUBECONFIG) or bench/emulator_runner.py as a child."""

    def __init__(self, workdir: Path, tag: str, kubeconfig: str | None) -> None:
        import kubernetes

        self.proc: subprocess.Popen[str] | None = None
        self.namespaces: list[str] = []
        if kubeconfig:
            self.kubeconfig = Path(kubeconfig)
            self.emulated = False
            self.url = ""
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
        if not self.emulated:
            self._install_crd()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _install_crd(self) -> None:
        import yaml
        from kubernetes.client import ApiextensionsV1Api
        from kubernetes.client.exceptions import ApiException

        ext = ApiextensionsV1Api(self.api)
        crd = yaml.safe_load(CRD_FILE.read_text())
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
        for ns in self.namespaces:
            self.delete_namespace(ns)
        self.namespaces.clear()

    def _create_many(self, ns: str, resource: str, bodies: list[dict[str, Any]], threads: int = 16) -> float:
        """Create ``bodies``: one seeding request on the emulator, a thread pool of POSTs on a cluster."""
        started = time.monotonic()
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

    # -- request counters (emulator only) --------------------------------------------------------

    def request_counts(self) -> dict[str, int] | None:
        if not self.emulated:
            return None
        return http_json("GET", self.url + "/_emulator/stats")["requests"]  # type: ignore[no-any-return]

    def reset_request_counts(self) -> None:
        if self.emulated:
            http_json("POST", self.url + "/_emulator/stats/reset", {})

    def reset_gets(self) -> None:
        if self.emulated:
            http_json("POST", self.url + "/_bench/gets/reset", {})

    def distinct_gets(self, ns: str) -> int:
        return int(http_json("GET", f"{self.url}/_bench/gets?namespace={ns}")["distinct"])


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
            "KUBECONFIG": str(cluster.kubeconfig),
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
