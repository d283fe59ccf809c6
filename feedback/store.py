"""The SQLite traffic log: connection set-up and the one writer.

Requests never touch SQLite. They hand a finished row to ``LogWriter.submit`` (a non-blocking
append); one writer thread owns the write connection and inserts rows in batches, so WAL
keeps readers (the trainer, ``GET /v1/feedback``) off the writer's back. A failed write is
counted and retried with the batch kept; rows beyond the bounded buffer are dropped and counted;
``close()`` drains what is left.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from feedback.migrations import apply_migrations
from gateway.errors import StoreError

log = logging.getLogger("protege.store")

BUSY_TIMEOUT_MS = 5000


def open_database(path: Path, synchronous: str = "NORMAL", migrate: bool = True) -> sqlite_utils.Database:
    """Open (and create) the log database in WAL mode, schema up to date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        db = sqlite_utils.Database(conn)
        if migrate:
            apply_migrations(db)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the log database {path}: {exc}") from exc
    return db


@dataclass
class WriterStats:
    written: int = 0
    failures: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class Write:
    """One queued write: rows for ``table``; ``upsert`` replaces rows with the same key."""

    table: str
    row: dict[str, Any]
    upsert_pk: str | None = None


class LogWriter:
    """The single writer. Thread-safe ``submit``; everything else happens on its own thread."""

    def __init__(
        self,
        db_path: Path,
        *,
        synchronous: str = "NORMAL",
        batch_size: int = 256,
        queue_max: int = 100_000,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 0.5,
        on_stats: Callable[[WriterStats, int], None] | None = None,
    ) -> None:
        self._db_path = Path(db_path)
        self._synchronous = synchronous
        self._batch_size = batch_size
        self._queue_max = queue_max
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        self._on_stats = on_stats
        self._pending: collections.deque[Write] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._drained = threading.Condition(self._lock)
        self._in_flight = 0
        self.stats = WriterStats()

    # -- request side ---------------------------------------------------------------------
    def submit(self, table: str, row: dict[str, Any], upsert_pk: str | None = None) -> bool:
        """Queue one row; never blocks, never raises. False when the buffer was full (dropped)."""
        with self._lock:
            if len(self._pending) >= self._queue_max:
                self.stats.dropped += 1
                log.error("log buffer full (%d rows): dropping a %s row", self._queue_max, table)
                return False
            self._pending.append(Write(table, row, upsert_pk))
        if len(self._pending) >= self._batch_size:
            self._wake.set()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._pending) + self._in_flight

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        db = open_database(self._db_path, self._synchronous)
        db.conn.close()
        self._thread = threading.Thread(target=self._run, name="protege-log-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything submitted so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._drained:
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(min(remaining, 0.05))
                self._wake.set()
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        drained = self.flush(timeout_s)
        if not drained:
            log.error("log writer closed with %d rows unwritten", self.depth)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        db: sqlite_utils.Database | None = None
        while not self._stopping:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            while True:
                batch = self._take_batch()
                if not batch:
                    break
                db = self._write_until_done(db, batch)
                if db is None:  # stopping while the database stayed unwritable
                    return
            self._report()
        if db is not None:
            db.conn.close()

    def _take_batch(self) -> list[Write]:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(self._batch_size, len(self._pending)))]
            self._in_flight = len(batch)
            if not batch:
                self._drained.notify_all()
            return batch

    def _write_until_done(
        self, db: sqlite_utils.Database | None, batch: list[Write]
    ) -> sqlite_utils.Database | None:
        while True:
            try:
                if db is None:
                    db = open_database(self._db_path, self._synchronous, migrate=False)
                try:
                    _write_batch(db, batch)
                except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError):
                    # A bad row, not a bad moment: retrying would wedge the log forever. Write the
                    # rows one by one and drop (and count) only the ones SQLite refuses.
                    self._write_one_by_one(db, batch)
                    batch = []  # counted row by row already
            except (sqlite3.Error, StoreError, OSError) as exc:
                self.stats.failures += 1
                log.warning("log write of %d rows failed (%s); retrying", len(batch), exc)
                self._report()
                if db is not None:
                    try:
                        db.conn.close()
                    except sqlite3.Error:
                        pass
                    db = None
                if self._stopping:
                    return None
                time.sleep(self._retry_interval_s)
                continue
            with self._lock:
                self.stats.written += len(batch)
                self._in_flight = 0
                if not self._pending:
                    self._drained.notify_all()
            return db

    def _write_one_by_one(self, db: sqlite_utils.Database, batch: list[Write]) -> None:
        for write in batch:
            try:
                _write_batch(db, [write])
            except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
                self.stats.dropped += 1
                log.error("dropping a %s row SQLite refuses: %s", write.table, exc)
                continue
            with self._lock:
                self.stats.written += 1

    def _report(self) -> None:
        if self._on_stats is not None:
            self._on_stats(self.stats, self.depth)


def _write_batch(db: sqlite_utils.Database, batch: list[Write]) -> None:
    """One transaction for the whole batch (raw SQL: sqlite-utils commits per call)."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        for write in batch:
            columns = list(write.row)
            sql = (
                f"INSERT INTO [{write.table}] ({', '.join(f'[{c}]' for c in columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
            if write.upsert_pk:
                updates = ", ".join(f"[{c}] = excluded.[{c}]" for c in columns if c != write.upsert_pk)
                sql += f" ON CONFLICT([{write.upsert_pk}]) DO UPDATE SET {updates}"
            conn.execute(sql, [write.row[c] for c in columns])
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full, I/O error) may already have rolled back: a second ROLLBACK
        # would raise "no transaction is active" and hide the real error.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
