"""Extra Secret keys rendered from the token (spec.target.template.data)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fakes import T0, Clock, FakeKube, FakeTokens, unb64

from autotek_operator.reconcile import CredentialState, Deps, run_pass
from autotek_operator.target import HeldToken, render_templates

TOKEN = HeldToken(access_token="Zq9x", token_type="bearer", scope="read", issued_at=T0,
                  expires_at=T0 + timedelta(hours=1), refreshed_at=T0)


@pytest.mark.parametrize(
    ("key", "template", "value"),
    [
        pytest.param(".env", "AUTOTEK_TOKEN={{ .access_token }}", "AUTOTEK_TOKEN=Zq9x", id="dotenv"),
        pytest.param("headers.json", '{"Authorization": "{{.authorization}}"}', '{"Authorization": "Bearer Zq9x"}',
                     id="json"),
        pytest.param("all", "{{ .token_type }} {{ .scope }} {{ .expires_at }}", "bearer read 2026-11-28T05:00:00Z",
                     id="every-field"),
        pytest.param("plain", "no placeholders", "no placeholders", id="constant"),
    ],
)
def test_renders(key: str, template: str, value: str) -> None:
    data, problems = render_templates([(key, template)], TOKEN)
    assert problems == []
    assert unb64(data[key]) == value


@pytest.mark.parametrize(
    ("key", "template", "problem"),
    [
        pytest.param("x", "{{ .password }}", "unknown field(s) password", id="unknown-field"),
        pytest.param("x", "{{ access_token }}", "malformed placeholder", id="no-dot"),
        pytest.param("x", "{{ .access_token", "malformed placeholder", id="unclosed"),
        pytest.param("a/b", "x", "not a valid Secret key", id="bad-key"),
        pytest.param("..x", "x", "not a valid Secret key", id="dotdot-key"),
        pytest.param("access_token", "x", "token keys", id="token-key"),
        pytest.param("big", "{{ .access_token }}" * 20000 + "x" * 65536, "more than", id="too-big"),
    ],
)
def test_bad_template_is_left_out_and_reported(key: str, template: str, problem: str) -> None:
    data, problems = render_templates([(key, template), ("good", "{{ .access_token }}")], TOKEN)
    assert key not in data
    assert unb64(data["good"]) == "Zq9x"
    assert len(problems) == 1 and problem in problems[0]
    assert "Zq9x" not in problems[0]  # a problem report never carries the token


def test_rotation_goes_on_with_a_bad_template() -> None:
    clock = Clock()
    kube = FakeKube()
    kube.put_secret("shop", "client", {"client_id": "id", "client_secret": "s"})
    deps = Deps(kube=kube, tokens=FakeTokens(clock), clock=clock, rand=lambda: 0.0)  # type: ignore[arg-type]
    body: dict[str, Any] = {
        "metadata": {"namespace": "shop", "name": "c", "uid": "u", "generation": 1},
        "spec": {"clientSecretRef": {"name": "client"},
                 "target": {"template": {"data": {".env": "T={{ .access_token }}", "bad": "{{ .nope }}"}}}},
    }
    st = run_pass(CredentialState.from_body(body), deps)
    secret = kube.secrets[("shop", "c")]
    assert unb64(secret["data"][".env"]) == "T=tok-1"
    assert "bad" not in secret["data"]
    cond = kube.statuses[("shop", "c")]["conditions"][0]
    assert cond["status"] == "True" and "bad" in cond["message"]
    assert [e["reason"] for e in kube.events] == ["TemplateError", "TokenIssued"]
    clock.advance(3600 * 0.7)
    run_pass(st, deps)
    assert unb64(kube.secrets[("shop", "c")]["data"][".env"]) == "T=tok-2"
