"""POST/GET /v1/feedback on a minimal app carrying the feedback router."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback.store import LogWriter, open_database
from tests.feedback.conftest import (
    FeedbackTestMetrics,
    FeedbackTestServices,
    LogSeed,
    auth,
    caller_middleware_app,
)


def feedback_rows(db_path: Path) -> list[dict]:
    db = open_database(db_path)
    try:
        return list(db.query("SELECT * FROM feedback ORDER BY request_id"))
    finally:
        db.conn.close()


def post(client: TestClient, caller: str, body: dict | str):  # noqa: ANN201
    if isinstance(body, str):
        return client.post("/v1/feedback", content=body, headers={**auth(caller), "content-type": "application/json"})
    return client.post("/v1/feedback", json=body, headers=auth(caller))


@pytest.mark.parametrize(("rating", "stored", "bucket"), [("up", 1.0, "up"), ("down", -1.0, "down"),
                                                           (0.25, 0.25, "up"), (0, 0.0, "neutral")])
def test_rating_is_stored_and_counted(client: TestClient, seed: LogSeed, writer: LogWriter, db_path: Path,
                                      feedback_services: FeedbackTestServices, rating: object, stored: float,
                                      bucket: str) -> None:
    seed.request("req-1", caller="alice")
    response = post(client, "alice", {"request_id": "req-1", "rating": rating, "comment": "thanks",
                                      "labels": {"topic": "billing", "severity": 2}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["request_id"], body["rating"]) == ("feedback", "req-1", stored)
    assert body["labels"] == {"topic": "billing", "severity": 2}
    writer.flush()
    [row] = feedback_rows(db_path)
    assert (row["caller"], row["rating"], row["comment"]) == ("alice", stored, "thanks")
    assert json.loads(row["labels"]) == {"severity": 2, "topic": "billing"}
    assert feedback_services.metrics.value("protege_feedback_total", rating=bucket) == 1.0


def test_second_feedback_replaces_the_first(client: TestClient, seed: LogSeed, writer: LogWriter,
                                            db_path: Path) -> None:
    seed.request("req-1", caller="alice", answer="5")
    first = post(client, "alice", {"request_id": "req-1", "rating": "up"}).json()
    writer.flush()
    time.sleep(0.01)
    second = post(client, "alice", {"request_id": "req-1", "rating": "down", "correction": "4"}).json()
    writer.flush()
    rows = feedback_rows(db_path)
    assert len(rows) == 1
    assert (rows[0]["rating"], rows[0]["correction"]) == (-1.0, "4")
    assert rows[0]["created_at"] == first["created_at"]
    assert rows[0]["updated_at"] == second["updated_at"] > first["updated_at"]
    got = client.get("/v1/feedback/req-1", headers=auth("alice")).json()
    assert (got["rating"], got["correction"], got["created_at"]) == (-1.0, "4", first["created_at"])


def test_unknown_request_is_404(client: TestClient) -> None:
    response = post(client, "alice", {"request_id": "nope", "rating": "up"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.json()["error"]["param"] == "request_id"


def test_another_callers_request_is_404_like_an_unknown_one(client: TestClient, seed: LogSeed,
                                                             writer: LogWriter, db_path: Path) -> None:
    seed.request("req-bob", caller="bob")
    response = post(client, "mallory", {"request_id": "req-bob", "rating": "down", "correction": "spam"})
    unknown = post(client, "mallory", {"request_id": "req-none", "rating": "down"})
    assert response.status_code == 404
    assert response.json()["error"]["message"].replace("req-bob", "X") == \
        unknown.json()["error"]["message"].replace("req-none", "X")
    writer.flush()
    assert feedback_rows(db_path) == []
    post(client, "bob", {"request_id": "req-bob", "rating": "up"})
    assert client.get("/v1/feedback/req-bob", headers=auth("mallory")).status_code == 404
    assert client.get("/v1/feedback/req-bob", headers=auth("bob")).status_code == 200


def test_get_without_feedback_is_404(client: TestClient, seed: LogSeed) -> None:
    seed.request("req-1", caller="alice")
    response = client.get("/v1/feedback/req-1", headers=auth("alice"))
    assert response.status_code == 404
    assert "no feedback" in response.json()["error"]["message"]


def test_missing_caller_is_401(client: TestClient, seed: LogSeed) -> None:
    seed.request("req-1", caller="alice")
    response = client.post("/v1/feedback", json={"request_id": "req-1", "rating": "up"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"request_id": "req-1", "rating": "sideways"}, "rating", "'up', 'down' or a number"),
        ({"request_id": "req-1", "rating": 1.5}, "rating", "less than or equal to 1"),
        ({"request_id": "req-1", "rating": -2}, "rating", "greater than or equal to -1"),
        ({"request_id": "req-1", "rating": True}, "rating", "'up', 'down' or a number"),
        ({"request_id": "req-1", "rating": "0.5"}, "rating", "'up', 'down' or a number"),
        ({"request_id": "req-1"}, "rating", "required"),
        ({"rating": "up"}, "request_id", "required"),
        ({"request_id": "", "rating": "up"}, "request_id", "at least 1"),
        ({"request_id": "req-1", "rating": "up", "stars": 5}, "stars", "unknown field"),
        ({"request_id": "req-1", "rating": "up", "correction": "   "}, "correction", "blank"),
        ({"request_id": "req-1", "rating": "up", "preferred": "teacher"}, "preferred", "'answer', 'draft' or 'shadow'"),
        ({"request_id": "req-1", "rating": "up", "labels": ["a"]}, "labels", "valid dictionary"),
        ({"request_id": "req-1", "rating": "up", "labels": {"k": {"nested": 1}}}, "labels", "label 'k': values must"),
        ({"request_id": "req-1", "rating": "up", "labels": {str(i): 1 for i in range(40)}}, "labels", "at most 32"),
        ([1, 2], None, "JSON object"),
    ],
)
def test_invalid_bodies_are_400_with_the_field_named(client: TestClient, seed: LogSeed, body: object,
                                                     param: str | None, fragment: str) -> None:
    seed.request("req-1", caller="alice")
    response = post(client, "alice", body)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param if param is None else error["param"].startswith(param)
    assert fragment in error["message"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = post(client, "alice", '{"request_id": ')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_oversized_body_is_413(client: TestClient) -> None:
    response = post(client, "alice", {"request_id": "r", "rating": "up", "comment": "x" * 300_000})
    assert response.status_code == 413


def test_preferred_must_name_a_logged_candidate(client: TestClient, seed: LogSeed, writer: LogWriter) -> None:
    seed.request("req-plain", caller="alice")
    seed.request("req-esc", caller="alice", route="teacher", draft="student draft", answer="teacher answer")
    no_draft = post(client, "alice", {"request_id": "req-plain", "rating": "up", "preferred": "draft"})
    no_shadow = post(client, "alice", {"request_id": "req-plain", "rating": "up", "preferred": "shadow"})
    with_draft = post(client, "alice", {"request_id": "req-esc", "rating": "up", "preferred": "draft"})
    assert (no_draft.status_code, no_shadow.status_code, with_draft.status_code) == (400, 400, 200)
    assert "no student draft" in no_draft.json()["error"]["message"]
    seed.shadow("req-plain", "teacher's shadow answer")
    assert post(client, "alice", {"request_id": "req-plain", "rating": "up", "preferred": "shadow"}).status_code == 200


def test_feedback_right_after_its_request_waits_for_the_writer(db_path: Path) -> None:
    """The request row is still in the writer's queue (a slow writer): the feedback flushes it."""
    slow_writer = LogWriter(db_path, flush_interval_s=30.0, batch_size=10_000)
    slow_writer.start()
    try:
        services = FeedbackTestServices(writer=slow_writer, db_path=db_path, metrics=FeedbackTestMetrics())
        slow_writer.submit("requests", {"id": "req-fresh", "created_at": time.time(), "caller": "alice",
                                        "requested_model": "auto", "status": "ok", "route": "student",
                                        "answer": "hi"})
        assert _request_count(db_path) == 0  # still queued: the writer has not woken up
        with TestClient(caller_middleware_app(services)) as client:
            response = post(client, "alice", {"request_id": "req-fresh", "rating": "up"})
            assert response.status_code == 200, response.text
            got = client.get("/v1/feedback/req-fresh", headers=auth("alice"))
            assert got.status_code == 200
            assert got.json()["rating"] == 1.0
    finally:
        slow_writer.close()


def _request_count(db_path: Path) -> int:
    db = open_database(db_path)
    try:
        return db["requests"].count
    finally:
        db.conn.close()


def test_openapi_documents_the_body(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"request_id", "rating"}
    assert "/v1/feedback/{request_id}" in schema["paths"]
