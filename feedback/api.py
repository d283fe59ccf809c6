"""`POST /v1/feedback` and `GET /v1/feedback/{request_id}`: callers rate and correct answers.

Feedback is tied to the caller who made the request: another caller's request id answers 404,
exactly like an unknown one, so ids leak nothing. A second feedback on the same request
replaces the first (one row per request). Request rows reach SQLite asynchronously through the
writer, so a feedback sent right after its answer may find no row yet: on a miss the writer is
flushed once and the lookup repeated.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from gateway.errors import InvalidRequest, NotFound, Overloaded, StoreError, Unauthorized
from gateway.http import read_json

FEEDBACK_TABLE = "feedback"
MAX_BODY_BYTES = 256_000
MAX_CORRECTION_CHARS = 32_000
MAX_COMMENT_CHARS = 4_000
MAX_LABELS = 32
# How long a feedback waits for the writer when its request is not in SQLite yet.
FLUSH_WAIT_S = 2.0

Preferred = Literal["answer", "draft", "shadow"]
LabelValue = str | int | float | bool | list[str] | None


# -- what the router needs from the app ------------------------------------------------------


class RowWriter(Protocol):
    def submit(self, table: str, row: dict[str, Any], upsert_pk: str | None = None) -> bool: ...

    def flush(self, timeout_s: float = 10.0) -> bool: ...


class FeedbackMetrics(Protocol):
    @property
    def feedback(self) -> Counter:
        """Feedback received, labelled ``rating`` = up | down | neutral."""
        ...


class FeedbackServices(Protocol):
    @property
    def writer(self) -> RowWriter: ...

    @property
    def db_path(self) -> Path: ...

    @property
    def metrics(self) -> FeedbackMetrics: ...


# -- request body -----------------------------------------------------------------------------


class FeedbackIn(BaseModel):
    """Body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, description="The `id` of the chat completion.")
    rating: float = Field(ge=-1, le=1, description="'up' (1), 'down' (-1), or a number in [-1, 1].")
    correction: str | None = Field(
        None, max_length=MAX_CORRECTION_CHARS, description="The answer that should have been given."
    )
    preferred: Preferred | None = Field(
        None,
        description="For reviewers comparing logged candidates: which was better, the served "
        "`answer`, the student's escalated `draft`, or the teacher's `shadow` answer.",
    )
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS, description="Free text; never trained on.")
    labels: dict[str, LabelValue] | None = Field(
        None, max_length=MAX_LABELS, description="Small key -> value tags (category, severity, ...)."
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _rating_words(cls, value: Any) -> Any:
        if value == "up" and isinstance(value, str):
            return 1.0
        if value == "down" and isinstance(value, str):
            return -1.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("rating must be 'up', 'down' or a number in [-1, 1]")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _flat_labels(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_label_value(item):
                    raise ValueError(
                        f"label {key!r}: values must be strings, numbers, booleans, null or lists of strings"
                    )
        return value

    @field_validator("correction")
    @classmethod
    def _non_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("correction is blank: leave it out instead")
        return value


def _is_label_value(item: Any) -> bool:
    if item is None or isinstance(item, str | int | float | bool):
        return True
    return isinstance(item, list) and all(isinstance(element, str) for element in item)


def parse_feedback(data: Any) -> FeedbackIn:
    """The validated body, or InvalidRequest naming the first offending field."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_value")
    try:
        return FeedbackIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param, code="invalid_value") from None


# -- the two operations -----------------------------------------------------------------------


@dataclass(frozen=True)
class _RequestFacts:
    caller: str
    has_draft: bool
    has_shadow: bool


def record_feedback(services: FeedbackServices, caller: str, body: FeedbackIn, now: float) -> dict[str, Any]:
    """Store (or replace) ``caller``'s feedback on one of their own requests; returns it."""
    facts = _own_request(services, caller, body.request_id)
    _check_preferred(body.preferred, facts)
    existing = _stored_feedback(services.db_path, body.request_id)
    row = {
        "request_id": body.request_id,
        "caller": caller,
        "rating": float(body.rating),
        "correction": body.correction,
        "preferred": body.preferred,
        "comment": body.comment,
        "labels": json.dumps(body.labels, sort_keys=True) if body.labels is not None else None,
        "created_at": existing["created_at"] if existing else now,
        "updated_at": now,
    }
    if not services.writer.submit(FEEDBACK_TABLE, row, upsert_pk="request_id"):
        raise Overloaded("the log is saturated and the feedback was not stored; retry shortly", code="log_full")
    services.metrics.feedback.labels(rating=rating_bucket(body.rating)).inc()
    return _render(row)


def read_feedback(services: FeedbackServices, caller: str, request_id: str) -> dict[str, Any]:
    """``caller``'s feedback on ``request_id``; NotFound when there is none (or not theirs)."""
    _own_request(services, caller, request_id)
    row = _stored_feedback(services.db_path, request_id)
    if row is None and services.writer.flush(FLUSH_WAIT_S):
        row = _stored_feedback(services.db_path, request_id)
    if row is None or row["caller"] != caller:
        raise NotFound(f"no feedback on request {request_id!r}", param="request_id")
    return _render(row)


def rating_bucket(rating: float) -> str:
    if rating > 0:
        return "up"
    return "down" if rating < 0 else "neutral"


def _render(row: dict[str, Any]) -> dict[str, Any]:
    labels = row["labels"]
    return {
        "object": "feedback",
        "request_id": row["request_id"],
        "rating": row["rating"],
        "correction": row["correction"],
        "preferred": row["preferred"],
        "comment": row["comment"],
        "labels": json.loads(labels) if isinstance(labels, str) else labels,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _own_request(services: FeedbackServices, caller: str, request_id: str) -> _RequestFacts:
    facts = _request_facts(services.db_path, request_id)
    if facts is None and services.writer.flush(FLUSH_WAIT_S):
        facts = _request_facts(services.db_path, request_id)
    if facts is None or facts.caller != caller:
        raise NotFound(f"no request {request_id!r} made with this API key", param="request_id")
    return facts


def _check_preferred(preferred: Preferred | None, facts: _RequestFacts) -> None:
    if preferred == "draft" and not facts.has_draft:
        raise InvalidRequest("preferred: this request has no student draft", param="preferred")
    if preferred == "shadow" and not facts.has_shadow:
        raise InvalidRequest("preferred: this request has no shadow teacher answer", param="preferred")


# -- reads ------------------------------------------------------------------------------------


def _read_connection(db_path: Path) -> sqlite3.Connection:
    # mode=rw: never create an empty database where the gateway's should be.
    conn = sqlite3.connect(f"file:{Path(db_path)}?mode=rw", uri=True, timeout=5.0)
    conn.execute("PRAGMA query_only = ON")
    conn.row_factory = sqlite3.Row
    return conn


def _query_one(db_path: Path, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
    try:
        with closing(_read_connection(db_path)) as conn:
            return conn.execute(sql, params).fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the log database: {exc}") from exc


def _request_facts(db_path: Path, request_id: str) -> _RequestFacts | None:
    row = _query_one(
        db_path,
        "SELECT r.caller, r.draft IS NOT NULL AS has_draft, s.teacher_answer IS NOT NULL AS has_shadow"
        " FROM requests AS r LEFT JOIN shadow_labels AS s ON s.request_id = r.id WHERE r.id = ?",
        (request_id,),
    )
    if row is None:
        return None
    return _RequestFacts(caller=row["caller"], has_draft=bool(row["has_draft"]), has_shadow=bool(row["has_shadow"]))


def _stored_feedback(db_path: Path, request_id: str) -> dict[str, Any] | None:
    row = _query_one(db_path, "SELECT * FROM feedback WHERE request_id = ?", (request_id,))
    return dict(row) if row is not None else None


# -- HTTP ---------------------------------------------------------------------------------------


def caller_from_state(request: Request) -> str:
    """The caller key id the auth middleware put on ``request.state.caller``."""
    caller = getattr(request.state, "caller", None)
    if not isinstance(caller, str) or not caller:
        raise Unauthorized("no authenticated caller for this request", code="missing_api_key")
    return caller


def build_feedback_router(
    get_services: Callable[[Request], FeedbackServices],
    get_caller: Callable[[Request], str] = caller_from_state,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> APIRouter:
    """The feedback routes. ``get_caller`` authenticates (raises Unauthorized) and returns the
    caller's key id; by default it reads ``request.state.caller``."""
    router = APIRouter(tags=["feedback"])
    body_schema = {"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}}}}

    @router.post("/v1/feedback", openapi_extra=body_schema)
    async def post_feedback(request: Request) -> JSONResponse:
        services = get_services(request)
        caller = get_caller(request)
        body = parse_feedback(await read_json(request, max_body_bytes))
        stored = await run_in_threadpool(record_feedback, services, caller, body, time.time())
        return JSONResponse(stored)

    @router.get("/v1/feedback/{request_id}")
    async def get_feedback(request_id: str, request: Request) -> JSONResponse:
        services = get_services(request)
        caller = get_caller(request)
        stored = await run_in_threadpool(read_feedback, services, caller, request_id)
        return JSONResponse(stored)

    return router
