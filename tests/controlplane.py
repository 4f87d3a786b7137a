"""A real Kubernetes control plane as a test fixture: etcd, kube-apiserver and kube-controller-manager.

Shaped after controller-runtime's ``pkg/internal/testing/controlplane``: one :class:`ControlPlane`
owns the processes; :class:`Etcd`, :class:`APIServer` and :class:`ControllerManager` each own one
process, its flags, its health check and its data directory. ``start()`` starts them in order and
stops whatever already started when a later step fails; ``stop()`` stops everything and reports
every error it met.

The binaries come from a ``KUBEBUILDER_ASSETS``-style folder (``kube-apiserver``, ``etcd`` and,
when present, ``kube-controller-manager``). Certificates are made with ``cryptography``. Every child
runs in its own process group with its output in ``workdir/logs/`` and dies with the process that
started it (``PR_SET_PDEATHSIG``). A started plane writes ``workdir/controlplane.json`` so that other
processes (pytest-xdist workers) can :meth:`ControlPlane.attach` to it.

Usable from tests (``import controlplane``) and from scripts by path.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["APIServer", "ControlPlane", "ControlPlaneError", "ControllerManager", "Etcd", "check_assets"]

STATE_FILE = "controlplane.json"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc"
#: Names the serving certificate always carries (the ``kubernetes`` Service and loopback).
DEFAULT_SANS = (
    "IP:127.0.0.1",
    f"IP:{KUBERNETES_SERVICE_IP}",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)
STOP_TIMEOUT = 15.0
VERSION_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """A control plane (or one of its binaries) could not be used; the message names the step or file."""


# -- binaries ---------------------------------------------------------------------------------


def check_assets(directory: str | os.PathLike[str] | None, names: Sequence[str] = ("kube-apiserver", "etcd")) -> Path:
    """Check that ``directory`` holds each of ``names`` as a working executable; return it as a Path."""
    if not directory:
        raise ControlPlaneError("no assets folder given (KUBEBUILDER_ASSETS is empty)")
    folder = Path(directory).expanduser().resolve()
    if not folder.is_dir():
        raise ControlPlaneError(f"assets folder {folder} does not exist or is not a directory")
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ControlPlaneError(f"{path} is missing (the assets folder needs {', '.join(names)})")
        if not os.access(path, os.X_OK):
            raise ControlPlaneError(f"{path} is not executable")
        try:
            done = subprocess.run(
                [str(path), "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                stdin=subprocess.DEVNULL, errors="replace",
            )
        except subprocess.TimeoutExpired as exc:
            raise ControlPlaneError(f"{path} --version did not finish within {VERSION_TIMEOUT:.0f}s") from exc
        except OSError as exc:
            raise ControlPlaneError(f"{path} cannot be run: {exc}") from exc
        if done.returncode != 0:
            out = text_tail(done.stdout + done.stderr, 10)
            raise ControlPlaneError(f"{path} --version exited with code {done.returncode}:\n{out}")
    return folder


def binary_version(path: Path) -> str:
    """The first line ``PATH --version`` prints (for headers and logs)."""
    try:
        done = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
            stdin=subprocess.DEVNULL, errors="replace",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# -- small helpers ---------------------------------------------------------------------------


def text_tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (read from its last 64 KiB), or why there are none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return text_tail(data, lines) or f"({path} is empty)"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll ``fn`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and release it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the thread that started it ends (Linux)."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "user"


# -- processes --------------------------------------------------------------------------------


class Process:
    """One child process: its own process group, output to a log file, killed with its parent."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, cmd: Sequence[str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"# {' '.join(cmd)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                start_new_session=True, preexec_fn=die_with_parent(os.getpid()),
            )
        except OSError as exc:
            self._close_log()
            raise ControlPlaneError(f"{self.name}: cannot start {cmd[0]}: {exc}") from exc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.proc.poll() if self.proc is not None else None

    def tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def fail(self, what: str, lines: int = 40) -> ControlPlaneError:
        return ControlPlaneError(f"{self.name}: {what}; last lines of {self.log_path}:\n{self.tail(lines)}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``; idempotent."""
        proc, self.proc = self.proc, None
        try:
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)
            # Whatever the leader left behind in its group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def _wait_until(proc: Process, what: str, check: Callable[[], str | None], deadline: float,
                interval: float = 0.25) -> None:
    """Poll ``check`` (None means ready, else a reason) until ready, the process exits, or ``deadline``."""
    last = "not checked yet"
    while True:
        code = proc.exited()
        if code is not None:
            raise proc.fail(f"exited with code {code} before {what}")
        reason = check()
        if reason is None:
            return
        last = reason
        if time.monotonic() >= deadline:
            raise proc.fail(f"{what} did not happen in time (last: {last})")
        time.sleep(interval)


