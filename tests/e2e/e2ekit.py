"""Helpers for the end-to-end suite: kubectl, the clusters (kind or the local node), the in-cluster broker
over TLS, the objects we apply.

Every external command runs with a timeout and every wait is bounded. ``kubectl`` always gets the
suite's own kubeconfig (``--kubeconfig`` and ``KUBECONFIG``), never the user's current context.
Nothing here prints a client secret or a token: objects that carry secrets go to kubectl on stdin,
and the diagnostics leave the broker's token list out.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from token_client.servers import make_ca, make_server_cert

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OVERLAYS = HERE / "overlays"
#: ``manifests/`` with the e2e image and settings (the component ``overlays/settings``).
OVERLAY = OVERLAYS / "default"
NAMESPACED_OVERLAY = OVERLAYS / "namespaced"
ROLLOUT_RESTART_OVERLAY = OVERLAYS / "rollout-restart"

#: The image the suite builds, under the name its own pods (broker, readers, applications) use...
IMAGE = "autotek-operator:e2e"


def _manifest_image() -> str:
    """The operator image ``manifests/`` refers to (``images:`` of manifests/base)."""
    doc = yaml.safe_load((ROOT / "manifests" / "base" / "kustomization.yaml").read_text())
    for image in doc.get("images") or []:
        if image.get("name") == "autotek-operator":
            return f"{image.get('newName', 'autotek-operator')}:{image.get('newTag', 'latest')}"
    raise AssertionError("manifests/base/kustomization.yaml names no image for autotek-operator")


#: ...and under the name the manifests install, so that ``kubectl apply -k manifests/`` runs it unchanged.
OPERATOR_IMAGE = _manifest_image()
IMAGES = (IMAGE, OPERATOR_IMAGE)


def image_ref(name: str) -> str:
    """The name as a container runtime stores it (a name without a registry is Docker Hub's library)."""
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


OPERATOR_NS = "autotek-system"
OPERATOR_DEPLOY = "autotek-operator"
OPERATOR_SELECTOR = "app.kubernetes.io/name=autotek-operator"
CRD_NAME = "autotekcredentials.autotek.io"
CLUSTER_CRD_NAME = "clusterautotekcredentials.autotek.io"
#: Every CRD the manifests install (an uninstall removes them all; Helm keeps them all).
CRD_NAMES = (CRD_NAME, CLUSTER_CRD_NAME)

NS = "autotek-e2e"
BROKER = "autotek-broker"
BROKER_PORT = 8443
BROKER_LIFETIME = 30
#: The broker's Service has this fixed ClusterIP (in the default 10.96.0.0/16 Service range of kind and
#: of the local node): the operator reaches it by address, so no cluster DNS is needed.
BROKER_IP = "10.96.203.17"
ALLOWED_TOKEN_URLS = f"https://{BROKER_IP}:{BROKER_PORT}/"
TOKEN_URL = f"https://{BROKER_IP}:{BROKER_PORT}/auth-broker/request-token"

CLIENT_ID = "e2e-client"
RETAIN_CLIENT_ID = "e2e-retain"
CREDENTIAL = "autotek"
TARGET = "autotek-token"
CLIENT_SECRET_NAME = "autotek-client"
RETAIN_CREDENTIAL = "autotek-retain"
RETAIN_TARGET = "autotek-retain-token"
RETAIN_CLIENT_SECRET_NAME = "autotek-retain-client"
#: The client of the ClusterAutoTekCredentials; its Secret lives in the operator's namespace (the only
#: namespace a cluster credential may read it from by default).
CLUSTER_CLIENT_ID = "e2e-cluster"
CLUSTER_CLIENT_SECRET_NAME = "autotek-cluster-client"
READER_POD = "autotek-reader"
MOUNT_PATH = "/var/run/autotek"

RUN_AS = 65532

T = TypeVar("T")


class CommandError(AssertionError):
    """An external command failed or timed out; the message carries its output."""


def _tail(text: str, lines: int = 40) -> str:
    parts = text.strip().splitlines()
    return "\n".join(parts[-lines:])


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a timeout; raise :class:`CommandError` (with its output) when it fails."""
    try:
        proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(
            f"`{' '.join(cmd)}` timed out after {timeout:.0f}s\nstdout:\n{_tail(out)}\nstderr:\n{_tail(err)}"
        ) from None
    except FileNotFoundError as exc:
        raise CommandError(f"`{cmd[0]}` is not installed: {exc}") from None
    if check and proc.returncode != 0:
        raise CommandError(
            f"`{' '.join(cmd)}` exited with {proc.returncode}\n"
            f"stdout:\n{_tail(proc.stdout)}\nstderr:\n{_tail(proc.stderr)}"
        )
    return proc


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
    """Poll ``fn`` until it returns something truthy; fail after ``timeout`` seconds.

    A :class:`CommandError` inside ``fn`` (an API hiccup, an object not there yet) counts as "not
    yet" and is reported if it is the last thing seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = fn()
        except CommandError as exc:
            last = f"error: {exc}"
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {_tail(str(last), 20)})")
        time.sleep(interval)


