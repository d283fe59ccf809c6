"""Gateway behaviour with fake backends: routing choices, fallbacks, errors, headers, log rows."""

from __future__ import annotations

import contextlib
import json

import pytest
from fastapi.testclient import TestClient

from feedback.store import open_database
from gateway.app import Overrides, create_app
from gateway.backends import Pricing
from gateway.errors import BackendRejected, BackendTimeout, BackendUnavailable
from gateway.service import AdapterLease
from tests.conftest import chunks_for, completion, student_error

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client_factory(settings_factory, fake_student, fake_teacher):  # noqa: ANN001, ANN201
    clients = []

    def factory(teacher: bool = True, **sections):  # noqa: ANN003, ANN202
        settings = settings_factory(**sections)
        app = create_app(settings, Overrides(student=fake_student, teacher=fake_teacher if teacher else None,
                                             pricing=Pricing(1e-6, 2e-6)))
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client, settings

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


def rows(client: TestClient, settings) -> list[dict]:  # noqa: ANN001
    client.app.state.services.writer.flush()
    return list(open_database(settings.db_path).query("select * from requests order by created_at"))


def test_auto_serves_student_and_logs_one_row(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(completion("hi there", prompt_tokens=5, completion_tokens=2))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "hi there"
    assert body["id"] == response.headers["x-protege-request-id"]
    assert response.headers["x-protege-route"] == "student; reason=student"
    assert fake_student.payloads[0]["model"] == "student-base"  # alias 'base' -> served base name
    [row] = rows(client, settings)
    assert row["id"] == body["id"]
    assert (row["route"], row["reason"], row["status"], row["answer"]) == ("student", "student", "ok", "hi there")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 2)
    assert row["teacher_cost_usd"] == pytest.approx(5e-6 + 4e-6)
    assert json.loads(row["messages"]) == MESSAGES


def test_student_error_falls_back_to_teacher_with_reason(client_factory, fake_student, fake_teacher) -> None:
    client, settings = client_factory()
    fake_student.enqueue(student_error())
    fake_teacher.enqueue(completion("teacher says"))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "teacher says"
    assert response.headers["x-protege-route"] == "teacher; reason=error"
    [row] = rows(client, settings)
    assert (row["route"], row["reason"]) == ("teacher", "error")
    assert row["cost_usd"] > 0


def test_student_timeout_falls_back_with_reason_timeout(client_factory, fake_student, fake_teacher) -> None:
    client, _ = client_factory()
    fake_student.enqueue(BackendTimeout("slow", backend="student"))
    fake_teacher.enqueue(completion("ok"))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.headers["x-protege-route"] == "teacher; reason=timeout"


