"""Training from the SQLite log: labels, fitting, calibration to a teacher share or a quality."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from feedback.store import open_database
from router.difficulty import load_difficulty_model
from router.train import (
    FitOptions,
    NotEnoughData,
    calibrate_cascade,
    label_row,
    read_logged_requests,
    train_difficulty,
)
from router.types import Message

from .conftest import SyntheticRequest, messages_json, synthetic_requests, write_log


@pytest.mark.parametrize(
    ("route", "reason", "answer", "draft", "feedback", "shadow", "expected"),
    [
        ("student", "student", "a", None, (-1.0, None, None), None, (True, "feedback")),
        ("student", "student", "a", None, (0.0, "the right answer", None), None, (True, "feedback")),
        ("student", "student", "a", None, (0.0, None, "shadow"), None, (True, "feedback")),
        ("student", "student", "a", None, (1.0, None, None), "b", (False, "feedback")),  # people over the teacher
        ("teacher", "low_confidence", "t", "s", (0.5, None, "draft"), None, (False, "feedback")),
        ("teacher", "difficulty", "t", None, (-1.0, None, None), None, (None, None)),  # about the teacher
        ("teacher", "low_confidence", "t", "t", None, None, (True, "escalation")),
        ("teacher", "invalid_output", "t", "s", None, None, (True, "escalation")),
        ("student", "student", "A  b", None, None, "a b", (False, "shadow")),
        ("student", "student", "a", None, None, "b", (True, "shadow")),
        ("teacher", "teacher_unavailable", "t", "s", None, None, (True, "shadow")),
        ("student", "student", "a", None, (0.0, None, None), None, (None, None)),
        ("student", "student", "a", None, None, None, (None, None)),
    ],
)
def test_labels(route, reason, answer, draft, feedback, shadow, expected):
    assert label_row(route, reason, answer, draft, feedback, shadow) == expected


def test_reading_the_log_keeps_auto_traffic_the_policy_judges(tmp_path):
    db_path = tmp_path / "log.db"
    db = open_database(db_path)
    base = {"caller": "c", "status": "ok", "adapter": "support", "messages": messages_json([Message("user", "hi")])}
    db["requests"].insert_all([
        {**base, "id": "a", "created_at": 3.0, "requested_model": "auto", "route": "student", "reason": "student"},
        {**base, "id": "b", "created_at": 1.0, "requested_model": "auto", "route": "teacher", "reason": "timeout"},
        {**base, "id": "c", "created_at": 2.0, "requested_model": "auto", "route": "teacher", "reason": "rule"},
        {**base, "id": "d", "created_at": 4.0, "requested_model": "teacher", "route": "teacher", "reason": "explicit"},
        {**base, "id": "e", "created_at": 5.0, "requested_model": "auto", "route": "student", "reason": "student",
         "adapter": "other"},
    ])
    db.conn.execute("DROP TABLE feedback")  # an older log: no feedback table at all
    db.conn.close()
    rows = read_logged_requests(db_path, adapter="support")
    assert [(r.request_id, r.bad, r.label_source) for r in rows] == [("b", True, "escalation"), ("a", None, None)]
    assert {r.request_id for r in read_logged_requests(db_path, adapter=None)} == {"a", "b", "e"}


def test_training_learns_and_records_what_it_was_calibrated_for(trained_artefact):
    _, report = trained_artefact
    model = load_difficulty_model(report.artefact_path)
    assert (model.adapter, model.adapter_version) == ("support", "v12")  # the newest version in the log
    assert report.label_sources.keys() == {"shadow", "feedback"}
    assert report.heldout_teacher_share == pytest.approx(0.3, abs=0.001)
    assert model.calibration.target_teacher_share == 0.3
    # the model ranks by the true difficulty it was never shown
    fresh = synthetic_requests(3000, seed=7)
    scores = np.array([model.probability(r.messages) for r in fresh])
    truth = np.array([r.p_bad for r in fresh])
    assert np.corrcoef(scores, truth)[0, 1] > 0.8
    assert report.heldout_auc > 0.75


def test_calibrated_share_holds_on_fresh_traffic(trained_artefact):
    model = load_difficulty_model(trained_artefact[1].artefact_path)
    fresh = synthetic_requests(6000, seed=8)
    share = np.mean([model.probability(r.messages) > model.threshold for r in fresh])
    assert share == pytest.approx(0.3, abs=0.02)


def test_quality_target_takes_the_lowest_share_reaching_it(tmp_path):
    db_path = tmp_path / "log.db"
    write_log(db_path, synthetic_requests(4000, seed=21), seed=22, labelled_share=0.9)
    report = train_difficulty(db_path, tmp_path / "out", target_teacher_share=None, target_quality=0.85,
                              adapter=None, options=FitOptions(c_grid=(1.0,)))
    assert report.reached_target
    assert report.heldout_quality >= 0.85
    assert report.heldout_student_quality < 0.85
    assert 0.0 < report.heldout_teacher_share < 1.0
    model = load_difficulty_model(report.artefact_path)
    assert model.calibration.target_quality == 0.85


def test_too_few_labels_is_an_explained_error(tmp_path):
    db_path = tmp_path / "log.db"
    write_log(db_path, synthetic_requests(300, seed=3), seed=4, labelled_share=0.02)
    with pytest.raises(NotEnoughData, match="labelled training rows"):
        train_difficulty(db_path, tmp_path / "out", 0.2, None, None)


def test_a_missing_log_is_an_explained_error_and_is_not_created(tmp_path):
    with pytest.raises(NotEnoughData, match="no traffic log"):
        train_difficulty(tmp_path / "absent.db", tmp_path / "out", 0.2, None, None)
    assert not (tmp_path / "absent.db").exists()


def test_targets_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        train_difficulty(tmp_path / "absent.db", tmp_path, None, None, None)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        train_difficulty(tmp_path / "absent.db", tmp_path, 30.0, None, None)
    assert not (tmp_path / "absent.db").exists()


def test_banking77_calibration_holds_on_held_out_queries(banking77_dir, tmp_path):
    """Real queries, a synthetic student that fails on a seeded third of the intents (10% noise)."""
    rows = []
    for name in ("train.csv", "test.csv"):
        with open(banking77_dir / name, newline="") as handle:
            rows += [(row["text"], row["category"]) for row in csv.DictReader(handle)]
    rng = np.random.default_rng(77)
    intents = sorted({intent for _, intent in rows})
    hard = set(rng.choice(intents, size=len(intents) // 3, replace=False).tolist())
    requests = [
        SyntheticRequest((Message("system", "Name the intent."), Message("user", text)), 0.0,
                         (intent in hard) != (rng.random() < 0.1))
        for text, intent in (rows[i] for i in rng.permutation(len(rows)))
    ]
    log, held_out = requests[:9000], requests[9000:]
    write_log(tmp_path / "log.db", log, seed=78, labelled_share=0.7)
    report = train_difficulty(tmp_path / "log.db", tmp_path / "out", 0.35, None, "support",
                              options=FitOptions(c_grid=(3.0,)))
    model = load_difficulty_model(report.artefact_path)
    scores = np.array([model.probability(r.messages) for r in held_out])
    assert np.mean(scores > model.threshold) == pytest.approx(0.35, abs=0.02)
    bad = np.array([r.bad for r in held_out])
    assert np.mean(bad[scores > model.threshold]) > 2 * np.mean(bad[scores <= model.threshold])


def test_cascade_calibration_from_the_log_ignores_its_own_escalations(tmp_path):
    rng = np.random.default_rng(31)
    db = open_database(tmp_path / "log.db")
    rows, shadow = [], []
    for index in range(3000):
        correct = bool(rng.random() < 0.7)
        confidence = float(rng.normal(-0.4, 0.3) if correct else rng.normal(-1.2, 0.5))
        request_id = f"r{index}"
        rows.append({"id": request_id, "created_at": float(index), "caller": "c", "requested_model": "auto",
                     "route": "student", "reason": "student", "status": "ok", "confidence": confidence,
                     "messages": messages_json([Message("user", "q")]), "answer": "right" if correct else "wrong"})
        shadow.append({"request_id": request_id, "teacher_answer": "right", "created_at": float(index)})
    # escalated by an earlier cascade: "bad" only because of the threshold, so no evidence for it
    rows += [{"id": f"e{index}", "created_at": 5000.0 + index, "caller": "c", "requested_model": "auto",
              "route": "teacher", "reason": "low_confidence", "status": "ok", "confidence": -0.1,
              "messages": messages_json([Message("user", "q")]), "answer": "t", "draft": "s"}
             for index in range(1000)]
    db["requests"].insert_all(rows)
    db["shadow_labels"].insert_all(shadow)
    db.conn.close()
    calibration = calibrate_cascade(tmp_path / "log.db", 0.2, None, None)
    confidences = np.array([row["confidence"] for row in rows[:3000]])
    assert np.mean(confidences < calibration.min_confidence) == pytest.approx(0.2, abs=0.001)