def parse_time(value: str) -> datetime:
    """An RFC 3339 instant as the operator writes it (``...Z``)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- kubectl -----------------------------------------------------------------------------------


class Kubectl:
    """kubectl bound to one kubeconfig file."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.env["KUBECONFIG"] = str(kubeconfig)

    def argv(self, *args: str) -> list[str]:
        # A discovery cache of our own, next to the kubeconfig: nothing under ~/.kube is written.
        cache = self.kubeconfig.parent / "kube-cache"
        return ["kubectl", "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(cache), *args]

    def __call__(
        self, *args: str, timeout: float = 60, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), timeout=timeout, input=input, env=self.env, check=check)

    def text(self, *args: str, timeout: float = 60) -> str:
        return self(*args, timeout=timeout).stdout

    def json(self, *args: str, timeout: float = 60) -> Any:
        out = self(*args, "-o", "json", timeout=timeout).stdout
        return json.loads(out) if out.strip() else None

    def get(self, kind: str, name: str, ns: str | None = None, timeout: float = 30) -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        args = ["get", kind, name, "--ignore-not-found"]
        if ns:
            args += ["-n", ns]
        doc: dict[str, Any] | None = self.json(*args, timeout=timeout)
        return doc

    def apply(self, objects: Sequence[dict[str, Any]], timeout: float = 60) -> str:
        """``kubectl apply -f -`` with the objects on stdin (so secrets never reach a command line)."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        return self("apply", "-f", "-", input=json.dumps(doc), timeout=timeout).stdout

    def secret_data(self, ns: str, name: str, timeout: float = 30) -> dict[str, str] | None:
        secret = self.get("secret", name, ns, timeout=timeout)
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def condition(self, obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == kind:
                return dict(cond)
        return None

    def exec_cat(self, ns: str, pod: str, path: str, timeout: float = 30) -> str:
        return self.text("exec", "-n", ns, pod, "--", "cat", path, timeout=timeout)

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(*args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )

    def operator_pods(self) -> list[dict[str, Any]]:
        doc = self.json("get", "pods", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR)
        items: list[dict[str, Any]] = (doc or {}).get("items", [])
        return items

    def logs(self, *args: str, timeout: float = 60) -> str:
        """``kubectl logs``; an empty string when there is nothing (e.g. no previous container)."""
        proc = self("logs", *args, timeout=timeout, check=False)
        return proc.stdout if proc.returncode == 0 else ""


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def restart_counts(pod: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: int(c.get("restartCount", 0)) for c in (pod.get("status") or {}).get("containerStatuses") or []}


# -- clusters ----------------------------------------------------------------------------------


@dataclass
class Cluster:
    flavour: str  # "kind" or "local"
    name: str
    kubeconfig: Path
    created: bool  # by this session (and so deleted at its end unless AUTOTEK_E2E_KEEP=1)


# -- docker and kind ---------------------------------------------------------------------------


def kind_clusters() -> list[str]:
    return run(["kind", "get", "clusters"], timeout=60).stdout.split()


def kind_create(name: str, kubeconfig: Path, log: Path) -> None:
    # --kubeconfig: kind writes the new context there, not into ~/.kube/config, and does not switch
    # the user's current context.
    proc = run(
        ["kind", "create", "cluster", "--name", name, "--wait", "120s", "--kubeconfig", str(kubeconfig)],
        timeout=600,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        check=False,
    )
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise CommandError(f"kind create cluster --name {name} failed:\n{_tail(proc.stdout + proc.stderr)}")


def kind_kubeconfig(name: str, kubeconfig: Path) -> None:
    text = run(["kind", "get", "kubeconfig", "--name", name], timeout=60).stdout
    kubeconfig.write_text(text)
    kubeconfig.chmod(0o600)


def kind_delete(name: str, kubeconfig: Path) -> None:
    run(
        ["kind", "delete", "cluster", "--name", name, "--kubeconfig", str(kubeconfig)],
        timeout=300,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        check=False,
    )


def docker_build(log: Path) -> None:
    tags = [arg for image in IMAGES for arg in ("-t", image)]
    proc = run(["docker", "build", *tags, "."], timeout=1800, cwd=ROOT, check=False)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise CommandError(
            f"docker build {' '.join(tags)} . failed (full log: {log}):\n{_tail(proc.stdout + proc.stderr)}"
        )


def kind_load(name: str) -> None:
    run(["kind", "load", "docker-image", *IMAGES, "--name", name], timeout=600)


# -- TLS for the token endpoint ---------------------------------------------------------------


@dataclass
class TestCA:
    """A CA made for one run and the broker's serving certificate (files in ``folder``)."""

    folder: Path
    ca_pem: str
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def create(cls, folder: Path) -> TestCA:
        folder.mkdir(parents=True, exist_ok=True)
        ca = make_ca("autotek-e2e test CA")
        cert_pem, key_pem = make_server_cert(
            ca,
            ips=(BROKER_IP, "127.0.0.1"),
            dns=("localhost", f"{BROKER}.{NS}.svc", f"{BROKER}.{NS}.svc.cluster.local"),
            name=BROKER,
        )
        paths = {"ca": folder / "ca.crt", "cert": folder / "tls.crt", "key": folder / "tls.key"}
        paths["ca"].write_text(ca.pem)
        paths["cert"].write_bytes(cert_pem)
        paths["key"].write_bytes(key_pem)
        paths["key"].chmod(0o600)
        return cls(folder=folder, ca_pem=ca.pem, **paths)

    def tls_secret(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": f"{BROKER}-tls",
                "namespace": NS,
                "labels": {"app.kubernetes.io/part-of": "autotek-e2e"},
            },
            "stringData": {"tls.crt": self.cert.read_text(), "tls.key": self.key.read_text()},
        }


