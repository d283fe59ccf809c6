"""The teacher's address and credentials come from settings only. A request naming another
server (a second mock on its own port) must never make the gateway call it, whatever field or
litellm keyword it tries; the configured teacher is the only one ever reached."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.schemas import FORBIDDEN_FIELDS
from tests.reliability.harness import KeyEchoingMock, chat

pytestmark = pytest.mark.reliability


@pytest.fixture
def two_teachers(upstream_factory, gateway_factory):  # noqa: ANN001, ANN201
    real, evil = upstream_factory(KeyEchoingMock()), upstream_factory()
    gateway = gateway_factory(
        student={"url": f"{real.url}/v1"},
        teacher={"model": "openai/mock-model", "api_base": f"{real.url}/v1", "api_key": "sk-real-teacher",
                 "max_retries": 0},
    )
    return gateway, real, evil


@pytest.mark.parametrize("field", sorted(FORBIDDEN_FIELDS))
@pytest.mark.parametrize("stream", [False, True])
def test_forbidden_fields_are_refused_and_the_other_server_never_called(two_teachers, field: str,
                                                                        stream: bool) -> None:
    gateway, real, evil = two_teachers
    value: Any = {
        "api_base": f"{evil.url}/v1", "base_url": f"{evil.url}/v1", "api_key": "sk-attacker",
        "custom_llm_provider": "openai", "extra_headers": {"host": evil.url},
    }[field]
    for model in ("teacher", "auto"):
        response = gateway.client().post("/v1/chat/completions", json=chat(model, stream=stream, **{field: value}))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "forbidden_field"
        assert response.json()["error"]["param"] == field
    assert evil.mock.calls == 0 and real.mock.calls == 0


# litellm keywords that are not in the forbidden list but would steer (or skip) the call if a
# request's extra fields reached litellm as keywords: they must travel as plain body fields.
LITELLM_KEYWORDS = {
    "model_list": lambda evil: [{"model_name": "openai/mock-model",
                                 "litellm_params": {"model": "openai/mock-model", "api_base": f"{evil}/v1"}}],
    "api_version": lambda evil: "2099-01-01",
    "headers": lambda evil: {"authorization": "Bearer sk-attacker"},
    "mock_response": lambda evil: "an answer the teacher never gave",
    "metadata": lambda evil: {"api_base": f"{evil}/v1"},
    "extra_body": lambda evil: {"api_base": f"{evil}/v1"},
    "azure_ad_token": lambda evil: "token",
    "input_cost_per_token": lambda evil: 0,
}


@pytest.mark.parametrize("keyword", sorted(LITELLM_KEYWORDS))
def test_litellm_keywords_in_a_request_do_not_steer_the_teacher(two_teachers, keyword: str) -> None:
    gateway, real, evil = two_teachers
    value = LITELLM_KEYWORDS[keyword](evil.url)
    response = gateway.client().post("/v1/chat/completions", json=chat("teacher", **{keyword: value}))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello there"  # the real teacher's
    assert evil.mock.calls == 0
    assert real.mock.calls == 1
    sent = real.mock.requests[-1]
    assert sent["model"] == "mock-model"
    assert sent.get(keyword) == value  # passed on as data in the body, not obeyed
    [row] = gateway.rows()
    assert row["cost_usd"] is not None


def test_teacher_credentials_are_the_configured_ones(two_teachers) -> None:
    gateway, real, _ = two_teachers
    response = gateway.client().post("/v1/chat/completions",
                                     json=chat("teacher", headers={"authorization": "Bearer sk-attacker"}))
    assert response.status_code == 200
    assert real.mock.authorizations == ["Bearer sk-real-teacher"]
