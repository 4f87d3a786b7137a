"""The "bare loop" baseline: the operator's first-issue work for N credentials, with no operator.

``python bench/bareloop.py --kubeconfig K --namespace NS --workers 8`` lists the AutoTekCredentials
of NS once, then for each of them, in a pool of ``--workers`` threads, makes the calls a first pass
makes, directly with the kubernetes client and requests:

1. GET the client Secret,
2. POST the token request (Basic auth, form body, a fresh connection -- as the operator does),
3. create the target Secret (token keys, label, annotations, owner reference),
4. PATCH the credential's status (merge patch, Ready=True and the same fields),
5. POST an Event.

It prints one JSON line: ``{"n", "seconds", "errors", "cpu_seconds", "max_rss_kib"}`` where
``seconds`` runs from just before the LIST to the last Event (imports excluded, as the operator's
start-up is excluded from its figure).
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import requests

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
TIMEOUT = (5.0, 30.0)


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=args.kubeconfig, client_configuration=config)
    config.connection_pool_maxsize = args.workers + 4
    config.retries = False
    api = kubernetes.client.ApiClient(configuration=config)
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    ns = args.namespace
    errors: list[str] = []
    lock = threading.Lock()

    def one(cred: dict[str, Any]) -> None:
        meta, spec = cred["metadata"], cred["spec"]
        name, uid = meta["name"], meta["uid"]
        try:
            ref = spec["clientSecretRef"]
            resp = core.read_namespaced_secret(ref["name"], ns, _preload_content=False, _request_timeout=TIMEOUT)
            data = json.loads(resp.data)["data"]
            client_id = base64.b64decode(data[ref.get("clientIdKey", "client_id")]).decode()
            client_secret = base64.b64decode(data[ref.get("clientSecretKey", "client_secret")]).decode()
            sent_at = datetime.now(UTC)
            basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
            r = requests.post(
                spec["tokenURL"],
                data={"grant_type": "client_credentials"},
                headers={"Authorization": f"Basic {basic}", "Accept": "application/json", "Connection": "close"},
                timeout=(10, 10),
                allow_redirects=False,
            )
            r.raise_for_status()
            token = r.json()
            lifetime = float(token["expires_in"])
            expires = (sent_at + timedelta(seconds=lifetime)).replace(microsecond=0)
            refreshed = datetime.now(UTC).replace(microsecond=0)
            target = (spec.get("target") or {}).get("name") or name
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": target,
                    "namespace": ns,
                    "labels": {"app.kubernetes.io/managed-by": "autotek-operator"},
                    "annotations": {
                        "autotek.io/credential": name,
                        "autotek.io/expires-at": _fmt(expires),
                        "autotek.io/refreshed-at": _fmt(refreshed),
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": f"{GROUP}/{VERSION}",
                            "kind": "AutoTekCredential",
                            "name": name,
                            "uid": uid,
                            "controller": True,
                        }
                    ],
                },
                "data": {
                    "access_token": _b64(token["access_token"]),
                    "token_type": _b64(token["token_type"]),
                    "authorization": _b64(f"Bearer {token['access_token']}"),
                    "expires_at": _b64(_fmt(expires)),
                    "scope": _b64(token.get("scope", "")),
                },
            }
            core.create_namespaced_secret(ns, body, _preload_content=False, _request_timeout=TIMEOUT)
            next_refresh = sent_at + timedelta(seconds=lifetime * 0.67)
            now = _fmt(datetime.now(UTC))
            status = {
                "observedGeneration": meta.get("generation"),
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "TokenIssued",
                        "message": f"token valid until {_fmt(expires)}",
                        "lastTransitionTime": now,
                        "observedGeneration": meta.get("generation"),
                    }
                ],
                "secretName": target,
                "tokenType": token["token_type"],
                "lastRefreshTime": _fmt(refreshed),
                "expiresAt": _fmt(expires),
                "nextRefreshTime": _fmt(next_refresh),
                "failedAttempts": 0,
                "clientSecretVersion": "0",
            }
            custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                ns,
                PLURAL,
                name,
                {"status": status},
                _preload_content=False,
                _request_timeout=TIMEOUT,
                _content_type="application/merge-patch+json",
            )
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": ns},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "AutoTekCredential",
                    "name": name,
                    "namespace": ns,
                    "uid": uid,
                },
                "type": "Normal",
                "reason": "TokenIssued",
                "message": f"issued a token into Secret {target}; valid until {_fmt(expires)}",
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "source": {"component": "autotek-operator"},
                "reportingComponent": "autotek-operator",
                "reportingInstance": "autotek-operator",
            }
            core.create_namespaced_event(ns, event, _preload_content=False, _request_timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the loop goes on
            with lock:
                errors.append(f"{name}: {type(exc).__name__}")

    started = time.monotonic()
    listing = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _preload_content=False)
    items = json.loads(listing.data)["items"]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(one, items))
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "n": len(items),
                "seconds": seconds,
                "errors": len(errors),
                "error_samples": errors[:5],
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "max_rss_kib": usage.ru_maxrss,
            }
        ),
        flush=True,
    )
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