def test_explicit_student_does_not_fall_back(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(BackendUnavailable("down", backend="student"))
    response = client.post("/v1/chat/completions", json={"model": "student", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    [row] = rows(client, settings)
    assert (row["status"], row["http_status"]) == ("error", 503)
    assert response.headers["x-protege-request-id"] == row["id"]  # the failed call can be found and rated


def test_stream_error_before_first_byte_names_the_logged_request(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(BackendUnavailable("down", backend="student"))
    response = client.post("/v1/chat/completions", json={"model": "student", "messages": MESSAGES, "stream": True})
    assert response.status_code == 503
    [row] = rows(client, settings)
    assert (row["status"], row["http_status"]) == ("error", 503)
    assert response.headers["x-protege-request-id"] == row["id"]


def test_refused_before_logging_carries_no_request_id(client_factory) -> None:
    client, settings = client_factory()
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": "not a list"})
    assert response.status_code == 400
    assert "x-protege-request-id" not in response.headers
    assert rows(client, settings) == []


def test_teacher_model_goes_to_teacher(client_factory, fake_teacher) -> None:
    client, _ = client_factory()
    fake_teacher.enqueue(completion("big answer"))
    response = client.post("/v1/chat/completions", json={"model": "teacher", "messages": MESSAGES})
    assert response.headers["x-protege-route"] == "teacher; reason=explicit"
    assert response.json()["model"] == "teacher"


def test_student_adapter_is_named_per_request(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(completion("x"))
    client.post("/v1/chat/completions", json={"model": "student:support", "messages": MESSAGES})
    assert fake_student.payloads[0]["model"] == "support"
    [row] = rows(client, settings)
    assert row["adapter"] == "support"


def test_no_teacher_counts_teacher_unavailable(client_factory, fake_student) -> None:
    client, _ = client_factory(teacher=False)
    fake_student.enqueue(student_error())
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.status_code == 502
    metrics = client.get("/metrics").text
    assert 'protege_fallbacks_total{reason="teacher_unavailable"} 1.0' in metrics
    explicit = client.post("/v1/chat/completions", json={"model": "teacher", "messages": MESSAGES})
    assert explicit.status_code == 503
    assert explicit.json()["error"]["code"] == "teacher_not_configured"


def test_route_header_forces_teacher(client_factory, fake_teacher) -> None:
    client, _ = client_factory()
    fake_teacher.enqueue(completion("t"))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                           headers={"x-protege-route": "teacher"})
    assert response.headers["x-protege-route"] == "teacher; reason=explicit"


def test_stream_relays_chunks_with_our_id_and_usage(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(chunks_for("one two three"))
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "auto", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["id"] for c in chunks} == {response.headers["x-protege-request-id"]}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    [row] = rows(client, settings)
    assert (row["stream"], row["answer"], row["completion_tokens"]) == (1, "one two three", 3)
    assert row["ttft_ms"] is not None


def test_stream_without_include_usage_drops_usage_chunk(client_factory, fake_student) -> None:
    client, _ = client_factory()
    fake_student.enqueue(chunks_for("a b"))
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "auto", "messages": MESSAGES, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    assert all("usage" not in c for c in chunks)


def test_stream_failing_before_first_byte_falls_back(client_factory, fake_student, fake_teacher) -> None:
    client, settings = client_factory()
    fake_student.enqueue(student_error())
    fake_teacher.enqueue(chunks_for("from teacher"))
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "auto", "messages": MESSAGES, "stream": True}) as response:
        assert response.headers["x-protege-route"] == "teacher; reason=error"
        body = response.read().decode()
    assert "from teacher".split()[0] in body
    [row] = rows(client, settings)
    assert (row["route"], row["reason"], row["answer"]) == ("teacher", "error", "from teacher")


def test_stream_failing_after_first_byte_ends_with_error_event(client_factory, fake_student) -> None:
    client, settings = client_factory()
    fake_student.enqueue(chunks_for("partial answer", usage=False)[:1] + [student_error("died")])
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "auto", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert error["error"]["code"] == "upstream_error"
    [row] = rows(client, settings)
    assert (row["status"], row["answer"]) == ("error", "partial")


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "auto"}', 400, "messages"),
    (b'{"model": "auto", "messages": [], "n": 1}', 400, "messages"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 99}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000}', 400, "max_tokens"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "api_base": "http://evil"}', 400, "api_base"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(client_factory, body: bytes, status: int, param) -> None:  # noqa: ANN001
    client, settings = client_factory()
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert rows(client, settings) == []  # refused requests are not accepted, so not logged


def test_oversized_body_is_413(client_factory) -> None:
    client, _ = client_factory(server={"max_body_bytes": 2048})
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_backend_rejection_from_explicit_student_is_400(client_factory, fake_student) -> None:
    client, _ = client_factory()
    fake_student.enqueue(BackendRejected("context too long", backend="student", upstream_status=400))
    response = client.post("/v1/chat/completions", json={"model": "student", "messages": MESSAGES})
    assert response.status_code == 400
    assert "context too long" in response.json()["error"]["message"]


def test_auth_required_when_keys_configured(client_factory, fake_student) -> None:
    client, settings = client_factory(auth={"api_keys": {"team-a": "sk-secret-a"}, "admin_key": "adm"})
    fake_student.default = completion("ok")
    assert client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES}).status_code == 401
    bad = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                      headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    ok = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                     headers={"authorization": "Bearer sk-secret-a"})
    assert ok.status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/healthz").status_code == 200
    [row] = rows(client, settings)
    assert row["caller"] == "team-a"


def test_models_lists_auto_student_teacher(client_factory) -> None:
    client, _ = client_factory()
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:3] == ["auto", "student", "teacher"]


def test_unknown_route_is_openai_shaped_404(client_factory) -> None:
    client, _ = client_factory()
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_overload_answers_429_not_queue(client_factory, fake_student) -> None:
    client, _ = client_factory(server={"max_concurrency": 1})
    client.app.state.services.in_flight = 1  # one request already holds the only slot
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "overloaded"
    client.app.state.services.in_flight = 0


