"""One accepted request's record: filled in as the request runs, finished exactly once.

``finish`` turns it into the SQLite row (through the one writer) and the Prometheus samples, so
the log and the metrics can never disagree about a request.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import orjson

from feedback.store import LogWriter
from gateway.backends import Pricing
from gateway.errors import ProtegeError
from gateway.metrics import Metrics
from router.types import FALLBACK_REASONS


def new_request_id() -> str:
    """``chatcmpl-`` and a random UUID4 in hex: what ``uuid.uuid4().hex`` gives, without building a
    ``UUID`` object (3 of the 4 µs it takes)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return "chatcmpl-" + raw.hex()


@dataclass
class CallRecord:
    caller: str
    requested_model: str
    requested_kind: str
    stream: bool
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    id: str = field(default_factory=new_request_id)
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    route: str = "none"
    reason: str = ""
    route_score: float | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    answer: str | None = None
    draft: str | None = None
    confidence: float | None = None  # mean token log-probability of the student's answer
    min_logprob: float | None = None
    # The serving version's calibrated cascade threshold (registry), for the post-call review.
    adapter_min_confidence: float | None = None
    status: str = "ok"
    http_status: int = 200
    error: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished: bool = False

    def fail(self, error: ProtegeError) -> None:
        error.request_id = self.id  # the error answer names the row it was logged under
        self.status = "error"
        self.http_status = error.status_code
        self.error = f"{error.code}: {error.message}"

    def mark_first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")


def answer_text(body: dict[str, Any]) -> str:
    choices = body.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("message") or {}).get("content") or ""


def finish(record: CallRecord, writer: LogWriter, metrics: Metrics, pricing: Pricing | None,
           store_messages: bool) -> None:
    """Write the row and the metrics. Idempotent: a request is recorded exactly once."""
    if record.finished:
        return
    record.finished = True
    latency_s = time.perf_counter() - record.started
    prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
    estimated_teacher_cost = pricing.cost(prompt, completion) if pricing else None
    cost = estimated_teacher_cost if record.route == "teacher" else 0.0
    avoided = estimated_teacher_cost if record.route == "student" and record.status == "ok" else None
    writer.submit("requests", {
        "id": record.id,
        "created_at": record.created_at,
        "caller": record.caller,
        "requested_model": record.requested_model,
        "route": record.route,
        "reason": record.reason,
        "route_score": record.route_score,
        "adapter": record.adapter,
        "adapter_version": record.adapter_version,
        "stream": int(record.stream),
        "messages": orjson.dumps(record.messages).decode() if store_messages else None,
        "params": orjson.dumps(record.params).decode(),
        "answer": record.answer if store_messages else None,
        "draft": record.draft if store_messages else None,
        "confidence": record.confidence,
        "status": record.status,
        "http_status": record.http_status,
        "error": record.error,
        "latency_ms": latency_s * 1000,
        "ttft_ms": record.ttft_s * 1000 if record.ttft_s is not None else None,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": cost,
        "teacher_cost_usd": avoided,
    })
    _observe(record, metrics, latency_s, cost, avoided)


class _Children(dict):  # type: ignore[type-arg]
    """Label children of one ``Metrics``, by (metric attribute, *label values).

    prometheus_client's ``labels()`` checks and ``str()``s every value and takes a lock on each
    call: about 2 µs, up to seven times a request. Children are never removed, so each
    combination is looked up there once and then served from this dict.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = weakref.ref(metrics)  # weak: the cache must not keep its key alive

    def __missing__(self, key: tuple[str, ...]) -> Any:
        child = self[key] = getattr(self._metrics(), key[0]).labels(*key[1:])
        return child


_CHILDREN: weakref.WeakKeyDictionary[Metrics, _Children] = weakref.WeakKeyDictionary()


def _children(metrics: Metrics) -> _Children:
    children = _CHILDREN.get(metrics)
    if children is None:
        children = _CHILDREN[metrics] = _Children(metrics)
    return children


def _observe(record: CallRecord, metrics: Metrics, latency_s: float, cost: float | None,
             avoided: float | None) -> None:
    route = record.route
    child = _children(metrics)
    child["requests", record.requested_kind, route, record.reason, record.adapter or "", record.status].inc()
    if record.requested_kind == "auto":
        metrics.auto_requests.inc()
        if record.reason in FALLBACK_REASONS:
            child["fallbacks", record.reason].inc()
    child["latency", route].observe(latency_s)
    if record.ttft_s is not None:
        child["ttft", route].observe(record.ttft_s)
    if record.prompt_tokens:
        child["tokens", route, "prompt"].inc(record.prompt_tokens)
    if record.completion_tokens:
        child["tokens", route, "completion"].inc(record.completion_tokens)
    if cost:
        child["cost", route].inc(cost)
    if avoided:
        metrics.teacher_cost_avoided.inc(avoided)
    if route == "student" and record.adapter:
        version = record.adapter_version or ""
        child["adapter_requests", record.adapter, version, record.status].inc()
        child["adapter_latency", record.adapter, version].observe(latency_s)
        if record.completion_tokens:
            child["adapter_tokens", record.adapter, version].inc(record.completion_tokens)