# -- the broker's control API, through kubectl port-forward -------------------------------------


class BrokerAPI:
    """The in-cluster token-endpoint double's ``/_control`` and ``/_stats``, reached on 127.0.0.1.

    ``kubectl port-forward svc/autotek-broker`` runs as a child process on a free local port; if it
    dies (it does when the connection to the pod breaks) the next call starts it again.
    """

    def __init__(self, kubectl: Kubectl, log: Path, ca: Path) -> None:
        self.kubectl = kubectl
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        # Never through an HTTP proxy from the environment: the target is our own loopback forward,
        # served with the run's test CA.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca))
        )
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.stop()
        self.port = free_port()
        self.proc = self.kubectl.popen(
            "port-forward",
            "-n",
            NS,
            f"svc/{BROKER}",
            f"{self.port}:{BROKER_PORT}",
            "--address",
            "127.0.0.1",
            log=self.log,
        )

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"kubectl port-forward exited with {self.proc.returncode}:\n"
                    f"{_tail(self.log.read_text(errors='replace'))}"
                )
            try:
                return bool(self._raw("GET", "/_health", None, timeout=3).get("ok"))
            except (OSError, ValueError, ssl.SSLError):
                return False

        wait_for(f"kubectl port-forward to svc/{BROKER} on 127.0.0.1:{self.port}", healthy, timeout=30, interval=0.5)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _raw(self, method: str, path: str, doc: Any, timeout: float = 10) -> Any:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with self._opener.open(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def call(self, method: str, path: str, doc: Any = None) -> Any:
        with self._lock:
            try:
                return self._raw(method, path, doc)
            except urllib.error.HTTPError:
                raise
            except OSError:
                # The forward broke (pod replaced, idle connection dropped): start it again, once.
                self.start()
                return self._raw(method, path, doc)

    def control(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/_control", changes)
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/_stats")
        return result

    def requests_for(self, client_id: str) -> list[dict[str, Any]]:
        return [r for r in self.stats()["requests"] if r.get("client_id") == client_id]

    def summary(self) -> str:
        """For diagnostics: counts and the last requests, never the tokens."""
        s = self.stats()
        recent = [{k: r.get(k) for k in ("time", "client_id", "status", "auth_method")} for r in s["requests"][-20:]]
        return json.dumps(
            {"count": s["count"], "by_client": s["by_client"], "by_status": s["by_status"], "recent_requests": recent},
            indent=1,
        )


# -- objects the suite applies -------------------------------------------------------------------


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def namespace_object() -> dict[str, Any]:
    # Pod Security "restricted" is enforced, so every pod the suite runs there must be hardened.
    return hardened_namespace(NS)


def broker_objects(clients: dict[str, str], tls: TestCA, lifetime: int = BROKER_LIFETIME) -> list[dict[str, Any]]:
    """The token-endpoint double over TLS: Secrets (client secrets, serving cert), a Deployment, a Service.

    The secrets reach the broker's ``--client ID:SECRET`` arguments through ``$(VAR)`` expansion of
    environment variables taken from the Secret, so they never show in the Deployment spec. The
    Service has the fixed ClusterIP :data:`BROKER_IP` that the serving certificate names.
    """
    labels = {"app.kubernetes.io/name": BROKER, "app.kubernetes.io/part-of": "autotek-e2e"}
    env: list[dict[str, Any]] = []
    args = ["--host", "0.0.0.0", "--port", str(BROKER_PORT), "--lifetime", str(lifetime)]
    args += ["--tls-cert", "/etc/broker-tls/tls.crt", "--tls-key", "/etc/broker-tls/tls.key"]
    for i, client_id in enumerate(sorted(clients)):
        var = f"BROKER_CLIENT_SECRET_{i}"
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": f"{BROKER}-clients", "key": client_id}}})
        args += ["--client", f"{client_id}:$({var})"]
    probe = {
        "httpGet": {"path": "/_health", "port": "https", "scheme": "HTTPS"},
        "periodSeconds": 2,
        "timeoutSeconds": 2,
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": f"{BROKER}-clients", "namespace": NS, "labels": labels},
            "stringData": dict(clients),
        },
        tls.tls_secret(),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": BROKER, "namespace": NS, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": BROKER}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "terminationGracePeriodSeconds": 5,
                        "securityContext": pod_security_context(),
                        "containers": [
                            {
                                "name": "broker",
                                "image": IMAGE,
                                "imagePullPolicy": "Never",  # loaded into the nodes, never pulled
                                "command": ["python", "-m", "autotek_operator.dev.broker"],
                                "args": args,
                                "env": env,
                                "ports": [{"name": "https", "containerPort": BROKER_PORT}],
                                "readinessProbe": probe,
                                "resources": {
                                    "requests": {"cpu": "10m", "memory": "32Mi"},
                                    "limits": {"memory": "128Mi"},
                                },
                                "securityContext": container_security_context(),
                                "volumeMounts": [{"name": "tls", "mountPath": "/etc/broker-tls", "readOnly": True}],
                            }
                        ],
                        "volumes": [{"name": "tls", "secret": {"secretName": f"{BROKER}-tls", "defaultMode": 0o440}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": BROKER, "namespace": NS, "labels": labels},
            "spec": {
                "clusterIP": BROKER_IP,
                "selector": {"app.kubernetes.io/name": BROKER},
                "ports": [{"name": "https", "port": BROKER_PORT, "targetPort": "https"}],
            },
        },
    ]


def client_secret_object(ns: str, name: str, client_id: str, clients: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "autotek-e2e"}},
        "stringData": {"client_id": client_id, "client_secret": clients[client_id]},
    }


