"""The operator's own API calls over real loopback HTTP: keep-alive, the bearer token as the
kubernetes client would send it (a rotating ServiceAccount token file re-read), timeouts, and the
same error classification (404, 409, 429/503 with Retry-After, nothing of a body in messages)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import urllib3
from kubernetes.config.incluster_config import InClusterConfigLoader

from autotek_operator import kube
from autotek_operator.errors import KubernetesAPIError, NamespaceGone

SECRET_DATA = "c3VwZXItc2VjcmV0LXZhbHVl"  # what must never show in an error message


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], Any]]) -> None:
        self.answer = answer
        self.connections = 0
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client closes
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.seen.append((self.command, self.path, headers, body))
        status, extra, doc = self.server.answer(self.command, self.path, headers, body)
        if status == 0:  # do not answer at all
            threading.Event().wait(2)
            return
        data = json.dumps(doc).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **extra}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any


@pytest.fixture
def serve() -> Iterator[Callable[..., _Server]]:
    servers: list[_Server] = []

    def start(answer: Callable[..., tuple[int, dict[str, str], Any]]) -> _Server:
        server = _Server(answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _client(url: str, token: str = "tok") -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration(host=url)
    config.api_key["BearerToken"] = token
    config.api_key_prefix["BearerToken"] = "Bearer"
    config.retries = False
    return kubernetes.client.ApiClient(config)


def _ok(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], Any]:
    return 200, {}, {"kind": "Secret", "metadata": {"name": "s", "resourceVersion": "7"}, "echo": body.decode()}


def test_calls_share_one_kept_alive_connection_and_send_plain_json(serve: Callable[..., _Server]) -> None:
    server = serve(_ok)
    k = kube.Kube(_client(server.url))
    for _ in range(5):
        assert k.get_secret("ns", "s") == {
            "kind": "Secret",
            "metadata": {"name": "s", "resourceVersion": "7"},
            "echo": "",
        }
    created = k.create_secret("ns", {"metadata": {"name": "t"}, "data": {"k": SECRET_DATA}})
    assert json.loads(created["echo"]) == {"metadata": {"name": "t"}, "data": {"k": SECRET_DATA}}
    k.patch_credential_status("ns", "c", {"phase": "Ready"})
    assert server.connections == 1  # seven calls, one TCP connection
    method, path, headers, body = server.seen[-1]
    assert (method, path) == ("PATCH", "/apis/autotek.io/v1alpha1/namespaces/ns/autotekcredentials/c/status")
    assert headers["content-type"] == "application/merge-patch+json"
    assert headers["accept"] == "application/json"
    assert headers["authorization"] == "Bearer tok"
    assert json.loads(body) == {"status": {"phase": "Ready"}}
    assert server.seen[0][2].get("content-type") is None  # a GET has no body


def test_a_rotating_serviceaccount_token_file_is_read_again(serve: Callable[..., _Server], tmp_path: Path) -> None:
    server = serve(_ok)
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text("first-token")
    ca_file.write_text("not used over http")
    config = kubernetes.client.Configuration()
    loader = InClusterConfigLoader(
        str(token_file),
        str(ca_file),
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1"},
    )
    loader._token_refresh_period = 0 * loader._token_refresh_period  # the client's own re-read, now
    loader.load_and_set(config)
    config.host = server.url  # plain http on loopback; the hook's later resets do not matter
    k = kube.Kube(kubernetes.client.ApiClient(config))
    k.api_client.AUTH_EVERY = 0.0
    k.get_secret("ns", "s")
    token_file.write_text("second-token")  # the kubelet rotated it
    k.get_secret("ns", "s")
    assert [h["authorization"] for _, _, h, _ in server.seen] == ["bearer first-token", "bearer second-token"]


def test_errors_are_classified_as_before_without_the_body(serve: Callable[..., _Server]) -> None:
    answers = {
        "/api/v1/namespaces/ns/secrets/missing": (404, {}),
        "/api/v1/namespaces/ns/secrets": (409, {}),
        "/api/v1/namespaces/ns/secrets/busy": (429, {"Retry-After": "3"}),
        "/api/v1/namespaces/ns/secrets/down": (503, {"Retry-After": "2"}),
        "/api/v1/namespaces/ns/secrets/broken": (500, {"Retry-After": "2"}),
    }

    def answer(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], Any]:
        status, extra = answers[path]
        return status, extra, {"kind": "Status", "message": f"echo {SECRET_DATA}", "code": status}

    server = serve(answer)
    k = kube.Kube(_client(server.url))
    assert k.get_secret("ns", "missing") is None
    assert k.patch_secret("ns", "missing", {"data": {}}) is None
    k.delete_secret("ns", "missing")
    with pytest.raises(kube.Conflict):
        k.create_secret("ns", {"metadata": {"name": "x"}, "data": {"k": SECRET_DATA}})
    for name, retry_after in (("busy", 3.0), ("down", 2.0), ("broken", None)):
        with pytest.raises(KubernetesAPIError) as caught:
            k.get_secret("ns", name)
        assert caught.value.retry_after == retry_after
        assert SECRET_DATA not in str(caught.value) and SECRET_DATA not in repr(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert str(caught.value) == "Kubernetes API get secrets failed: HTTP 500 Internal Server Error"


def test_a_server_that_does_not_answer_times_out(serve: Callable[..., _Server]) -> None:
    server = serve(lambda *_: (0, {}, None))
    transport = kube.Transport(_client(server.url))
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        kube.request(transport, "GET", "/api/v1/namespaces/ns/secrets/s", timeout=(0.5, 0.2))


def _status(reason: str, kind: str, *causes: str) -> dict[str, Any]:
    return {"kind": "Status", "reason": reason, "message": f"echo {SECRET_DATA}",
            "details": {"name": "x", "kind": kind, "causes": [{"type": t} for t in causes]}}


@pytest.mark.parametrize(("status", "doc", "gone"), [
    pytest.param(404, _status("NotFound", "namespaces"), True, id="namespace-deleted"),
    pytest.param(403, _status("Forbidden", "secrets", "NamespaceTerminating"), True, id="namespace-terminating"),
    pytest.param(404, _status("NotFound", "secrets"), False, id="secret-not-found"),
    pytest.param(403, _status("Forbidden", "secrets"), False, id="rbac-forbidden"),
    pytest.param(403, _status("Forbidden", "secrets", "FieldValueInvalid"), False, id="other-cause"),
    pytest.param(500, _status("InternalError", "namespaces", "NamespaceTerminating"), False, id="server-error"),
    pytest.param(403, {"reason": "Forbidden", "details": {"causes": [{"type": "NamespaceTerminating"}]}}, False,
                 id="not-a-status"),
    pytest.param(403, ["NamespaceTerminating"], False, id="not-an-object"),
])
def test_a_deleted_or_terminating_namespace_is_told_apart(
    serve: Callable[..., _Server], status: int, doc: Any, gone: bool
) -> None:
    """Read from the Status object's structured fields (reason, details.kind, details.causes[].type)."""
    server = serve(lambda *_: (status, {}, doc))
    k = kube.Kube(_client(server.url))
    with pytest.raises(KubernetesAPIError) as caught:
        k.create_secret("ns", {"metadata": {"name": "x"}, "data": {"k": SECRET_DATA}})
    assert isinstance(caught.value, NamespaceGone) is gone
    assert SECRET_DATA not in str(caught.value) and caught.value.__cause__ is None


def test_a_base_path_is_kept_and_a_proxy_goes_through_the_manager(serve: Callable[..., _Server]) -> None:
    """An API server behind a path prefix (a Rancher-style proxy URL) gets the prefix on every call; with
    a proxy configured the calls go through the client's proxy manager, not a direct pool."""
    server = serve(_ok)
    k = kube.Kube(_client(server.url + "/k8s/clusters/c-1/"))
    k.get_secret("ns", "s")
    assert [path for _, path, _, _ in server.seen] == ["/k8s/clusters/c-1/api/v1/namespaces/ns/secrets/s"]
    assert k.api_client._direct is not None
    config = kubernetes.client.Configuration(host="https://api.example.invalid")
    config.proxy = server.url
    proxied = kube.Transport(kubernetes.client.ApiClient(config))
    assert isinstance(proxied.pool, urllib3.ProxyManager) and proxied._direct is None
