"""Shared pieces of the reliability and security tests: in-process gateways on real loopback
sockets, upstream doubles, and small HTTP helpers. Subprocess gateways come from bench.load."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response

from bench.load import GatewayProcess
from bench.mock_openai import MockOpenAI, ServerThread, _sse, free_port
from gateway.app import Overrides, Services, create_app
from gateway.settings import Settings
from tests.conftest import make_settings

LOOPBACK = "127.0.0.1"
MESSAGES = [{"role": "user", "content": "hello there"}]


def chat(model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value, or the last (falsy) one."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def db_rows(db_path: Path, table: str = "requests") -> list[dict[str, Any]]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(f"select * from {table} order by created_at")]
    finally:
        conn.close()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample from a Prometheus text page (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return 0.0


def raw_http(port: int, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send bytes as they are (no client normalising the path or headers); the whole answer."""
    chunks: list[bytes] = []
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    """Status code of a raw HTTP/1.1 answer; 0 when the server closed without answering."""
    if not raw.startswith(b"HTTP/1.1 "):
        return 0
    return int(raw[9:12])


# -- upstream doubles --------------------------------------------------------------------------


class EchoBackend:
    """A ChatBackend that always answers (the fuzzing tests' upstream): echo of the last user turn."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"id": "x", "object": "chat.completion", "created": 0, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        for piece in ("ec", "ho"):
            yield {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": self.name,
                   "choices": [{"index": 0, "delta": {"content": piece}}]}


class SlowStreamMock(MockOpenAI):
    """The mock upstream, streaming one word every ``chunk_delay_s`` (time to break things)."""

    def __init__(self, words: int = 40, chunk_delay_s: float = 0.05, **kwargs: Any) -> None:
        super().__init__(answer_fn=lambda messages: " ".join(f"w{i}" for i in range(words)), **kwargs)
        self.chunk_delay_s = chunk_delay_s
        self.streams_finished = 0
        self.streams_cancelled = 0

    async def _chunks(self, text: str, include_usage: bool):  # noqa: ANN202
        base = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": 0, "model": self.model}
        try:
            for i, word in enumerate(text.split(" ")):
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]})
                await asyncio.sleep(self.chunk_delay_s)
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield b"data: [DONE]\n\n"
            self.streams_finished += 1
        except BaseException:
            self.streams_cancelled += 1
            raise


class KeyEchoingMock(MockOpenAI):
    """An upstream whose errors quote the credentials it was sent, as careless providers do:
    ``fail_next(...)`` statuses answer 'Incorrect API key provided: <the Authorization header>'."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.authorizations: list[str] = []  # the Authorization header of every call

    async def chat(self, request: Request) -> Response:
        self.authorizations.append(request.headers.get("authorization", ""))
        if self.failures:
            self.calls += 1
            status = self.failures.popleft()
            quoted = request.headers.get("authorization", "")
            body = {"error": {"message": f"Incorrect API key provided: {quoted}. Key: {quoted[7:]}",
                              "type": "invalid_request_error", "code": "invalid_api_key"}}
            return Response(orjson.dumps(body), status_code=status, media_type="application/json")
        return await super().chat(request)


@dataclass
class Upstream:
    mock: MockOpenAI
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


# -- in-process gateway ------------------------------------------------------------------------


@dataclass
class Gateway:
    settings: Settings
    server: ServerThread
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def app(self) -> Any:
        return self.server.server.config.app

    @property
    def services(self) -> Services:
        return self.app.state.services

    def client(self, key: str | None = None, timeout_s: float = 30.0) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, trust_env=False)
        self.clients.append(client)
        return client

    def rows(self) -> list[dict[str, Any]]:
        self.services.writer.flush()
        return db_rows(self.settings.db_path)

    def metrics(self) -> str:
        with httpx.Client(base_url=self.url, trust_env=False) as client:
            return client.get("/metrics").text

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., Upstream]]:
    """Real mock OpenAI servers on loopback: ``upstream_factory()`` or ``upstream_factory(mock)``."""
    started: list[ServerThread] = []

    def factory(mock: MockOpenAI | None = None) -> Upstream:
        mock = mock or MockOpenAI()
        server = ServerThread(mock.app).start()
        started.append(server)
        return Upstream(mock, server)

    yield factory
    for server in reversed(started):
        server.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """In-process gateways (uvicorn in a thread, real sockets): ``gateway_factory(overrides=..., **sections)``."""
    started: list[Gateway] = []

    def factory(overrides: Overrides | None = None, **sections: Any) -> Gateway:
        if (overrides is None or overrides.student is None) and "student" not in sections:
            # Never the managed vLLM here: an external student that is simply not there.
            sections["student"] = {"url": f"http://{LOOPBACK}:{free_port()}/v1"}
        settings = make_settings(tmp_path / f"home{len(started)}", **sections)
        gateway = Gateway(settings, ServerThread(create_app(settings, overrides)).start())
        started.append(gateway)
        return gateway

    yield factory
    for gateway in reversed(started):
        gateway.stop()


@pytest.fixture
def gateway_process_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Real gateway processes (``python -m gateway.cli serve``); killed at teardown if still up."""
    started: list[GatewayProcess] = []

    def factory(config: dict[str, Any], start: bool = True) -> GatewayProcess:
        process = GatewayProcess(tmp_path / f"proc{len(started)}", config)
        started.append(process)
        return process.start() if start else process

    yield factory
    for process in reversed(started):
        if process.proc is not None:
            process.kill() if process.alive() else process.terminate(1)