def credential_object(
    ns: str, name: str, secret: str, target: dict[str, Any], ca_pem: str, **spec: Any
) -> dict[str, Any]:
    """An AutoTekCredential for the in-cluster broker: its https URL, trusted through ``caBundle``."""
    return {
        "apiVersion": "autotek.io/v1alpha1",
        "kind": "AutoTekCredential",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "autotek-e2e"}},
        "spec": {
            "clientSecretRef": {"name": secret},
            "tokenURL": TOKEN_URL,
            "caBundle": ca_pem,
            "target": target,
            **spec,
        },
    }


def credential_objects(clients: dict[str, str], ca_pem: str) -> list[dict[str, Any]]:
    """Client Secrets and the two AutoTekCredentials: ``autotek`` (Delete) and ``autotek-retain`` (Retain)."""
    return [
        client_secret_object(NS, CLIENT_SECRET_NAME, CLIENT_ID, clients),
        client_secret_object(NS, RETAIN_CLIENT_SECRET_NAME, RETAIN_CLIENT_ID, clients),
        credential_object(NS, CREDENTIAL, CLIENT_SECRET_NAME, {"name": TARGET}, ca_pem),
        credential_object(
            NS,
            RETAIN_CREDENTIAL,
            RETAIN_CLIENT_SECRET_NAME,
            {"name": RETAIN_TARGET, "deletionPolicy": "Retain"},
            ca_pem,
        ),
    ]


