"""The e2e kustomize overlays and the objects the suite applies, checked without a cluster.

Runs in ``make test`` wherever kubectl is installed (``kubectl kustomize`` needs no cluster); not
marked ``e2e``, so it does not need ``--with-e2e``.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import e2ekit as kit
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from autotek_operator import config
from autotek_operator.token_client import url_allowed

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def _render(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120, cwd=kit.ROOT
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


#: Each e2e overlay and the repository's kustomization it stands for.
OVERLAYS = {
    "default": kit.ROOT / "manifests",
    "namespaced": kit.ROOT / "manifests" / "overlays" / "namespaced",
    "rollout-restart": kit.ROOT / "manifests" / "overlays" / "rollout-restart",
}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return _render(kit.OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render(kit.ROOT / "manifests")


def _deployment(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == kit.OPERATOR_DEPLOY]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in rendered]
    return found[0]


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: dict[str, Any] = containers[0]
    return container


def test_overlay_runs_the_manifests_image_with_the_broker_allowed(rendered: list[dict[str, Any]]) -> None:
    deploy = _deployment(rendered)
    assert deploy["metadata"]["namespace"] == kit.OPERATOR_NS
    container = _container(deploy)
    # The image the manifests name, which the suite builds under that name too (kit.IMAGES).
    assert container["image"] == kit.OPERATOR_IMAGE and kit.OPERATOR_IMAGE in kit.IMAGES
    # A loaded image must not be pulled from a registry.
    assert container["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AUTOTEK_ALLOWED_TOKEN_URLS"] == kit.ALLOWED_TOKEN_URLS
    # The patch merges into the base: its other settings are still there.
    assert env["AUTOTEK_LOG_FORMAT"] == "json"
    assert len(container["env"]) == len(env), "an env variable appears twice"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_changes_only_the_allowed_token_urls(name: str) -> None:
    """Each e2e overlay renders exactly its kustomization, but for the value of AUTOTEK_ALLOWED_TOKEN_URLS."""
    assert (kit.OVERLAYS / name).resolve() in {kit.OVERLAY, kit.NAMESPACED_OVERLAY, kit.ROLLOUT_RESTART_OVERLAY}
    rendered, base = _render(kit.OVERLAYS / name), _render(OVERLAYS[name])

    def normalised(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
        out = {}
        for doc in copy.deepcopy(docs):
            meta = doc["metadata"]
            if doc["kind"] == "Deployment" and meta["name"] == kit.OPERATOR_DEPLOY:
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    for e in c.get("env", []):
                        if e["name"] == "AUTOTEK_ALLOWED_TOKEN_URLS":
                            e["value"] = "<allowed>"
                    # A strategic merge patch moves the entries it touches to the front.
                    c["env"] = sorted(c.get("env", []), key=lambda e: e["name"])
            out[(doc["kind"], meta.get("namespace", ""), meta["name"])] = doc
        return out

    ours, theirs = normalised(rendered), normalised(base)
    assert sorted(ours) == sorted(theirs)
    for key, doc in theirs.items():
        assert ours[key] == doc, f"the overlay changes {key} beyond AUTOTEK_ALLOWED_TOKEN_URLS"
    assert ("CustomResourceDefinition", "", kit.CRD_NAME) in ours
    assert ("Deployment", kit.OPERATOR_NS, kit.OPERATOR_DEPLOY) in ours
    env = {e["name"]: e.get("value") for e in _container(_deployment(rendered))["env"]}
    assert env["AUTOTEK_ALLOWED_TOKEN_URLS"] == kit.ALLOWED_TOKEN_URLS


def test_image_names_as_the_runtime_stores_them() -> None:
    assert kit.image_ref("autotek-operator:0.1.0") == "docker.io/library/autotek-operator:0.1.0"
    assert kit.image_ref("platform/autotek-operator:1") == "docker.io/platform/autotek-operator:1"
    assert kit.image_ref("registry.example.com/autotek-operator:1") == "registry.example.com/autotek-operator:1"
    assert kit.image_ref("localhost/autotek-e2e/pause:1") == "localhost/autotek-e2e/pause:1"


def test_the_operator_allows_the_in_cluster_token_url(rendered: list[dict[str, Any]]) -> None:
    """The rendered setting, read by the operator's own parser, allows the broker's https URL and nothing else."""
    env = {e["name"]: e.get("value") for e in _container(_deployment(rendered))["env"]}
    settings = config.from_env({"AUTOTEK_ALLOWED_TOKEN_URLS": env["AUTOTEK_ALLOWED_TOKEN_URLS"]})
    assert kit.TOKEN_URL.startswith(f"https://{kit.BROKER_IP}:{kit.BROKER_PORT}/")
    assert url_allowed(kit.TOKEN_URL, settings.allowed_token_urls)
    assert not url_allowed(kit.TOKEN_URL.replace("https:", "http:"), settings.allowed_token_urls)
    assert not url_allowed("https://api.autograb.com.au/auth-broker/request-token", settings.allowed_token_urls)


def test_in_cluster_objects_are_hardened_and_keep_secrets_out_of_specs(tmp_path: Path) -> None:
    clients = {kit.CLIENT_ID: "cs-secret-one", kit.RETAIN_CLIENT_ID: "cs-secret-two"}
    tls = kit.TestCA.create(tmp_path)
    broker = kit.broker_objects(clients, tls)
    deploy = next(o for o in broker if o["kind"] == "Deployment")
    pod_specs = [deploy["spec"]["template"]["spec"], kit.reader_pod_object()["spec"]]
    for spec in pod_specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            assert c["image"] == kit.IMAGE and c["imagePullPolicy"] == "Never"
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"] == {"drop": ["ALL"]}
    # The client secrets travel in a Secret, not in the Deployment's arguments.
    text = json.dumps(deploy)
    assert "cs-secret-one" not in text and "cs-secret-two" not in text
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--client" in args and f"{kit.CLIENT_ID}:$(BROKER_CLIENT_SECRET_0)" in args
    # The TLS key travels in a Secret too; the Service has the address the certificate names.
    assert tls.key.read_text() not in text
    service = next(o for o in broker if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == kit.BROKER_IP
    creds = {
        o["metadata"]["name"]: o
        for o in kit.credential_objects(clients, tls.ca_pem)
        if o["kind"] == "AutoTekCredential"
    }
    assert creds[kit.CREDENTIAL]["spec"]["target"] == {"name": kit.TARGET}
    assert creds[kit.RETAIN_CREDENTIAL]["spec"]["target"]["deletionPolicy"] == "Retain"
    assert all(c["spec"]["tokenURL"] == kit.TOKEN_URL for c in creds.values())
    assert all(c["spec"]["caBundle"] == tls.ca_pem for c in creds.values())


def test_the_broker_certificate_verifies_against_the_test_ca(tmp_path: Path) -> None:
    """The serving certificate chains to the run's CA and names the Service address and loopback."""
    tls = kit.TestCA.create(tmp_path)
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    addresses = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    assert addresses == {kit.BROKER_IP, "127.0.0.1"}
    assert tls.ca_pem.startswith("-----BEGIN CERTIFICATE-----")


def test_rbac_denial_pattern() -> None:
    assert kit.rbac_denials('{"message": "secrets is forbidden: User cannot list"}')
    assert kit.rbac_denials("kubernetes.client.exceptions.ApiException: (403)")
    assert kit.rbac_denials('{"code": 403, "reason": "Forbidden"}')
    assert kit.rbac_denials("HTTP 403 from the API")
    assert not kit.rbac_denials('{"time": "2025-01-01T12:04:03.403+00:00", "message": "resourceVersion 14037"}')
    assert not kit.rbac_denials("token rotated; next refresh 2025-01-01T12:04:03.403Z, rv=4031")
