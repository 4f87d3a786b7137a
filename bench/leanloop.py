"""The lean loop: the physical limit of the first-issue work on this API server and token endpoint.

``python bench/leanloop.py --kubeconfig K --namespace NS --threads 8`` lists the AutoTekCredentials of
NS once, then ``--threads`` threads take credentials from a shared list and make, for each, only the
calls the work needs, with the cheapest client there is: one keep-alive connection per thread to the
API server and one to the token endpoint (``http.client``), raw JSON bodies, no client models:

1. GET the client Secret,
2. POST the token request (Basic auth, form body),
3. POST the target Secret (the operator's keys, label, annotations and owner reference),
4. PATCH the credential's status (merge patch: the Ready condition and the status fields).

No Event (an Event is not on the minimum path to Ready). It prints one JSON line:
``{"n", "threads", "seconds", "errors", "cpu_seconds", "max_rss_kib", "per_credential_ms"}`` where
``seconds`` runs from just before the LIST to the last status patch's answer.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import resource
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as bk

GROUP, VERSION, PLURAL = bk.GROUP, bk.VERSION, bk.PLURAL


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenConn(bk.KeepAlive):
    """One keep-alive connection to the token endpoint."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (443 if self.https else 80)
        self.path = parts.path or "/"

    def _new(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=30)

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        return self.request("POST", self.path, body, headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    target = bk.KubeTarget(Path(args.kubeconfig))
    ns = args.namespace
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    secrets_path = f"/api/v1/namespaces/{ns}/secrets"
    errors: list[str] = []
    lock = threading.Lock()

    started = time.monotonic()
    lister = target.connect()
    items: list[dict[str, Any]] = lister.json("GET", base)["items"]
    lister.close()
    next_index = iter(range(len(items)))

    def worker() -> None:
        kube = target.connect()
        tokens: dict[str, TokenConn] = {}
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            cred = items[i]
            meta, spec = cred["metadata"], cred["spec"]
            name = meta["name"]
            try:
                ref = spec["clientSecretRef"]
                status, data = kube.call("GET", f"{secrets_path}/{ref['name']}")
                if status != 200:
                    raise RuntimeError(f"GET client Secret: {status}")
                sdata = json.loads(data)["data"]
                client_id = base64.b64decode(sdata[ref.get("clientIdKey", "client_id")]).decode()
                client_secret = base64.b64decode(sdata[ref.get("clientSecretKey", "client_secret")]).decode()
                url = spec["tokenURL"]
                conn = tokens.get(url) or tokens.setdefault(url, TokenConn(url))
                sent_at = datetime.now(UTC)
                status, data = conn.post(
                    b"grant_type=client_credentials",
                    {
                        "Authorization": "Basic " + _b64(f"{client_id}:{client_secret}"),
                        "Content-Type": "application/x-www-form-urlencoded",
                        "Accept": "application/json",
                    },
                )
                if status != 200:
                    raise RuntimeError(f"token request: {status}")
                token = json.loads(data)
                lifetime = float(token["expires_in"])
                expires = _fmt(sent_at + timedelta(seconds=lifetime))
                now = _fmt(datetime.now(UTC))
                target_name = (spec.get("target") or {}).get("name") or name
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {
                        "name": target_name,
                        "namespace": ns,
                        "labels": {"app.kubernetes.io/managed-by": "autotek-operator"},
                        "annotations": {
                            "autotek.io/credential": name,
                            "autotek.io/expires-at": expires,
                            "autotek.io/refreshed-at": now,
                            "autotek.io/creation-policy": "Owner",
                            "autotek.io/deletion-policy": "Delete",
                            "autotek.io/credential-selector": "",
                        },
                        "ownerReferences": [
                            {
                                "apiVersion": f"{GROUP}/{VERSION}",
                                "kind": "AutoTekCredential",
                                "name": name,
                                "uid": meta["uid"],
                                "controller": True,
                            }
                        ],
                    },
                    "data": {
                        "access_token": _b64(token["access_token"]),
                        "token_type": _b64(token["token_type"]),
                        "authorization": _b64(f"Bearer {token['access_token']}"),
                        "expires_at": _b64(expires),
                        "scope": _b64(token.get("scope", "")),
                    },
                }
                status, data = kube.call("POST", secrets_path, json.dumps(body).encode())
                if status != 201:
                    raise RuntimeError(f"create target Secret: {status}")
                generation = meta.get("generation")
                patch = {
                    "status": {
                        "observedGeneration": generation,
                        "conditions": [
                            {
                                "type": "Ready",
                                "status": "True",
                                "reason": "TokenIssued",
                                "message": f"token valid until {expires}",
                                "lastTransitionTime": now,
                                "observedGeneration": generation,
                            }
                        ],
                        "secretName": target_name,
                        "tokenType": token["token_type"],
                        "lastRefreshTime": now,
                        "expiresAt": expires,
                        "nextRefreshTime": _fmt(sent_at + timedelta(seconds=lifetime * 0.67)),
                        "failedAttempts": 0,
                        "clientSecretVersion": "0",
                    }
                }
                status, data = kube.call(
                    "PATCH", f"{base}/{name}/status", json.dumps(patch).encode(), "application/merge-patch+json"
                )
                if status != 200:
                    raise RuntimeError(f"patch status: {status}")
            except Exception as exc:  # noqa: BLE001 - counted and reported, the loop goes on
                with lock:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
        kube.close()

    threads = [threading.Thread(target=worker, name=f"lean-{i}") for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(
        json.dumps(
            {
                "n": len(items),
                "threads": args.threads,
                "seconds": seconds,
                "errors": len(errors),
                "error_samples": errors[:5],
                "cpu_seconds": cpu,
                "per_credential_ms": round(1000.0 * cpu / max(1, len(items)), 3),
                "max_rss_kib": usage.ru_maxrss,
            }
        ),
        flush=True,
    )
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
