"""explicit, rules, fallback, and how the Router composes policies."""

from __future__ import annotations

import pytest

from router.base import POLICY_KINDS, Router, build_router
from router.difficulty import DifficultyPolicy
from router.policies import ExplicitPolicy, FailureFallbackPolicy, RulesPolicy
from router.types import REASONS, RouteDecision, StudentOutcome


class FixedPolicy:
    """A pre-call policy that always gives the same decision (composition tests)."""

    def __init__(self, name: str, decision: RouteDecision | None) -> None:
        self.name = name
        self.decision = decision

    def decide(self, features: object) -> RouteDecision | None:
        return self.decision


def assert_well_formed(decision: RouteDecision) -> None:
    assert decision.reason in REASONS
    assert isinstance(decision.score, float)


@pytest.mark.parametrize(
    ("requested_model", "adapter", "header", "expected"),
    [
        ("teacher", None, None, ("teacher", None)),
        ("student", "legal", None, ("student", "legal")),
        ("auto", None, "teacher", ("teacher", None)),
        ("auto", "legal", "student", ("student", "legal")),
        ("student", None, "teacher", ("teacher", None)),  # the header wins over the model name
    ],
)
def test_explicit_routes_what_the_caller_named(make_features, settings, requested_model, adapter, header, expected):
    decision = ExplicitPolicy(settings()).decide(
        make_features(requested_model=requested_model, adapter=adapter, route_header=header)
    )
    assert decision is not None
    assert (decision.target, decision.adapter, decision.reason) == (*expected, "explicit")
    assert_well_formed(decision)


def test_explicit_has_no_opinion_on_auto(make_features, settings):
    assert ExplicitPolicy(settings()).decide(make_features()) is None


def test_rules_send_what_the_student_cannot_do_to_the_teacher(make_features, settings):
    policy = RulesPolicy(settings(student_context_tokens=100, teacher_patterns=[r"(?i)\blawsuit\b"],
                                  teacher_tenants=["vip"]))
    too_long = policy.decide(make_features(estimated_tokens=101))
    assert too_long is not None and too_long.target == "teacher" and too_long.score == 101.0
    for features in (
        make_features(has_tools=True),
        make_features(caller="vip"),
        make_features(("user", "Is this a LAWSUIT?")),
    ):
        decision = policy.decide(features)
        assert decision is not None and (decision.target, decision.reason) == ("teacher", "rule")
        assert_well_formed(decision)


def test_rules_pattern_reads_the_last_user_message_only(make_features, settings):
    policy = RulesPolicy(settings(teacher_patterns=["lawsuit"]))
    assert policy.decide(make_features(("user", "a lawsuit"), ("assistant", "ok"), ("user", "thanks"))) is None
    assert policy.decide(make_features(estimated_tokens=100)) is None


@pytest.mark.parametrize("error", ["error", "timeout"])
def test_fallback_escalates_student_failures(make_features, settings, error):
    decision = FailureFallbackPolicy(settings()).review(make_features(adapter="a"), StudentOutcome(error=error))
    assert decision is not None and (decision.target, decision.reason, decision.adapter) == ("teacher", error, "a")
    assert_well_formed(decision)


def test_fallback_keeps_a_successful_answer(make_features, settings):
    outcome = StudentOutcome(mean_logprob=-9.0, output_text="x")
    assert FailureFallbackPolicy(settings()).review(make_features(), outcome) is None


def test_explicit_beats_rules_beats_difficulty(make_features, settings):
    difficulty = FixedPolicy("difficulty", RouteDecision("teacher", None, "difficulty", 0.9))
    router = Router([ExplicitPolicy(settings()), RulesPolicy(settings()), difficulty], [], "base")
    assert router.route(make_features(requested_model="student", has_tools=True)).reason == "explicit"
    assert router.route(make_features(has_tools=True)).reason == "rule"
    assert router.route(make_features()).reason == "difficulty"


