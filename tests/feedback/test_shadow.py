"""Shadow sampling: who gets sampled, what is stored, and that nothing ever waits for it."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from feedback.shadow import ShadowSampler, cost_from_usage, shadow_payload
from feedback.store import LogWriter, open_database
from gateway.backends import Pricing
from gateway.errors import BackendTimeout, BackendUnavailable
from gateway.settings import ShadowSettings
from tests.feedback.conftest import FakeTeacher, FeedbackTestMetrics, chat_completion

PAYLOAD = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2,
           "stream_options": {"include_usage": True}, "temperature": 0.2, "max_tokens": 64, "user": "u-1"}


class RecordingWriter:
    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any], str | None]] = []

    def submit(self, table: str, row: dict[str, Any], upsert_pk: str | None = None) -> bool:
        self.rows.append((table, row, upsert_pk))
        return True


def sampler(teacher: FakeTeacher, writer: Any, rate: float = 1.0, queue_max: int = 100, concurrency: int = 2,
            seed: int = 0, metrics: FeedbackTestMetrics | None = None) -> ShadowSampler:
    settings = ShadowSettings(sample_rate=rate, queue_max=queue_max, concurrency=concurrency)
    return ShadowSampler(settings, teacher, writer, random.Random(seed), metrics=metrics,
                         cost_of=lambda response: 0.001 * response["usage"]["total_tokens"])


async def settle(shadow: ShadowSampler, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while shadow.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_payload_keeps_the_conversation_and_drops_streaming() -> None:
    assert shadow_payload(PAYLOAD) == {"model": "auto", "messages": PAYLOAD["messages"], "temperature": 0.2,
                                       "max_tokens": 64}


def test_sampled_requests_get_a_stored_teacher_answer(fake_teacher: FakeTeacher, writer: LogWriter,
                                                      db_path: Path) -> None:
    fake_teacher.enqueue(chat_completion("teacher one"), chat_completion("teacher two", finish_reason="length"))
    metrics = FeedbackTestMetrics()

    async def scenario() -> None:
        shadow = sampler(fake_teacher, writer, metrics=metrics)
        await shadow.start()
        shadow.offer("req-1", PAYLOAD)
        shadow.offer("req-2", PAYLOAD)
        await settle(shadow)
        await shadow.stop()

    asyncio.run(scenario())
    writer.flush()
    db = open_database(db_path)
    rows = {row["request_id"]: row for row in db.query("SELECT * FROM shadow_labels")}
    db.conn.close()
    assert set(rows) == {"req-1", "req-2"}
    answers = {rows[r]["teacher_answer"]: rows[r]["finish_reason"] for r in rows}
    assert answers == {"teacher one": "stop", "teacher two": "length"}
    assert all(row["teacher_model"] == "teacher-x" and row["error"] is None for row in rows.values())
    assert all(row["cost_usd"] == pytest.approx(0.005) for row in rows.values())
    assert fake_teacher.payloads == [shadow_payload(PAYLOAD)] * 2
    assert metrics.value("protege_shadow_samples_total", outcome="ok") == 2


def test_rate_zero_never_calls_the_teacher(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()

    async def scenario() -> ShadowSampler:
        shadow = sampler(fake_teacher, writer, rate=0.0)
        await shadow.start()
        for i in range(50):
            shadow.offer(f"req-{i}", PAYLOAD)
        await settle(shadow)
        await shadow.stop()
        return shadow

    shadow = asyncio.run(scenario())
    assert (shadow.stats.offered, shadow.stats.sampled) == (50, 0)
    assert fake_teacher.payloads == [] and writer.rows == []


def test_the_sampled_share_follows_the_rng(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(*[chat_completion("ok")] * 1000)
    expected_rng = random.Random(1234)
    expected = [f"req-{i}" for i in range(1000) if expected_rng.random() < 0.3]

    async def scenario() -> None:
        shadow = sampler(fake_teacher, writer, rate=0.3, queue_max=1000, seed=1234)
        await shadow.start()
        for i in range(1000):
            shadow.offer(f"req-{i}", PAYLOAD)
        await settle(shadow)
        await shadow.stop()

    asyncio.run(scenario())
    assert sorted(row["request_id"] for _, row, _ in writer.rows) == sorted(expected)
    assert 240 <= len(expected) <= 360


def test_full_queue_skips_without_waiting(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(*[chat_completion("late")] * 3)
    metrics = FeedbackTestMetrics()

    async def scenario() -> tuple[ShadowSampler, float]:
        fake_teacher.gate = asyncio.Event()  # the teacher hangs until released
        shadow = sampler(fake_teacher, writer, queue_max=3, concurrency=1, metrics=metrics)
        await shadow.start()
        started = time.perf_counter()
        for i in range(10):
            shadow.offer(f"req-{i}", PAYLOAD)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.05)
        assert writer.rows == []  # nothing answered while the teacher hangs
        fake_teacher.gate.set()
        await settle(shadow)
        await shadow.stop()
        return shadow, elapsed

    shadow, elapsed = asyncio.run(scenario())
    assert elapsed < 0.05
    assert (shadow.stats.sampled, shadow.stats.skipped_full) == (3, 7)
    assert metrics.value("protege_shadow_samples_total", outcome="skipped") == 7
    assert [row["request_id"] for _, row, _ in writer.rows] == ["req-0", "req-1", "req-2"]


def test_concurrency_is_bounded(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(*[chat_completion("ok")] * 8)

    async def scenario() -> None:
        fake_teacher.gate = asyncio.Event()
        shadow = sampler(fake_teacher, writer, concurrency=2)
        await shadow.start()
        for i in range(8):
            shadow.offer(f"req-{i}", PAYLOAD)
        await asyncio.sleep(0.05)
        assert fake_teacher.active == 2
        fake_teacher.gate.set()
        await settle(shadow)
        await shadow.stop()

    asyncio.run(scenario())
    assert fake_teacher.most_active == 2
    assert len(writer.rows) == 8


def test_teacher_failures_are_stored_and_the_worker_survives(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(
        BackendTimeout("too slow", backend="teacher"),
        RuntimeError("adapter bug"),
        {"choices": []},
        chat_completion("fine"),
    )
    metrics = FeedbackTestMetrics()

    async def scenario() -> None:
        shadow = sampler(fake_teacher, writer, concurrency=1, metrics=metrics)
        await shadow.start()
        for i in range(4):
            shadow.offer(f"req-{i}", PAYLOAD)
        await settle(shadow)
        await shadow.stop()

    asyncio.run(scenario())
    rows = {row["request_id"]: row for _, row, _ in writer.rows}
    assert rows["req-0"]["error"] == "upstream_timeout: too slow"
    assert "adapter bug" in rows["req-1"]["error"]
    assert "no message content" in rows["req-2"]["error"]
    assert all(rows[r]["teacher_answer"] is None for r in ("req-0", "req-1", "req-2"))
    assert (rows["req-3"]["teacher_answer"], rows["req-3"]["error"]) == ("fine", None)
    assert metrics.value("protege_shadow_samples_total", outcome="error") == 3
    assert all(pk == "request_id" for _, _, pk in writer.rows)


def test_offers_outside_start_stop_are_skipped(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(chat_completion("ok"))

    async def scenario() -> ShadowSampler:
        shadow = sampler(fake_teacher, writer)
        shadow.offer("before", PAYLOAD)
        await shadow.start()
        shadow.offer("during", PAYLOAD)
        await settle(shadow)
        await shadow.stop()
        shadow.offer("after", PAYLOAD)
        return shadow

    shadow = asyncio.run(scenario())
    assert shadow.stats.skipped_stopped == 2
    assert [row["request_id"] for _, row, _ in writer.rows] == ["during"]


def test_stop_drains_then_cancels_a_hung_teacher(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(BackendUnavailable("down", backend="teacher"))

    async def scenario() -> tuple[ShadowSampler, float]:
        shadow = sampler(fake_teacher, writer, concurrency=1)
        await shadow.start()
        shadow.offer("quick", PAYLOAD)
        await settle(shadow)
        fake_teacher.gate = asyncio.Event()  # never released: the teacher hangs
        shadow.offer("hung", PAYLOAD)
        shadow.offer("queued", PAYLOAD)
        started = time.perf_counter()
        await shadow.stop(drain_timeout_s=0.1)
        return shadow, time.perf_counter() - started

    shadow, took = asyncio.run(scenario())
    assert took < 2.0
    assert shadow.stats.dropped_at_stop == 1
    assert [row["request_id"] for _, row, _ in writer.rows] == ["quick"]
    assert not shadow.running


def test_a_cooled_down_teacher_is_not_shadowed(fake_teacher: FakeTeacher) -> None:
    writer = RecordingWriter()
    fake_teacher.enqueue(chat_completion("ok"))
    teacher_up = [False]

    async def scenario() -> ShadowSampler:
        settings = ShadowSettings(sample_rate=1.0, queue_max=10, concurrency=1)
        shadow = ShadowSampler(settings, fake_teacher, writer, random.Random(0), teacher_allows=lambda: teacher_up[0])
        await shadow.start()
        shadow.offer("while-down", PAYLOAD)
        teacher_up[0] = True
        shadow.offer("while-up", PAYLOAD)
        await settle(shadow)
        await shadow.stop()
        return shadow

    shadow = asyncio.run(scenario())
    assert shadow.stats.skipped_teacher_down == 1
    assert [row["request_id"] for _, row, _ in writer.rows] == ["while-up"]


def test_cost_from_usage_prices_by_tokens() -> None:
    cost_of = cost_from_usage(Pricing(input_per_token=1e-6, output_per_token=3e-6))
    assert cost_of(chat_completion("x")) == pytest.approx(3 * 1e-6 + 2 * 3e-6)
    assert cost_of({"choices": []}) is None
