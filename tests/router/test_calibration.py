"""Routing curves, thresholds, CPT and APGR."""

from __future__ import annotations

import numpy as np
import pytest

from router.calibration import (
    average_pgr,
    call_performance_threshold,
    choose_threshold,
    routing_curve,
    teacher_share,
    threshold_for_share,
)


def test_curve_by_hand():
    curve = routing_curve(risk=[0.9, 0.8, 0.1, 0.5], student_correct=[0, 1, 1, 0], teacher_correct=[1, 1, 1, 0])
    assert curve.shares.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.qualities.tolist() == [0.5, 0.75, 0.75, 0.75, 0.75]
    assert average_pgr(curve) == pytest.approx(0.875)
    assert call_performance_threshold(curve, 0.95) == 0.25


def test_teacher_defaults_to_always_right():
    curve = routing_curve(risk=[0.2, 0.7], student_correct=[1, 0])
    assert curve.qualities.tolist() == [0.5, 1.0, 1.0]


def test_ties_move_together():
    curve = routing_curve(risk=[0.5, 0.5, 0.2], student_correct=[0, 1, 1])
    assert curve.shares.tolist() == pytest.approx([0.0, 2 / 3, 1.0])


def test_each_threshold_escalates_exactly_its_share():
    rng = np.random.default_rng(3)
    risk = np.round(rng.random(500), 2)  # many ties
    curve = routing_curve(risk, rng.random(500) < 0.6)
    for share, threshold in zip(curve.shares, curve.thresholds):
        assert teacher_share(risk, threshold) == pytest.approx(share)


def test_share_target_picks_the_nearest_point():
    risk = np.linspace(0.0, 1.0, 101)
    choice = threshold_for_share(routing_curve(risk, np.ones(101)), 0.3)
    assert choice.teacher_share == pytest.approx(30 / 101, abs=0.006)
    assert teacher_share(risk, choice.threshold) == pytest.approx(choice.teacher_share)
    with pytest.raises(ValueError):
        threshold_for_share(routing_curve(risk, np.ones(101)), 1.5)


def test_unreachable_quality_returns_the_best_point_and_says_so():
    curve = routing_curve(risk=[0.1, 0.9], student_correct=[1, 0], teacher_correct=[0, 0])
    choice = choose_threshold(curve, None, 0.99)
    assert not choice.reached_target
    assert choice.quality == 0.5


def test_random_informed_and_oracle_routers_are_ordered():
    rng = np.random.default_rng(5)
    student = rng.random(5000) < 0.6
    bad_share = float(np.mean(~student))
    random_curve = routing_curve(rng.random(5000), student)
    informed_curve = routing_curve((~student) + rng.normal(0.0, 0.6, 5000), student)
    oracle_curve = routing_curve((~student) + rng.random(5000) * 1e-3, student)
    # the oracle recovers the gap linearly until every bad answer is escalated, then stays at 1
    assert average_pgr(oracle_curve) == pytest.approx(1 - bad_share / 2, abs=1e-3)
    assert call_performance_threshold(oracle_curve, 1.0) == pytest.approx(bad_share)
    assert average_pgr(random_curve) == pytest.approx(0.5, abs=0.03)
    assert average_pgr(random_curve) + 0.1 < average_pgr(informed_curve) < average_pgr(oracle_curve)
    assert call_performance_threshold(informed_curve) < call_performance_threshold(random_curve)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        routing_curve([0.1, 0.2], [1])
