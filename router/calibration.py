"""Thresholds and routing-quality curves: pure functions of scores and outcomes.

Everything speaks of a *risk* score: higher means "more likely to need the teacher", and a
request escalates when ``risk > threshold`` (strictly). The difficulty model's P(bad) is a risk
as it is; a student confidence becomes one by negation.

A routing curve sorts requests by falling risk and sends the riskiest ``k`` to the teacher, for
every ``k`` from 0 (all student) to n (all teacher). Tied risks move together: a threshold cannot
split them, so the curve only has points at tie boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoutingCurve:
    """Point i: teacher share ``shares[i]`` reached by ``thresholds[i]`` gives ``qualities[i]``."""

    shares: np.ndarray
    qualities: np.ndarray
    thresholds: np.ndarray

    @property
    def student_quality(self) -> float:
        return float(self.qualities[0])

    @property
    def teacher_quality(self) -> float:
        return float(self.qualities[-1])


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    teacher_share: float  # on the data it was chosen on
    quality: float | None  # likewise; None when no outcomes were given
    reached_target: bool


@dataclass(frozen=True)
class ConfidenceCalibration:
    """A cascade threshold: escalate when the student's confidence is below ``min_confidence``."""

    min_confidence: float
    teacher_share: float
    quality: float | None
    reached_target: bool


def routing_curve(
    risk: Sequence[float], student_correct: Sequence[float], teacher_correct: Sequence[float] | None = None
) -> RoutingCurve:
    """Quality (mean correctness of whoever answers) against teacher share, over all thresholds.

    ``teacher_correct`` defaults to all ones: labels that mean "disagrees with the teacher" make
    the teacher right by definition.
    """
    risks = np.asarray(risk, dtype=float)
    student = np.asarray(student_correct, dtype=float)
    teacher = np.ones_like(student) if teacher_correct is None else np.asarray(teacher_correct, dtype=float)
    if not (len(risks) == len(student) == len(teacher)) or len(risks) == 0:
        raise ValueError("risk, student_correct and teacher_correct must be non-empty and of one length")
    order = np.argsort(-risks, kind="stable")
    sorted_risk = risks[order]
    n = len(risks)
    # quality with the first k (riskiest) on the teacher, for k = 0..n
    teacher_prefix = np.concatenate([[0.0], np.cumsum(teacher[order])])
    student_suffix = np.concatenate([np.cumsum(student[order][::-1])[::-1], [0.0]])
    qualities = (teacher_prefix + student_suffix) / n
    cuts = _tie_boundaries(sorted_risk)
    thresholds = np.array([_threshold_at(sorted_risk, k) for k in cuts])
    return RoutingCurve(shares=cuts / n, qualities=qualities[cuts], thresholds=thresholds)


def _tie_boundaries(sorted_risk: np.ndarray) -> np.ndarray:
    """The k (0..n) at which a strict threshold can separate the first k from the rest."""
    n = len(sorted_risk)
    inner = np.nonzero(sorted_risk[:-1] != sorted_risk[1:])[0] + 1
    return np.concatenate([[0], inner, [n]]).astype(int)


def _threshold_at(sorted_risk: np.ndarray, k: int) -> float:
    """A threshold that escalates exactly the first k of the descending ``sorted_risk``."""
    if k == 0:
        return float(sorted_risk[0])  # strict ">": the maximum itself stays on the student
    if k == len(sorted_risk):
        return math.nextafter(float(sorted_risk[-1]), -math.inf)
    return float((sorted_risk[k - 1] + sorted_risk[k]) / 2.0)


def threshold_for_share(curve: RoutingCurve, target_share: float) -> ThresholdChoice:
    """The point whose teacher share is nearest the target (ties: the lower share)."""
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target teacher share must be in [0, 1], got {target_share}")
    index = int(np.argmin(np.abs(curve.shares - target_share)))
    return ThresholdChoice(
        threshold=float(curve.thresholds[index]),
        teacher_share=float(curve.shares[index]),
        quality=float(curve.qualities[index]),
        reached_target=bool(abs(curve.shares[index] - target_share) <= 0.01),
    )


def threshold_for_quality(curve: RoutingCurve, target_quality: float) -> ThresholdChoice:
    """The lowest teacher share whose quality reaches the target; the best quality if none does."""
    reaching = np.nonzero(curve.qualities >= target_quality - 1e-12)[0]
    reached = len(reaching) > 0
    index = int(reaching[0]) if reached else int(np.argmax(curve.qualities))
    return ThresholdChoice(
        threshold=float(curve.thresholds[index]),
        teacher_share=float(curve.shares[index]),
        quality=float(curve.qualities[index]),
        reached_target=reached,
    )


def choose_threshold(
    curve: RoutingCurve, target_teacher_share: float | None, target_quality: float | None
) -> ThresholdChoice:
    """Exactly one target must be given."""
    if (target_teacher_share is None) == (target_quality is None):
        raise ValueError("give exactly one of target_teacher_share and target_quality")
    if target_teacher_share is not None:
        return threshold_for_share(curve, target_teacher_share)
    assert target_quality is not None
    return threshold_for_quality(curve, target_quality)


def teacher_share(risk: Sequence[float], threshold: float) -> float:
    """Share of requests a threshold escalates (``risk > threshold``)."""
    risks = np.asarray(risk, dtype=float)
    return float(np.mean(risks > threshold)) if len(risks) else 0.0


def calibrate_min_confidence(
    confidences: Sequence[float],
    correct: Sequence[bool],
    target_teacher_share: float | None = None,
    target_quality: float | None = None,
) -> ConfidenceCalibration:
    """Cascade threshold from logged (student confidence, was the answer correct?) pairs.

    Give a target teacher share (escalate that share of student answers), or a target quality
    (the lowest share whose answers, escalated ones counted as correct, reach it).
    """
    curve = routing_curve([-c for c in confidences], [float(c) for c in correct])
    choice = choose_threshold(curve, target_teacher_share, target_quality)
    # escalate iff -confidence > t  <=>  confidence < -t
    return ConfidenceCalibration(
        min_confidence=-choice.threshold,
        teacher_share=choice.teacher_share,
        quality=choice.quality,
        reached_target=choice.reached_target,
    )


# -- routing quality summaries (benchmark) ---------------------------------------------------


def performance_gap_recovered(curve: RoutingCurve) -> np.ndarray:
    """PGR at each point: (quality - student) / (teacher - student)."""
    gap = curve.teacher_quality - curve.student_quality
    if gap <= 0:
        return np.ones_like(curve.qualities)  # the student is as good as the teacher: nothing to recover
    return (curve.qualities - curve.student_quality) / gap


def average_pgr(curve: RoutingCurve) -> float:
    """APGR: the area under PGR against teacher share (0.5 for a random router on average)."""
    pgr = performance_gap_recovered(curve)
    widths = np.diff(curve.shares)
    return float(np.sum(widths * (pgr[1:] + pgr[:-1]) / 2.0))


def call_performance_threshold(curve: RoutingCurve, fraction_of_teacher: float = 0.95) -> float:
    """CPT: the smallest teacher share whose quality reaches ``fraction`` of the teacher's."""
    target = fraction_of_teacher * curve.teacher_quality
    reaching = np.nonzero(curve.qualities >= target - 1e-12)[0]
    return float(curve.shares[reaching[0]])
