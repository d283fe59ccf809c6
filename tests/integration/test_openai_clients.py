"""The real openai SDK and litellm, as clients, against a running gateway whose student is a real
HTTP server and whose teacher is reached through litellm (no monkeypatching)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator

import httpx
import openai
import pytest

from bench.mock_openai import MockOpenAI, ServerThread
from gateway.app import create_app
from tests.conftest import make_settings


@pytest.fixture
def stack(tmp_path, openai_client) -> Iterator[dict]:  # noqa: ANN001
    student = MockOpenAI(answer_fn=lambda msgs: "student answer")
    teacher = MockOpenAI(answer_fn=lambda msgs: "teacher answer", model="big-model")
    student_srv = ServerThread(student.app).start()
    teacher_srv = ServerThread(teacher.app).start()
    settings = make_settings(
        tmp_path / "home",
        student={"url": f"{student_srv.url}/v1"},
        teacher={"model": "openai/big-model", "api_base": f"{teacher_srv.url}/v1", "api_key": "sk-teacher-secret",
                 "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        auth={"api_keys": {"app-1": "sk-app-1"}},
    )
    gateway = ServerThread(create_app(settings)).start()
    try:
        yield {"student": student, "teacher": teacher, "gateway": gateway, "settings": settings,
               "client": openai_client}
    finally:
        gateway.stop()
        student_srv.stop()
        teacher_srv.stop()


def client_for(stack: dict, key: str = "sk-app-1") -> openai.OpenAI:
    return stack["client"](f"{stack['gateway'].url}/v1", key)


def db_rows(stack: dict) -> list[sqlite3.Row]:
    conn = sqlite3.connect(stack["settings"].db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("select * from requests").fetchall()
    finally:
        conn.close()


def wait_rows(stack: dict, count: int) -> list[sqlite3.Row]:
    import time

    deadline = time.monotonic() + 10
    while True:
        found = db_rows(stack)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_sdk_non_streaming_chat(stack: dict) -> None:
    reply = client_for(stack).chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "student answer"
    assert reply.id.startswith("chatcmpl-")
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def test_sdk_streaming_chat_with_usage(stack: dict) -> None:
    stream = client_for(stack).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "student answer"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_sdk_models_list(stack: dict) -> None:
    ids = [m.id for m in client_for(stack).models.list()]
    assert {"auto", "student", "teacher"} <= set(ids)


def test_sdk_error_cases(stack: dict) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client_for(stack).chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client_for(stack, key="wrong").chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client_for(stack).chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}],
                                                  temperature=7)
    assert bad.value.body["param"] == "temperature"


def test_teacher_path_end_to_end_through_litellm(stack: dict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reply = client_for(stack).chat.completions.create(model="teacher", messages=[{"role": "user", "content": "q"}])
    assert reply.choices[0].message.content == "teacher answer"
    assert stack["teacher"].calls == 1
    assert stack["teacher"].requests[0]["model"] == "big-model"
    [row] = wait_rows(stack, 1)
    assert row["route"] == "teacher" and row["cost_usd"] > 0
    stream = client_for(stack).chat.completions.create(model="teacher", messages=[{"role": "user", "content": "q"}],
                                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "teacher answer"
    # litellm logs every completion at INFO; in a gateway that is per-request noise.
    assert [r.getMessage() for r in caplog.records if r.name == "LiteLLM" and r.levelno < logging.WARNING] == []


def test_student_failure_falls_back_through_litellm(stack: dict) -> None:
    stack["student"].fail_next(500)
    response = client_for(stack).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "q"}])
    assert response.headers["x-protege-route"] == "teacher; reason=error"
    assert response.parse().choices[0].message.content == "teacher answer"


def test_litellm_as_a_client(stack: dict) -> None:
    import litellm
    from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

    async def ask() -> str:
        try:
            reply = await litellm.acompletion(
                model="openai/auto", api_base=f"{stack['gateway'].url}/v1", api_key="sk-app-1",
                messages=[{"role": "user", "content": "hello"}],
            )
            return reply.choices[0].message.content
        finally:
            # litellm caches clients per process; close them with the loop that made them.
            await close_litellm_async_clients()
            litellm.in_memory_llm_clients_cache.cache_dict.clear()

    assert asyncio.run(ask()) == "student answer"


def test_one_row_per_accepted_request_and_metrics_agree(stack: dict) -> None:
    """N concurrent requests (plain, streamed, failing, escalated) -> exactly N rows, and the
    Prometheus counters say the same as the rows."""
    stack["student"].fail_next(500, 500, 500)  # three escalations (teacher answers them)
    stack["teacher"].fail_next(400)  # one teacher rejection -> one failed request

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{stack['gateway'].url}/v1", api_key="sk-app-1", max_retries=0)

        async def one(i: int) -> None:
            kind = i % 3
            try:
                if kind == 0:
                    await client.chat.completions.create(model="auto", messages=[{"role": "user", "content": f"{i}"}])
                elif kind == 1:
                    stream = await client.chat.completions.create(
                        model="auto", messages=[{"role": "user", "content": f"{i}"}], stream=True)
                    async for _ in stream:
                        pass
                else:
                    await client.chat.completions.create(model="teacher",
                                                         messages=[{"role": "user", "content": f"{i}"}])
            except openai.APIStatusError:
                pass

        await asyncio.gather(*(one(i) for i in range(60)))
        await client.close()

    asyncio.run(run())
    found = wait_rows(stack, 60)
    assert len(found) == 60
    assert len({r["id"] for r in found}) == 60
    assert sum(1 for r in found if r["status"] == "error") == 1
    assert sum(1 for r in found if r["reason"] == "error") == 3
    metrics = httpx.get(f"{stack['gateway'].url}/metrics").text
    total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("protege_requests_total{"))
    assert total == 60
    fallbacks = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("protege_fallbacks_total{"))
    assert fallbacks == sum(1 for r in found if r["requested_model"] == "auto" and r["route"] == "teacher")
    assert "sk-app-1" not in metrics and "sk-teacher-secret" not in metrics