def cluster_credential_object(name: str, target: dict[str, Any], ca_pem: str, **selection: Any) -> dict[str, Any]:
    """A ClusterAutoTekCredential for the in-cluster broker; ``selection``: namespaceSelector and/or namespaces."""
    return {
        "apiVersion": "autotek.io/v1alpha1",
        "kind": "ClusterAutoTekCredential",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "autotek-e2e"}},
        "spec": {
            "clientSecretRef": {"namespace": OPERATOR_NS, "name": CLUSTER_CLIENT_SECRET_NAME},
            "tokenURL": TOKEN_URL,
            "caBundle": ca_pem,
            "target": target,
            **selection,
        },
    }


def reader_pod_object(ns: str = NS, secret: str = TARGET) -> dict[str, Any]:
    """A pod that mounts the target Secret as a volume, as an application would, and idles."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": READER_POD, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "autotek-e2e"}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Always",
            "securityContext": pod_security_context(),
            "containers": [
                {
                    "name": "app",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "infinity"],
                    "volumeMounts": [{"name": "token", "mountPath": MOUNT_PATH, "readOnly": True}],
                    "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
                    "securityContext": container_security_context(),
                }
            ],
            "volumes": [{"name": "token", "secret": {"secretName": secret, "defaultMode": 0o440}}],
        },
    }


# -- installing and removing the operator ------------------------------------------------------


def operator_present(kubectl: Kubectl) -> bool:
    return kubectl.get("deploy", OPERATOR_DEPLOY, OPERATOR_NS) is not None


def install(kubectl: Kubectl, overlay: Path) -> None:
    """``kubectl apply -k <overlay>``, then wait for the CRD and for every replica to be Ready."""
    kubectl("apply", "-k", str(overlay), timeout=120)
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90)
    kubectl("rollout", "status", "-n", OPERATOR_NS, f"deploy/{OPERATOR_DEPLOY}", "--timeout=240s", timeout=260)


def uninstall(kubectl: Kubectl, overlay: Path) -> None:
    """``kubectl delete -k <overlay>``, waiting until everything (the namespace too) is gone."""
    kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--wait=true", "--timeout=240s", timeout=270)


def operator_logs(kubectl: Kubectl) -> dict[str, str]:
    """Each operator pod's logs, current and previous container."""
    out = {}
    for pod in kubectl.operator_pods():
        name = str(pod["metadata"]["name"])
        out[name] = kubectl.logs("-n", OPERATOR_NS, f"pod/{name}", "--all-containers") + kubectl.logs(
            "-n", OPERATOR_NS, f"pod/{name}", "--all-containers", "--previous"
        )
    return out


