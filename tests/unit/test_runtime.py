"""The scheduler and event handling, with real passes against in-memory fakes (real clock)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes import FakeKube, FakeTokens, b64, running_runtime, settle

from autotek_operator import scheduling
from autotek_operator.runtime import Runtime

NS = "shop"


def credential(generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": "autotek", "uid": "u1", "generation": generation, **meta},
            "spec": {"clientSecretRef": {"name": "client"}}}


@pytest.fixture
async def rt(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS) as world:
        yield world


async def test_new_credential_gets_one_pass_and_a_token(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    assert tokens.count == 1
    assert (NS, "autotek") in kube.secrets
    # The operator's own status patch comes back as an event: nothing to do.
    body = credential()
    body["status"] = copy.deepcopy(kube.statuses[(NS, "autotek")])
    passes = runtime.passes
    runtime.on_credential_event("MODIFIED", body)
    await settle(runtime)
    assert runtime.passes == passes and tokens.count == 1
    assert runtime.stats()["scheduled"] == 1  # the next refresh, and nothing else


async def test_spec_change_and_annotation_get_new_tokens(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    runtime.on_credential_event("MODIFIED", credential(generation=2))
    await settle(runtime)
    assert tokens.count == 2
    runtime.on_credential_event("MODIFIED", credential(generation=2, annotations={
        "autotek.io/refresh-requested-at": "2026-11-28T05:00:00Z"}))
    await settle(runtime)
    assert tokens.count == 3


async def test_client_secret_change_gets_a_new_token(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    changed = kube.put_secret(NS, "client", {"client_id": "id", "client_secret": "rotated"})
    runtime.on_secret_event("MODIFIED", changed)
    await settle(runtime)
    assert tokens.count == 2
    assert tokens.requests[-1].client_secret == "rotated"
    # Unrelated Secrets change nothing.
    runtime.on_secret_event("ADDED", kube.put_secret(NS, "other", {"k": "v"}))
    await settle(runtime)
    assert tokens.count == 2


async def test_target_edit_is_restored_and_own_writes_are_ignored(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    passes = runtime.passes
    runtime.on_secret_event("MODIFIED", copy.deepcopy(kube.secrets[(NS, "autotek")]))  # our own write
    await settle(runtime)
    assert runtime.passes == passes
    edited = copy.deepcopy(kube.secrets[(NS, "autotek")])
    edited["data"]["access_token"] = b64("tampered")
    kube.secrets[(NS, "autotek")] = edited
    edited["metadata"]["resourceVersion"] = "999"
    runtime.on_secret_event("MODIFIED", copy.deepcopy(edited))
    await settle(runtime)
    assert kube.secrets[(NS, "autotek")]["data"]["access_token"] == b64("tok-1")
    assert tokens.count == 1


async def test_follower_runs_nothing_until_it_leads(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.set_active(False)
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    assert tokens.count == 0 and runtime.passes == 0
    runtime.set_active(True)
    await settle(runtime)
    assert tokens.count == 1


async def test_deleted_credential_is_forgotten_and_cleaned_up(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert runtime.stats()["credentials"] == 0 and runtime.stats()["scheduled"] == 0
    assert (NS, "autotek") not in kube.secrets


async def test_conflict_is_retried_when_the_target_secret_changes(rt: Any) -> None:
    runtime, kube, tokens = rt
    foreign = kube.put_secret(NS, "autotek", {"someone": "else"})
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    assert kube.statuses[(NS, "autotek")]["conditions"][0]["reason"] == "TargetConflict"
    del kube.secrets[(NS, "autotek")]
    runtime.on_secret_event("DELETED", foreign)
    await settle(runtime)
    assert tokens.count == 1
    assert kube.statuses[(NS, "autotek")]["conditions"][0]["status"] == "True"


async def test_a_client_secret_listed_before_its_credential_is_not_read_again(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes = {NS}
    # The Secret list arrives first (the client Secret, changed once while listing; a TLS Secret;
    # a large one), then the credential list.
    runtime.on_secret_event(None, kube.secrets[(NS, "client")])
    runtime.on_secret_event("MODIFIED", kube.put_secret(NS, "client", {"client_id": "id", "client_secret": "newer"}))
    tls = kube.put_secret(NS, "tls", {"tls.crt": "c", "tls.key": "k"}, type="kubernetes.io/tls")
    runtime.on_secret_event(None, tls)
    runtime.on_secret_event(None, kube.put_secret(NS, "big", {"blob": "x" * 5000}))
    runtime.on_secrets_listed(NS, {(NS, "client"), (NS, "tls"), (NS, "big")})
    assert set(runtime.early_clients) == {(NS, "client")}
    runtime.on_credential_event(None, credential())
    runtime.on_credentials_listed(NS, {(NS, "autotek")})
    assert runtime.early_clients == {}  # every credential listed: the early copies are gone
    await settle(runtime)
    assert tokens.count == 1
    assert tokens.requests[-1].client_secret == "newer"  # the latest copy, never an outdated one
    assert ("get", "client") not in kube.calls
    # Once the credentials are listed, Secrets no credential names are not kept.
    runtime.on_secret_event(None, kube.put_secret(NS, "later", {"client_id": "x", "client_secret": "y"}))
    assert runtime.early_clients == {}


async def test_a_deleted_early_client_secret_is_not_used(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.secret_scopes = {NS}
    runtime.on_secret_event(None, kube.secrets[(NS, "client")])
    runtime.on_secret_event("DELETED", kube.secrets.pop((NS, "client")))
    assert runtime.early_clients == {}
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    assert tokens.count == 0
    assert ("get", "client") in kube.calls  # not known from the watch: read, and not found