def test_first_decisive_policy_wins_and_none_passes_on(make_features):
    first = FixedPolicy("a", None)
    second = FixedPolicy("b", RouteDecision("teacher", None, "rule", 1.0))
    third = FixedPolicy("c", RouteDecision("student", None, "student", 0.1))
    assert Router([first, second, third], [], "base").route(make_features()).reason == "rule"
    default = Router([first], [], "base").route(make_features())
    assert (default.target, default.reason, default.adapter) == ("student", "student", "base")


def test_teacher_unavailable_downgrades_auto_to_the_student(make_features):
    router = Router([FixedPolicy("d", RouteDecision("teacher", None, "difficulty", 0.8))], [], "base")
    decision = router.route(make_features(teacher_available=False))
    assert (decision.target, decision.reason, decision.score, decision.adapter) == (
        "student", "teacher_unavailable", 0.8, "base")


def test_teacher_unavailable_keeps_an_explicit_teacher_request(make_features, settings):
    router = Router([ExplicitPolicy(settings())], [], "base")
    for features in (make_features(requested_model="teacher", teacher_available=False),
                     make_features(route_header="teacher", teacher_available=False)):
        decision = router.route(features)
        assert (decision.target, decision.reason) == ("teacher", "explicit")


def test_post_call_escalation_also_downgrades_when_the_teacher_is_away(make_features, settings):
    router = Router([], [FailureFallbackPolicy(settings())], "base")
    decision = router.after_student(make_features(teacher_available=False), StudentOutcome(error="timeout"))
    assert decision is not None and (decision.target, decision.reason) == ("student", "teacher_unavailable")


def test_post_call_policies_only_review_auto(make_features, settings):
    router = Router([], [FailureFallbackPolicy(settings())], "base")
    assert router.after_student(make_features(requested_model="student"), StudentOutcome(error="error")) is None


def test_all_kinds_register_and_build_in_order(settings, trained_artefact):
    _, report = trained_artefact
    router = build_router(
        settings(policies=["explicit", "rules", "difficulty", "fallback", "cascade"],
                 difficulty_model=str(report.artefact_path), min_confidence=-1.0),
        default_adapter="base",
    )
    assert {"explicit", "rules", "fallback", "difficulty", "cascade"} <= set(POLICY_KINDS)
    assert [p.name for p in router.pre_call] == ["explicit", "rules", "difficulty"]
    assert [p.name for p in router.post_call] == ["fallback", "cascade"]
    assert isinstance(router.pre_call[2], DifficultyPolicy)


def test_unknown_kind_and_missing_artefact_are_refused(settings, tmp_path):
    with pytest.raises(ValueError, match="unknown router policy"):
        build_router(settings(policies=["explicit", "magic"]), default_adapter="base")
    with pytest.raises(ValueError, match="difficulty_model"):
        build_router(settings(policies=["difficulty"]), default_adapter="base")
    with pytest.raises(ValueError, match="cannot read"):
        build_router(settings(policies=["difficulty"], difficulty_model=str(tmp_path / "none.json")),
                     default_adapter="base")


@pytest.mark.parametrize(
    ("requested_model", "calibrated", "expected"),
    [
        ("auto", False, "teacher"),  # base@v0 or a hand-promoted version: nobody calibrated it
        ("auto", True, None),  # the cascade decides after the student answered
        ("auto", None, None),  # no registry to tell: no opinion
        ("student", False, None),  # asked for the student by name: served by it
    ],
)
def test_uncalibrated_sends_auto_to_the_teacher_until_a_version_is_calibrated(
        make_features, settings, requested_model, calibrated, expected):
    from router.policies import UncalibratedPolicy

    features = make_features(requested_model=requested_model, student_calibrated=calibrated)
    decision = UncalibratedPolicy(settings()).decide(features)
    assert (decision.target if decision else None) == expected
    if decision is not None:
        assert_well_formed(decision)
        assert decision.reason == "uncalibrated"
    assert "uncalibrated" in POLICY_KINDS