# -- certificates -----------------------------------------------------------------------------


class PKI:
    """The certificates of one control plane, as PEM files in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / name

    @staticmethod
    def _key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @staticmethod
    def _write(path: Path, data: bytes, private: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _write_key(self, path: Path, key: rsa.RSAPrivateKey) -> None:
        self._write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()), private=True)

    def _write_cert(self, path: Path, cert: x509.Certificate) -> None:
        self._write(path, cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(self, name: str, cn: str) -> None:
        """A self-signed CA as ``NAME.crt``/``NAME.key``."""
        key = self._key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self._write_key(self.path(f"{name}.key"), key)
        self._write_cert(self.path(f"{name}.crt"), cert)

    def issue(self, name: str, cn: str, *, orgs: Sequence[str] = (), sans: Sequence[str] = (), server: bool = False,
              ca: str = "ca") -> tuple[Path, Path]:
        """A certificate ``NAME.crt``/``NAME.key`` signed by ``CA.crt``; returns (cert, key)."""
        ca_cert = x509.load_pem_x509_certificate(self.path(f"{ca}.crt").read_bytes())
        ca_key = serialization.load_pem_private_key(self.path(f"{ca}.key").read_bytes(), password=None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        key = self._key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(_parse_sans(sans)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        crt_path, key_path = self.path(f"{name}.crt"), self.path(f"{name}.key")
        self._write_key(key_path, key)
        self._write_cert(crt_path, cert)
        return crt_path, key_path

    def make_key_pair(self, name: str) -> None:
        """An RSA key pair ``NAME.key``/``NAME.pub`` (ServiceAccount token signing)."""
        key = self._key()
        self._write_key(self.path(f"{name}.key"), key)
        self._write(self.path(f"{name}.pub"), key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    """``IP:1.2.3.4`` / ``DNS:name`` (a bare value is an IP when it parses as one, else a DNS name)."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in sans:
        prefix, _, rest = raw.partition(":")
        if prefix.upper() in ("IP", "DNS"):
            kind, value = prefix.upper(), rest
        else:
            try:
                ipaddress.ip_address(raw)
                kind, value = "IP", raw
            except ValueError:
                kind, value = "DNS", raw
        if kind not in ("IP", "DNS") or not value:
            raise ControlPlaneError(f"subject alternative name {raw!r} is neither IP:ADDRESS nor DNS:NAME")
        key = f"{kind}:{value}"
        if key in seen:
            continue
        seen.add(key)
        if kind == "IP":
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
            except ValueError as exc:
                raise ControlPlaneError(f"subject alternative name {raw!r}: {exc}") from exc
        else:
            names.append(x509.DNSName(value))
    return names


def _b64file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None) -> Path:
    """A self-contained kubeconfig (certificates embedded) for one identity."""
    creds: dict[str, str] = {}
    if cert is not None and key is not None:
        creds = {"client-certificate-data": _b64file(cert), "client-key-data": _b64file(key)}
    if token is not None:
        creds["token"] = token
    doc = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "controlplane",
                      "cluster": {"server": server, "certificate-authority-data": _b64file(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {"cluster": "controlplane", "user": user}}],
        "current-context": user,
    }
    PKI._write(path, json.dumps(doc, indent=2).encode(), private=True)
    return path


# -- components -------------------------------------------------------------------------------