def assert_no_denials_and_no_restarts(kubectl: Kubectl, extra_logs: Sequence[str] = ()) -> None:
    """No 403/Forbidden in any operator log, and no operator container restarted."""
    pods = kubectl.operator_pods()
    assert pods, "no operator pods"
    restarts = {str(p["metadata"]["name"]): restart_counts(p) for p in pods}
    assert all(n == 0 for counts in restarts.values() for n in counts.values()), f"operator restarts: {restarts}"
    logs = operator_logs(kubectl)
    assert any(text.strip() for text in logs.values()), "the operator wrote no logs"
    denials = rbac_denials("\n".join([*extra_logs, *logs.values()]))
    assert not denials, "the operator was refused by the API server (RBAC):\n" + "\n".join(denials[:20])


def hardened_namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted", "app.kubernetes.io/part-of": "autotek-e2e"},
        },
    }


# -- watching a Secret while something happens ---------------------------------------------------


@dataclass
class Sample:
    at: datetime
    token: str | None
    expires_at: datetime | None
    error: str | None = None


@dataclass
class SecretWatch:
    """Reads a Secret about once a second in a background thread, until stopped."""

    kubectl: Kubectl
    ns: str
    name: str
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SecretWatch:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=40)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = datetime.now(UTC)
            try:
                data = self.kubectl.secret_data(self.ns, self.name, timeout=15)
            except CommandError as exc:
                self.samples.append(Sample(at, None, None, error=_tail(str(exc), 3)))
            else:
                token = (data or {}).get("access_token") or None
                raw = (data or {}).get("expires_at")
                self.samples.append(Sample(at, token, parse_time(raw) if raw else None))
            self._stop.wait(self.interval)


# -- logs --------------------------------------------------------------------------------------

#: "Forbidden"/"forbidden" anywhere, or 403 as a number of its own ("(403)", "status 403",
#: '"code": 403'), but not digits inside timestamps such as "12:04:03.403" or resource versions.
RBAC_DENIAL = re.compile(r"[Ff]orbidden|(?<![\w.:+-])403(?![\w.])")


def rbac_denials(text: str) -> list[str]:
    return [line for line in text.splitlines() if RBAC_DENIAL.search(line)]


# -- what the tests share -------------------------------------------------------------------------


