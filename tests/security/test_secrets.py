"""No configured secret (caller keys, admin key, teacher key) ever shows up in what the gateway
writes or answers: process output at debug level, Python logging, the SQLite log (rows and the
raw files), /metrics, response bodies and headers. Including when the teacher fails with an
error that quotes the key it was sent."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import httpx
import pytest

from bench.load import CLEAN_EXIT
from tests.reliability.harness import KeyEchoingMock, chat, wait_until

pytestmark = pytest.mark.reliability

CALLER_A = "sk-caller-a-SECRET-7f3a9c"
CALLER_B = "sk-caller-b-SECRET-1d8e4b"
ADMIN = "sk-admin-SECRET-55aa01"
TEACHER = "sk-teacher-SECRET-c0ffee42"
SECRETS = (CALLER_A, CALLER_B, ADMIN, TEACHER)


def _leaks(text: str | bytes, where: str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{secret[:12]}... in {where}" for secret in SECRETS if secret.encode() in data]


def _config(student_url: str, teacher_url: str) -> dict:
    return {
        "server": {"log_level": "debug"},
        "auth": {"api_keys": {"team-a": CALLER_A, "team-b": CALLER_B}, "admin_key": ADMIN},
        "student": {"url": f"{student_url}/v1"},
        "teacher": {"model": "openai/mock-model", "api_base": f"{teacher_url}/v1", "api_key": TEACHER,
                    "max_retries": 1, "retry_backoff_s": 0.01, "cooldown_window": 100},
    }


def _exercise(url: str, teacher: KeyEchoingMock) -> tuple[list[str], list[str]]:
    """Traffic of every kind, failures included; returns (texts the clients got, request ids)."""
    seen: list[str] = []
    ids: list[str] = []

    def keep(response: httpx.Response) -> httpx.Response:
        seen.append(response.text)
        seen.append("\n".join(f"{k}: {v}" for k, v in response.headers.items()))
        if "x-protege-request-id" in response.headers:
            ids.append(response.headers["x-protege-request-id"])
        return response

    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        a = {"authorization": f"Bearer {CALLER_A}"}
        b = {"authorization": f"Bearer {CALLER_B}"}
        assert keep(client.post("/v1/chat/completions", json=chat(), headers=a)).status_code == 200
        assert keep(client.post("/v1/chat/completions", json=chat("teacher"), headers=b)).status_code == 200
        assert keep(client.post("/v1/chat/completions", json=chat(stream=True), headers=a)).status_code == 200
        assert keep(client.post("/v1/chat/completions", json=chat(), headers={
            "authorization": f"Bearer {ADMIN}"})).status_code == 200  # the admin key is also a caller key
        # The teacher refuses the gateway's key and quotes it back: 401, then 500s (retried), then 400.
        teacher.fail_next(401)
        failed = keep(client.post("/v1/chat/completions", json=chat("teacher"), headers=a))
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_auth_failed"
        assert "[redacted]" in failed.json()["error"]["message"]  # the quote was there, and was cut
        teacher.fail_next(500, 500)
        assert keep(client.post("/v1/chat/completions", json=chat("teacher"), headers=b)).status_code == 502
        teacher.fail_next(400)
        assert keep(client.post("/v1/chat/completions", json=chat("teacher", stream=True),
                                headers=a)).status_code == 400
        # Wrong keys, including the teacher's own key offered as a caller key.
        for wrong in (TEACHER, CALLER_A[:-1], ADMIN + "x"):
            assert keep(client.post("/v1/chat/completions", json=chat(),
                                    headers={"authorization": f"Bearer {wrong}"})).status_code == 401
        assert keep(client.post("/v1/feedback", json={"request_id": ids[0], "rating": 1, "correction": "better"},
                                headers=a)).status_code == 200
        keep(client.get(f"/v1/feedback/{ids[0]}", headers=a))
        keep(client.get("/v1/models", headers=b))
        keep(client.get("/readyz"))
        seen.append(keep(client.get("/metrics")).text)
    return seen, ids


def _database_leaks(db_path: Path) -> list[str]:
    leaks: list[str] = []
    conn = sqlite3.connect(db_path)
    try:
        tables = [row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for row in conn.execute(f"select * from [{table}]"):
                leaks += _leaks(" ".join(str(value) for value in row), f"table {table}")
    finally:
        conn.close()
    for path in db_path.parent.glob(db_path.name + "*"):  # the db, its WAL and shm, raw bytes
        leaks += _leaks(path.read_bytes(), path.name)
    return leaks


def test_no_secret_in_process_output_db_metrics_or_answers(upstream_factory, gateway_process_factory) -> None:  # noqa: ANN001
    student = upstream_factory()
    teacher = upstream_factory(KeyEchoingMock())
    gateway = gateway_process_factory(_config(student.url, teacher.url))
    seen, ids = _exercise(gateway.url, teacher.mock)
    assert teacher.mock.authorizations[0] == f"Bearer {TEACHER}"  # the key was really sent (and quoted)
    assert wait_until(lambda: len(_rows(gateway.db_path)) >= len(ids))
    assert gateway.terminate() in CLEAN_EXIT

    leaks = []
    for text in seen:
        leaks += _leaks(text, "an answer")
    leaks += _leaks(gateway.output, "the gateway's stdout/stderr")
    leaks += _database_leaks(gateway.db_path)
    assert not leaks, leaks
    assert "DEBUG" in gateway.output  # it really logged at debug level
    assert {row["caller"] for row in _rows(gateway.db_path)} >= {"team-a", "team-b", "admin"}


def test_no_secret_in_python_logging(caplog, upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    caplog.set_level(logging.DEBUG)
    student = upstream_factory()
    teacher = upstream_factory(KeyEchoingMock())
    gateway = gateway_factory(**_config(student.url, teacher.url))
    seen, _ = _exercise(gateway.url, teacher.mock)
    gateway.rows()
    leaks = _leaks(caplog.text, "Python logging") + _leaks(gateway.metrics(), "/metrics")
    for text in seen:
        leaks += _leaks(text, "an answer")
    leaks += _database_leaks(gateway.settings.db_path)
    assert not leaks, leaks
    assert caplog.records  # something was logged


def _rows(db_path: Path) -> list[dict]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("select * from requests")]
    finally:
        conn.close()
