"""Migration 3: the feedback and shadow_labels tables, and numbering gaps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from feedback import migrations
from feedback.store import open_database


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite_utils.Database]:
    database = open_database(db_path)
    try:
        yield database
    finally:
        database.conn.close()


def test_tables_and_columns(db: sqlite_utils.Database) -> None:
    assert 3 in migrations.applied(db)
    assert set(db["feedback"].columns_dict) == {
        "request_id", "caller", "rating", "correction", "preferred", "comment", "labels", "created_at", "updated_at",
    }
    assert db["feedback"].pks == ["request_id"]
    assert set(db["shadow_labels"].columns_dict) == {
        "request_id", "teacher_answer", "teacher_model", "finish_reason", "created_at", "cost_usd", "error",
    }
    assert db["shadow_labels"].pks == ["request_id"]


def test_a_lower_number_registered_later_still_runs(db: sqlite_utils.Database,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap (3 shipped before 2) is fine: apply_migrations runs whatever is not recorded."""
    done = migrations.applied(db)
    free = [n for n in range(1, max(done)) if n not in done]
    if not free:
        pytest.skip("no gap below the newest migration in this checkout")
    late = free[0]

    def late_migration(database: sqlite_utils.Database) -> None:
        database["late_table"].create({"id": int}, pk="id")

    monkeypatch.setitem(migrations._MIGRATIONS, late, ("late_migration", late_migration))
    assert migrations.apply_migrations(db) == [late]
    assert "late_table" in db.table_names()
    assert migrations.apply_migrations(db) == []
