"""`protege router train`: fit the learned difficulty model from the traffic log.

Not on the decision path: this module reads SQLite and imports scikit-learn; the gateway only
ever loads the JSON artefact it writes (``router.difficulty``).

Labels ("was the student's answer bad?") come from the log, strongest evidence first:

1. feedback on an answer the student served: rating < 0, a correction, or the shadow teacher's
   answer preferred => bad; rating > 0 => good. On an escalated row, the student's draft
   preferred => good (feedback on a teacher answer otherwise says nothing about the student);
2. an escalation after the student answered (reason error / timeout / low_confidence /
   invalid_output) => bad;
3. a student answer and a teacher answer for the same request (an escalated row keeps the
   student's ``draft`` next to the teacher's ``answer``; a shadow sample keeps the teacher's
   answer in ``shadow_labels``) => bad when they differ after normalising case and white space,
   good when they agree. Exact agreement suits the closed tasks protege distils (labels,
   extraction); for free text it is a strict judge, and feedback should dominate.

Rows with none of these are unlabelled: they still count as traffic for the teacher-share
calibration and for the vocabulary's document frequencies.

The split is by time: the newest ``heldout_fraction`` of the traffic is held out; the model is
fitted on the older labelled rows and its threshold calibrated on the held-out ones, which is
how it will meet tomorrow's traffic.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feedback.store import open_database
from router.calibration import (
    ConfidenceCalibration,
    calibrate_min_confidence,
    choose_threshold,
    routing_curve,
    teacher_share,
)
from router.difficulty import Calibration, DifficultyModel, save_difficulty_model, tfidf_values
from router.features import FeatureConfig, conversation_features
from router.types import Message

ESCALATION_REASONS = frozenset({"error", "timeout", "low_confidence", "invalid_output"})
# Requests the difficulty policy never sees (decided before it): not part of its traffic.
DECIDED_BEFORE_DIFFICULTY = frozenset({"explicit", "rule"})
MIN_LABELLED_TRAIN_ROWS = 20
MIN_HELDOUT_ROWS = 20


class NotEnoughData(ValueError):
    """The log holds too few usable rows to fit or calibrate a difficulty model."""


@dataclass(frozen=True)
class LoggedRequest:
    """One `auto` request the difficulty policy would have judged, with its label if any."""

    request_id: str
    created_at: float
    messages: tuple[Message, ...]
    adapter: str | None
    adapter_version: str | None
    bad: bool | None  # None: unlabelled
    label_source: str | None  # "feedback" | "escalation" | "shadow"
    confidence: float | None = None  # the student's mean token logprob, when it was logged


@dataclass(frozen=True)
class FitOptions:
    heldout_fraction: float = 0.3
    min_df: int = 2
    max_features: int = 50_000
    c_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass(frozen=True)
class TrainReport:
    artefact_path: Path
    model_version: str
    adapter: str | None
    adapter_version: str | None
    traffic_rows: int
    labelled_rows: int
    bad_rows: int
    label_sources: dict[str, int]
    train_labelled_rows: int
    heldout_rows: int
    heldout_labelled_rows: int
    regularisation_c: float
    threshold: float
    target_teacher_share: float | None
    target_quality: float | None
    heldout_teacher_share: float
    heldout_quality: float | None  # labelled held-out rows, teacher assumed right
    heldout_student_quality: float | None  # the same rows, all on the student
    heldout_auc: float | None
    reached_target: bool


def train_difficulty(
    db_path: Path,
    out_dir: Path,
    target_teacher_share: float | None,
    target_quality: float | None,
    adapter: str | None,
    options: FitOptions | None = None,
) -> TrainReport:
    """Fit on the log at ``db_path``, calibrate, write ``out_dir/difficulty.json``.

    Give exactly one of ``target_teacher_share`` (share of judged traffic to send to the
    teacher) and ``target_quality`` (the lowest share whose held-out quality reaches it).
    ``adapter``: only rows served with that adapter alias (labels judge one adapter's answers).
    """
    _check_targets(target_teacher_share, target_quality)
    traffic = read_logged_requests(db_path, adapter)
    return train_from_traffic(traffic, out_dir, target_teacher_share, target_quality, adapter, options)


def train_from_traffic(
    traffic: Sequence[LoggedRequest],
    out_dir: Path,
    target_teacher_share: float | None,
    target_quality: float | None,
    adapter: str | None,
    options: FitOptions | None = None,
) -> TrainReport:
    """``train_difficulty`` on rows already read (the benchmark holds some back for testing)."""
    _check_targets(target_teacher_share, target_quality)
    options = options or FitOptions()
    train_rows, heldout_rows = split_by_time(traffic, options.heldout_fraction)
    fitted = fit_difficulty(train_rows, options)
    heldout = calibrate(fitted, heldout_rows, target_teacher_share, target_quality)
    metrics = {"heldout_auc": heldout.auc} if heldout.auc is not None else {}
    model = fitted.with_calibration(
        heldout.calibration,
        metrics,
        adapter=adapter,
        adapter_version=latest_adapter_version(traffic),
        trained_at=time.time(),
    )
    path = save_difficulty_model(model, out_dir)
    labelled = [row for row in traffic if row.bad is not None]
    return TrainReport(
        artefact_path=path,
        model_version=model.model_version,
        adapter=adapter,
        adapter_version=model.adapter_version,
        traffic_rows=len(traffic),
        labelled_rows=len(labelled),
        bad_rows=sum(1 for row in labelled if row.bad),
        label_sources=dict(Counter(str(row.label_source) for row in labelled)),
        train_labelled_rows=sum(1 for row in train_rows if row.bad is not None),
        heldout_rows=len(heldout_rows),
        heldout_labelled_rows=sum(1 for row in heldout_rows if row.bad is not None),
        regularisation_c=fitted.regularisation_c,
        threshold=heldout.calibration.threshold,
        target_teacher_share=target_teacher_share,
        target_quality=target_quality,
        heldout_teacher_share=heldout.calibration.heldout_teacher_share,
        heldout_quality=heldout.calibration.heldout_quality,
        heldout_student_quality=heldout.student_quality,
        heldout_auc=heldout.auc,
        reached_target=heldout.reached_target,
    )


def calibrate_cascade(
    db_path: Path,
    target_teacher_share: float | None,
    target_quality: float | None,
    adapter: str | None,
) -> ConfidenceCalibration:
    """``RouterSettings.min_confidence`` from the log's (confidence, was the answer right?) pairs.

    Only independent evidence counts (feedback, shadow samples): rows the cascade itself
    escalated are "bad" because of their confidence, and would confirm any threshold.
    Confidence is logged only when the gateway asked the student for logprobs.
    """
    _check_targets(target_teacher_share, target_quality)
    pairs = [
        (row.confidence, not row.bad)
        for row in read_logged_requests(db_path, adapter)
        if row.confidence is not None and row.bad is not None and row.label_source in ("feedback", "shadow")
    ]
    if len(pairs) < MIN_HELDOUT_ROWS:
        raise NotEnoughData(
            f"{len(pairs)} logged answers with both a confidence and a label; need at least {MIN_HELDOUT_ROWS}"
        )
    return calibrate_min_confidence(
        [confidence for confidence, _ in pairs],
        [correct for _, correct in pairs],
        target_teacher_share=target_teacher_share,
        target_quality=target_quality,
    )


def _check_targets(target_teacher_share: float | None, target_quality: float | None) -> None:
    if (target_teacher_share is None) == (target_quality is None):
        raise ValueError("give exactly one of target_teacher_share and target_quality")
    for name, value in (("target_teacher_share", target_teacher_share), ("target_quality", target_quality)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


# -- reading the log ------------------------------------------------------------------------


def read_logged_requests(db_path: Path, adapter: str | None) -> list[LoggedRequest]:
    """The `auto` traffic the difficulty policy judges, oldest first, labelled where possible."""
    if not Path(db_path).is_file():
        raise NotEnoughData(f"no traffic log at {db_path}")
    # migrate=False: training reads the gateway's log, it does not get to change its schema.
    db = open_database(Path(db_path), migrate=False)
    try:
        conn = db.conn
        if "requests" not in _table_names(conn):
            return []
        feedback = _latest_feedback(conn)
        shadow = _shadow_answers(conn)
        query = (
            "SELECT id, created_at, route, reason, adapter, adapter_version, messages, answer, draft, confidence "
            "FROM requests WHERE requested_model = 'auto' AND messages IS NOT NULL"
        )
        parameters: list[Any] = []
        if adapter is not None:
            query += " AND adapter = ?"
            parameters.append(adapter)
        query += " ORDER BY created_at, id"
        rows = conn.execute(query, parameters).fetchall()
    finally:
        db.conn.close()
    requests = []
    for row in rows:
        request = _logged_request(row, feedback.get(row[0]), shadow.get(row[0]))
        if request is not None:
            requests.append(request)
    return requests


def _table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _table_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info([{table}])")}


Feedback = tuple[float | None, str | None, str | None]  # rating, correction, preferred


def _latest_feedback(conn: sqlite3.Connection) -> dict[str, Feedback]:
    """request_id -> (rating, correction, preferred); read defensively, columns may be missing."""
    columns = _table_columns(conn, "feedback")
    if "request_id" not in columns:
        return {}
    selected = ", ".join(name if name in columns else "NULL" for name in ("rating", "correction", "preferred"))
    rows = conn.execute(f"SELECT request_id, {selected} FROM feedback ORDER BY rowid")
    return {request_id: (rating, correction, preferred) for request_id, rating, correction, preferred in rows}


def _shadow_answers(conn: sqlite3.Connection) -> dict[str, str]:
    """request_id -> the teacher's answer to a shadow sample of a student-served request."""
    columns = _table_columns(conn, "shadow_labels")
    if not {"request_id", "teacher_answer"} <= columns:
        return {}
    query = "SELECT request_id, teacher_answer FROM shadow_labels WHERE teacher_answer IS NOT NULL"
    if "error" in columns:
        query += " AND error IS NULL"
    return dict(conn.execute(query + " ORDER BY rowid").fetchall())


def _logged_request(
    row: tuple[Any, ...], feedback: Feedback | None, shadow_answer: str | None
) -> LoggedRequest | None:
    request_id, created_at, route, reason, adapter, adapter_version, messages_json, answer, draft, confidence = row
    if reason in DECIDED_BEFORE_DIFFICULTY:
        return None
    messages = parse_messages(messages_json)
    if not messages:
        return None
    bad, source = label_row(route, reason, answer, draft, feedback, shadow_answer)
    return LoggedRequest(
        request_id=request_id,
        created_at=float(created_at),
        messages=messages,
        adapter=adapter,
        adapter_version=adapter_version,
        bad=bad,
        label_source=source,
        confidence=None if confidence is None else float(confidence),
    )


def parse_messages(messages_json: str | None) -> tuple[Message, ...]:
    try:
        raw = json.loads(messages_json or "[]")
    except ValueError:
        return ()
    if not isinstance(raw, list):
        return ()
    return tuple(
        Message(str(item.get("role", "")), _content_text(item.get("content")))
        for item in raw
        if isinstance(item, dict)
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def label_row(
    route: str | None,
    reason: str | None,
    answer: str | None,
    draft: str | None,
    feedback: Feedback | None,
    shadow_answer: str | None,
) -> tuple[bool | None, str | None]:
    """(student answer bad?, evidence) for one logged request; (None, None) when unknown."""
    verdict = _feedback_verdict(route, draft, feedback)
    if verdict is not None:
        return verdict, "feedback"
    if reason in ESCALATION_REASONS:
        return True, "escalation"
    student_text, teacher_text = None, None
    if route == "teacher" and draft is not None:
        student_text, teacher_text = draft, answer
    elif route == "student" and shadow_answer is not None:
        student_text, teacher_text = answer, shadow_answer
    if student_text is not None and teacher_text is not None:
        return _normalise(student_text) != _normalise(teacher_text), "shadow"
    return None, None


def _feedback_verdict(route: str | None, draft: str | None, feedback: Feedback | None) -> bool | None:
    if feedback is None:
        return None
    rating, correction, preferred = feedback
    if route == "student":
        if (rating is not None and rating < 0) or (correction or "").strip() or preferred == "shadow":
            return True
        if rating is not None and rating > 0:
            return False
    elif route == "teacher" and draft is not None and preferred == "draft":
        return False  # the student's draft was preferred to the teacher's answer
    return None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def latest_adapter_version(traffic: Sequence[LoggedRequest]) -> str | None:
    for row in reversed(traffic):
        if row.adapter_version:
            return row.adapter_version
    return None


def split_by_time(
    traffic: Sequence[LoggedRequest], heldout_fraction: float
) -> tuple[list[LoggedRequest], list[LoggedRequest]]:
    """Older rows for fitting, the newest ``heldout_fraction`` for calibration."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in (0, 1)")
    ordered = sorted(traffic, key=lambda row: (row.created_at, row.request_id))
    cut = len(ordered) - int(round(len(ordered) * heldout_fraction))
    return ordered[:cut], ordered[cut:]


# -- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedDifficulty:
    """Weights without a calibrated threshold yet."""

    config: FeatureConfig
    bias: float
    weights: dict[str, tuple[float, float]]
    regularisation_c: float

    def with_calibration(
        self,
        calibration: Calibration,
        metrics: dict[str, float],
        *,
        adapter: str | None,
        adapter_version: str | None,
        trained_at: float,
    ) -> DifficultyModel:
        return DifficultyModel(
            config=self.config,
            bias=self.bias,
            weights=self.weights,
            calibration=calibration,
            adapter=adapter,
            adapter_version=adapter_version,
            trained_at=trained_at,
            metrics=metrics,
        )


def fit_difficulty(train_rows: Sequence[LoggedRequest], options: FitOptions) -> FittedDifficulty:
    """TF-IDF vocabulary from all training traffic, logistic regression on its labelled rows."""
    labelled = [row for row in train_rows if row.bad is not None]
    labels = np.array([1 if row.bad else 0 for row in labelled])
    if len(labelled) < MIN_LABELLED_TRAIN_ROWS or len(set(labels.tolist())) < 2:
        raise NotEnoughData(
            f"{len(labelled)} labelled training rows ({int(labels.sum())} bad); need at least "
            f"{MIN_LABELLED_TRAIN_ROWS} with both good and bad answers: collect feedback or "
            "enable shadow sampling"
        )
    all_features = [conversation_features(row.messages, options.features) for row in train_rows]
    idf = _idf(all_features, options.min_df, options.max_features)
    labelled_features = [f for f, row in zip(all_features, train_rows) if row.bad is not None]
    matrix, vocabulary = design_matrix(labelled_features, idf)
    regularisation_c = _choose_c(matrix, labels, options.c_grid)
    classifier = _logistic_regression(regularisation_c).fit(matrix, labels)
    coefficients = classifier.coef_[0]
    return FittedDifficulty(
        config=options.features,
        bias=float(classifier.intercept_[0]),
        weights={feature: (idf[feature], float(coefficients[column])) for feature, column in vocabulary.items()},
        regularisation_c=regularisation_c,
    )


def _idf(documents: Sequence[frozenset[str]], min_df: int, max_features: int) -> dict[str, float]:
    """Smoothed IDF (scikit-learn's formula) of the ``max_features`` most frequent features."""
    document_frequency: Counter[str] = Counter()
    for present in documents:
        document_frequency.update(present)
    kept = sorted(
        (feature for feature, df in document_frequency.items() if df >= min_df),
        key=lambda feature: (-document_frequency[feature], feature),
    )[:max_features]
    n = len(documents)
    return {feature: math.log((1 + n) / (1 + document_frequency[feature])) + 1.0 for feature in sorted(kept)}


def design_matrix(
    features: Sequence[frozenset[str]], idf: dict[str, float]
) -> tuple[Any, dict[str, int]]:
    """CSR matrix built with the serving code's own weighting (``tfidf_values``), and its columns."""
    from scipy.sparse import csr_matrix

    vocabulary = {feature: column for column, feature in enumerate(idf)}
    indptr, indices, data = [0], [], []
    for present in features:
        for feature, value in tfidf_values(present, idf).items():
            indices.append(vocabulary[feature])
            data.append(value)
        indptr.append(len(indices))
    matrix = csr_matrix((data, indices, indptr), shape=(len(features), len(vocabulary)), dtype=np.float64)
    return matrix, vocabulary


def _logistic_regression(regularisation_c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=regularisation_c, max_iter=5000)


def _choose_c(matrix: Any, labels: np.ndarray, grid: Sequence[float]) -> float:
    """Regularisation by 3-fold cross-validated log loss; small data gets the middle of the grid."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    if len(grid) == 1 or len(labels) < 150 or min(np.bincount(labels)) < 10:
        return float(sorted(grid)[len(grid) // 2])
    folds = list(StratifiedKFold(n_splits=3, shuffle=True, random_state=0).split(matrix, labels))
    losses = []
    for value in grid:
        loss = 0.0
        for fit_index, test_index in folds:
            classifier = _logistic_regression(value).fit(matrix[fit_index], labels[fit_index])
            loss += log_loss(labels[test_index], classifier.predict_proba(matrix[test_index])[:, 1], labels=[0, 1])
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])


# -- calibration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutResult:
    calibration: Calibration
    student_quality: float | None  # labelled held-out rows, all on the student
    auc: float | None  # of P(bad) on the labelled held-out rows
    reached_target: bool


def calibrate(
    fitted: FittedDifficulty,
    heldout_rows: Sequence[LoggedRequest],
    target_teacher_share: float | None,
    target_quality: float | None,
) -> HeldoutResult:
    """Choose the threshold on held-out traffic, scored exactly as the gateway will score it."""
    if len(heldout_rows) < MIN_HELDOUT_ROWS:
        raise NotEnoughData(f"{len(heldout_rows)} held-out rows; need at least {MIN_HELDOUT_ROWS}")
    uncalibrated = fitted.with_calibration(
        Calibration(0.5, None, None, 0.0, None, 0), {}, adapter=None, adapter_version=None, trained_at=0.0
    )
    risks = np.array([uncalibrated.probability(row.messages) for row in heldout_rows])
    labelled = np.array([row.bad is not None for row in heldout_rows])
    student_correct = np.array([0.0 if row.bad else 1.0 for row in heldout_rows])
    if target_teacher_share is not None:
        # A share is a property of traffic, labelled or not: calibrate it on all of it.
        choice = choose_threshold(routing_curve(risks, student_correct), target_teacher_share, None)
    else:
        if not labelled.any():
            raise NotEnoughData("no labelled held-out rows to calibrate a quality target on")
        labelled_curve = routing_curve(risks[labelled], student_correct[labelled])
        choice = choose_threshold(labelled_curve, None, target_quality)
    quality, student_quality, auc = _heldout_quality(risks[labelled], student_correct[labelled], choice.threshold)
    calibration = Calibration(
        threshold=choice.threshold,
        target_teacher_share=target_teacher_share,
        target_quality=target_quality,
        heldout_teacher_share=teacher_share(risks, choice.threshold),
        heldout_quality=quality,
        heldout_rows=len(heldout_rows),
    )
    return HeldoutResult(calibration, student_quality, auc, choice.reached_target)


def _heldout_quality(
    risks: np.ndarray, student_correct: np.ndarray, threshold: float
) -> tuple[float | None, float | None, float | None]:
    """(routed quality, all-student quality, AUC of P(bad)) on labelled held-out rows."""
    if len(risks) == 0:
        return None, None, None
    escalated = risks > threshold
    quality = float(np.mean(np.where(escalated, 1.0, student_correct)))
    auc = None
    if 0 < student_correct.sum() < len(student_correct):
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(1 - student_correct, risks))
    return quality, float(student_correct.mean()), auc
