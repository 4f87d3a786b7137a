"""The embedded Kubernetes API emulator, checked through the real kubernetes client and a tiny kopf operator."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import kopf.testing
import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from autotek_operator.dev import emulator as emulator_module
from autotek_operator.dev.emulator import EmulatorThread

GROUP, VERSION, PLURAL = "autotek.io", "v1alpha1", "autotekcredentials"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def emu() -> Any:
    with EmulatorThread(port=0) as emu:
        yield emu


@pytest.fixture()
def api(emu: EmulatorThread) -> Any:
    # Not $KUBECONFIG: the client reads it once, at import time.
    with kubernetes.client.ApiClient(kubernetes.client.Configuration(host=emu.url)) as api:
        yield api


@pytest.fixture()
def core(api: Any) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture()
def custom(api: Any) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def secret(name: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, **fields}


def credential(name: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AutoTekCredential", "metadata": {"name": name},
            "spec": {"clientId": "c1"}, **fields}


def create_cred(custom: Any, name: str, **fields: Any) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, credential(name, **fields))


def patch_cred(custom: Any, name: str, body: Any, status: bool = False) -> dict[str, Any]:
    fn = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    # The custom-objects client sends merge-patch+json even for a list, as it would to a real cluster.
    kind = "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
    return fn(GROUP, VERSION, "default", PLURAL, name, body, _content_type=kind)


def rv(obj: Any) -> int:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    return int(meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version)


def http(emu: EmulatorThread, method: str, path: str, body: Any = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(emu.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_create_answers_201_with_server_metadata(core: Any, custom: Any) -> None:
    data, status, _ = core.create_namespaced_secret_with_http_info("default", secret("s1", data={}))
    assert status == 201
    meta = data.metadata
    assert meta.uid and meta.resource_version.isdigit() and meta.generation == 1
    assert meta.creation_timestamp is not None
    created = create_cred(custom, "c1")  # gap 5: the custom-objects client returns the object
    assert created["metadata"]["creationTimestamp"].endswith("Z")
    assert rv(created) > rv(data)


def test_resource_version_increases_on_every_write(core: Any) -> None:
    versions = [rv(core.create_namespaced_secret("default", secret("s1", data={"a": "YQ=="})))]
    versions.append(rv(core.patch_namespaced_secret("s1", "default", {"metadata": {"labels": {"x": "1"}}})))
    versions.append(rv(core.replace_namespaced_secret("s1", "default", secret("s1", data={"b": "Yg=="}))))
    add = [{"op": "add", "path": "/data/c", "value": "Yw=="}]
    versions.append(rv(core.patch_namespaced_secret("s1", "default", add)))
    assert versions == sorted(versions) and len(set(versions)) == 4
    # A no-op write changes nothing, as on a real server.
    assert rv(core.patch_namespaced_secret("s1", "default", {"data": {"c": "Yw=="}})) == versions[-1]


def test_generation_changes_only_with_spec(custom: Any) -> None:
    create_cred(custom, "c1")
    labelled = patch_cred(custom, "c1", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    with_status = patch_cred(custom, "c1", {"status": {"phase": "x"}}, status=True)
    assert with_status["metadata"]["generation"] == 1 and rv(with_status) > rv(labelled)
    changed = patch_cred(custom, "c1", {"spec": {"clientId": "c2"}})
    assert changed["metadata"]["generation"] == 2


def test_replace_and_optimistic_concurrency(core: Any) -> None:
    created = core.create_namespaced_secret("default", secret("s1", data={"a": "YQ=="}))
    created.data = {"a": "Yg=="}
    replaced, status, _ = core.replace_namespaced_secret_with_http_info("s1", "default", created)
    assert status == 200 and replaced.data == {"a": "Yg=="}
    assert replaced.metadata.uid == created.metadata.uid
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_secret("s1", "default", created)  # still the old resourceVersion
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
    # PUT of a missing object creates it.
    assert core.replace_namespaced_secret_with_http_info("s2", "default", secret("s2"))[1] == 201


def test_create_of_an_existing_name_conflicts(core: Any) -> None:
    core.create_namespaced_secret("default", secret("s1"))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret("default", secret("s1"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    core.create_namespaced_secret("other", secret("s1"))  # the same name elsewhere is fine


def test_secret_string_data_is_folded(core: Any) -> None:
    created = core.create_namespaced_secret("default", secret("s1", data={"a": "YQ=="}, stringData={"b": "bee"}))
    assert created.data == {"a": "YQ==", "b": base64.b64encode(b"bee").decode()}
    assert created.string_data is None
    patched = core.patch_namespaced_secret("s1", "default", {"stringData": {"c": "sea"}})
    assert base64.b64decode(patched.data["c"]) == b"sea" and patched.string_data is None


def test_namespace_and_generated_names(emu: EmulatorThread, custom: Any, core: Any) -> None:
    created = create_cred(custom, "c1")
    assert created["metadata"]["namespace"] == "default"
    generated = core.create_namespaced_secret("default", {"metadata": {"generateName": "tok-"}})
    assert generated.metadata.name.startswith("tok-") and len(generated.metadata.name) == 9
    assert core.read_namespaced_secret(generated.metadata.name, "default").metadata.uid == generated.metadata.uid
    status, _ = http(emu, "POST", "/api/v1/namespaces/default/secrets",
                        {"metadata": {"name": "s1", "namespace": "elsewhere"}})
    assert status == 400
    status, _ = http(emu, "POST", "/api/v1/namespaces/default/secrets", {"metadata": {"name": "Bad_Name"}})
    assert status == 422


def test_json_patch(custom: Any) -> None:
    created = create_cred(custom, "c1")
    test = {"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]}
    add = {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}
    assert patch_cred(custom, "c1", [test, add])["metadata"]["finalizers"] == ["f"]
    with pytest.raises(ApiException) as err:
        patch_cred(custom, "c1", [test, add])  # the resourceVersion has moved on
    assert err.value.status == 422


def test_merge_patch_null_deletes(core: Any) -> None:
    core.create_namespaced_secret("default", secret("s1", metadata={"name": "s1", "labels": {"a": "1", "b": "2"}}))
    patched = core.patch_namespaced_secret("s1", "default", {"metadata": {"labels": {"a": None, "c": "3"}}})
    assert patched.metadata.labels == {"b": "2", "c": "3"}


def test_status_subresource_isolation(emu: EmulatorThread, custom: Any) -> None:
    created = create_cred(custom, "c1", status={"ignored": True})
    assert "status" not in created  # status comes only through /status
    patched = patch_cred(custom, "c1", {"spec": {"clientId": "evil"}, "status": {"phase": "Ready"}}, status=True)
    assert patched["spec"] == {"clientId": "c1"} and patched["status"] == {"phase": "Ready"}
    patched = patch_cred(custom, "c1", {"spec": {"clientId": "c2"}, "status": {"phase": "Evil"}})
    assert patched["spec"] == {"clientId": "c2"} and patched["status"] == {"phase": "Ready"}
    whole = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")
    whole["spec"], whole["status"] = {"clientId": "c3"}, {"phase": "Replaced"}
    replaced = custom.replace_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "c1", whole)
    assert replaced["spec"] == {"clientId": "c2"} and replaced["status"] == {"phase": "Replaced"}
    status, body = http(emu, "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/c1/status",
                        [{"op": "replace", "path": "/status/phase", "value": "JSON"},
                         {"op": "replace", "path": "/spec/clientId", "value": "evil"}], "application/json-patch+json")
    assert status == 200 and body["status"] == {"phase": "JSON"} and body["spec"] == {"clientId": "c2"}


def test_namespaces(core: Any) -> None:
    assert {"default", "kube-system"} <= {ns.metadata.name for ns in core.list_namespace().items}
    created = core.create_namespace({"metadata": {"name": "team-a"}})
    assert created.status.phase == "Active" and created.metadata.namespace is None
    assert core.read_namespace("team-a").metadata.uid == created.metadata.uid
    assert "team-a" in {ns.metadata.name for ns in core.list_namespace().items}


def test_delete_and_finalizers(emu: EmulatorThread, core: Any, custom: Any) -> None:
    created = core.create_namespaced_secret("default", secret("s1"))
    assert ("v1/secrets", "default", "s1") in emu.emulator.objects  # gap 16: string keys work
    with pytest.raises(ApiException) as err:  # DeleteOptions preconditions are honoured
        core.delete_namespaced_secret("s1", "default", body={"preconditions": {"uid": "not-this-one"}})
    assert err.value.status == 409
    core.delete_namespaced_secret("s1", "default", body={"preconditions": {"uid": created.metadata.uid}})
    assert ("v1/secrets", "default", "s1") not in emu.emulator.objects
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret("s1", "default")
    assert err.value.status == 404

    create_cred(custom, "c1", metadata={"name": "c1", "finalizers": ["x/y"]})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")
    held = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")
    assert held["metadata"]["deletionTimestamp"]
    patch_cred(custom, "c1", {"metadata": {"finalizers": None}})
    assert emu.emulator.read_object(f"{GROUP}/{VERSION}/{PLURAL}", "default", "c1") is None


def test_selectors(core: Any) -> None:
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})]:
        core.create_namespaced_secret("default", {"metadata": {"name": name, "labels": labels}})
    core.create_namespaced_secret("other", {"metadata": {"name": "a", "labels": {"app": "x"}}})

    def names(selector: str = "", fields: str = "", namespace: str = "default") -> list[str]:
        items = core.list_namespaced_secret(namespace, label_selector=selector, field_selector=fields).items
        return sorted(s.metadata.name for s in items)

    assert names("app=x") == ["a"] and names("app==x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app") == ["a", "b"] and names("!app") == ["c"]
    assert names("app=x,tier") == ["a"] and names("app in (x, y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names(fields="metadata.name=b") == ["b"] and names(fields="metadata.name!=b") == ["a", "c"]
    everywhere = core.list_secret_for_all_namespaces(field_selector="metadata.namespace=other").items
    assert [(s.metadata.namespace, s.metadata.name) for s in everywhere] == [("other", "a")]
    with pytest.raises(ApiException) as err:
        names(fields="spec.x=1")
    assert err.value.status == 400

    # A filtered watch sees objects moving into and out of the selection as ADDED and DELETED.
    listed = core.list_namespaced_secret("default").metadata.resource_version
    core.patch_namespaced_secret("b", "default", {"metadata": {"labels": {"app": "x"}}})
    core.patch_namespaced_secret("a", "default", {"metadata": {"labels": {"app": None}}})
    core.patch_namespaced_secret("c", "default", {"metadata": {"labels": {"app": "z"}}})
    stream = kubernetes.watch.Watch().stream(core.list_namespaced_secret, "default", label_selector="app=x",
                                             resource_version=listed, timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "b"), ("DELETED", "a")]


def test_watch_sees_changes_live(core: Any) -> None:
    events: list[tuple[str, str, str]] = []

    def watch() -> None:
        for event in kubernetes.watch.Watch().stream(core.list_namespaced_secret, "default", timeout_seconds=2):
            events.append((event["type"], event["object"].metadata.name, event["object"].metadata.resource_version))

    core.create_namespaced_secret("default", secret("before"))
    thread = threading.Thread(target=watch)
    started = time.monotonic()
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_secret("default", secret("s1"))
    core.patch_namespaced_secret("s1", "default", {"metadata": {"labels": {"a": "b"}}})
    core.delete_namespaced_secret("s1", "default")
    thread.join(10)
    assert time.monotonic() - started < 5  # timeoutSeconds ends the stream (gap 9)
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "before"), ("ADDED", "s1"), ("MODIFIED", "s1"), ("DELETED", "s1")]
    assert [int(v) for _, _, v in events[1:]] == sorted(int(v) for _, _, v in events[1:])


def test_watch_resumes_from_a_listed_resource_version(emu: EmulatorThread, core: Any, monkeypatch: Any) -> None:
    listed = core.list_namespaced_secret("default")
    core.create_namespaced_secret("default", secret("s1"))
    core.create_namespaced_secret("other", secret("s2"))
    core.delete_namespaced_secret("s1", "default")
    stream = kubernetes.watch.Watch().stream(core.list_namespaced_secret, "default", timeout_seconds=1,
                                             resource_version=listed.metadata.resource_version)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "s1"), ("DELETED", "s1")]

    # A resourceVersion older than the kept history: 410 Gone, the client must list again.
    monkeypatch.setattr(emulator_module, "HISTORY_SIZE", 2)
    with EmulatorThread() as small:
        for name in "abc":
            http(small, "POST", "/api/v1/namespaces/default/secrets", secret(name))
        # The two namespaces took resourceVersions 1 and 2; a, b, c took 3, 4, 5; only 4 and 5 are kept.
        with urllib.request.urlopen(small.url + "/api/v1/namespaces/default/secrets?watch=true&resourceVersion=2") as r:
            event = json.loads(r.readline())
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


def test_request_counts_and_stats(emu: EmulatorThread, core: Any, custom: Any) -> None:
    emu.reset_request_counts()
    core.create_namespaced_secret("default", secret("s1"))
    create_cred(custom, "c1")
    patch_cred(custom, "c1", {"status": {"a": 1}}, status=True)
    patch_cred(custom, "c1", {"status": {"a": 2}}, status=True)
    core.list_namespace()
    assert emu.request_counts == {("POST", "secrets", ""): 1, ("POST", PLURAL, ""): 1,
                                  ("PATCH", PLURAL, "status"): 2, ("GET", "namespaces", ""): 1}
    status, stats = http(emu, "GET", "/_emulator/stats")
    assert status == 200 and stats["total"] == 5 and stats["requests"][f"PATCH {PLURAL}/status"] == 2
    assert http(emu, "POST", "/_emulator/stats/reset")[0] == 200
    assert emu.request_counts == {}


def test_discovery(emu: EmulatorThread) -> None:
    _, core_v1 = http(emu, "GET", "/api/v1")
    assert core_v1["groupVersion"] == "v1"
    namespaced = {r["name"]: r["namespaced"] for r in core_v1["resources"]}
    assert namespaced["namespaces"] is False and namespaced["secrets"] is True and namespaced["events"] is True
    _, ours = http(emu, "GET", f"/apis/{GROUP}/{VERSION}")
    names = {r["name"]: r for r in ours["resources"]}
    assert names[PLURAL]["namespaced"] is True and f"{PLURAL}/status" in names
    assert {"get", "list", "watch", "patch", "update", "create", "delete"} <= set(names[PLURAL]["verbs"])
    _, kopf_dev = http(emu, "GET", "/apis/kopf.dev/v1")
    assert {r["name"]: r["namespaced"] for r in kopf_dev["resources"]} == {
        "kopfpeerings": True, "clusterkopfpeerings": False}
    _, groups = http(emu, "GET", "/apis")
    assert {"apps", "coordination.k8s.io", "events.k8s.io", GROUP, "kopf.dev"} <= {g["name"] for g in groups["groups"]}
    assert http(emu, "GET", "/apis/nope.io/v1/things")[0] == 404


def test_request_log_is_trimmed_and_reactions_win(emu: EmulatorThread, core: Any) -> None:
    for _ in range(120):
        core.list_namespace()
    assert len(list(emu.emulator)) <= emulator_module.LOG_SIZE  # gap 15
    emu.emulator["post /api/v1/namespaces/default/secrets"] << 503  # fault injection through kmock
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret("default", secret("s1"))
    assert err.value.status == 503 and emu.emulator.read_object("v1/secrets", "default", "s1") is None


def test_kubeconfig_works_with_the_client(emu: EmulatorThread, tmp_path: Path) -> None:
    assert emu.url == f"http://127.0.0.1:{emu.port}"
    path = emu.write_kubeconfig(tmp_path / "kubeconfig")
    with kubernetes.config.new_client_from_config(config_file=str(path)) as client:
        names = {ns.metadata.name for ns in kubernetes.client.CoreV1Api(client).list_namespace().items}
    assert {"default", "kube-system"} <= names
    with pytest.raises(RuntimeError):
        EmulatorThread(port=emu.port).start()  # the port is taken: start() says so


def test_cli_prints_ready_and_serves(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    env = dict(os.environ, PYTHONPATH=str(REPO / "operator"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotek_operator.dev.emulator", "--port", "0", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("EMULATOR READY http://127.0.0.1:")
        url = line.split()[-1]
        config = json.loads(kubeconfig.read_text())
        assert config["current-context"] == "emulator" and config["clusters"][0]["cluster"]["server"] == url
        with urllib.request.urlopen(url + "/api/v1/namespaces", timeout=5) as response:
            assert "default" in {ns["metadata"]["name"] for ns in json.load(response)["items"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert proc.stdout.read() == ""  # exactly one line


OPERATOR = textwrap.dedent("""
    import json, os
    import kopf

    def record(*what):
        with open(os.environ["EMULATOR_TEST_EVENTS"], "a") as f:
            f.write(json.dumps(what) + "\\n")

    @kopf.on.login()
    def login(**kwargs):
        return kopf.login_with_kubeconfig(**kwargs)  # reads $KUBECONFIG now, not at import time

    @kopf.on.startup()
    def configure(settings, **_):
        settings.watching.server_timeout = 10
        settings.watching.client_timeout = 15

    @kopf.on.event("autotek.io", "v1alpha1", "autotekcredentials")
    def on_event(event, name, **_):
        record(event["type"], name)

    @kopf.on.create("autotek.io", "v1alpha1", "autotekcredentials")
    def on_create(name, body, **_):
        kopf.info(body, reason="Greeting", message="hello")
        return {"greeting": "hello " + name}

    @kopf.on.delete("autotek.io", "v1alpha1", "autotekcredentials")
    def on_delete(name, **_):
        record("deleted", name)
