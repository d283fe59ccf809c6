"""Learned difficulty: features, the artefact, the policy."""

from __future__ import annotations

import json
import math

import pytest

from router.difficulty import (
    DifficultyArtefactError,
    DifficultyPolicy,
    difficulty_policy_from_settings,
    load_difficulty_model,
    save_difficulty_model,
)
from router.features import FeatureConfig, conversation_features
from router.types import Message

from .conftest import synthetic_requests


def test_features_mark_roles_and_read_the_whole_conversation():
    config = FeatureConfig()
    question = Message("user", "Why was my card declined?")
    alone = conversation_features((question,), config)
    after_system = conversation_features((Message("system", "declined"), question), config)
    after_assistant = conversation_features((Message("assistant", "declined"), question), config)
    assert {"q:declined", "q:card declined"} <= alone
    assert "s:declined" in after_system and "a:declined" in after_assistant
    assert "s:declined" not in after_assistant
    assert after_system != alone  # earlier turns and structure count, not just the question
    earlier_question = conversation_features((Message("user", "pin"), Message("assistant", "ok"), question), config)
    assert "u:pin" in earlier_question and "q:pin" not in earlier_question


def test_feature_caps_bound_the_work():
    config = FeatureConfig(question_chars=22, context_messages=2, context_chars=10)
    history = tuple(Message("user" if i % 2 else "assistant", f"turn{i} " + "word " * 50) for i in range(10))
    features = conversation_features(history + (Message("user", "alpha beta gamma delta epsilon zeta eta"),), config)
    tagged = {f for f in features if not f.startswith("_")}
    assert "q:delta" in tagged and "q:zeta" not in tagged  # beyond 22 characters
    assert {f for f in tagged if f.startswith(("u:turn", "a:turn"))} == {"a:turn8", "u:turn9"}


def test_round_trip_gives_identical_scores(trained_artefact, tmp_path):
    _, report = trained_artefact
    model = load_difficulty_model(report.artefact_path)
    copy = load_difficulty_model(save_difficulty_model(model, tmp_path))
    assert copy.model_version == model.model_version == report.model_version
    assert (copy.adapter, copy.adapter_version, copy.threshold) == (model.adapter, model.adapter_version,
                                                                    model.threshold)
    for request in synthetic_requests(200, seed=99):
        assert copy.probability(request.messages) == model.probability(request.messages)
    assert load_difficulty_model(tmp_path).model_version == model.model_version  # the folder also works


def test_probability_is_the_logistic_of_the_logit(trained_artefact):
    model = load_difficulty_model(trained_artefact[1].artefact_path)
    messages = synthetic_requests(1, seed=5)[0].messages
    assert model.probability(messages) == pytest.approx(1 / (1 + math.exp(-model.logit(messages))))
    assert 0.0 < model.probability((Message("user", "zzz unseen qqq"),)) < 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="something-else"), "not a protege difficulty artefact"),
        (lambda d: d.update(format_version=99), "format version"),
        (lambda d: d["weights"].update({"q:card": [1.0, 99.0]}), "do not match"),
        (lambda d: d.pop("bias"), "malformed"),
    ],
)
def test_broken_artefacts_are_refused(trained_artefact, tmp_path, edit, message):
    document = json.loads(trained_artefact[1].artefact_path.read_text())
    edit(document)
    path = tmp_path / "difficulty.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DifficultyArtefactError, match=message):
        load_difficulty_model(path)


def test_policy_decides_auto_requests_by_threshold(trained_artefact, make_features):
    model = load_difficulty_model(trained_artefact[1].artefact_path)
    easy = make_features(("user", "check my balance please"))
    hard = make_features(("user", "court probate estate of the deceased, power of attorney garnishment"))
    p_easy, p_hard = model.probability(easy.messages), model.probability(hard.messages)
    assert p_easy < p_hard
    policy = DifficultyPolicy(model, threshold=(p_easy + p_hard) / 2)
    to_student, to_teacher = policy.decide(easy), policy.decide(hard)
    assert to_student is not None and (to_student.target, to_student.reason, to_student.score) == (
        "student", "student", p_easy)
    assert to_teacher is not None and (to_teacher.target, to_teacher.reason, to_teacher.score) == (
        "teacher", "difficulty", p_hard)


def test_policy_leaves_explicit_and_other_adapters_alone(trained_artefact, make_features):
    policy = DifficultyPolicy(load_difficulty_model(trained_artefact[1].artefact_path), threshold=0.0)
    assert policy.decide(make_features(requested_model="student")) is None
    assert policy.decide(make_features(requested_model="teacher")) is None
    assert policy.decide(make_features(adapter="another")) is None
    assert policy.decide(make_features(adapter="support")).target == "teacher"


def test_settings_threshold_overrides_the_calibrated_one(trained_artefact, settings):
    path = str(trained_artefact[1].artefact_path)
    assert difficulty_policy_from_settings(settings(difficulty_model=path)).threshold == trained_artefact[1].threshold
    assert difficulty_policy_from_settings(settings(difficulty_model=path, difficulty_threshold=0.9)).threshold == 0.9
