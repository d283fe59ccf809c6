"""Numbered schema migrations: the only way protege's SQLite schema changes.

Each migration is a function registered with ``@migration(N)``; ``apply_migrations`` runs the
ones not yet recorded in ``_protege_migrations``, in order, each in its own transaction.
Add a new one at the end with the next number; never edit one that has shipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
_MIGRATIONS: dict[int, tuple[str, Migration]] = {}


def migration(number: int) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        if number in _MIGRATIONS:
            raise RuntimeError(f"migration {number} registered twice")
        _MIGRATIONS[number] = (fn.__name__, fn)
        return fn

    return register


def applied(db: sqlite_utils.Database) -> list[int]:
    if "_protege_migrations" not in db.table_names():
        return []
    return [row["number"] for row in db["_protege_migrations"].rows]


def apply_migrations(db: sqlite_utils.Database) -> list[int]:
    """Bring ``db`` to the newest schema; returns the numbers applied now."""
    db["_protege_migrations"].create(
        {"number": int, "name": str, "applied_at": float}, pk="number", if_not_exists=True
    )
    done = set(applied(db))
    ran = []
    for number in sorted(_MIGRATIONS):
        if number in done:
            continue
        name, fn = _MIGRATIONS[number]
        # Explicit transaction: the connection is in autocommit mode, and sqlite-utils'
        # own helpers would commit half a migration.
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.conn.execute(
                "INSERT INTO _protege_migrations (number, name, applied_at) VALUES (?, ?, ?)",
                (number, name, time.time()),
            )
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        ran.append(number)
    return ran


@migration(1)
def m001_requests(db: sqlite_utils.Database) -> None:
    db["requests"].create(
        {
            "id": str,
            "created_at": float,
            "caller": str,
            "requested_model": str,
            "route": str,
            "reason": str,
            "route_score": float,
            "adapter": str,
            "adapter_version": str,
            "stream": int,
            "messages": str,
            "params": str,
            "answer": str,
            "draft": str,
            "confidence": float,
            "status": str,
            "http_status": int,
            "error": str,
            "latency_ms": float,
            "ttft_ms": float,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cost_usd": float,
            "teacher_cost_usd": float,
        },
        pk="id",
        not_null={"created_at", "caller", "requested_model", "status"},
    )
    db["requests"].create_index(["created_at"])
    db["requests"].create_index(["adapter", "created_at"])
    db["requests"].create_index(["route", "reason"])


@migration(2)
def m002_adapters(db: sqlite_utils.Database) -> None:
    # The adapter registry (gateway.adapters): low-volume admin state. A version row is
    # immutable; an alias is the newest promotion of (task, tenant) not rolled back, so the
    # promotion rows double as the history `rollback` walks. tenant '' is every caller.
    db.conn.execute(
        """
        CREATE TABLE adapters (
            name TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 0),
            path TEXT NOT NULL,
            rank INTEGER NOT NULL,
            base_fingerprint TEXT NOT NULL,
            weights_sha256 TEXT NOT NULL,
            source TEXT,
            created_at REAL NOT NULL,
            UNIQUE (task, version)
        )
        """
    )
    db.conn.execute(
        """
        CREATE TABLE adapter_promotions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task TEXT NOT NULL,
            tenant TEXT NOT NULL DEFAULT '',
            adapter TEXT NOT NULL REFERENCES adapters (name),
            promoted_at REAL NOT NULL,
            rolled_back_at REAL
        )
        """
    )
    db.conn.execute(
        "CREATE INDEX idx_adapter_promotions_alias ON adapter_promotions (task, tenant, rolled_back_at, id)"
    )


@migration(3)
def m003_feedback_and_shadow_labels(db: sqlite_utils.Database) -> None:
    # No foreign key to `requests` and no CHECK constraints: a violating row would fail the
    # writer's whole batch, and the writer retries a failed batch forever. The feedback API
    # validates rating (-1..1) and preferred (answer|draft|shadow) before anything is queued.
    db.conn.execute(
        """
        CREATE TABLE feedback (
            request_id TEXT PRIMARY KEY,
            caller TEXT NOT NULL,
            rating REAL NOT NULL,
            correction TEXT,
            preferred TEXT,
            comment TEXT,
            labels TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
    db.conn.execute("CREATE INDEX idx_feedback_caller ON feedback (caller, updated_at)")
    db.conn.execute(
        """
        CREATE TABLE shadow_labels (
            request_id TEXT PRIMARY KEY,
            teacher_answer TEXT,
            teacher_model TEXT,
            finish_reason TEXT,
            created_at REAL NOT NULL,
            cost_usd REAL,
            error TEXT
        )
        """
    )
    db.conn.execute("CREATE INDEX idx_shadow_labels_created_at ON shadow_labels (created_at)")


@migration(4)
def m004_retrain_runs(db: sqlite_utils.Database) -> None:
    # One row per `protege retrain` cycle: what was trained from what, on which data, how it
    # scored against the adapter it would replace, and what was decided.
    db.conn.execute(
        """
        CREATE TABLE retrain_runs (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,
            reason TEXT,
            candidate TEXT,
            parent TEXT,
            base_fingerprint TEXT,
            data_version TEXT,
            data_hash TEXT,
            data_counts TEXT,
            data_until REAL,
            hyperparameters TEXT,
            metrics TEXT,
            wall_s REAL
        )
        """
    )
    db.conn.execute("CREATE INDEX idx_retrain_runs_task ON retrain_runs (task, started_at)")


@migration(5)
def m005_adapter_cascade_threshold(db: sqlite_utils.Database) -> None:
    # The cascade threshold calibrated for one adapter version (set by the retrain after it
    # promotes the version). Stored on the version, not the alias: a rollback brings back the
    # older version and with it the threshold it was calibrated for. NULL: router.min_confidence.
    db.conn.execute("ALTER TABLE adapters ADD COLUMN min_confidence REAL")
