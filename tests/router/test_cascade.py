"""The confidence cascade: validators, the confidence threshold, and its calibration."""

from __future__ import annotations

import numpy as np
import pytest

from router.calibration import calibrate_min_confidence
from router.cascade import CascadePolicy, output_problem
from router.types import StudentOutcome

SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string"}, "urgent": {"type": "boolean"}},
    "required": ["intent"],
}


def review(settings, features, text="fine", mean=None, minimum=None, **configured):
    policy = CascadePolicy(settings(**configured))
    return policy.review(features, StudentOutcome(mean_logprob=mean, min_logprob=minimum, output_text=text))


def test_low_confidence_escalates_with_the_confidence_as_score(settings, make_features):
    decision = review(settings, make_features(adapter="a"), mean=-2.5, min_confidence=-1.0)
    assert decision is not None
    assert (decision.target, decision.reason, decision.score, decision.adapter) == (
        "teacher", "low_confidence", -2.5, "a")
    assert review(settings, make_features(), mean=-0.5, min_confidence=-1.0) is None


def test_min_statistic_reads_the_minimum_token_logprob(settings, make_features):
    features = make_features()
    assert review(settings, features, mean=-0.1, minimum=-6.0, min_confidence=-5.0, cascade_statistic="min") \
        .reason == "low_confidence"
    assert review(settings, features, mean=-9.0, minimum=-0.2, min_confidence=-5.0, cascade_statistic="min") is None


def test_the_answering_versions_calibrated_threshold_overrides_the_setting(settings, make_features):
    def calibrated(mean, own, **configured):
        policy = CascadePolicy(settings(**configured))
        return policy.review(make_features(), StudentOutcome(mean_logprob=mean, output_text="fine", min_confidence=own))

    assert calibrated(-0.5, -0.3, min_confidence=-1.0).reason == "low_confidence"  # stricter own threshold
    assert calibrated(-0.5, -0.7, min_confidence=-0.1) is None  # laxer own threshold
    assert calibrated(-0.5, -0.3).reason == "low_confidence"  # cascade off globally, on for this version
    assert calibrated(-0.5, None, min_confidence=-0.1).reason == "low_confidence"  # falls back to the setting


def test_unknown_confidence_or_no_threshold_keeps_the_answer(settings, make_features):
    assert review(settings, make_features(), mean=None, min_confidence=-1.0) is None
    assert review(settings, make_features(), mean=-50.0) is None


def test_streams_and_failures_are_not_reviewed(settings, make_features):
    assert review(settings, make_features(stream=True), text="{", mean=-9.0, min_confidence=-1.0,
                  output_regex="ok") is None
    policy = CascadePolicy(settings(min_confidence=-1.0))
    assert policy.review(make_features(), StudentOutcome(error="timeout")) is None


@pytest.mark.parametrize(
    ("response_format", "schema", "text", "problem"),
    [
        ("json_object", None, '{"intent": "x"}', None),
        ("json_object", None, "```json\n{}\n```", "not valid JSON"),
        ("json_object", None, "[1, 2]", "not a JSON object"),
        ("json_schema", SCHEMA, '{"intent": "card_arrival", "urgent": false}', None),
        ("json_schema", SCHEMA, '{"urgent": true}', "does not match the JSON schema"),
        ("json_schema", SCHEMA, '{"intent": 3}', "does not match the JSON schema"),
        ("json_schema", None, "[]", None),  # no schema passed: any JSON will do
        ("json_schema", {"type": "no-such-type"}, "[]", None),  # an invalid schema cannot be held to
        ("text", None, "not json", None),
    ],
)
def test_json_validation(make_features, response_format, schema, text, problem):
    features = make_features(response_format=response_format, json_schema=schema)
    found = output_problem(features, text, None)
    assert (found is None) if problem is None else (problem in found)


def test_invalid_output_escalates_before_confidence_is_considered(settings, make_features):
    features = make_features(response_format="json_object")
    decision = review(settings, features, text="nope", mean=-9.0, min_confidence=-1.0)
    assert decision is not None and (decision.reason, decision.score) == ("invalid_output", 1.0)


def test_label_set_and_regex(settings, make_features):
    labels = make_features(label_set=frozenset({"card_arrival", "pin_blocked"}))
    assert review(settings, labels, text=" card_arrival\n") is None
    assert review(settings, labels, text="Card arrival").reason == "invalid_output"
    assert review(settings, make_features(), text="ID-1234", output_regex=r"ID-\d+") is None
    assert review(settings, make_features(), text="ID-12a", output_regex=r"ID-\d+").reason == "invalid_output"


def confidence_sample(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean logprobs of answers, wrong answers less confident, as a small model's are."""
    rng = np.random.default_rng(seed)
    correct = rng.random(count) < 0.7
    confidence = np.where(correct, rng.normal(-0.4, 0.3, count), rng.normal(-1.2, 0.5, count))
    return confidence, correct


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_calibrated_threshold_hits_the_share_on_held_out_data(share):
    confidence, correct = confidence_sample(5000, seed=11)
    calibration = calibrate_min_confidence(confidence, correct, target_teacher_share=share)
    assert calibration.teacher_share == pytest.approx(share, abs=0.001)
    held_out, _ = confidence_sample(20_000, seed=12)
    assert np.mean(held_out < calibration.min_confidence) == pytest.approx(share, abs=0.02)


def test_quality_target_takes_the_lowest_share_that_reaches_it():
    confidence, correct = confidence_sample(2000, seed=13)
    calibration = calibrate_min_confidence(confidence, correct, target_quality=0.9)
    escalated = confidence < calibration.min_confidence
    assert np.mean(np.where(escalated, True, correct)) >= 0.9
    # escalating even one answer fewer (the most confident escalated one) misses the target
    least_risky = np.argmax(np.where(escalated, confidence, -np.inf))
    escalated[least_risky] = False
    assert np.mean(np.where(escalated, True, correct)) < 0.9
    assert calibration.reached_target


def test_calibration_needs_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_min_confidence([-1.0, -2.0], [True, False])
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_min_confidence([-1.0, -2.0], [True, False], target_teacher_share=0.5, target_quality=0.9)