@dataclass
class Env:
    cluster: Cluster
    kubectl: Kubectl
    broker: BrokerAPI
    clients: dict[str, str]
    workdir: Path
    tls: TestCA
    #: What one test leaves for a later one (e.g. the logs of an operator pod it deleted).
    notes: dict[str, Any] = field(default_factory=dict)

    def wait_ready(self, name: str, timeout: int = 120) -> dict[str, Any]:
        """``kubectl wait --for=condition=Ready atc/<name>``, then the credential as JSON."""
        self.kubectl(
            "wait", "--for=condition=Ready", f"atc/{name}", "-n", NS, f"--timeout={timeout}s", timeout=timeout + 30
        )
        cred = self.kubectl.get("atc", name, NS)
        assert cred is not None, f"AutoTekCredential {NS}/{name} disappeared"
        return cred

    def secret_data(self, name: str = TARGET) -> dict[str, str] | None:
        return self.kubectl.secret_data(NS, name)

    def token(self, name: str = TARGET) -> str | None:
        return (self.secret_data(name) or {}).get("access_token")

    def count(self, client_id: str = CLIENT_ID) -> int:
        """Token requests the broker has answered for ``client_id``."""
        return int(self.broker.stats()["by_client"].get(client_id, 0))

    def cat(self, path: str, pod: str = READER_POD) -> str:
        return self.kubectl.exec_cat(NS, pod, path)

    def pod(self, name: str = READER_POD) -> dict[str, Any]:
        pod = self.kubectl.get("pod", name, NS)
        assert pod is not None, f"pod {NS}/{name} disappeared"
        return pod


# -- diagnostics for failed tests ----------------------------------------------------------------


@dataclass
class _Diagnostics:
    kubectl: Kubectl | None = None
    broker: BrokerAPI | None = None
    workdir: Path | None = None
    #: What the cluster itself can tell (the local node: its components' state and log tails).
    node: Callable[[], str] | None = None


#: Set by the session fixtures as they come up, so a failure in any phase can be explained.
DIAGNOSTICS = _Diagnostics()


def diagnostics() -> str:
    """kubectl get/describe/logs for the operator and the test namespace, plus the broker's counts.

    No Secret data: ``kubectl describe secret`` and ``get secrets`` show names and sizes only, the
    operator never logs tokens, and the broker summary leaves its token list out.
    """
    k = DIAGNOSTICS.kubectl
    if k is None:
        return "(no cluster yet)"
    commands: list[list[str]] = [
        ["get", "nodes", "-o", "wide"],
        ["get", "pods", "-A", "-o", "wide"],
        ["get", "deploy,rs,pods,svc", "-n", OPERATOR_NS, "-o", "wide"],
        ["describe", "deploy", OPERATOR_DEPLOY, "-n", OPERATOR_NS],
        ["describe", "pods", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR],
        ["get", "lease", "-n", OPERATOR_NS, "-o", "yaml"],
        ["logs", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR, "--all-containers", "--prefix", "--tail=300"],
        [
            "logs",
            "-n",
            OPERATOR_NS,
            "-l",
            OPERATOR_SELECTOR,
            "--all-containers",
            "--prefix",
            "--previous",
            "--tail=100",
        ],
        ["get", "events", "-n", OPERATOR_NS, "--sort-by=.lastTimestamp"],
        ["get", "atc,deploy,pods,svc,secrets", "-n", NS, "-o", "wide"],
        ["get", "atc", "-n", NS, "-o", "yaml"],
        ["describe", "atc", "-n", NS],
        ["describe", "pods", "-n", NS],
        ["describe", "secrets", "-n", NS],
        ["get", "events", "-n", NS, "--sort-by=.lastTimestamp"],
        ["logs", "-n", NS, f"deploy/{BROKER}", "--tail=50"],
    ]
    parts: list[str] = []
    for args in commands:
        try:
            proc = k(*args, timeout=30, check=False)
            body = (proc.stdout + proc.stderr).rstrip()
        except CommandError as exc:
            body = str(exc)
        parts.append(f"$ kubectl {' '.join(args)}\n{body}")
    if DIAGNOSTICS.node is not None:
        try:
            parts.append(f"local node:\n{DIAGNOSTICS.node()}")
        except OSError as exc:
            parts.append(f"local node: {exc}")
    if DIAGNOSTICS.broker is not None:
        try:
            parts.append(f"broker /_stats (tokens left out):\n{DIAGNOSTICS.broker.summary()}")
        except (OSError, AssertionError, ValueError) as exc:
            parts.append(f"broker /_stats unavailable: {exc}")
    return "\n\n".join(parts)
