"""Scoping and probes: the credential selector setting, leaving the selection versus deletion,
complete lists, and what /healthz and /readyz answer."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes import FakeKube, FakeTokens, running_runtime, settle

from autotek_operator import config, handlers, health, scheduling
from autotek_operator.errors import KubernetesAPIError
from autotek_operator.leader import FOLLOWING, LEADING, UNKNOWN
from autotek_operator.runtime import Runtime

NS = "shop"


@pytest.mark.parametrize(
    "selector",
    [
        "team=shop",
        "team==shop",
        "team!=shop",
        "team",
        "!canary",
        "tier in (a,b)",
        "tier notin (a, b)",
        "autotek.io/test-scope=abc,tier in (a,b),!canary",
        "example.com/empty=",
    ],
)
def test_well_formed_selectors_are_kept_as_written(selector: str) -> None:
    settings = config.from_env({"AUTOTEK_CREDENTIAL_SELECTOR": selector})
    assert settings.credential_selector == selector


@pytest.mark.parametrize(
    ("selector", "complaint"),
    [
        ("team shop", "cannot parse 'team shop'"),
        ("=shop", "'=shop' is not a valid label key"),
        ("team=shop x", "cannot parse"),
        ("tier in a", "cannot parse"),
        ("tier in (a", "cannot parse"),
        ("a,,b", "cannot parse ''"),
        ("-team=shop", "'-team' is not a valid label key"),
        ("team=-shop", "'-shop' is not a valid label value"),
        ("t" * 64 + "=x", "is not a valid label key"),
        ("Bad_Prefix.io/team=x", "is not a valid label key"),
    ],
)
def test_malformed_selectors_are_refused_at_start(selector: str, complaint: str) -> None:
    with pytest.raises(config.ConfigError, match="AUTOTEK_CREDENTIAL_SELECTOR") as caught:
        config.from_env({"AUTOTEK_CREDENTIAL_SELECTOR": selector})
    assert complaint in str(caught.value)


def test_no_selector_by_default() -> None:
    assert config.from_env({}).credential_selector == ""


# -- the runtime: deletion versus leaving the selection ---------------------------------------


def credential(uid: str = "u1", name: str = "autotek", ns: str = NS) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": uid, "generation": 1},
        "spec": {"clientSecretRef": {"name": "client"}},
    }


@pytest.fixture
async def rt(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, FakeKube, FakeTokens]]:
    monkeypatch.setattr(scheduling, "FLOOR_SECONDS", 0.2)
    async with running_runtime(NS) as world:
        world[1].credentials = {}
        yield world


async def _issued(runtime: Runtime, kube: FakeKube) -> None:
    runtime.on_credential_event(None, credential())
    await settle(runtime)
    assert (NS, "autotek") in kube.secrets


async def test_without_a_selector_a_deletion_cleans_up_without_a_read(rt: Any) -> None:
    runtime, kube, _ = rt
    await _issued(runtime, kube)
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert (NS, "autotek") not in kube.secrets
    assert ("get-credential", "autotek") not in kube.calls


async def test_a_credential_that_left_the_selection_keeps_its_secret(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.confirm_deletions = True
    await _issued(runtime, kube)
    kube.credentials[(NS, "autotek")] = credential()  # still there: only its labels changed
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert (NS, "autotek") in kube.secrets
    assert ("delete", "autotek") not in kube.calls
    assert runtime.stats()["credentials"] == 0  # forgotten: another operator may take it now
    requests = tokens.count
    await settle(runtime, 0.5)
    assert tokens.count == requests


async def test_under_a_selector_a_confirmed_deletion_cleans_up(rt: Any) -> None:
    runtime, kube, _ = rt
    runtime.confirm_deletions = True
    await _issued(runtime, kube)
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert ("get-credential", "autotek") in kube.calls
    assert (NS, "autotek") not in kube.secrets


async def test_a_new_credential_of_the_same_name_is_not_mistaken_for_the_old_one(rt: Any) -> None:
    runtime, kube, _ = rt
    runtime.confirm_deletions = True
    await _issued(runtime, kube)
    kube.credentials[(NS, "autotek")] = credential(uid="u2")  # deleted, then created again
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert (NS, "autotek") not in kube.secrets


async def test_an_unconfirmed_deletion_leaves_the_secret(rt: Any) -> None:
    runtime, kube, _ = rt
    runtime.confirm_deletions = True
    await _issued(runtime, kube)
    kube.fail_next.append(KubernetesAPIError("Kubernetes API get autotekcredentials failed: HTTP 503"))
    runtime.on_credential_event("DELETED", credential())
    await settle(runtime)
    assert (NS, "autotek") in kube.secrets


async def test_a_complete_list_forgets_credentials_it_no_longer_holds(rt: Any) -> None:
    runtime, kube, tokens = rt
    runtime.on_credential_events([(None, credential()), (None, credential(uid="u9", name="other"))])
    await settle(runtime)
    assert runtime.stats()["credentials"] == 2
    runtime.on_credentials_listed(NS, {(NS, "autotek")})
    assert runtime.stats()["credentials"] == 1
    assert (NS, "other") in kube.secrets  # forgotten, not cleaned up: it may have left the selection
    runtime.on_credentials_listed("elsewhere", set())  # another namespace's list touches nothing here
    assert runtime.stats()["credentials"] == 1


async def test_watches_count_as_listed_only_once_both_kinds_listed_every_namespace(rt: Any) -> None:
    runtime, _, _ = rt
    runtime.secret_scopes = {"a", "b"}
    assert not runtime.watches_listed()
    for ns in ("a", "b"):
        runtime.on_secrets_listed(ns, set())
    assert not runtime.watches_listed()
    runtime.on_credentials_listed("a", set())
    assert not runtime.watches_listed()
    runtime.on_credentials_listed("b", set())
    assert runtime.watches_listed()


# -- the probes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
async def probes(rt: Any) -> AsyncIterator[tuple[Runtime, int]]:
    runtime = rt[0]
    runtime.secret_scopes = {None}
    saved = (handlers.STATE.runtime, handlers.STATE.election_result)
    handlers.STATE.runtime, handlers.STATE.election_result = runtime, None
    port = _free_port()
    runner = await health.serve(port, live=handlers.live, ready=handlers.ready, host="127.0.0.1")
    try:
        yield runtime, port
    finally:
        await runner.cleanup()
        handlers.STATE.runtime, handlers.STATE.election_result = saved


async def _ask(port: int, path: str) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(_get, port, path)


async def test_ready_needs_complete_lists_and_an_election_answer(probes: tuple[Runtime, int]) -> None:
    runtime, port = probes
    status, body = await _ask(port, "/readyz")
    assert (status, body["watches"], body["leaderElection"]) == (503, False, False)
    runtime.on_secrets_listed(None, set())
    runtime.on_credentials_listed(None, set())
    status, body = await _ask(port, "/readyz")
    assert (status, body["watches"], body["leaderElection"]) == (503, True, False)
    handlers.STATE.election_result = FOLLOWING  # a follower is ready: it can take over
    status, body = await _ask(port, "/readyz")
    assert (status, body["role"]) == (200, FOLLOWING)
    handlers.STATE.election_result = UNKNOWN  # the API server did not answer the last round
    assert (await _ask(port, "/readyz"))[0] == 503
    handlers.STATE.election_result = LEADING
    assert (await _ask(port, "/readyz"))[0] == 200


async def test_live_while_the_scheduler_runs(probes: tuple[Runtime, int]) -> None:
    runtime, port = probes
    status, body = await _ask(port, "/healthz")
    assert status == 200 and body["credentials"] == 0
    await runtime.stop(grace=1)
    assert (await _ask(port, "/healthz"))[0] == 503
