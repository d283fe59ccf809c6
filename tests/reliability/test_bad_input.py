"""Bad input, explicitly: every refusal is a 4xx with an OpenAI-shaped body, nothing reaches a
backend, nothing is logged; clients that break a stream release everything they held.
(Generated bad input: test_schemathesis.py.)"""

from __future__ import annotations

import asyncio
import json
import socket

import orjson
import pytest

from bench.mock_openai import MockOpenAI
from gateway.app import MAX_HEADER_BYTES, Overrides
from tests.reliability.harness import EchoBackend, SlowStreamMock, chat, raw_http, status_of, wait_until

pytestmark = pytest.mark.reliability

MSG = [{"role": "user", "content": "x"}]


@pytest.fixture
def echo_gateway(gateway_factory):  # noqa: ANN001, ANN201
    student, teacher = EchoBackend("student"), EchoBackend("teacher")
    gateway = gateway_factory(Overrides(student=student, teacher=teacher),
                              server={"max_body_bytes": 4096, "max_n": 2, "max_tokens_limit": 1000})
    gateway.backends = (student, teacher)
    return gateway


def _assert_refused(gateway, response, status: int, param=None) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    assert sum(backend.calls for backend in gateway.backends) == 0
    return error


BAD_BODIES = [
    # not a JSON object
    pytest.param(b"[]", 400, None, id="array"),
    pytest.param(b'"hello"', 400, None, id="string"),
    pytest.param(b"42", 400, None, id="number"),
    pytest.param(b"null", 400, None, id="null"),
    pytest.param(b"", 400, None, id="empty"),
    pytest.param(b"{", 400, None, id="truncated"),
    pytest.param(b"\xff\xfe{}", 400, None, id="not-utf8"),
    pytest.param(b"[" * 1500 + b"]" * 1500, 400, None, id="deeply-nested"),
    pytest.param(b'{"model": "auto", "messages": [], "x": 1e999}', 400, None, id="infinite-number"),
    # wrong types
    pytest.param({"model": 5, "messages": MSG}, 400, "model", id="model-int"),
    pytest.param({"model": "auto", "messages": "hi"}, 400, "messages", id="messages-string"),
    pytest.param({"model": "auto", "messages": [1, 2]}, 400, "messages.0", id="messages-ints"),
    pytest.param({"model": "auto", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role",
                 id="unknown-role"),
    pytest.param({"model": "auto", "messages": [{"content": "x"}]}, 400, "messages.0.role", id="no-role"),
    pytest.param({"model": "auto", "messages": MSG, "temperature": "hot"}, 400, "temperature", id="temperature-str"),
    pytest.param({"model": "auto", "messages": MSG, "temperature": 1e308}, 400, "temperature", id="temperature-huge"),
    pytest.param({"model": "auto", "messages": MSG, "stream": "sometimes"}, 400, "stream", id="stream-str"),
    pytest.param({"model": "auto", "messages": MSG, "stop": ["a"] * 5}, 400, "stop", id="stop-too-many"),
    pytest.param({"model": "auto", "messages": MSG, "stream_options": {"evil": 1}}, 400, "stream_options.evil",
                 id="stream-options-extra"),
    # limits
    pytest.param({"model": "auto", "messages": MSG, "max_tokens": 10**12}, 400, "max_tokens", id="max-tokens-huge"),
    pytest.param(b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1%s}' % (b"0" * 30),
                 400, "max_tokens", id="max-tokens-beyond-64-bit"),
    pytest.param({"model": "auto", "messages": MSG, "max_completion_tokens": 1001}, 400, "max_completion_tokens",
                 id="max-completion-tokens-over"),
    pytest.param({"model": "auto", "messages": MSG, "max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param({"model": "auto", "messages": MSG, "max_tokens": -1}, 400, "max_tokens", id="max-tokens-negative"),
    pytest.param({"model": "auto", "messages": MSG, "n": 3}, 400, "n", id="n-over-limit"),
    pytest.param({"model": "auto", "messages": MSG, "n": 10**9}, 400, "n", id="n-huge"),
    pytest.param({"model": "auto", "messages": MSG, "n": 2, "stream": True}, 400, "n", id="n-with-stream"),
    pytest.param({"model": "x" * 300, "messages": MSG}, 400, "model", id="model-too-long"),
    # unknown models
    pytest.param({"model": "gpt-4o", "messages": MSG}, 404, "model", id="unknown-model"),
    pytest.param({"model": "student:", "messages": MSG}, 404, "model", id="empty-adapter"),
    pytest.param({"model": "Teacher", "messages": MSG}, 404, "model", id="case-differs"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_bodies_are_refused_cleanly(echo_gateway, body, status: int, param) -> None:  # noqa: ANN001
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = echo_gateway.client().post("/v1/chat/completions", content=content,
                                          headers={"content-type": "application/json"})
    _assert_refused(echo_gateway, response, status, param)
    if status == 404:
        assert response.json()["error"]["code"] == "model_not_found"
    assert echo_gateway.rows() == []  # refused requests were never accepted


def test_oversized_body_is_413_declared_or_not(echo_gateway) -> None:  # noqa: ANN001
    big = orjson.dumps(chat(messages=[{"role": "user", "content": "x" * 5000}]))
    response = echo_gateway.client().post("/v1/chat/completions", content=big,
                                          headers={"content-type": "application/json"})
    assert _assert_refused(echo_gateway, response, 413)["code"] == "request_too_large"
    # Chunked, no Content-Length: refused while reading, without reading it all.
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (big[:3000], big[3000:]))
    answer = raw_http(echo_gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                                         b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert status_of(answer) == 413
    # A Content-Length that lies (says small, sends more) is not trusted either.
    answer = raw_http(echo_gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Content-Type: application/json\r\nContent-Length: 100\r\n"
                                         b"Connection: close\r\n\r\n" + big)
    assert status_of(answer) in (0, 400)  # the parser stops at 100 bytes: invalid JSON (or a dropped link)
    assert echo_gateway.rows() == []


@pytest.mark.parametrize("shape", ["one-big-header", "many-headers"])
def test_oversized_headers_are_refused_with_431(echo_gateway, shape: str) -> None:  # noqa: ANN001
    if shape == "one-big-header":
        headers = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n"
    else:
        headers = b"".join(b"X-H%05d: %s\r\n" % (i, b"v" * 40) for i in range(MAX_HEADER_BYTES // 40))
    body = orjson.dumps(chat())
    answer = raw_http(echo_gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers +
                      b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % len(body) + body)
    assert status_of(answer) == 431
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "headers_too_large"
    assert sum(backend.calls for backend in echo_gateway.backends) == 0
    # Ordinary large headers (8 KiB) still pass; the gateway is fine afterwards.
    ok = echo_gateway.client().post("/v1/chat/completions", json=chat(), headers={"x-big": "a" * 8192})
    assert ok.status_code == 200


# -- clients that break a stream ---------------------------------------------------------------


def _open_stream(port: int, body: dict) -> socket.socket:
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(4096)
        assert chunk, f"closed before {marker!r}: {seen!r}"
        seen += chunk
    return seen


def _add_task_counter(gateway) -> None:  # noqa: ANN001
    async def tasks() -> dict:
        return {"tasks": len(asyncio.all_tasks())}

    gateway.app.add_api_route("/_test/tasks", tasks, methods=["GET"])


@pytest.mark.parametrize("when", ["mid-stream", "before-first-byte"])
def test_client_leaving_a_stream_releases_its_slot_task_and_upstream(
        when: str, upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    mock: MockOpenAI = SlowStreamMock(words=60, chunk_delay_s=0.05, latency_s=0.5 if when == "before-first-byte" else 0)
    student = upstream_factory(mock)
    gateway = gateway_factory(student={"url": f"{student.url}/v1"})
    _add_task_counter(gateway)
    client = gateway.client()
    baseline = client.get("/_test/tasks").json()["tasks"]

    sock = _open_stream(gateway.port, chat(stream=True))
    try:
        if when == "mid-stream":
            assert b"HTTP/1.1 200" in _read_until(sock, b'"content":" w1"')
        else:
            assert wait_until(lambda: gateway.services.in_flight == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    finally:
        sock.close()

    assert wait_until(lambda: gateway.services.in_flight == 0, timeout_s=10)
    rows = wait_until(lambda: gateway.rows(), timeout_s=10)
    [row] = rows
    assert (row["status"], row["http_status"], row["route"]) == ("error", 499, "student")
    assert "disconnect" in row["error"]
    # The upstream stream was abandoned too (not read to its end), and no task outlives it.
    assert wait_until(lambda: mock.streams_cancelled == 1, timeout_s=10)
    assert mock.streams_finished == 0
    assert wait_until(lambda: client.get("/_test/tasks").json()["tasks"] <= baseline, timeout_s=10)
    # The gateway is healthy afterwards.
    follow = client.post("/v1/chat/completions", json=chat())
    assert follow.status_code == 200