class Etcd:
    """etcd with its data on disk under ``workdir/etcd``."""

    name = "etcd"

    def __init__(self, binary: Path, workdir: Path, host: str = "127.0.0.1") -> None:
        self.binary = binary
        self.workdir = workdir
        self.data_dir = workdir / "etcd"
        self.host = host
        self.client_port = 0
        self.peer_port = 0
        self.process = Process(self.name, workdir / "logs" / "etcd.log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def flags(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            f"--name={self.name}", f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}", f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}", "--initial-cluster-state=new",
            "--logger=zap", "--log-level=warn",
        ]

    def start(self, deadline: float) -> None:
        if self.data_dir.exists():  # a fresh cluster each start: the certificates are new too
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, mode=0o700)
        self.client_port, self.peer_port = free_port(self.host), free_port(self.host)
        self.process.start([str(self.binary), *self.flags()], cwd=self.workdir)
        _wait_until(self.process, f"{self.url}/health answered healthy", self.health, deadline)

    def health(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                doc = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            return str(exc)
        return None if str(doc.get("health")) == "true" else f"health: {doc!r}"

    def stop(self) -> None:
        self.process.stop()


class APIServer:
    """kube-apiserver: RBAC, ServiceAccount tokens, TLS from the plane's CA."""

    name = "kube-apiserver"

    def __init__(self, binary: Path, workdir: Path, pki: PKI, *, bind_address: str, advertise_address: str,
                 secure_port: int, host: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.pki = pki
        self.bind_address = bind_address
        self.advertise_address = advertise_address
        self.secure_port = secure_port
        self.host = host
        self.etcd_url = ""
        self.process = Process(self.name, workdir / "logs" / "kube-apiserver.log")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.secure_port}"

    def flags(self) -> list[str]:
        p = self.pki.path
        flags = [
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={self.secure_port}", f"--bind-address={self.bind_address}",
            f"--advertise-address={self.advertise_address}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={p('apiserver.crt')}", f"--tls-private-key-file={p('apiserver.key')}",
            f"--client-ca-file={p('ca.crt')}",
            # Node lets a kubelet with a system:node certificate act for its node; RBAC for everyone else.
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={p('sa.pub')}", f"--service-account-signing-key-file={p('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}", "--allow-privileged=true",
            f"--kubelet-client-certificate={p('apiserver-kubelet-client.crt')}",
            f"--kubelet-client-key={p('apiserver-kubelet-client.key')}",
            f"--requestheader-client-ca-file={p('front-proxy-ca.crt')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p('front-proxy-client.crt')}",
            f"--proxy-client-key-file={p('front-proxy-client.key')}",
            "--profiling=false",
        ]
        if ipaddress.ip_address(self.advertise_address).is_loopback:
            # The `kubernetes` Endpoints may not hold a loopback address; nothing in-cluster needs it then.
            flags.append("--endpoint-reconciler-type=none")
        return flags

    def start(self, etcd_url: str, deadline: float, admin: Callable[[str], tuple[int, bytes]]) -> None:
        self.etcd_url = etcd_url
        if not self.secure_port:
            self.secure_port = free_port(self.bind_address if self.bind_address not in ("0.0.0.0", "::")
                                         else "127.0.0.1")
        self.process.start([str(self.binary), *self.flags()], cwd=self.workdir)

        def readyz() -> str | None:
            status, body = admin("/readyz")
            text = body.decode(errors="replace").strip()
            return None if status == 200 and text == "ok" else f"/readyz {status}: {text_tail(text, 3)}"

        _wait_until(self.process, f"{self.url}/readyz answered ok", readyz, deadline)

    def stop(self) -> None:
        self.process.stop()


class ControllerManager:
    """kube-controller-manager: garbage collection, namespace deletion, ServiceAccounts and tokens."""

    name = "kube-controller-manager"

    def __init__(self, binary: Path, workdir: Path, pki: PKI, kubeconfig: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.pki = pki
        self.kubeconfig = kubeconfig
        self.secure_port = 0
        self.process = Process(self.name, workdir / "logs" / "kube-controller-manager.log")

    def flags(self) -> list[str]:
        p = self.pki.path
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            f"--client-ca-file={p('ca.crt')}", f"--requestheader-client-ca-file={p('front-proxy-ca.crt')}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p('sa.key')}", f"--root-ca-file={p('ca.crt')}",
            f"--cluster-signing-cert-file={p('ca.crt')}", f"--cluster-signing-key-file={p('ca.key')}",
            "--leader-elect=false", "--controllers=*",
            "--bind-address=127.0.0.1", f"--secure-port={self.secure_port}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            "--profiling=false",
        ]

    def start(self, deadline: float, admin: Callable[[str], tuple[int, bytes]]) -> None:
        self.secure_port = free_port()
        self.process.start([str(self.binary), *self.flags()], cwd=self.workdir)

        # Ready for tests once its ServiceAccount controller has filled the `default` namespace.
        def default_service_account() -> str | None:
            status, _ = admin("/api/v1/namespaces/default/serviceaccounts/default")
            return None if status == 200 else f"GET serviceaccount default/default: {status}"

        _wait_until(self.process, "the ServiceAccount default/default existed", default_service_account, deadline)

    def stop(self) -> None:
        self.process.stop()


# -- the plane --------------------------------------------------------------------------------


def install_crds(api: Any, crds: Sequence[dict[str, Any]], timeout: float = 60.0) -> None:
    """Create each CRD unless it exists and wait until all are Established (envtest's InstallCRDs).

    ``api`` is a kubernetes ``ApiClient`` with the rights to create CRDs. A CRD that exists already
    is left as it is: other sessions and workers may share it, so nothing here deletes one."""
    from kubernetes.client import ApiextensionsV1Api
    from kubernetes.client.exceptions import ApiException

    ext = ApiextensionsV1Api(api)
    for crd in crds:
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
    pending = {crd["metadata"]["name"] for crd in crds}
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(pending):
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"CRDs not Established within {timeout:.0f} s: {', '.join(sorted(pending))}")
        time.sleep(0.2)


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback, with one CA and per-user kubeconfigs."""

    def __init__(self, assets: Path, workdir: Path, *, bind_address: str = "127.0.0.1",
                 advertise_address: str | None = None, extra_sans: Sequence[str] = (),
                 controller_manager: bool | None = None, secure_port: int = 0,
                 ready_timeout: float = 60.0) -> None:
        self.assets = Path(assets)
        self.workdir = Path(workdir).resolve()
        self.pki = self.workdir / "pki"
        self.admin_kubeconfig = self.workdir / "admin.kubeconfig"
        self.bind_address = bind_address
        self.advertise_address = advertise_address or "127.0.0.1"
        for address in (bind_address, self.advertise_address):
            try:
                ipaddress.ip_address(address)
            except ValueError as exc:
                raise ControlPlaneError(f"{address!r} is not an IP address") from exc
        self.extra_sans = tuple(extra_sans)
        _parse_sans(self.extra_sans)  # a bad SAN fails here, not half-way through start()
        self.controller_manager = controller_manager
        self.secure_port = secure_port
        self.ready_timeout = ready_timeout
        host = "127.0.0.1" if bind_address in ("0.0.0.0", "::") else bind_address
        self.url = f"https://{host}:{secure_port}" if secure_port else ""
        self._host = host
        self._pki = PKI(self.pki)
        self._owner = True
        self._started: list[Etcd | APIServer | ControllerManager] = []
        self.etcd: Etcd | None = None
        self.apiserver: APIServer | None = None
        self.kcm: ControllerManager | None = None
        self.start_seconds: float | None = None
        #: Seconds each start step took (certificates, etcd, kube-apiserver, kube-controller-manager).
        self.timings: dict[str, float] = {}
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd, then kube-apiserver (until /readyz is ok), then kube-controller-manager."""
        if not self._owner:
            raise ControlPlaneError("an attached control plane cannot be started; start it where it was created")
        if self._started:
            raise ControlPlaneError("control plane already started")
        began = time.monotonic()
        deadline = began + self.ready_timeout
        names = ["kube-apiserver", "etcd"]
        run_kcm = self.controller_manager
        if run_kcm is None:
            run_kcm = (self.assets / "kube-controller-manager").exists()
        if run_kcm:
            names.append("kube-controller-manager")
        assets = check_assets(self.assets, names)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / STATE_FILE).unlink(missing_ok=True)
        mark = began

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[name] = round(now - mark, 2)
            mark = now

        try:
            self._make_pki()
            step("certificates")
            self.etcd = Etcd(assets / "etcd", self.workdir, "127.0.0.1")
            self._started.append(self.etcd)
            self.etcd.start(deadline)
            step("etcd")
            self.apiserver = APIServer(assets / "kube-apiserver", self.workdir, self._pki,
                                       bind_address=self.bind_address, advertise_address=self.advertise_address,
                                       secure_port=self.secure_port, host=self._host)
            self.apiserver.secure_port = self.secure_port or free_port(self._host)
            self.secure_port = self.apiserver.secure_port
            self.url = self.apiserver.url
            self._write_admin_kubeconfigs()
            self._started.append(self.apiserver)
            self.apiserver.start(self.etcd.url, deadline, self._admin_get)
            _wait_until(self.apiserver.process, "the namespace `default` existed",
                        lambda: None if self._admin_get("/api/v1/namespaces/default")[0] == 200 else "not yet",
                        deadline)
            step("kube-apiserver")
            if run_kcm:
                self.kcm = ControllerManager(assets / "kube-controller-manager", self.workdir, self._pki,
                                             self.workdir / "controller-manager.kubeconfig")
                self._started.append(self.kcm)
                self.kcm.start(deadline, self._admin_get)
                step("kube-controller-manager")
            self.start_seconds = time.monotonic() - began
            self._write_state()
        except BaseException as exc:
            try:
                self.stop()
            except ControlPlaneError as stop_exc:
                if isinstance(exc, ControlPlaneError):
                    raise ControlPlaneError(f"{exc}\n(and while stopping: {stop_exc})") from exc
            raise

    def stop(self) -> None:
        """Stop every process this plane started (newest first); idempotent; raise all errors at once."""
        errors: list[str] = []
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(f"{component.name}: {exc!r}")
        if errors:
            raise ControlPlaneError("stopping the control plane: " + "; ".join(errors))

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """The process ids of the running components (empty for an attached plane)."""
        return {c.name: c.process.pid for c in self._started if c.process.pid is not None}

    # -- identities ---------------------------------------------------------------------------

    def issue_client_cert(self, cn: str, orgs: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate for user ``cn`` in groups ``orgs``, signed by the plane's CA: (cert, key)."""
        if not cn:
            raise ControlPlaneError("a client certificate needs a user name (CN)")
        if not (self.pki / "ca.key").exists():
            raise ControlPlaneError(f"the control plane has not been started (no CA in {self.pki})")
        name = f"users/{_safe_name(cn)}-{uuid.uuid4().hex[:8]}"
        return self._pki.issue(name, cn, orgs=orgs)

    def add_user(self, name: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig that authenticates as user ``name`` in ``groups`` (a client certificate)."""
        cert, key = self.issue_client_cert(name, groups)
        path = self.workdir / "users" / f"{cert.stem}.kubeconfig"
        return write_kubeconfig(path, self._require_url(), self.pki / "ca.crt", name, cert=cert, key=key)

    def service_account_kubeconfig(self, namespace: str, name: str, duration: int = 7200) -> Path:
        """A kubeconfig with a TokenRequest token for ServiceAccount ``namespace/name`` (created if missing)."""
        if duration < 600:
            raise ControlPlaneError(f"token duration {duration}s is below the API server's minimum of 600s")
        server = self._require_url()
        status, body = self._admin("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        if status not in (201, 409):
            raise ControlPlaneError(f"creating namespace {namespace}: HTTP {status}: {body[:300]!r}")
        status, body = self._admin("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
        if status not in (201, 409):
            raise ControlPlaneError(f"creating ServiceAccount {namespace}/{name}: HTTP {status}: {body[:300]!r}")
        status, body = self._admin("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": int(duration)}})
        if status != 201:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name}: HTTP {status}: {body[:300]!r}")
        token = json.loads(body)["status"]["token"]
        user = f"system:serviceaccount:{namespace}:{name}"
        stem = f"sa-{_safe_name(namespace)}-{_safe_name(name)}-{uuid.uuid4().hex[:8]}"
        path = self.workdir / "users" / f"{stem}.kubeconfig"
        return write_kubeconfig(path, server, self.pki / "ca.crt", user, token=token)

    # -- logs and state -----------------------------------------------------------------------

    def log_tail(self, component: str, lines: int = 40) -> str:
        """The last ``lines`` lines of a component's log (etcd, kube-apiserver, kube-controller-manager)."""
        known = ("etcd", "kube-apiserver", "kube-controller-manager")
        if component not in known:
            raise ControlPlaneError(f"unknown component {component!r}; one of {', '.join(known)}")
        return file_tail(self.workdir / "logs" / f"{component}.log", lines)

    @classmethod
    def attach(cls, workdir: Path) -> ControlPlane:
        """The plane a started ControlPlane described in ``workdir``; owns no process (stop() does nothing)."""
        state_path = Path(workdir) / STATE_FILE
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as exc:
            raise ControlPlaneError(f"cannot attach: {state_path}: {exc}") from exc
        plane = cls(Path(state["assets"]), Path(workdir), bind_address=state["bind_address"],
                    advertise_address=state["advertise_address"], extra_sans=state["extra_sans"],
                    controller_manager=state["controller_manager"], secure_port=state["secure_port"])
        plane.url = state["url"]
        plane._owner = False
        plane.state = state
        return plane

    state: dict[str, Any]

    def _write_state(self) -> None:
        assert self.etcd is not None
        self.state = {
            "url": self.url, "secure_port": self.secure_port, "bind_address": self.bind_address,
            "advertise_address": self.advertise_address, "extra_sans": list(self.extra_sans),
            "assets": str(self.assets), "controller_manager": self.kcm is not None,
            "etcd_url": self.etcd.url, "etcd_peer_port": self.etcd.peer_port,
            "controller_manager_port": self.kcm.secure_port if self.kcm else None,
            "admin_kubeconfig": str(self.admin_kubeconfig), "pki": str(self.pki),
            "pids": self.pids(), "owner_pid": os.getpid(), "start_seconds": self.start_seconds,
            "timings": self.timings,
        }
        PKI._write(self.workdir / STATE_FILE, json.dumps(self.state, indent=2).encode())

    # -- internals ----------------------------------------------------------------------------

    def _require_url(self) -> str:
        if not self.url:
            raise ControlPlaneError("the control plane has not been started")
        return self.url

    def _make_pki(self) -> None:
        pki = self._pki
        if self.pki.exists():
            shutil.rmtree(self.pki)
        pki.make_ca("ca", "kubernetes-ca")
        pki.make_ca("front-proxy-ca", "front-proxy-ca")
        sans = [*DEFAULT_SANS, f"IP:{self.advertise_address}", *self.extra_sans]
        if self.bind_address not in ("0.0.0.0", "::"):
            sans.append(f"IP:{self.bind_address}")
        pki.issue("apiserver", "kube-apiserver", sans=sans, server=True)
        pki.issue("admin", "admin", orgs=["system:masters"])
        pki.issue("controller-manager", "system:kube-controller-manager")
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", orgs=["system:masters"])
        pki.issue("front-proxy-client", "front-proxy-client", ca="front-proxy-ca")
        pki.make_key_pair("sa")

    def _write_admin_kubeconfigs(self) -> None:
        p = self._pki.path
        write_kubeconfig(self.admin_kubeconfig, self.url, p("ca.crt"), "admin", cert=p("admin.crt"), key=p("admin.key"))
        write_kubeconfig(self.workdir / "controller-manager.kubeconfig", self.url, p("ca.crt"),
                         "system:kube-controller-manager", cert=p("controller-manager.crt"),
                         key=p("controller-manager.key"))

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def _admin(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """One request as the admin user: (HTTP status, body); 0 when the server could not be reached."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._require_url() + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, ssl.SSLError) as exc:
            return 0, str(exc).encode()

    def _admin_get(self, path: str) -> tuple[int, bytes]:
        return self._admin("GET", path, timeout=3.0)
