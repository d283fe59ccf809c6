"""Start-up and shut-down of everything the gateway talks to (called from the app's lifespan)."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from feedback.shadow import ShadowSampler, cost_from_usage
from feedback.store import LogWriter
from gateway.auth import Authenticator
from gateway.backends import StudentBackend, TeacherBackend, teacher_pricing
from gateway.metrics import Metrics
from gateway.service import ChatService, StaticAdapters
from gateway.settings import Settings
from router.base import build_router

if TYPE_CHECKING:
    from gateway.app import Overrides, Services

log = logging.getLogger("protege.gateway")


def _make_writer(settings: Settings) -> LogWriter:
    cfg = settings.log
    writer = LogWriter(
        settings.db_path,
        synchronous=cfg.synchronous,
        batch_size=cfg.batch_size,
        queue_max=cfg.queue_max,
        flush_interval_s=cfg.flush_interval_s,
        retry_interval_s=cfg.retry_interval_s,
    )
    writer.start()
    return writer


def _make_teacher(settings: Settings, overrides: Overrides) -> TeacherBackend | None:
    if overrides.teacher is not None:
        return overrides.teacher  # type: ignore[return-value]
    if not settings.teacher.model:
        log.warning(
            "no teacher configured (teacher.model): model=auto is served by the student alone; "
            "escalations it would make are counted as fallback reason 'teacher_unavailable'"
        )
        return None
    return TeacherBackend(settings.teacher)


async def build_services(settings: Settings, overrides: Overrides) -> Services:
    from gateway.app import Services

    metrics = Metrics(settings.db_path)
    writer = _make_writer(settings)
    teacher = _make_teacher(settings, overrides)
    pricing = overrides.pricing
    if pricing is None and settings.teacher.model:
        pricing = teacher_pricing(settings.teacher)
    student = overrides.student
    closers = []
    if student is None and settings.student.url:
        student = StudentBackend(settings.student, settings.student.url)
        closers.append(student.aclose)
    if teacher is not None and overrides.teacher is None:
        closers.append(teacher.aclose)
    adapters = overrides.adapters or StaticAdapters(settings.student.served_model_name)
    breaker = getattr(teacher, "breaker", None)
    teacher_allows = breaker.allow if breaker is not None else None
    shadow = None
    if teacher is not None and settings.shadow.sample_rate > 0:
        shadow = ShadowSampler(settings.shadow, teacher, writer, random.Random(), metrics=metrics,
                               cost_of=cost_from_usage(pricing) if pricing else None,
                               teacher_allows=teacher_allows)
        await shadow.start()
        closers.append(shadow.stop)  # closers run before the writer closes: last labels land
    chat = ChatService(
        router=build_router(settings.router, settings.student.default_adapter),
        student=student,
        teacher=teacher,
        adapters=adapters,
        writer=writer,
        metrics=metrics,
        pricing=pricing,
        store_messages=settings.log.store_messages,
        request_logprobs=settings.router.request_logprobs,
        teacher_allows=teacher_allows,
        shadow=shadow,
    )
    return Services(
        settings=settings,
        metrics=metrics,
        writer=writer,
        auth=Authenticator(settings.auth),
        chat=chat,
        student=student,
        teacher=teacher,
        adapters=adapters,
        closers=closers,
    )


async def close_services(services: Services) -> None:
    for close in reversed(services.closers):
        try:
            await close()
        except Exception:  # noqa: BLE001 - shut-down must go on
            log.exception("error while closing")
    services.writer.close()
