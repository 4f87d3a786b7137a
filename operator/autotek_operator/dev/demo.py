"""``autotek-operator demo``: the real operator, an embedded Kubernetes API, a local token endpoint.

Starts the emulator and the token-endpoint double on 127.0.0.1, runs ``autotek-operator run`` as a
child process against them, applies a client Secret and an AutoTekCredential with a short token
lifetime, and prints what happens to the Secret and the status. Tokens are shown only as short
fingerprints.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import constants as c

NAMESPACE = "shop"
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret-not-real"  # noqa: S105 - a throwaway value for the local double


def fingerprint(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _api(url: str) -> Any:
    import kubernetes

    config = kubernetes.client.Configuration()
    config.host = url
    return kubernetes.client.ApiClient(config)


def _plain(body: dict[str, Any]) -> Any:
    """Bodies are sent as plain dicts, not the client's typed models."""
    return body


def _say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_demo(*, lifetime: int = 30, rotations: int = 0) -> int:
    """Run the demo until interrupted, or until ``rotations`` rotations have been seen."""
    from kubernetes.client import CoreV1Api, CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from .broker import BrokerServer
    from .emulator import EmulatorThread

    workdir = Path(tempfile.mkdtemp(prefix="autotek-demo-"))
    with (
        EmulatorThread(port=0) as emulator,
        BrokerServer(clients={CLIENT_ID: CLIENT_SECRET}, lifetime=lifetime) as broker,
    ):
        kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
        _say(f"Kubernetes API emulator at {emulator.url}; kubeconfig {kubeconfig}")
        _say(f"token endpoint at {broker.token_url} issuing {lifetime}s tokens")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "AUTOTEK_ALLOWED_TOKEN_URLS": broker.url + "/",
            "AUTOTEK_HEALTH_PORT": "0",
            "AUTOTEK_METRICS_PORT": "0",
            "AUTOTEK_WATCH_TIMEOUT": "10",
        }
        env.setdefault("AUTOTEK_LOG_LEVEL", "INFO")
        operator = subprocess.Popen([sys.executable, "-m", "autotek_operator", "run"], env=env)
        try:
            api = _api(emulator.url)
            core, custom = CoreV1Api(api), CustomObjectsApi(api)
            time.sleep(2)  # let the operator's watches start before the objects arrive
            try:
                core.create_namespace(_plain({"metadata": {"name": NAMESPACE}}))
            except ApiException as exc:
                if exc.status != 409:
                    raise
            core.create_namespaced_secret(
                NAMESPACE,
                _plain(
                    {
                        "metadata": {"name": "autotek-client"},
                        "stringData": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
                    }
                ),
            )
            custom.create_namespaced_custom_object(
                c.GROUP,
                c.VERSION,
                NAMESPACE,
                c.PLURAL,
                {
                    "apiVersion": c.API_VERSION,
                    "kind": c.KIND,
                    "metadata": {"name": "autotek"},
                    "spec": {
                        "clientSecretRef": {"name": "autotek-client"},
                        "tokenURL": broker.token_url,
                        "target": {"name": "autotek-token"},
                    },
                },
            )
            _say(f"applied Secret {NAMESPACE}/autotek-client and AutoTekCredential {NAMESPACE}/autotek")
            return _watch(core, custom, rotations, operator)
        except KeyboardInterrupt:
            _say("interrupted")
            # Ctrl-C reached the operator too (same process group) and it is stopping: a SIGTERM
            # on top would make kopf stop twice. Terminate it only if it has not stopped by itself.
            try:
                operator.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            return 0
        finally:
            if operator.poll() is None:
                operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
            _say(f"token endpoint answered {broker.stats()['count']} token requests; stopped")


def _watch(core: Any, custom: Any, rotations: int, operator: subprocess.Popen[bytes]) -> int:
    from kubernetes.client.exceptions import ApiException

    seen: list[str] = []
    last_status = None
    while operator.poll() is None:
        try:
            raw = core.read_namespaced_secret("autotek-token", NAMESPACE, _preload_content=False)
            import json

            secret = json.loads(raw.data)
        except ApiException:
            secret = None
        if secret:
            token = base64.b64decode(secret["data"]["access_token"]).decode()
            if not seen or seen[-1] != token:
                expires = base64.b64decode(secret["data"]["expires_at"]).decode()
                verb = "issued" if not seen else f"rotated (#{len(seen)})"
                seen.append(token)
                _say(f"Secret {NAMESPACE}/autotek-token {verb}: token {fingerprint(token)}, expires_at {expires}")
        obj = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, NAMESPACE, c.PLURAL, "autotek")
        status = obj.get("status") or {}
        cond = next((x for x in status.get("conditions") or [] if x.get("type") == "Ready"), None)
        summary = (
            f"Ready={cond.get('status')} reason={cond.get('reason')} expiresAt={status.get('expiresAt')} "
            f"nextRefreshTime={status.get('nextRefreshTime')}"
            if cond
            else "no status yet"
        )
        if summary != last_status:
            _say(f"status: {summary}")
            last_status = summary
        if rotations and len(seen) > rotations:
            _say(f"saw {rotations} rotation(s); stopping")
            return 0
        time.sleep(1)
    _say(f"the operator exited with code {operator.returncode}")
    return 1
