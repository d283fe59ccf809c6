"""Serving one chat request: route, call the student and/or teacher, fall back, record.

``ChatService.complete`` and ``ChatService.open_stream`` are the only entry points; the HTTP
routes parse, call one of them, and render.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from feedback.store import LogWriter
from gateway.backends import ChatBackend, Pricing
from gateway.errors import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ProtegeError,
)
from gateway.metrics import Metrics
from gateway.record import CallRecord, answer_text, finish
from gateway.schemas import ChatRequest, parse_model, to_features
from router.base import Router
from router.cascade import logprob_stats
from router.types import RequestFeatures, RouteDecision, StudentOutcome

log = logging.getLogger("protege.service")

# Request fields that are protege's business, not the backends'.
_GATEWAY_FIELDS = frozenset({"model", "stream", "stream_options"})


@dataclass(frozen=True)
class AdapterLease:
    alias: str
    version: str
    model_name: str  # what the student server calls it
    min_confidence: float | None = None  # the version's calibrated cascade threshold, if any


class AdapterResolver(Protocol):
    def lease(self, alias: str, caller: str) -> contextlib.AbstractAsyncContextManager[AdapterLease]: ...

    def calibrated(self, alias: str, caller: str) -> bool | None:
        """Whether the version ``alias`` resolves to for ``caller`` has its own cascade
        threshold; None when that cannot be told (unknown alias, no registry)."""
        ...


class StaticAdapters:
    """No registry: an alias is served under its own name, ``base`` under the base model's name.
    For external student servers without LoRA management, and for tests."""

    def __init__(self, base_model_name: str, default_alias: str = "default") -> None:
        self.base_model_name = base_model_name
        self.base_aliases = frozenset({"base", default_alias})

    @contextlib.asynccontextmanager
    async def lease(self, alias: str, caller: str) -> AsyncIterator[AdapterLease]:
        name = self.base_model_name if alias in self.base_aliases else alias
        yield AdapterLease(alias, alias, name)

    def calibrated(self, alias: str, caller: str) -> bool | None:
        return None


class ShadowHook(Protocol):
    def offer(self, request_id: str, payload: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CallContext:
    caller: str
    route_header: str | None


@dataclass
class StreamReply:
    record: CallRecord
    chunks: AsyncIterator[bytes]
    cleanup: Any  # async, idempotent: releases the upstream and the adapter lease, records the request

    async def aclose(self) -> None:
        """For a response that ends before its body was ever iterated (client gone at once)."""
        if not self.record.finished:
            self.record.status, self.record.http_status, self.record.error = "error", 499, "client disconnected"
        await self.cleanup()


class ChatService:
    def __init__(
        self,
        *,
        router: Router,
        student: ChatBackend | None,
        teacher: ChatBackend | None,
        adapters: AdapterResolver,
        writer: LogWriter,
        metrics: Metrics,
        pricing: Pricing | None,
        store_messages: bool,
        request_logprobs: bool,
        shadow: ShadowHook | None = None,
        teacher_allows: Any = None,
    ) -> None:
        self.router = router
        self.student = student
        self.teacher = teacher
        self.adapters = adapters
        self.writer = writer
        self.metrics = metrics
        self.pricing = pricing
        self.store_messages = store_messages
        # Asked of the student on every call, so that `confidence` is logged for calibrating the
        # cascade even before it is switched on; stripped again unless the caller asked.
        self.want_logprobs = request_logprobs
        self.shadow = shadow
        # A callable telling whether the teacher is accepting calls (cool-down); None: always.
        self.teacher_allows = teacher_allows

    # -- shared pieces --------------------------------------------------------------------
    def _teacher_available(self) -> bool:
        return self.teacher is not None and (self.teacher_allows is None or self.teacher_allows())

    def new_record(self, request: ChatRequest, ctx: CallContext) -> CallRecord:
        kind, _ = parse_model(request.model)
        params = request.model_dump(exclude={"messages", "model"}, exclude_none=True, exclude_defaults=True)
        return CallRecord(
            caller=ctx.caller,
            requested_model=request.model,
            requested_kind=kind,
            stream=request.stream,
            messages=[m.model_dump(exclude_none=True) for m in request.messages],
            params=params,
        )

    def _decide(self, request: ChatRequest, ctx: CallContext, record: CallRecord) -> tuple[RequestFeatures, RouteDecision]:
        kind, adapter = parse_model(request.model)
        calibrated = None
        if kind == "auto":  # only `auto` is routed on it; explicit requests skip the registry lookup
            calibrated = self.adapters.calibrated(adapter or self.router.default_adapter, ctx.caller)
        features = to_features(request, ctx.caller, ctx.route_header, self._teacher_available(), calibrated)
        decision = self.router.route(features)
        record.reason, record.route_score, record.adapter = decision.reason, decision.score, decision.adapter
        return features, decision

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        return request.model_dump(exclude=_GATEWAY_FIELDS, exclude_none=True)

    def _finish(self, record: CallRecord) -> None:
        finish(record, self.writer, self.metrics, self.pricing, self.store_messages)

    # -- non-streaming --------------------------------------------------------------------
    async def complete(self, request: ChatRequest, ctx: CallContext) -> tuple[dict[str, Any], CallRecord]:
        record = self.new_record(request, ctx)
        try:
            features, decision = self._decide(request, ctx, record)
            if decision.target == "student":
                body = await self._student_with_fallback(request, features, decision, record)
            else:
                body = await self._call_teacher(request, record)
            record.answer = answer_text(body)
            record.take_usage(body.get("usage"))
            body["id"] = record.id
            return body, record
        except ProtegeError as error:
            record.fail(error)
            raise
        finally:
            self._finish(record)

    async def _call_student(self, request: ChatRequest, decision: RouteDecision, record: CallRecord) -> dict[str, Any]:
        if self.student is None:
            raise BackendUnavailable("no student backend is configured", backend="student")
        payload = self._payload(request)
        asked_logprobs = bool(request.logprobs)
        if self.want_logprobs and not asked_logprobs:
            payload["logprobs"] = True
        async with self.adapters.lease(decision.adapter or "base", record.caller) as lease:
            record.route, record.adapter, record.adapter_version = "student", lease.alias, lease.version
            record.adapter_min_confidence = lease.min_confidence
            payload["model"] = lease.model_name
            body = await self.student.complete(payload)
        record.confidence, record.min_logprob = logprob_stats(body)
        if self.want_logprobs and not asked_logprobs:
            for choice in body.get("choices") or []:
                choice.pop("logprobs", None)
        body["model"] = f"student:{lease.version}"
        return body

    async def _student_with_fallback(self, request: ChatRequest, features: RequestFeatures,
                                     decision: RouteDecision, record: CallRecord) -> dict[str, Any]:
        body: dict[str, Any] | None = None
        failure: BackendError | None = None
        try:
            body = await self._call_student(request, decision, record)
            outcome = StudentOutcome(mean_logprob=record.confidence, min_logprob=record.min_logprob,
                                     output_text=answer_text(body),
                                     min_confidence=record.adapter_min_confidence)
        except BackendTimeout as exc:
            failure, outcome = exc, StudentOutcome(error="timeout")
        except BackendError as exc:
            if isinstance(exc, BackendRejected) and features.requested_model != "auto":
                raise
            failure, outcome = exc, StudentOutcome(error="error")
        escalation = self.router.after_student(features, outcome)
        if escalation is None:
            if failure is not None:
                raise failure
            self._offer_shadow(request, record)
            return body  # type: ignore[return-value]
        record.reason, record.route_score = escalation.reason, escalation.score
        if body is not None:
            record.draft = answer_text(body)
        if not self._teacher_available():
            record.reason = "teacher_unavailable"
            if failure is not None:
                raise failure
            return body  # type: ignore[return-value]
        return await self._call_teacher(request, record)

    async def _call_teacher(self, request: ChatRequest, record: CallRecord) -> dict[str, Any]:
        record.route = "teacher"
        if self.teacher is None:
            raise BackendUnavailable("no teacher is configured (settings: teacher.model)", backend="teacher",
                                     code="teacher_not_configured")
        try:
            body = await self.teacher.complete(self._payload(request))
        except BackendError as exc:
            self._count_teacher(exc)
            raise
        self._count_teacher(None)
        body["model"] = "teacher"
        return body

    def _count_teacher(self, error: BackendError | None) -> None:
        if error is None:
            outcome = "ok"
        elif isinstance(error, BackendTimeout):
            outcome = "timeout"
        elif error.code == "teacher_cooldown":
            outcome = "cooldown"
        else:
            outcome = "error"
        self.metrics.teacher_calls.labels(outcome).inc()

    def _offer_shadow(self, request: ChatRequest, record: CallRecord) -> None:
        if self.shadow is not None and self.teacher is not None:
            self.shadow.offer(record.id, self._payload(request))

    # -- streaming ------------------------------------------------------------------------
    async def open_stream(self, request: ChatRequest, ctx: CallContext) -> StreamReply:
        """Route, and wait for the first chunk before answering: until then a failure can still
        fall back (auto) or become a plain HTTP error; after it, errors end the stream."""
        record = self.new_record(request, ctx)
        try:
            features, decision = self._decide(request, ctx, record)
            upstream, lease_stack = await self._open_upstream(request, features, decision, record)
            first = await _first_chunk(upstream)
        except ProtegeError as error:
            record.fail(error)
            self._finish(record)
            raise
        except BaseException:
            record.status, record.http_status, record.error = "error", 499, "cancelled before first byte"
            self._finish(record)
            raise
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def cleanup() -> None:
            if record.finished:
                return
            with contextlib.suppress(Exception):
                await upstream.aclose()  # type: ignore[attr-defined]
            await lease_stack.aclose()
            self._finish(record)

        return StreamReply(record, self._relay(first, upstream, record, include_usage, cleanup), cleanup)

    async def _open_upstream(self, request: ChatRequest, features: RequestFeatures, decision: RouteDecision,
                             record: CallRecord) -> tuple[AsyncIterator[dict[str, Any]], contextlib.AsyncExitStack]:
        stack = contextlib.AsyncExitStack()
        if decision.target == "student":
            try:
                upstream = await self._open_student_stream(request, decision, record, stack)
                return upstream, stack
            except BackendError as exc:
                await stack.aclose()
                if isinstance(exc, BackendRejected) and features.requested_model != "auto":
                    raise
                outcome = StudentOutcome(error="timeout" if isinstance(exc, BackendTimeout) else "error")
                escalation = self.router.after_student(features, outcome)
                if escalation is None:
                    raise
                record.reason, record.route_score = escalation.reason, escalation.score
                if not self._teacher_available():
                    record.reason = "teacher_unavailable"
                    raise
        record.route = "teacher"
        if self.teacher is None:
            raise BackendUnavailable("no teacher is configured (settings: teacher.model)", backend="teacher",
                                     code="teacher_not_configured")
        primed = _Primed(self.teacher.stream(self._payload(request)), "teacher")
        try:
            await primed.prime()
        except BackendError as exc:
            self._count_teacher(exc)
            raise
        self._count_teacher(None)
        return primed, stack

    async def _open_student_stream(self, request: ChatRequest, decision: RouteDecision, record: CallRecord,
                                   stack: contextlib.AsyncExitStack) -> AsyncIterator[dict[str, Any]]:
        if self.student is None:
            raise BackendUnavailable("no student backend is configured", backend="student")
        lease = await stack.enter_async_context(self.adapters.lease(decision.adapter or "base", record.caller))
        record.route, record.adapter, record.adapter_version = "student", lease.alias, lease.version
        payload = self._payload(request)
        payload["model"] = lease.model_name
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        primed = _Primed(self.student.stream(payload), f"student:{lease.version}")
        await primed.prime()
        return primed

    async def _relay(self, first: dict[str, Any] | None, upstream: AsyncIterator[dict[str, Any]],
                     record: CallRecord, include_usage: bool, cleanup: Any) -> AsyncIterator[bytes]:
        parts: list[str] = []
        model_name = getattr(upstream, "model_name", record.route)
        try:
            chunk = first
            while chunk is not None:
                out = self._rewrite_chunk(chunk, record, parts, model_name, include_usage)
                if out is not None:
                    yield out
                chunk = await anext(upstream, None)
            yield b"data: [DONE]\n\n"
        except ProtegeError as error:
            record.fail(error)
            yield b"data: " + orjson.dumps(error.to_body()) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except BaseException:
            # The client went away (cancelled) mid-stream: record it, do not swallow.
            record.status, record.http_status, record.error = "error", 499, "client disconnected"
            raise
        finally:
            record.answer = "".join(parts)
            await cleanup()

    def _rewrite_chunk(self, chunk: dict[str, Any], record: CallRecord, parts: list[str], model_name: str,
                       include_usage: bool) -> bytes | None:
        usage = chunk.get("usage")
        choices = chunk.get("choices") or []
        if usage:
            record.take_usage(usage)
        for choice in choices:
            content = (choice.get("delta") or {}).get("content")
            if content:
                record.mark_first_token()
                parts.append(content)
        if not choices and usage and not include_usage:
            return None
        if usage and not include_usage:
            chunk.pop("usage", None)
        chunk["id"] = record.id
        chunk["model"] = model_name
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


class _Primed:
    """Wraps a backend stream so that its first chunk (the moment the upstream really answered)
    can be awaited before the HTTP response starts."""

    def __init__(self, stream: AsyncIterator[dict[str, Any]], model_name: str) -> None:
        self._stream = stream
        self.model_name = model_name
        self._first: dict[str, Any] | None = None
        self._primed = False

    async def prime(self) -> None:
        if not self._primed:
            self._first = await anext(self._stream, None)
            self._primed = True

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self._primed:
            await self.prime()
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._stream)

    async def aclose(self) -> None:
        await self._stream.aclose()  # type: ignore[attr-defined]


async def _first_chunk(upstream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    return await anext(upstream, None)
