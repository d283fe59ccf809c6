"""Quality rules, near-duplicate grouping and the per-caller cap, one by one."""

from __future__ import annotations

import random

import pytest

from feedback.filters import (
    Ending,
    LabelSetValidator,
    LengthRule,
    RegexValidator,
    cap_per_caller,
    effective_cap,
    failed_validator,
    is_refusal,
    is_truncated,
)
from feedback.near_dup import jaccard, near_duplicate_groups, normalize, shingles, text_key


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I’m sorry, I cannot assist with this request.",
        "I cannot help with that request.",
        "Sorry, I can't do that.",
        "As an AI language model, I do not have opinions. But here is a fact.",
        "Unfortunately, I am unable to provide that information.",
    ],
)
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Paris is the capital of France.",
        "I can't believe how easy this is: just run `make`.",
        "Sorry for the wait! Here is the answer: 42.",
        "I'm sorry to hear that. " + "Here is how to fix it step by step. " * 30,
    ],
)
def test_answers_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_truncation_signals() -> None:
    assert is_truncated("fine text", Ending(finish_reason="length"))
    assert is_truncated("fine text", Ending(completion_tokens=64, max_tokens=64))
    assert is_truncated("here:\n```python\nprint(1)\n", Ending())
    assert not is_truncated("here:\n```python\nprint(1)\n```", Ending(completion_tokens=10, max_tokens=64))
    assert not is_truncated("fine text", Ending(finish_reason="stop"))


def test_length_rule() -> None:
    rule = LengthRule(min_completion_chars=3, max_completion_chars=10, max_total_chars=30)
    assert rule.allows(prompt_chars=5, completion="abcdef")
    assert not rule.allows(prompt_chars=5, completion="ab")
    assert not rule.allows(prompt_chars=5, completion="a" * 11)
    assert not rule.allows(prompt_chars=25, completion="abcdef")


def test_validators() -> None:
    labels = LabelSetValidator.of(["positive", "negative"])
    assert labels("Positive.") and labels(" negative ")
    assert not labels("maybe")
    digits = RegexValidator(r"\d+", name="digits")
    assert failed_validator([labels], "neutral") == "label_set"
    assert failed_validator([digits], "12") is None
    assert failed_validator([digits], "twelve") == "digits"


def test_normalize_and_keys() -> None:
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert text_key("Hello, world") == text_key("hello world")
    assert text_key("hello world") != text_key("hello there")


def test_near_duplicates_group_and_distinct_texts_do_not() -> None:
    base = "please summarise the attached quarterly report for the board meeting on friday"
    texts = [
        base,
        "a totally different question about the weather in lisbon next week",
        base + " thanks",
        base.upper() + "!",
        "summarise the quarterly report",
    ]
    groups = near_duplicate_groups(texts, threshold=0.8)
    assert groups[0] == groups[2] == groups[3] == 0
    assert groups[1] == 1
    assert groups[4] == 4


def test_near_duplicates_find_most_pairs_above_threshold() -> None:
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(2000)]
    originals = [" ".join(rng.choice(vocabulary) for _ in range(40)) for _ in range(60)]
    edited = []
    for text in originals:
        words = text.split()
        words[rng.randrange(len(words))] = "changed"
        edited.append(" ".join(words))
    texts = originals + edited
    assert all(jaccard(shingles(a), shingles(b)) >= 0.85 for a, b in zip(originals, edited, strict=True))
    groups = near_duplicate_groups(texts, threshold=0.85)
    paired = sum(groups[i] == groups[i + 60] for i in range(60))
    assert paired >= 58  # LSH is probabilistic; > 99% expected
    assert len(set(groups)) <= 62  # and unrelated texts are not merged


def test_effective_cap_relaxes_below_one_over_cap_callers() -> None:
    assert effective_cap(0.2, 10) == 0.2
    assert effective_cap(0.2, 2) == 0.5
    assert effective_cap(0.2, 1) == 1.0


def test_cap_per_caller_limits_the_flooder_and_keeps_everyone_else() -> None:
    rows = [("mallory", i) for i in range(100)] + [(f"honest{c}", i) for c in range(5) for i in range(8)]
    kept = cap_per_caller(rows, lambda row: row[0], share=0.2)
    flooder = sum(1 for caller, _ in kept if caller == "mallory")
    assert flooder / len(kept) <= 0.2
    assert len(kept) - flooder == 40  # no honest row lost
    assert flooder == 10  # the largest k with k <= 0.2 * (40 + k)
    assert kept[:flooder] == [("mallory", i) for i in range(flooder)]  # earlier rows win


def test_a_set_filled_by_one_caller_alone_is_emptied_by_a_real_cap() -> None:
    rows = [("mallory", i) for i in range(30)]
    assert cap_per_caller(rows, lambda row: row[0], share=0.2) == []
    assert cap_per_caller(rows, lambda row: row[0], share=1.0) == rows


@pytest.mark.parametrize("seed", range(5))
def test_cap_holds_for_random_mixes(seed: int) -> None:
    rng = random.Random(seed)
    rows = [(f"c{rng.randrange(12)}", i) for i in range(rng.randrange(50, 400))]
    callers = len({caller for caller, _ in rows})
    share = effective_cap(0.15, callers)
    kept = cap_per_caller(rows, lambda row: row[0], share=share)
    counts: dict[str, int] = {}
    for caller, _ in kept:
        counts[caller] = counts.get(caller, 0) + 1
    assert max(counts.values()) <= share * len(kept) + 1e-9
    assert set(counts) == {caller for caller, _ in rows}  # an attainable cap never silences a caller
