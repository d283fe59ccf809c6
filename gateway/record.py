"""One accepted request's record: filled in as the request runs, finished exactly once.

``finish`` turns it into the SQLite row (through the one writer) and the Prometheus samples, so
the log and the metrics can never disagree about a request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from feedback.store import LogWriter
from gateway.backends import Pricing
from gateway.errors import ProtegeError
from gateway.metrics import Metrics
from router.types import FALLBACK_REASONS


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


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
    status: str = "ok"
    http_status: int = 200
    error: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished: bool = False

    def fail(self, error: ProtegeError) -> None:
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


def _observe(record: CallRecord, metrics: Metrics, latency_s: float, cost: float | None,
             avoided: float | None) -> None:
    route = record.route
    metrics.requests.labels(record.requested_kind, route, record.reason, record.adapter or "",
                            record.status).inc()
    if record.requested_kind == "auto":
        metrics.auto_requests.inc()
        if record.reason in FALLBACK_REASONS:
            metrics.fallbacks.labels(record.reason).inc()
    metrics.latency.labels(route).observe(latency_s)
    if record.ttft_s is not None:
        metrics.ttft.labels(route).observe(record.ttft_s)
    if record.prompt_tokens:
        metrics.tokens.labels(route, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        metrics.tokens.labels(route, "completion").inc(record.completion_tokens)
    if cost:
        metrics.cost.labels(route).inc(cost)
    if avoided:
        metrics.teacher_cost_avoided.inc(avoided)
    if route == "student" and record.adapter:
        version = record.adapter_version or ""
        metrics.adapter_requests.labels(record.adapter, version, record.status).inc()
        metrics.adapter_latency.labels(record.adapter, version).observe(latency_s)
        if record.completion_tokens:
            metrics.adapter_tokens.labels(record.adapter, version).inc(record.completion_tokens)
