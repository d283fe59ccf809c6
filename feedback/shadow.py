"""Shadow sampling: a share of student-served requests also goes to the teacher, off the reply
path, and the teacher's answer is stored in ``shadow_labels`` as a training label.

``offer`` only samples and enqueues (no await, no I/O), so the caller's reply is never delayed;
a bounded queue and a fixed set of worker tasks bound both memory and teacher spend. When the
queue is full the sample is skipped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter

from gateway.errors import BackendError
from gateway.settings import ShadowSettings

log = logging.getLogger("protege.shadow")

SHADOW_TABLE = "shadow_labels"

# Request fields that shape the answer and mean the same to any chat model. Everything else
# (stream, n, logprobs, tools, user, ...) is dropped: the shadow call wants one plain answer.
_FORWARDED_FIELDS = (
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
)


class Teacher(Protocol):
    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat.completion as a dict; raises ``BackendError`` subclasses."""
        ...


class RowWriter(Protocol):
    def submit(self, table: str, row: dict[str, Any], upsert_pk: str | None = None) -> bool: ...


class TokenPricing(Protocol):
    def cost(self, prompt_tokens: int, completion_tokens: int) -> float: ...


class ShadowMetrics(Protocol):
    @property
    def shadow(self) -> Counter:
        """Shadow teacher calls, labelled ``outcome`` = ok | error | skipped."""
        ...


@dataclass
class ShadowStats:
    offered: int = 0
    sampled: int = 0
    skipped_full: int = 0
    skipped_stopped: int = 0
    skipped_teacher_down: int = 0
    ok: int = 0
    failed: int = 0
    dropped_at_stop: int = 0


@dataclass(frozen=True)
class _Job:
    request_id: str
    payload: dict[str, Any]


def cost_from_usage(pricing: TokenPricing) -> Callable[[dict[str, Any]], float | None]:
    """A ``cost_of`` for ShadowSampler pricing a response by its ``usage`` token counts."""

    def cost_of(response: dict[str, Any]) -> float | None:
        usage = response.get("usage") or {}
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int):
            return None
        return pricing.cost(prompt_tokens, completion_tokens)

    return cost_of


def shadow_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as the teacher should see it: same conversation, one non-streamed answer."""
    return {name: payload[name] for name in _FORWARDED_FIELDS if name in payload}


class ShadowSampler:
    """Call ``start()`` in the app's lifespan, ``offer()`` after each student-served reply, and
    ``stop()`` at shutdown. ``cost_of`` prices a teacher response (None: cost not recorded);
    ``teacher_allows`` is the teacher's cool-down check: while it says no, samples are skipped
    rather than piled onto a failing teacher."""

    def __init__(
        self,
        settings: ShadowSettings,
        teacher: Teacher,
        writer: RowWriter,
        rng: random.Random,
        metrics: ShadowMetrics | None = None,
        cost_of: Callable[[dict[str, Any]], float | None] | None = None,
        teacher_allows: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._teacher = teacher
        self._writer = writer
        self._rng = rng
        self._metrics = metrics
        self._cost_of = cost_of
        self._teacher_allows = teacher_allows
        self._clock = clock
        self._queue: asyncio.Queue[_Job] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self.stats = ShadowStats()

    @property
    def running(self) -> bool:
        return self._queue is not None

    @property
    def in_flight(self) -> int:
        """Samples queued or being answered."""
        return 0 if self._queue is None else self._queue.qsize() + self._busy

    async def start(self) -> None:
        if self._queue is not None:
            return
        queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=self._settings.queue_max)
        self._queue = queue
        self._workers = [
            asyncio.create_task(self._work(queue), name=f"protege-shadow-{i}")
            for i in range(self._settings.concurrency)
        ]

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Give queued samples ``drain_timeout_s`` to finish, then cancel the rest."""
        queue, self._queue = self._queue, None  # offers from now on are skipped
        if queue is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.join(), timeout=drain_timeout_s)
        self.stats.dropped_at_stop += queue.qsize()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def offer(self, request_id: str, payload: dict[str, Any]) -> None:
        """Maybe shadow this student-served request. Never blocks, never raises."""
        self.stats.offered += 1
        if self._settings.sample_rate <= 0 or self._rng.random() >= self._settings.sample_rate:
            return
        if self._queue is None:
            self.stats.skipped_stopped += 1
            self._count("skipped")
            return
        if self._teacher_allows is not None and not self._teacher_allows():
            self.stats.skipped_teacher_down += 1
            self._count("skipped")
            return
        try:
            self._queue.put_nowait(_Job(request_id, shadow_payload(payload)))
        except asyncio.QueueFull:
            self.stats.skipped_full += 1
            self._count("skipped")
            log.debug("shadow queue full (%d): skipping request %s", self._settings.queue_max, request_id)
            return
        self.stats.sampled += 1

    async def _work(self, queue: asyncio.Queue[_Job]) -> None:
        # Runs until cancelled by stop(), draining its own queue even after offers stopped.
        while True:
            job = await queue.get()
            self._busy += 1
            try:
                await self._shadow(job)
            finally:
                self._busy -= 1
                queue.task_done()

    async def _shadow(self, job: _Job) -> None:
        try:
            response = await self._teacher.complete(job.payload)
        except BackendError as exc:
            self._store_failure(job, f"{exc.code}: {exc.message}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a teacher adapter must not kill the worker
            log.exception("shadow call for request %s failed unexpectedly", job.request_id)
            self._store_failure(job, f"unexpected: {exc!r}")
            return
        self._store_answer(job, response)

    def _store_answer(self, job: _Job, response: dict[str, Any]) -> None:
        answer, finish_reason = _first_choice(response)
        if answer is None:
            self._store_failure(job, "the teacher response has no message content")
            return
        self.stats.ok += 1
        self._count("ok")
        self._writer.submit(
            SHADOW_TABLE,
            {
                "request_id": job.request_id,
                "teacher_answer": answer,
                "teacher_model": response.get("model"),
                "finish_reason": finish_reason,
                "created_at": self._clock(),
                "cost_usd": self._price(response),
                "error": None,
            },
            upsert_pk="request_id",
        )

    def _store_failure(self, job: _Job, error: str) -> None:
        self.stats.failed += 1
        self._count("error")
        self._writer.submit(
            SHADOW_TABLE,
            {
                "request_id": job.request_id,
                "teacher_answer": None,
                "teacher_model": None,
                "finish_reason": None,
                "created_at": self._clock(),
                "cost_usd": None,
                "error": error[:2000],
            },
            upsert_pk="request_id",
        )

    def _price(self, response: dict[str, Any]) -> float | None:
        if self._cost_of is None:
            return None
        try:
            return self._cost_of(response)
        except Exception:  # pricing is best effort: a missing price table entry is not a failure
            log.warning("cannot price a shadow teacher response", exc_info=True)
            return None

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.shadow.labels(outcome=outcome).inc()


def _first_choice(response: dict[str, Any]) -> tuple[str | None, str | None]:
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None, None
    message = choices[0].get("message") or {}
    content = message.get("content")
    return (content if isinstance(content, str) else None), choices[0].get("finish_reason")
