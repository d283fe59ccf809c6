"""The SQLite log: migrations, and the one writer (batching, retry while locked, bounded buffer,
bad rows dropped not wedging, close drains)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from feedback.migrations import applied, apply_migrations
from feedback.store import LogWriter, open_database


def request_row(i: int) -> dict:
    return {"id": f"r{i}", "created_at": time.time(), "caller": "c", "requested_model": "auto", "status": "ok"}


def count(path) -> int:  # noqa: ANN001
    conn = sqlite3.connect(path)
    try:
        return conn.execute("select count(*) from requests").fetchone()[0]
    finally:
        conn.close()


def test_migrations_apply_once_and_set_wal(tmp_path) -> None:  # noqa: ANN001
    db = open_database(tmp_path / "log.db")
    numbers = applied(db)
    assert numbers and numbers == sorted(numbers)
    assert apply_migrations(db) == []  # nothing left to do
    assert db.conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert "requests" in db.table_names()


@pytest.fixture
def writer(tmp_path):  # noqa: ANN001, ANN201
    w = LogWriter(tmp_path / "log.db", batch_size=50, flush_interval_s=0.01, retry_interval_s=0.05)
    w.start()
    yield w
    w.close()


def test_writer_batches_and_flushes(writer, tmp_path) -> None:  # noqa: ANN001
    for i in range(500):
        assert writer.submit("requests", request_row(i))
    assert writer.flush()
    assert count(tmp_path / "log.db") == 500
    assert writer.stats.written == 500 and writer.stats.failures == 0


def test_writer_keeps_rows_while_database_is_locked(writer, tmp_path) -> None:  # noqa: ANN001
    blocker = sqlite3.connect(tmp_path / "log.db", timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    writer.submit("requests", request_row(1))
    deadline = time.monotonic() + 20
    while writer.stats.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.stats.failures >= 1  # the locked write failed and was counted...
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.flush(timeout_s=30)
    assert count(tmp_path / "log.db") == 1  # ...and was written once the lock cleared
    assert writer.stats.dropped == 0


def test_bad_row_is_dropped_without_wedging_the_log(writer, tmp_path) -> None:  # noqa: ANN001
    writer.submit("requests", request_row(1))
    writer.submit("requests", {"id": "bad", "created_at": None, "caller": "c", "requested_model": "x",
                               "status": "ok"})  # NOT NULL violated
    writer.submit("requests", request_row(2))
    assert writer.flush()
    assert count(tmp_path / "log.db") == 2
    assert writer.stats.dropped == 1


def test_full_buffer_drops_and_counts(tmp_path) -> None:  # noqa: ANN001
    w = LogWriter(tmp_path / "log.db", queue_max=3)  # not started: nothing drains
    results = [w.submit("requests", request_row(i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert w.stats.dropped == 2
    w.start()
    w.close()
    assert count(tmp_path / "log.db") == 3


def test_close_drains_the_queue(tmp_path) -> None:  # noqa: ANN001
    w = LogWriter(tmp_path / "log.db", batch_size=7, flush_interval_s=5)
    w.start()
    for i in range(100):
        w.submit("requests", request_row(i))
    w.close()
    assert count(tmp_path / "log.db") == 100


def test_upsert_replaces_by_key(writer, tmp_path) -> None:  # noqa: ANN001
    writer.submit("requests", request_row(1))
    writer.submit("requests", {**request_row(1), "status": "error"}, upsert_pk="id")
    assert writer.flush()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("select status from requests").fetchall() == [("error",)]
    conn.close()


def test_retrain_outcomes_are_metrics_read_at_scrape_time(tmp_path) -> None:  # noqa: ANN001
    from gateway.metrics import Metrics

    db = open_database(tmp_path / "log.db")
    runs = [("a", "t1", 100.0, "promoted"), ("b", "t1", 200.0, "failed"), ("c", "t2", 150.0, "skipped")]
    for run_id, task, finished, status in runs:
        db.conn.execute("INSERT INTO retrain_runs (id, task, started_at, finished_at, status) VALUES (?, ?, ?, ?, ?)",
                        (run_id, task, finished - 10, finished, status))
    db.conn.close()
    text = Metrics(tmp_path / "log.db").render().decode()
    assert 'protege_retrain_last_status{task="t1"} 0.0' in text  # latest t1 run failed
    assert 'protege_retrain_last_status{task="t2"} 1.0' in text
    assert 'protege_retrain_last_success_timestamp_seconds{task="t1"} 100.0' in text
    assert "protege_retrain_last_status" in Metrics(None).render().decode()  # described even with no log
