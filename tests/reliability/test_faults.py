"""Upstream faults against a running gateway: the teacher reached through litellm and the student
through aiohttp, both real HTTP servers on loopback (MockOpenAI), some behind a TCP proxy that
can cut connections."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from bench.tcp_proxy import TcpProxy
from tests.reliability.harness import SlowStreamMock, chat, metric_value

pytestmark = pytest.mark.reliability

TEACHER_KEY = "sk-teacher-faults-0123456789"


def teacher_section(url: str, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/mock-model", "api_base": f"{url}/v1", "api_key": TEACHER_KEY,
            "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, **extra}


# status from the teacher -> (status of the gateway's answer, error code)
RETRIED = {
    500: (502, "upstream_error"),
    502: (502, "upstream_error"),
    503: (503, "upstream_unavailable"),
    429: (429, "upstream_rate_limited"),
    408: (504, "upstream_timeout"),
}


@pytest.mark.parametrize("status", sorted(RETRIED))
def test_teacher_retryable_errors_are_retried_with_back_off_then_a_clean_error(
        status: int, upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    teacher = upstream_factory()
    gateway = gateway_factory(teacher=teacher_section(teacher.url, max_retries=2, retry_backoff_s=0.05))
    teacher.mock.fail_next(status, status, status)
    started = time.monotonic()
    response = gateway.client().post("/v1/chat/completions", json=chat("teacher"))
    elapsed = time.monotonic() - started
    expected_status, expected_code = RETRIED[status]
    assert response.status_code == expected_status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == expected_code
    assert teacher.mock.calls == 3  # the first try and max_retries=2 retries
    assert elapsed >= 0.05 + 0.10  # back-off doubles: 0.05 s, then 0.10 s
    [row] = gateway.rows()
    assert (row["route"], row["status"], row["http_status"]) == ("teacher", "error", expected_status)


def test_teacher_transient_error_is_retried_into_a_success(upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    teacher = upstream_factory()
    gateway = gateway_factory(teacher=teacher_section(teacher.url, max_retries=2, retry_backoff_s=0.01))
    teacher.mock.fail_next(503)
    response = gateway.client().post("/v1/chat/completions", json=chat("teacher"))
    assert response.status_code == 200 and teacher.mock.calls == 2
    [row] = gateway.rows()
    assert (row["route"], row["status"]) == ("teacher", "ok")


# Refusals are never retried: the caller's request (4xx) or the gateway's own key (401/403).
NOT_RETRIED = {400: (400, "upstream_rejected"), 404: (400, "upstream_rejected"), 422: (400, "upstream_rejected"),
               401: (502, "upstream_auth_failed"), 403: (502, "upstream_auth_failed")}


@pytest.mark.parametrize("status", sorted(NOT_RETRIED))
def test_teacher_refusals_are_not_retried(status: int, upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    teacher = upstream_factory()
    gateway = gateway_factory(teacher=teacher_section(teacher.url, max_retries=2, retry_backoff_s=0.01))
    teacher.mock.fail_next(status, status, status)
    response = gateway.client().post("/v1/chat/completions", json=chat("teacher"))
    assert (response.status_code, response.json()["error"]["code"]) == NOT_RETRIED[status]
    assert teacher.mock.calls == 1


def test_hanging_teacher_times_out_with_504(upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    teacher = upstream_factory()
    teacher.mock.hang_s = 1.5
    gateway = gateway_factory(teacher=teacher_section(teacher.url, timeout_s=0.3, max_retries=1,
                                                      retry_backoff_s=0.01))
    started = time.monotonic()
    response = gateway.client().post("/v1/chat/completions", json=chat("teacher"))
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert teacher.mock.calls == 2  # a time-out counts as 408: retried once
    assert elapsed < 1.5  # it did not wait for the hanging teacher
    [row] = gateway.rows()
    assert (row["status"], row["http_status"]) == ("error", 504)
    teacher.mock.hang_s = 0


def test_failing_teacher_is_cooled_down_and_recovers(upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    student, teacher = upstream_factory(), upstream_factory()
    cooldown_s = 1.5
    gateway = gateway_factory(
        student={"url": f"{student.url}/v1"},
        teacher=teacher_section(teacher.url, max_retries=0, cooldown_window=4, cooldown_failure_ratio=0.5,
                                cooldown_s=cooldown_s),
        router={"teacher_patterns": ["ESCALATE"]},
    )
    client = gateway.client()
    teacher.mock.fail_next(500, 500, 500, 500)
    for _ in range(4):  # 4 failures of 4 (> 50% of the window): the teacher is skipped from now on
        assert client.post("/v1/chat/completions", json=chat("teacher")).status_code == 502
    cooled_at = time.monotonic()
    assert teacher.mock.calls == 4

    explicit = client.post("/v1/chat/completions", json=chat("teacher"))
    assert explicit.status_code == 503
    assert explicit.json()["error"]["code"] == "teacher_cooldown"
    # model=auto that a rule would send to the teacher is served by the student instead.
    escalated = client.post("/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "ESCALATE this"}]})
    assert escalated.status_code == 200
    assert escalated.headers["x-protege-route"] == "student; reason=teacher_unavailable"
    assert teacher.mock.calls == 4  # nothing reached the teacher while it cooled down
    assert metric_value(gateway.metrics(), "protege_fallbacks_total", 'reason="teacher_unavailable"') == 1

    time.sleep(max(0.0, cooldown_s - (time.monotonic() - cooled_at)) + 0.1)
    recovered = client.post("/v1/chat/completions", json=chat("teacher"))
    assert recovered.status_code == 200 and teacher.mock.calls == 5
    routed = client.post("/v1/chat/completions",
                         json={"model": "auto", "messages": [{"role": "user", "content": "ESCALATE again"}]})
    assert routed.headers["x-protege-route"] == "teacher; reason=rule"


def _sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_student_killed_mid_stream_then_teacher_then_student_again(upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    student = upstream_factory(SlowStreamMock(words=40, chunk_delay_s=0.05))
    teacher = upstream_factory()
    with TcpProxy(student.server.port) as proxy:
        gateway = gateway_factory(student={"url": f"{proxy.url}/v1", "timeout_s": 5},
                                  teacher=teacher_section(teacher.url, max_retries=0))
        client = gateway.client()
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["x-protege-route"] == "student; reason=student"
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "w0"
            assert proxy.refuse() >= 1  # the student dies with the stream half sent
            rest = "\n".join(lines)
        events = _sse_events(rest)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "upstream_unavailable" and error["type"] == "upstream_unavailable"
        assert teacher.mock.calls == 0  # after the first byte there is no falling back

        # While the student is down, model=auto goes to the teacher (reason: error), streamed or not.
        down = client.post("/v1/chat/completions", json=chat())
        assert down.status_code == 200 and down.headers["x-protege-route"] == "teacher; reason=error"
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as streamed:
            assert streamed.headers["x-protege-route"] == "teacher; reason=error"
            assert _sse_events(streamed.read().decode())[-1] == "[DONE]"

        proxy.accept()  # the student is back: traffic returns to it
        back = client.post("/v1/chat/completions", json=chat())
        assert back.status_code == 200 and back.headers["x-protege-route"] == "student; reason=student"

        rows = gateway.rows()
        assert [(r["route"], r["reason"], r["status"]) for r in rows] == [
            ("student", "student", "error"), ("teacher", "error", "ok"), ("teacher", "error", "ok"),
            ("student", "student", "ok")]
        assert rows[0]["answer"].startswith("w0") and "upstream_unavailable" in rows[0]["error"]
        assert gateway.services.in_flight == 0