""")


def wait_for(condition: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def test_kopf_operator_runs_against_the_emulator(
        emu: EmulatorThread, custom: Any, core: Any, tmp_path: Path, monkeypatch: Any, request: Any) -> None:
    operator, events = tmp_path / "tiny_operator.py", tmp_path / "events.jsonl"
    operator.write_text(OPERATOR)
    events.touch()
    monkeypatch.setenv("KUBECONFIG", str(emu.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("EMULATOR_TEST_EVENTS", str(events))
    # Keep the tiny operator's handlers (and kopf's sys.path entry) out of later tests.
    monkeypatch.setattr(sys, "path", list(sys.path))
    previous_registry = kopf.get_default_registry()
    kopf.set_default_registry(kopf.OperatorRegistry())
    request.addfinalizer(lambda: kopf.set_default_registry(previous_registry))

    def seen() -> list[list[str]]:
        return [json.loads(line) for line in events.read_text().splitlines()]

    def read() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")

    with kopf.testing.KopfRunner(["run", "-A", "--standalone", str(operator)], timeout=30) as runner:
        wait_for(lambda: emu.request_counts.get(("WATCH", PLURAL, "")))  # the operator is watching
        create_cred(custom, "c1")
        wait_for(lambda: ["ADDED", "c1"] in seen())
        # The create handler ran: kopf JSON-patched its finalizer and merge-patched /status.
        done = wait_for(lambda: (obj := read()).get("status", {}).get("on_create") and obj)
        assert done["status"]["on_create"] == {"greeting": "hello c1"} and done["metadata"]["finalizers"]
        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c1")
        wait_for(lambda: ["deleted", "c1"] in seen())
        wait_for(lambda: emu.emulator.read_object(f"{GROUP}/{VERSION}/{PLURAL}", "default", "c1") is None)
        wait_for(lambda: ["DELETED", "c1"] in seen())
        wait_for(lambda: core.list_namespaced_event("default").items)  # kopf posts events with generateName
    assert runner.exit_code == 0 and runner.exception is None
    assert "Traceback" not in runner.output
