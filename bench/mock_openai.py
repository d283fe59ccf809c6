"""A small, real OpenAI-compatible HTTP server: the stand-in upstream for tests and benchmarks.

It is honest about what it is: it answers with ``answer_fn(messages)`` (default: an echo), can
be told to fail (a queue of HTTP statuses, or a hang), and counts what it served. Runs in a
thread (``ServerThread``) or as its own process (``python -m bench.mock_openai``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

AnswerFn = Callable[[list[dict[str, Any]]], str]


def echo_answer(messages: list[dict[str, Any]]) -> str:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = last.get("content")
    return f"echo: {content if isinstance(content, str) else ''}"


class MockOpenAI:
    def __init__(self, answer_fn: AnswerFn = echo_answer, model: str = "mock-model",
                 logprob: float = -0.1, latency_s: float = 0.0) -> None:
        self.answer_fn = answer_fn
        self.model = model
        self.logprob = logprob
        self.latency_s = latency_s
        self.failures: collections.deque[int] = collections.deque()  # statuses to answer next
        self.hang_s = 0.0
        self.calls = 0
        self.requests: list[dict[str, Any]] = []
        self.keep_requests = True
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    def fail_next(self, *statuses: int) -> None:
        self.failures.extend(statuses)

    async def models(self, request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]}),
                        media_type="application/json")

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.calls += 1
        if self.keep_requests:
            self.requests.append(body)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.failures:
            status = self.failures.popleft()
            return Response(orjson.dumps({"error": {"message": f"injected {status}", "type": "mock", "code": status}}),
                            status_code=status, media_type="application/json")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self.answer_fn(body.get("messages") or [])
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._chunks(text, include_usage), media_type="text/event-stream")
        return Response(orjson.dumps(self._completion(text, body)), media_type="application/json")

    def _completion(self, text: str, body: dict[str, Any]) -> dict[str, Any]:
        tokens = text.split(" ")
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": t, "logprob": self.logprob, "bytes": None,
                                               "top_logprobs": []} for t in tokens]}
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
        return {
            "id": f"chatcmpl-mock-{uuid.uuid4().hex[:8]}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", self.model),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
        }

    async def _chunks(self, text: str, include_usage: bool):  # noqa: ANN202
        base = {"id": f"chatcmpl-mock-{uuid.uuid4().hex[:8]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model}
        words = text.split(" ")
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(words),
                                                          "total_tokens": 1 + len(words)}})
        yield b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """Run an ASGI app under uvicorn in a background thread (tests and benchmarks)."""

    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.port = port or free_port()
        self.host = host
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Mock OpenAI-compatible server (echo).")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    mock = MockOpenAI(latency_s=args.latency_ms / 1000)
    mock.keep_requests = False
    uvicorn.run(mock.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