def test_low_confidence_answer_is_escalated_and_draft_logged(client_factory, fake_student, fake_teacher) -> None:
    client, settings = client_factory(router={"min_confidence": -1.0})
    fake_student.enqueue(completion("unsure guess", logprobs=[-3.0, -2.5]))
    fake_teacher.enqueue(completion("confident answer"))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.headers["x-protege-route"] == "teacher; reason=low_confidence"
    assert response.json()["choices"][0]["message"]["content"] == "confident answer"
    assert fake_student.payloads[0]["logprobs"] is True  # asked for, to measure confidence
    [row] = rows(client, settings)
    assert (row["draft"], row["answer"], row["reason"]) == ("unsure guess", "confident answer", "low_confidence")
    assert row["confidence"] == pytest.approx(-2.75)


def test_confident_answer_stays_and_logprobs_are_stripped(client_factory, fake_student) -> None:
    client, settings = client_factory(router={"min_confidence": -1.0})
    fake_student.enqueue(completion("sure", logprobs=[-0.1, -0.2]))
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert response.headers["x-protege-route"] == "student; reason=student"
    assert "logprobs" not in response.json()["choices"][0]  # the caller did not ask for them
    [row] = rows(client, settings)
    assert row["confidence"] == pytest.approx(-0.15)


def test_output_failing_the_json_schema_is_escalated(client_factory, fake_student, fake_teacher) -> None:
    client, settings = client_factory()
    schema = {"type": "object", "properties": {"intent": {"type": "string", "enum": ["a", "b"]}},
              "required": ["intent"]}
    fake_student.enqueue(completion('{"intent": "made_up"}'))
    fake_teacher.enqueue(completion('{"intent": "a"}'))
    response = client.post("/v1/chat/completions", json={
        "model": "auto", "messages": MESSAGES,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    })
    assert response.headers["x-protege-route"] == "teacher; reason=invalid_output"
    [row] = rows(client, settings)
    assert row["draft"] == '{"intent": "made_up"}'


def test_teacher_calls_are_counted_by_outcome(client_factory, fake_teacher) -> None:
    client, _ = client_factory()
    fake_teacher.enqueue(completion("ok"), BackendTimeout("slow", backend="teacher"),
                         BackendUnavailable("cool", backend="teacher", code="teacher_cooldown"), chunks_for("x y"))
    for _ in range(3):
        client.post("/v1/chat/completions", json={"model": "teacher", "messages": MESSAGES})
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "teacher", "messages": MESSAGES, "stream": True}) as response:
        response.read()
    metrics = client.get("/metrics").text
    for outcome, count in (("ok", 2.0), ("timeout", 1.0), ("cooldown", 1.0)):
        assert f'protege_teacher_calls_total{{outcome="{outcome}"}} {count}' in metrics


class _CalibrationAwareAdapters:
    """An AdapterResolver whose versions are calibrated or not, as the test says."""

    def __init__(self, calibrated: bool) -> None:
        self.is_calibrated = calibrated
        self.leases = 0

    @contextlib.asynccontextmanager
    async def lease(self, alias: str, caller: str):  # noqa: ANN201
        self.leases += 1
        yield AdapterLease(alias, f"{alias}@v1", f"{alias}@v1", -1.0 if self.is_calibrated else None)

    def calibrated(self, alias: str, caller: str) -> bool | None:
        return self.is_calibrated


@pytest.mark.parametrize("calibrated", [False, True])
def test_uncalibrated_policy_skips_the_student_until_its_version_is_calibrated(
        settings_factory, fake_student, fake_teacher, calibrated: bool) -> None:
    settings = settings_factory(router={"policies": ["explicit", "rules", "uncalibrated", "fallback", "cascade"]})
    adapters = _CalibrationAwareAdapters(calibrated)
    app = create_app(settings, Overrides(student=fake_student, teacher=fake_teacher, adapters=adapters))
    fake_student.enqueue(completion("from student", logprobs=[-0.1, -0.2]))
    fake_teacher.enqueue(completion("from teacher"))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
        assert response.status_code == 200
        if calibrated:
            assert response.json()["choices"][0]["message"]["content"] == "from student"
            assert (adapters.leases, len(fake_teacher.payloads)) == (1, 0)
            fake_student.enqueue(completion("from student, asked by name"))
        else:
            assert response.json()["choices"][0]["message"]["content"] == "from teacher"
            assert response.headers["x-protege-route"] == "teacher; reason=uncalibrated"
            assert (adapters.leases, len(fake_student.payloads)) == (0, 0)
            [row] = rows(client, settings)
            assert (row["route"], row["reason"]) == ("teacher", "uncalibrated")
        explicit = client.post("/v1/chat/completions", json={"model": "student", "messages": MESSAGES})
        assert explicit.status_code == 200  # asked for by name: the student answers either way
