"""The SQLite log under trouble: locked, full, the gateway killed (-9) or stopped (SIGTERM).

Requests never wait on SQLite: they are served whatever the log does; rows wait in the writer's
bounded buffer, drops are counted, and what was committed survives a crash intact."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

import feedback.store
from bench.load import CALLER_KEY, CLEAN_EXIT, MockProcess, _one, gateway_config, logged_ids, steady_load
from tests.reliability.harness import chat, db_rows, metric_value, wait_until

pytestmark = pytest.mark.reliability

AUTH = {"authorization": f"Bearer {CALLER_KEY}"}


def test_locked_database_requests_are_served_rows_buffered_bounded_and_drops_counted(
        monkeypatch, upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    # A short busy time-out so that the lock shows up as failed writes within the test (5 s in
    # production: a brief lock from a reader-turned-writer is simply waited out).
    monkeypatch.setattr(feedback.store, "BUSY_TIMEOUT_MS", 50)
    student = upstream_factory()
    gateway = gateway_factory(student={"url": f"{student.url}/v1"},
                              log={"queue_max": 10, "batch_size": 5, "retry_interval_s": 0.1})
    client = gateway.client()
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert wait_until(lambda: len(db_rows(gateway.settings.db_path)) == 1)
    writer = gateway.services.writer

    locker = sqlite3.connect(gateway.settings.db_path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # nobody else can write now
        statuses = [client.post("/v1/chat/completions", json=chat()).status_code for _ in range(30)]
        assert statuses == [200] * 30  # served regardless
        assert wait_until(lambda: writer.stats.failures >= 2)
        # Buffer: queue_max (10) waiting + one batch (5) being retried; the rest dropped, counted.
        assert 15 <= writer.stats.dropped <= 20
        assert writer.depth == 30 - writer.stats.dropped
        metrics = gateway.metrics()
        assert metric_value(metrics, "protege_log_rows_dropped_total") == writer.stats.dropped
        assert metric_value(metrics, "protege_log_write_failures_total") >= 2
        assert metric_value(metrics, "protege_log_queue_depth") == writer.depth
        assert len(db_rows(gateway.settings.db_path)) == 1  # WAL: readers still read
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    kept = 30 - writer.stats.dropped
    assert wait_until(lambda: len(db_rows(gateway.settings.db_path)) == 1 + kept)
    assert writer.depth == 0


def test_full_disk_requests_are_served_and_rows_written_when_it_clears(gateway_process_factory) -> None:  # noqa: ANN001
    """'Disk full' for real: RLIMIT_FSIZE on the gateway process (CPython ignores SIGXFSZ), so
    SQLite's writes fail with an I/O error until the limit is lifted again."""
    with MockProcess() as mock:
        config = gateway_config(mock.url, teacher=False)
        config["log"] = {"retry_interval_s": 0.1}
        gateway = gateway_process_factory(config)
        with poster(gateway.url) as post:
            assert post(3) == [200] * 3
            assert wait_until(lambda: len(logged_ids(gateway.db_path)) == 3)
            # No file of the process may grow past 1 KiB now: not the WAL (a frame is 4 KiB), nor
            # the database (a checkpoint), nor a fresh WAL after the writer reopens the database.
            resource.prlimit(gateway.pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
            try:
                assert post(10) == [200] * 10  # served while nothing can be written
                assert wait_until(lambda: _metric(gateway.port, "protege_log_write_failures_total") >= 3), (
                    gateway.output[-2000:])
                assert _metric(gateway.port, "protege_log_queue_depth") == 10
                assert len(logged_ids(gateway.db_path)) == 3
            finally:
                resource.prlimit(gateway.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            assert wait_until(lambda: len(logged_ids(gateway.db_path)) == 13)
            assert _metric(gateway.port, "protege_log_rows_dropped_total") == 0
        assert gateway.terminate() in CLEAN_EXIT
    assert "log write of" in gateway.output  # the failures were logged, with the reason
    assert _integrity(gateway.db_path) == "ok"


def test_kill_9_under_load_keeps_the_database_intact_and_loses_only_the_last_flush(
        gateway_process_factory) -> None:  # noqa: ANN001
    rps, kill_after_s = 40.0, 2.0
    with MockProcess(latency_ms=2) as mock:
        gateway = gateway_process_factory(gateway_config(mock.url, teacher=False))
        killed: dict[str, float] = {}

        def kill_at(elapsed: float) -> None:
            if elapsed >= kill_after_s and not killed:
                os.kill(gateway.pid, signal.SIGKILL)
                killed["at"] = time.monotonic()

        outcomes = asyncio.run(steady_load(gateway.url, rps, kill_after_s + 0.5, teacher_share=0,
                                           stream_share=0.2, on_tick=kill_at))
        assert gateway.wait(10) == -signal.SIGKILL
    answered = [o for o in outcomes if o.status == 200]
    assert len(answered) >= rps * kill_after_s * 0.5  # there was load
    assert any(o.status == 0 for o in outcomes)  # and it was cut off by the kill

    assert _integrity(gateway.db_path) == "ok"
    ids = set(logged_ids(gateway.db_path))
    missing = [o for o in answered if o.request_id not in ids]
    # What can be lost: rows answered but not yet committed, i.e. queued for at most one flush
    # interval (log.flush_interval_s = 0.05 s) plus the batch's write time. Allow 1 s of a loaded
    # CI machine's scheduling on top; anything answered earlier must be in the log.
    window_s = 0.05 + 1.0
    print(f"kill -9 after {kill_after_s}s at {rps} rps: {len(answered)} answered, {len(ids)} rows, "
          f"{len(missing)} answered rows lost, answered {[round(killed['at'] - o.finished_at, 3) for o in missing]} s "
          f"before the kill")
    assert all(killed["at"] - o.finished_at <= window_s for o in missing), [
        round(killed["at"] - o.finished_at, 3) for o in missing]
    assert len(ids) <= len([o for o in outcomes if o.status != 429])  # no phantom rows


def test_sigterm_drains_in_flight_requests_and_the_log_queue(gateway_process_factory) -> None:  # noqa: ANN001
    with MockProcess(latency_ms=1000) as mock:  # every answer takes 1 s: all 10 are in flight
        gateway = gateway_process_factory(gateway_config(mock.url, teacher=False))

        async def scenario() -> list:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession() as session:
                kinds = ["auto"] * 6 + ["stream"] * 4
                tasks = [asyncio.ensure_future(_one(session, gateway.url, kind, CALLER_KEY, timeout)) for kind in kinds]
                deadline = time.monotonic() + 10
                while await _in_flight(session, gateway.url) < len(kinds) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                gateway.signal(signal.SIGTERM)
                return list(await asyncio.gather(*tasks))

        outcomes = asyncio.run(scenario())
        code = gateway.wait(30)
    assert code in CLEAN_EXIT
    assert [o.status for o in outcomes] == [200] * 10, [o.error for o in outcomes]
    ids = logged_ids(gateway.db_path)
    assert sorted(ids) == sorted(o.request_id for o in outcomes)  # every answer has its row
    assert "unwritten" not in gateway.output


# -- helpers -----------------------------------------------------------------------------------


async def _in_flight(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        return metric_value(await response.text(), "protege_in_flight_requests")


def _metric(port: int, name: str) -> float:
    from bench.load import http_get

    return metric_value(http_get(port, "/metrics")[1].decode(), name)


def _integrity(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@contextlib.contextmanager
def poster(url: str) -> Iterator[Callable[[int], list[int]]]:
    """``post(n)``: n chat requests, one after the other; their statuses."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30, trust_env=False) as client:
        yield lambda n: [client.post("/v1/chat/completions", json=chat()).status_code for _ in range(n)]
