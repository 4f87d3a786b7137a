#!/usr/bin/env python3
"""A one-machine Kubernetes node for the end-to-end suite, from upstream binaries and Debian packages.

    .venv/bin/python tests/e2e/node/localnode.py up [--build] [--kubeconfig-out PATH]
    .venv/bin/python tests/e2e/node/localnode.py load-image docker.io/library/autotek-operator:e2e
    .venv/bin/python tests/e2e/node/localnode.py status
    .venv/bin/python tests/e2e/node/localnode.py down
    .venv/bin/python tests/e2e/node/localnode.py build     # only the packages and the images

``up`` brings up, as root on this machine: the control plane of ``tests/controlplane.py`` (etcd,
kube-apiserver on 0.0.0.0 advertising this machine's address, kube-controller-manager), containerd
with its own root, state and socket, a CNI bridge (``autotek0``, 10.244.0.0/24, masquerading, portmap),
kube-scheduler, kubelet (cgroupfs, cgroup v1 allowed) and kube-proxy (iptables); it waits until the
node is Ready and the ``kubernetes`` Service has endpoints. The binaries come from ``KUBEBUILDER_ASSETS``
(default ``.cache/envtest``). Missing Debian packages are installed first (``apt-get``). ``up`` returns
once the node is Ready; a supervisor process keeps the node running until ``down``. Running ``up``
again while the node runs does nothing; after a crash it first cleans up what is left.

``down`` deletes every pod through the kubelet (so that CNI tears the pod networks down), stops
kubelet, kube-proxy, kube-scheduler, containerd and the control plane, then removes whatever is left:
container and shim processes, mounts under the state folder, the ``autotek0`` bridge, kube-proxy's and
the bridge plugin's iptables rules, the network namespaces of our pods; it restores the sysctls it
changed. It is safe to run at any time, also when nothing runs.

State lives under ``.cache/localnode/`` (``run/`` for one node's life, ``images/`` for cached image
tarballs kept across runs, ``timings.json``, ``logs/``). Images: see ``nodeimages.py``.

From Python (the pytest fixture): ``LocalNode().up()`` / ``.load_image(tag)`` / ``.down()``; the
components then are children of the calling process and die with it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
for _path in (HERE, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import nodeimages  # noqa: E402
from nodeutil import (  # noqa: E402
    Child,
    NodeError,
    Timings,
    all_pids,
    cmdline,
    file_tail,
    run,
    say,
    start_time,
    stop_from_pid_file,
    stop_group,
    wait_until,
)

import controlplane  # noqa: E402

DEFAULT_STATE = ROOT / ".cache" / "localnode"
DEFAULT_ASSETS = ROOT / ".cache" / "envtest"
NODE_BINARIES = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")

#: Debian packages the node and the image builds need, with a file each provides.
PACKAGES = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "iptables": "/usr/sbin/iptables",
    "conntrack": "/usr/sbin/conntrack",
    "iproute2": "/usr/bin/ip",
    "podman": "/usr/bin/podman",
    "debootstrap": "/usr/sbin/debootstrap",
    "debian-archive-keyring": "/usr/share/keyrings/debian-archive-keyring.gpg",
    "busybox-static": "/bin/busybox",
}

POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
BRIDGE = "autotek0"
CNI_NETWORK = "autotek-e2e"
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}
KUBELET_PORT = 10250
NODE_READY_TIMEOUT = 180.0

#: The kubelet re-reads Secret volumes on each pod sync; the default period is a minute.
KUBELET_SYNC_FREQUENCY = "20s"


def host_address() -> str:
    """The address of the interface that holds the default route (pods reach the API server there)."""
    # `ip route get` only looks the route up; nothing is sent.
    proc = subprocess.run(["ip", "-4", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True, timeout=10)
    found = re.search(r"\bsrc (\S+)", proc.stdout)
    if found and not ipaddress.ip_address(found.group(1)).is_loopback:
        return found.group(1)
    proc = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True, timeout=10
    )
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", proc.stdout):
        return match.group(1)
    raise NodeError("address", "this machine has no global IPv4 address for pods to reach the API server on")


def _kubeconfig(path: Path, server: str, ca: Path, user: str, cert: Path, key: Path) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    path.chmod(0o600)
    return path


class LocalNode:
    """One node on this machine; see the module's docstring."""

    def __init__(
        self,
        state: Path = DEFAULT_STATE,
        assets: Path | None = None,
        *,
        node_name: str | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.state = state.resolve()
        self.assets = (assets or Path(os.environ.get("KUBEBUILDER_ASSETS") or DEFAULT_ASSETS)).resolve()
        self.node_name = (node_name or socket.gethostname()).lower()
        self.run_dir = self.state / "run"
        self.logs = self.state / "logs"
        self.pids = self.run_dir / "pids"
        self.timings = timings or Timings(self.state / "timings.json")
        digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:8]
        # Unix socket paths are limited to 108 bytes: keep them short whatever the checkout's path.
        self.sockets = Path(f"/run/autotek-e2e-{digest}")
        self.containerd_sock = self.sockets / "containerd.sock"
        self.images = nodeimages.Images(self.state / "images", self.state / "work", self.logs)
        self.plane: controlplane.ControlPlane | None = None
        self.children: dict[str, Child] = {}
        self.address = ""

    # -- paths ---------------------------------------------------------------------------------

    @property
    def info_file(self) -> Path:
        return self.run_dir / "node.json"

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "admin.kubeconfig"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # -- up ------------------------------------------------------------------------------------

    def up(self, *, build: list[str] | None = None) -> Path:
        """Bring the node up (cleaning up a previous run's leftovers first); the admin kubeconfig.

        ``build``: tags for the project's image, built from the Dockerfile before the node starts and
        loaded into it once it is Ready.
        """
        with self.timings.stage("packages"):
            ensure_packages(self.logs)
        if build:
            self.build_images(build)
        else:
            with self.timings.stage("pause image"):
                self.images.ensure_pause()
        with self.timings.stage("node up"):
            self.cleanup()
            self.logs.mkdir(parents=True, exist_ok=True)
            for old in self.logs.glob("*.log"):
                if old.name not in ("base-image.log", "pause-image.log", "image-build.log", "packages.log"):
                    old.unlink()
            try:
                self._start()
            except BaseException:
                self.down()
                raise
        if build:
            with self.timings.stage("load image"):
                self.load_image(*build)
        return self.kubeconfig

    def build_images(self, tags: list[str]) -> None:
        with self.timings.stage("base image"):
            say(f"base image {nodeimages.BASE_IMAGE}: {self.images.ensure_base()}")
            self.images.ensure_pause()
        with self.timings.stage("image build"):
            self.images.build(ROOT, tags, self.log("image-build"))

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(parents=True, exist_ok=True)
        try:
            controlplane.check_assets(self.assets, NODE_BINARIES)
        except controlplane.ControlPlaneError as exc:
            raise NodeError("assets", f"{exc} (make envtest unpacks them; or set KUBEBUILDER_ASSETS)") from exc
        self.address = host_address()
        try:
            # The API server reaches the kubelet (logs, exec, port-forward) by the node's name.
            socket.getaddrinfo(self.node_name, KUBELET_PORT)
        except OSError as exc:
            raise NodeError(
                "address", f"the node name {self.node_name!r} does not resolve ({exc}): add it to /etc/hosts"
            ) from exc
        self._record_netns()
        self._sysctls()

        plane = controlplane.ControlPlane(
            self.assets,
            self.run_dir / "controlplane",
            bind_address="0.0.0.0",  # pods reach it at the node's address
            advertise_address=self.address,
            extra_sans=[f"IP:{self.address}", f"DNS:{self.node_name}"],
            ready_timeout=90.0,
        )
        self.plane = plane
        try:
            plane.start()
        except controlplane.ControlPlaneError as exc:
            raise NodeError("control plane", str(exc)) from exc
        shutil.copy2(plane.admin_kubeconfig, self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        self._write_info("starting")

        ca = plane.pki / "ca.crt"
        users = self.run_dir / "users"
        kubelet_kc = _kubeconfig(
            users / "kubelet.kubeconfig",
            plane.url,
            ca,
            f"system:node:{self.node_name}",
            *plane.issue_client_cert(f"system:node:{self.node_name}", ["system:nodes"]),
        )
        proxy_kc = _kubeconfig(
            users / "kube-proxy.kubeconfig",
            plane.url,
            ca,
            "system:kube-proxy",
            *plane.issue_client_cert("system:kube-proxy"),
        )
        scheduler_kc = _kubeconfig(
            users / "kube-scheduler.kubeconfig",
            plane.url,
            ca,
            "system:kube-scheduler",
            *plane.issue_client_cert("system:kube-scheduler"),
        )

        self._start_containerd()
        self._import(nodeimages.PAUSE_IMAGE, step="pause image")
        self._start_scheduler(scheduler_kc)
        self._start_kube_proxy(proxy_kc)
        self._start_kubelet(kubelet_kc, ca)
        self._wait_ready()
        self._write_info("ready")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PATH", "")
        for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
            if extra not in path.split(":"):
                path = f"{path}:{extra}"
        env["PATH"] = path
        return env

    def _child(self, name: str) -> Child:
        child = Child(name, self.log(name), self.pids)
        self.children[name] = child
        return child

    def _start_containerd(self) -> None:
        base = self.run_dir / "containerd"
        cni = self.run_dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "ipam").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(cni / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni / "net.d" / "10-autotek-e2e.conflist").write_text(json.dumps(conflist, indent=1))
        config = f"""\
version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{self.containerd_sock}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{nodeimages.PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE on this machine: containers may not lower their OOM score adjustment.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / "net.d"}"
    max_conf_num = 1
"""
        base.mkdir(parents=True, exist_ok=True)
        (base / "config.toml").write_text(config)
        child = self._child("containerd")
        child.start(["containerd", "--config", str(base / "config.toml")], env=self._env())

        def answers() -> bool:
            if not self.containerd_sock.exists():
                return False
            return self.ctr("containerd", "version", timeout=10, check=False).returncode == 0

        wait_until("containerd", "containerd answers on its socket", answers, 60, log=child.log, alive=self._alive)

    def ctr(
        self, step: str, *args: str, timeout: float = 60, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return run(
            step,
            ["ctr", "--address", str(self.containerd_sock), "--namespace", "k8s.io", *args],
            timeout=timeout,
            check=check,
            input=input,
        )

    def _import(self, *images: str, step: str) -> None:
        with tempfile.TemporaryDirectory(prefix="image-", dir=self.run_dir) as tmp:
            archive = Path(tmp) / "image.tar"
            self.images.save(list(images), archive)
            run(
                step,
                [
                    "ctr",
                    "--address",
                    str(self.containerd_sock),
                    "--namespace",
                    "k8s.io",
                    "images",
                    "import",
                    str(archive),
                ],
                timeout=600,
                log=self.log("image-import"),
            )

    def load_image(self, *images: str) -> None:
        """``podman save`` the images (one archive) into this node's containerd (``ctr images import``)."""
        if not self.containerd_sock.exists():
            raise NodeError("load image", f"the node is not up (no {self.containerd_sock})")
        self._import(*images, step="load image")

    def _start_scheduler(self, kubeconfig: Path) -> None:
        port = controlplane.free_port()
        self._child("kube-scheduler").start(
            [
                str(self.assets / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.run_dir / 'scheduler-certs'}",
            ],
            env=self._env(),
        )

    def _start_kube_proxy(self, kubeconfig: Path) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": CLUSTER_CIDR,
            "hostnameOverride": self.node_name,
            "bindAddress": "0.0.0.0",
            "healthzBindAddress": f"127.0.0.1:{controlplane.free_port()}",
            "metricsBindAddress": f"127.0.0.1:{controlplane.free_port()}",
            # Leave the machine's conntrack settings alone (0 = do not change).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "30s", "minSyncPeriod": "1s"},
        }
        path = self.run_dir / "kube-proxy.yaml"
        path.write_text(json.dumps(config, indent=1))
        self._child("kube-proxy").start([str(self.assets / "kube-proxy"), f"--config={path}"], env=self._env())

    def _start_kubelet(self, kubeconfig: Path, ca: Path) -> None:
        root = self.run_dir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pod-logs").mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1 and no systemd.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "address": "0.0.0.0",
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            # Test only: the API server's `kubectl logs/exec/port-forward` calls need no kubelet RBAC.
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(self.run_dir / "pod-logs"),
            "syncFrequency": KUBELET_SYNC_FREQUENCY,
            "serializeImagePulls": True,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "maxPods": 50,
        }
        path = self.run_dir / "kubelet.yaml"
        path.write_text(json.dumps(config, indent=1))
        self._child("kubelet").start(
            [
                str(self.assets / "kubelet"),
                f"--config={path}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.node_name}",
                f"--node-ip={self.address}",
                f"--root-dir={root}",
                f"--cert-dir={self.run_dir / 'kubelet-certs'}",
                "--v=1",
            ],
            env=self._env(),
        )

    def kubectl(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(
            "kubectl",
            ["kubectl", "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.run_dir / "kube-cache"), *args],
            timeout=timeout,
            check=check,
        )

    def _alive(self) -> tuple[str, Path] | None:
        """The first component that is no longer running, and its log."""
        for child in self.children.values():
            dead = child.dead()
            if dead:
                return dead, child.log
        return None

    def diagnostics(self, lines: int = 30) -> str:
        """For a failed test's report: which components are no longer running, and the tails of their logs."""
        parts = []
        for name, child in self.children.items():
            dead = child.dead()
            if dead or name in ("kubelet", "containerd"):
                parts.append(f"{name}: {dead or 'running'}; last lines of {child.log}:\n{file_tail(child.log, lines)}")
        if self.plane is not None:
            for name, pid in self.plane.pids().items():
                if start_time(pid) is None:
                    parts.append(f"{name} is no longer running:\n{self.plane.log_tail(name, lines)}")
        return "\n\n".join(parts) or "(no node components)"

    def _wait_ready(self) -> None:
        kubelet = self.children["kubelet"]

        def ready() -> bool:
            proc = self.kubectl("get", "node", self.node_name, "-o", "json", check=False)
            if proc.returncode != 0:
                return False
            node = json.loads(proc.stdout)
            return any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in node.get("status", {}).get("conditions", [])
            )

        wait_until(
            "kubelet",
            f"node {self.node_name} Ready",
            ready,
            NODE_READY_TIMEOUT,
            interval=2,
            log=kubelet.log,
            alive=self._alive,
        )

        def proxied() -> bool:
            proc = run(
                "kube-proxy", ["iptables", "-w", "5", "-t", "nat", "-S", "KUBE-SERVICES"], timeout=20, check=False
            )
            return proc.returncode == 0 and b"default/kubernetes" in proc.stdout

        wait_until(
            "kube-proxy",
            "kube-proxy's rules for the `kubernetes` Service",
            proxied,
            60,
            interval=1,
            log=self.log("kube-proxy"),
            alive=self._alive,
        )

    # -- state -------------------------------------------------------------------------------

    def _write_info(self, status: str) -> None:
        assert self.plane is not None
        info = {
            "status": status,
            "node": self.node_name,
            "address": self.address,
            "apiserver": self.plane.url,
            "kubeconfig": str(self.kubeconfig),
            "containerd": str(self.containerd_sock),
            "pids": {**self.plane.pids(), **{n: c.proc.pid for n, c in self.children.items() if c.proc}},
            "owner_pid": os.getpid(),
        }
        self.info_file.write_text(json.dumps(info, indent=1))

    def info(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return None
        return doc

    def _record_netns(self) -> None:
        netns = Path("/var/run/netns")
        before = sorted(p.name for p in netns.iterdir()) if netns.is_dir() else []
        (self.run_dir / "netns-before.json").write_text(json.dumps(before))

    def _sysctls(self) -> None:
        saved: dict[str, str] = {}
        for key, value in SYSCTLS.items():
            path = Path("/proc/sys") / key
            if not path.exists():
                if key.startswith("net/bridge/") and shutil.which("modprobe"):
                    # br_netfilter may be a module; without it Service traffic between pods is not NATed.
                    run("sysctls", ["modprobe", "br_netfilter"], timeout=30, check=False)
                if not path.exists():
                    raise NodeError("sysctls", f"{path} does not exist (kernel without br_netfilter?)")
            old = path.read_text().strip()
            if old != value:
                saved[key] = old
                path.write_text(value)
        restore = self.state / "sysctls-restore.json"
        if not restore.exists():
            restore.write_text(json.dumps(saved))

    # -- down ----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop everything and clean up; returns what was done. Safe to call at any time."""
        done: list[str] = []
        if self.children.get("kubelet") and not self.children["kubelet"].dead() and self.plane is not None:
            done += self._drain()
        for name in ("kubelet", "kube-proxy", "kube-scheduler"):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()
                done.append(f"stopped {name}")
        done += self._remove_containers()
        child = self.children.pop("containerd", None)
        if child is not None:
            child.stop()
            done.append("stopped containerd")
        if self.plane is not None:
            try:
                self.plane.stop()
            except controlplane.ControlPlaneError as exc:
                done.append(f"control plane: {exc}")
            self.plane = None
            done.append("stopped the control plane")
        done += self.cleanup()
        return done

    def _drain(self) -> list[str]:
        """Delete every pod and wait until its sandbox is stopped, so that CNI releases its network."""
        try:
            self.kubectl("cordon", self.node_name, timeout=30, check=False)
            self.kubectl(
                "delete",
                "pods",
                "--all",
                "--all-namespaces",
                "--grace-period=1",
                "--wait=false",
                timeout=60,
                check=False,
            )

            def stopped() -> bool:
                proc = self.ctr("drain", "tasks", "list", timeout=20, check=False)
                lines = proc.stdout.decode(errors="replace").splitlines()[1:]
                running = proc.returncode != 0 or any("RUNNING" in line for line in lines)
                # A sandbox's network is released (CNI DEL) after its containers stop.
                return not running and not _cni_results()

            wait_until("drain", "every pod stopped and its network released", stopped, 60, interval=1)
        except NodeError as exc:
            return [f"drain incomplete: {exc}"]
        return ["deleted every pod"]

    def _remove_containers(self) -> list[str]:
        if not self.containerd_sock.exists():
            return []
        proc = self.ctr("down", "tasks", "list", "-q", timeout=20, check=False)
        tasks = proc.stdout.decode().split() if proc.returncode == 0 else []
        for task in tasks:
            self.ctr("down", "tasks", "kill", "-a", "-s", "SIGKILL", task, timeout=20, check=False)
        for task in tasks:
            self.ctr("down", "tasks", "delete", "-f", task, timeout=30, check=False)
        proc = self.ctr("down", "containers", "list", "-q", timeout=20, check=False)
        containers = proc.stdout.decode().split() if proc.returncode == 0 else []
        if containers:
            self.ctr("down", "containers", "delete", *containers, timeout=60, check=False)
        return [f"removed {len(containers)} containers ({len(tasks)} running)"] if containers else []

    def cleanup(self) -> list[str]:
        """Remove whatever a node of this state folder left behind (processes, mounts, network, rules)."""
        done: list[str] = []
        if self.pids.is_dir():
            for pid_file in sorted(self.pids.glob("*.pid")):
                stopped = stop_from_pid_file(pid_file)
                if stopped:
                    done.append(f"stopped leftover {stopped}")
        done += self._stop_leftover_plane()
        done += self._kill_shims_and_containers()
        done += self._unmount()
        for link in Path("/var/log/containers").glob("*.log") if Path("/var/log/containers").is_dir() else []:
            with contextlib.suppress(OSError):
                if str(self.run_dir) in os.readlink(link):
                    link.unlink()
        done += self._network_cleanup()
        done += self._restore_sysctls()
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.run_dir.exists():
                done.append(f"could not remove all of {self.run_dir}")
        if self.sockets.exists():
            shutil.rmtree(self.sockets, ignore_errors=True)
        return done

    def _stop_leftover_plane(self) -> list[str]:
        state = self.run_dir / "controlplane" / controlplane.STATE_FILE
        try:
            pids = json.loads(state.read_text()).get("pids", {})
        except (OSError, ValueError):
            return []
        done = []
        workdir = str(self.run_dir / "controlplane")
        for name, pid in pids.items():
            # Only the very process: its command line still names this plane's folder.
            if any(workdir in arg for arg in cmdline(int(pid))):
                stop_group(int(pid), 15)
                done.append(f"stopped leftover {name} (pid {pid})")
        return done

    def _kill_shims_and_containers(self) -> list[str]:
        done = []
        sock = str(self.containerd_sock)
        for pid in all_pids():
            argv = cmdline(pid)
            if argv and "containerd-shim" in Path(argv[0]).name and sock in argv:
                # The shim leads its own session; its containers live in the pod cgroups (below).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                done.append(f"killed leftover shim (pid {pid})")
        cgroup_root = Path("/sys/fs/cgroup")
        killed: set[int] = set()
        for controller in ("pids", "memory", "cpu", "freezer", "systemd", "unified"):
            kubepods = cgroup_root / controller / "kubepods"
            if not kubepods.is_dir():
                continue
            for procs in kubepods.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    for line in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            if int(line) not in killed:
                                os.kill(int(line), signal.SIGKILL)
                                killed.add(int(line))
        if killed:
            done.append(f"killed {len(killed)} leftover container processes")
            time.sleep(0.5)
        # What the killed shims kept at fixed places: runc's state, the shim's socket and CNI's cache, per task.
        tasks = self.run_dir / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
        for task in tasks.iterdir() if tasks.is_dir() else []:
            shutil.rmtree(Path("/run/containerd/runc/k8s.io") / task.name, ignore_errors=True)
            digest = hashlib.sha256(os.path.join(self.containerd_sock, "k8s.io", task.name).encode()).hexdigest()
            Path("/run/containerd/s", digest).unlink(missing_ok=True)
            results = Path("/var/lib/cni/results")  # libcni's cache (our network's and the loopback's)
            for result in results.glob(f"*-{task.name}-*") if results.is_dir() else []:
                result.unlink(missing_ok=True)
        for controller_dir in cgroup_root.iterdir() if cgroup_root.is_dir() else []:
            kubepods = controller_dir / "kubepods"
            if kubepods.is_dir():
                for d in sorted((p for p in kubepods.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    kubepods.rmdir()
        return done

    def _unmount(self) -> list[str]:
        prefixes = (str(self.run_dir) + "/", str(self.sockets) + "/")
        mounts: list[str] = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefixes):
                    mounts.append(point)
        for point in sorted(set(mounts), key=lambda p: -len(p)):
            proc = subprocess.run(["umount", point], capture_output=True, timeout=30)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        return [f"unmounted {len(set(mounts))} mounts"] if mounts else []

    def _network_cleanup(self) -> list[str]:
        done: list[str] = []
        netns = Path("/var/run/netns")
        before_file = self.run_dir / "netns-before.json"
        if before_file.exists() and netns.is_dir():
            before = set(json.loads(before_file.read_text()))
            for entry in netns.iterdir():
                if entry.name.startswith("cni-") and entry.name not in before:
                    subprocess.run(["umount", str(entry)], capture_output=True, timeout=30)
                    entry.unlink(missing_ok=True)
                    done.append(f"removed network namespace {entry.name}")
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, timeout=30)
            done.append(f"deleted bridge {BRIDGE}")
        if not self.run_dir.exists():
            return done  # no node of ours ran since the last cleanup: the rules below are not ours
        proxy = self.assets / "kube-proxy"
        if proxy.exists() and _has_chain("nat", "KUBE-SERVICES"):
            subprocess.run([str(proxy), "--cleanup"], capture_output=True, timeout=60, env=self._env())
            done.append("kube-proxy --cleanup")
        done += _remove_cni_masquerade()
        done += _remove_kubelet_rules()
        done += _remove_empty_system_dirs()
        return done

    def _restore_sysctls(self) -> list[str]:
        restore = self.state / "sysctls-restore.json"
        if not restore.exists():
            return []
        with contextlib.suppress(OSError, ValueError):
            for key, value in json.loads(restore.read_text()).items():
                (Path("/proc/sys") / key).write_text(value)
        restore.unlink(missing_ok=True)
        return ["restored sysctls"]


#: Folders that kubelet, the runc shim and CNI create at fixed places whatever our configuration says;
#: removed at the end when nothing but our own leftovers is in them.
SYSTEM_DIRS = (
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    "/run/containerd/runc/k8s.io",
    "/run/containerd/runc",
    "/run/containerd/s",
    "/run/containerd",
    "/var/lib/cni/results",
    "/var/lib/cni",
    "/var/log/containers",
)


def _cni_results() -> list[Path]:
    """libcni's cached results for our network's sandboxes (one file per attachment, until CNI DEL)."""
    folder = Path("/var/lib/cni/results")
    return sorted(folder.glob(f"{CNI_NETWORK}-*")) if folder.is_dir() else []


def _remove_empty_system_dirs() -> list[str]:
    removed = []
    for result in _cni_results():  # the sandboxes they describe are gone by now
        result.unlink(missing_ok=True)
    # The kubelet's device-plugin socket: nothing else listens there once our kubelet is stopped.
    Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink(missing_ok=True)
    for folder in SYSTEM_DIRS:
        with contextlib.suppress(OSError):
            Path(folder).rmdir()  # only when empty
            removed.append(folder)
    return [f"removed empty {', '.join(removed)}"] if removed else []


def _has_chain(table: str, chain: str) -> bool:
    proc = subprocess.run(["iptables", "-w", "5", "-t", table, "-S", chain], capture_output=True, timeout=30)
    return proc.returncode == 0


def _remove_kubelet_rules() -> list[str]:
    """The chains the kubelet adds at start (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT)."""
    removed = []
    for tool in ("iptables", "ip6tables"):

        def ipt(*args: str, tool: str = tool) -> bool:
            return subprocess.run([tool, "-w", "5", *args], capture_output=True, timeout=30).returncode == 0

        for chain in ("INPUT", "OUTPUT"):
            while ipt("-t", "filter", "-D", chain, "-j", "KUBE-FIREWALL"):
                pass
        for table, chain in (
            ("filter", "KUBE-FIREWALL"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
        ):
            if ipt("-t", table, "-F", chain) and ipt("-t", table, "-X", chain):
                removed.append(f"{tool} {table}/{chain}")
    return [f"removed the kubelet's chains ({', '.join(removed)})"] if removed else []


def _remove_cni_masquerade() -> list[str]:
    """The bridge plugin's per-pod masquerade rules (comment ``name: "autotek-e2e" id: ...``) and chains."""
    proc = subprocess.run(
        ["iptables", "-w", "5", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True, timeout=30
    )
    removed = 0
    for line in proc.stdout.splitlines():
        if f'name: \\"{CNI_NETWORK}\\"' not in line and f'name: "{CNI_NETWORK}"' not in line:
            continue
        target = re.search(r"-j (CNI-[0-9a-f]+)", line)
        rule = subprocess.run(
            ["sh", "-c", f"iptables -w 5 -t nat {line.replace('-A ', '-D ', 1)}"], capture_output=True, timeout=30
        )
        if rule.returncode == 0:
            removed += 1
        if target:
            subprocess.run(["iptables", "-w", "5", "-t", "nat", "-F", target.group(1)], capture_output=True, timeout=30)
            subprocess.run(["iptables", "-w", "5", "-t", "nat", "-X", target.group(1)], capture_output=True, timeout=30)
    return [f"removed {removed} leftover CNI masquerade rules"] if removed else []


def ensure_packages(logs: Path) -> list[str]:
    """Install the Debian packages that are missing (``apt-get``); the names installed."""
    missing = [name for name, path in PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise NodeError("packages", f"missing {', '.join(missing)} and no apt-get to install them")
    log = logs / "packages.log"
    say(f"apt-get install {' '.join(missing)} (log {log})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("packages", ["apt-get", "update"], timeout=600, log=log, env=env)
    run(
        "packages",
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        timeout=900,
        log=log,
        env=env,
    )
    still = [name for name in missing if not Path(PACKAGES[name]).exists()]
    if still:
        raise NodeError("packages", f"installed but still missing: {', '.join(still)}", log)
    return missing


# -- the supervisor: keeps a node up between `up` and `down` -------------------------------------


def _supervisor_pid(state: Path) -> int | None:
    try:
        doc = json.loads((state / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return None
    pid = int(doc["pid"])
    return pid if start_time(pid) == doc.get("start") else None


def running(state: Path = DEFAULT_STATE) -> bool:
    """Whether a node that ``localnode.py up`` started from this state folder is up."""
    return _supervisor_pid(state) is not None and (LocalNode(state).info() or {}).get("status") == "ready"


def serve(state: Path, build: list[str]) -> int:
    """Bring the node up, report through ``supervisor.json``, and keep it up until SIGTERM/SIGINT."""
    status_file = state / "supervisor.json"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = LocalNode(state)
    (state / "supervisor.pid").write_text(json.dumps({"pid": os.getpid(), "start": start_time(os.getpid())}))
    try:
        try:
            kubeconfig = node.up(build=build)
        except (NodeError, controlplane.ControlPlaneError) as exc:
            status_file.write_text(json.dumps({"status": "failed", "error": str(exc)}))
            return 1
        status_file.write_text(json.dumps({"status": "ready", "kubeconfig": str(kubeconfig)}))
        while not stop.wait(1):
            dead = node._alive()
            if dead:
                say(f"{dead[0]}; stopping the node; last lines of {dead[1]}:\n{file_tail(dead[1], 20)}")
                break
        return 0
    finally:
        for line in node.down():
            say(line)
        (state / "supervisor.pid").unlink(missing_ok=True)


def cmd_up(args: argparse.Namespace) -> int:
    state: Path = args.state
    node = LocalNode(state)
    if running(state):
        say(f"the node is already up; kubeconfig {node.kubeconfig}")
    else:
        cmd_down(args)
        state.mkdir(parents=True, exist_ok=True)
        status_file = state / "supervisor.json"
        status_file.unlink(missing_ok=True)
        (state / "timings.json").unlink(missing_ok=True)
        log = state / "supervisor.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--state", str(state), "_serve"]
        for tag in args.build or []:
            argv += ["--build", tag]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        say(f"supervisor pid {proc.pid}, log {log}")
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                doc = json.loads(status_file.read_text())
            except (OSError, ValueError):
                doc = {}
            if doc.get("status") == "ready":
                break
            if doc.get("status") == "failed":
                proc.wait(timeout=300)
                print(doc.get("error"), file=sys.stderr)
                return 1
            if proc.poll() is not None:
                print(f"the supervisor exited with {proc.returncode}:\n{file_tail(log)}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                cmd_down(args)
                print(f"the node was not up within {args.timeout:.0f}s:\n{file_tail(log)}", file=sys.stderr)
                return 1
            time.sleep(1)
        print(Timings.read(state / "timings.json").table(), file=sys.stderr)
    if args.kubeconfig_out:
        shutil.copy2(node.kubeconfig, args.kubeconfig_out)
        os.chmod(args.kubeconfig_out, 0o600)
    print(node.kubeconfig)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state: Path = args.state
    pid = _supervisor_pid(state)
    if pid is not None:
        say(f"stopping the supervisor (pid {pid})")
        stop_group(pid, timeout=180)
    (state / "supervisor.pid").unlink(missing_ok=True)
    for line in LocalNode(state).cleanup():
        say(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    node = LocalNode(args.state)
    info = node.info() or {}
    pids = info.get("pids", {})
    doc = {
        "supervisor": _supervisor_pid(args.state),
        "status": info.get("status", "down"),
        "kubeconfig": info.get("kubeconfig"),
        "processes": {name: (pid if start_time(int(pid)) else None) for name, pid in pids.items()},
    }
    if doc["status"] == "ready":
        proc = node.kubectl("get", "nodes", "-o", "wide", check=False)
        doc["nodes"] = proc.stdout.decode(errors="replace")
    print(json.dumps(doc, indent=1))
    return 0 if doc["status"] == "ready" and doc["supervisor"] else 1


def cmd_load_image(args: argparse.Namespace) -> int:
    LocalNode(args.state).load_image(*args.image)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    node = LocalNode(args.state)
    with node.timings.stage("packages"):
        ensure_packages(node.logs)
    node.build_images(args.tag or ["docker.io/library/autotek-operator:e2e"])
    print(node.timings.table(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localnode.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder (default .cache/localnode)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the node up (idempotent)")
    up.add_argument("--kubeconfig-out", type=Path, help="also copy the admin kubeconfig here")
    up.add_argument("--build", action="append", metavar="TAG", help="build the project's image as TAG and load it")
    up.add_argument("--timeout", type=float, default=1500, help="seconds to wait for the node (default 1500)")
    sub.add_parser("down", help="stop everything and clean up (idempotent)")
    sub.add_parser("status", help="what runs; exit 0 when the node is up")
    load = sub.add_parser("load-image", help="copy images from podman into the node")
    load.add_argument("image", nargs="+")
    build = sub.add_parser("build", help="install packages, make the base image, build the project's image")
    build.add_argument("--tag", action="append")
    serve_p = sub.add_parser("_serve")
    serve_p.add_argument("--build", action="append", default=[])
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("localnode.py must run as root (containerd, kubelet, iptables)", file=sys.stderr)
        return 2
    try:
        if args.command == "_serve":
            return serve(args.state, args.build)
        handler = {
            "up": cmd_up,
            "down": cmd_down,
            "status": cmd_status,
            "load-image": cmd_load_image,
            "build": cmd_build,
        }[args.command]
        return handler(args)
    except (NodeError, controlplane.ControlPlaneError) as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
