"""What the operator's API calls put on the wire, against the emulator over real HTTP.

The kubernetes client's typed methods turn a dict body into their model and write it out again:
a MicroTime with a zero fraction loses its six digits on the way, which a real API server refuses
(a Lease could then never be created or renewed). The emulator refuses such a MicroTime as the
API server does; the operator's calls send the body exactly as it was built.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import pytest
from fakes import Clock
from kubernetes.client.exceptions import ApiException

from autotek_operator import constants as c
from autotek_operator import kube
from autotek_operator.dev.emulator import EmulatorThread
from autotek_operator.errors import KubernetesAPIError
from autotek_operator.leader import FOLLOWING, LEADING, LeaderElector

NS = "default"
#: A whole second: the fraction is zero, which is what a datetime round trip drops.
T0 = datetime(2026, 12, 4, 21, 53, 24, tzinfo=UTC)


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread() as thread:
        yield thread


@pytest.fixture
def api(emu: EmulatorThread) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration(host=emu.url)
    config.retries = False
    return kubernetes.client.ApiClient(config)


def lease_body(name: str, renew: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 30, "renewTime": renew, "acquireTime": renew},
    }


def test_the_typed_client_loses_a_zero_fraction_and_the_emulator_refuses_it(api: kubernetes.client.ApiClient) -> None:
    # This is the failure the operator met on a real cluster, reproduced: the emulator must catch it.
    coordination = kubernetes.client.CoordinationV1Api(api)
    with pytest.raises(ApiException) as caught:
        coordination.create_namespaced_lease(NS, lease_body("typed", "2026-12-04T21:53:24.000000Z"))
    assert caught.value.status == 400
    assert "2006-01-02T15:04:05.000000Z07:00" in (caught.value.body or "")


def test_a_lease_body_reaches_the_server_as_built(api: kubernetes.client.ApiClient, emu: EmulatorThread) -> None:
    k = kube.Kube(api)
    k.create_lease(NS, lease_body("raw", "2026-12-04T21:53:24.000000Z"))
    stored = emu.emulator.read_object("coordination.k8s.io/v1/leases", NS, "raw")
    assert stored is not None
    assert stored["spec"]["renewTime"] == "2026-12-04T21:53:24.000000Z"
    current = k.get_lease(NS, "raw")
    assert current is not None
    current["spec"]["renewTime"] = "2026-12-04T21:53:29.000000Z"
    k.replace_lease(NS, "raw", current)
    again = k.get_lease(NS, "raw")
    assert again is not None and again["spec"]["renewTime"] == "2026-12-04T21:53:29.000000Z"


def test_a_bad_micro_time_is_a_typed_error_without_the_body(api: kubernetes.client.ApiClient) -> None:
    with pytest.raises(KubernetesAPIError) as caught:
        kube.Kube(api).create_lease(NS, lease_body("bad", "2026-12-04T21:53:24+00:00"))
    assert str(caught.value) == "Kubernetes API create leases failed: HTTP 400 Bad Request"


def test_leader_election_creates_renews_and_hands_over_on_whole_seconds(api: kubernetes.client.ApiClient) -> None:
    clock, mono = Clock(T0), [1000.0]

    def elector(identity: str) -> LeaderElector:
        return LeaderElector(
            api=kube.Kube(api),
            namespace=NS,
            name="operator-lease",
            identity=identity,
            clock=clock,
            monotonic=lambda: mono[0],
            lease_duration=10,
        )

    a, b = elector("a"), elector("b")
    assert a.try_acquire_or_renew() == LEADING  # create
    assert b.try_acquire_or_renew() == FOLLOWING
    clock.advance(5)
    assert a.try_acquire_or_renew() == LEADING  # renew
    a.release()  # a clean shutdown: the Lease is free at once
    assert b.try_acquire_or_renew() == LEADING
    assert a.try_acquire_or_renew() == FOLLOWING


def test_secret_bodies_keep_what_the_model_would_not(api: kubernetes.client.ApiClient, emu: EmulatorThread) -> None:
    k = kube.Kube(api)
    data = {"access_token": base64.b64encode(b"t").decode()}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "target", "namespace": NS, "annotations": {"autotek.io/expires-at": "x"}},
        "type": "Opaque",
        "data": data,
    }
    created = k.create_secret(NS, body)
    assert created["data"] == data and created["metadata"]["annotations"] == {"autotek.io/expires-at": "x"}
    patched = k.patch_secret(NS, "target", {"data": {"scope": base64.b64encode(b"s").decode()}})
    assert patched is not None and set(patched["data"]) == {"access_token", "scope"}
    k.delete_secret(NS, "target", uid="not-its-uid")  # a precondition that fails: left alone
    assert k.get_secret(NS, "target") is not None
    k.delete_secret(NS, "target", uid=created["metadata"]["uid"])
    assert k.get_secret(NS, "target") is None


def test_a_cluster_credentials_event_has_an_empty_involved_namespace(
    api: kubernetes.client.ApiClient, emu: EmulatorThread
) -> None:
    """An Event about a ClusterAutoTekCredential: in ``default`` with involvedObject.namespace "" (as a Node's),
    the only place the API server takes it and where ``kubectl describe catc`` looks."""
    kube.Kube(api).create_event(
        namespace=c.CLUSTER_EVENT_NAMESPACE, name="cc", uid="u2", event_type="Normal", reason="TokenIssued",
        message="m", now=T0, kind=c.CLUSTER_KIND,
    )
    resp = kubernetes.client.CoreV1Api(api).list_namespaced_event(c.CLUSTER_EVENT_NAMESPACE, _preload_content=False)
    [event] = [e for e in json.loads(resp.data)["items"] if e["involvedObject"]["name"] == "cc"]
    assert event["involvedObject"] == {
        "apiVersion": c.API_VERSION, "kind": c.CLUSTER_KIND, "name": "cc", "namespace": "", "uid": "u2"}


def test_events_and_status_go_out_as_built(api: kubernetes.client.ApiClient, emu: EmulatorThread) -> None:
    k = kube.Kube(api)
    k.create_event(
        namespace=NS, name="cred", uid="u1", event_type="Normal", reason="TokenIssued", message="m", now=T0
    )
    events = kubernetes.client.CoreV1Api(api).list_namespaced_event(NS, _preload_content=False)
    assert b'"firstTimestamp": "2026-12-04T21:53:24Z"' in events.data or b'"2026-12-04T21:53:24Z"' in events.data
    assert k.get_credential(NS, "missing") is None
    k.patch_credential_status(NS, "missing", {"failedAttempts": 0})  # 404: deleted meanwhile, no error
