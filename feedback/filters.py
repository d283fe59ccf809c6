"""Quality rules for training rows: each says why a row must not teach the student.

Every rule here is a pure function of the row's text (plus what the log recorded about how the
answer ended); the builder applies them in order and counts, per rule, what each removed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from feedback.near_dup import normalize

Message = dict[str, str]

# A judge scores an answer to a conversation in [0, 1] (e.g. the teacher asked to grade it).
Judge = Callable[[list[Message], str], float]

_REFUSAL_START_RE = re.compile(
    r"^\W*(?:"
    r"(?:i'?m|i am) (?:so |very |really )?sorry,? (?:but )?(?:i|we) (?:can(?:no|')t|am unable|won'?t|am not able)"
    r"|(?:i|we) (?:can(?:no|')t|won'?t|am unable to|am not able to|must decline to) "
    r"(?:help|assist|comply|provide|do that|answer|fulfil|fulfill|support)"
    r"|sorry,? (?:but )?i (?:can(?:no|')t|won'?t)"
    r"|unfortunately,? i (?:can(?:no|')t|am unable)"
    r")",
    re.IGNORECASE,
)
_REFUSAL_ANYWHERE_RE = re.compile(
    r"\bas an ai(?: language)? model\b|\bi'?m (?:just )?an ai(?: assistant)?,? (?:and|so) i (?:can(?:no|')t|don'?t)",
    re.IGNORECASE,
)
# Refusals are short; a long answer that opens politely and then delivers is not one.
_REFUSAL_MAX_CHARS = 600


def is_refusal(text: str) -> bool:
    """A canned refusal or an 'as an AI model' disclaimer: never something to teach."""
    flat = text.replace("\u2019", "'").strip()
    if _REFUSAL_ANYWHERE_RE.search(flat):
        return True
    return len(flat) <= _REFUSAL_MAX_CHARS and bool(_REFUSAL_START_RE.search(flat))


@dataclass(frozen=True)
class Ending:
    """What the log knows about how an answer ended (all optional: older rows lack them)."""

    finish_reason: str | None = None
    completion_tokens: int | None = None
    max_tokens: int | None = None


def is_truncated(text: str, ending: Ending) -> bool:
    """Cut off by the token limit: recorded finish_reason, tokens at the limit, or an open fence."""
    if ending.finish_reason == "length":
        return True
    tokens, limit = ending.completion_tokens, ending.max_tokens
    if tokens is not None and limit is not None and tokens >= limit:
        return True
    # An odd number of ``` fences: the answer stopped inside a code block.
    return text.count("```") % 2 == 1


def is_empty(text: str | None) -> bool:
    return text is None or not text.strip()


@dataclass(frozen=True)
class LengthRule:
    """Bounds on the characters of an answer and of conversation + answer.

    ``max_total_chars`` defaults to ~4 characters per token of a 2048-token student context:
    longer rows would be truncated by the trainer and teach answers that stop mid-way.
    """

    min_completion_chars: int = 1
    max_completion_chars: int = 6000
    max_total_chars: int = 8192

    def allows(self, prompt_chars: int, completion: str) -> bool:
        size = len(completion.strip())
        if size < self.min_completion_chars or size > self.max_completion_chars:
            return False
        return prompt_chars + size <= self.max_total_chars


class Validator(Protocol):
    """A task rule an answer must satisfy; ``name`` labels its count in the manifest."""

    @property
    def name(self) -> str: ...

    def __call__(self, completion: str) -> bool: ...


@dataclass(frozen=True)
class LabelSetValidator:
    """Classification tasks: the answer must be exactly one of the labels (case, space and
    punctuation insensitive, so 'Positive.' counts as 'positive')."""

    labels: frozenset[str]
    name: str = "label_set"

    @classmethod
    def of(cls, labels: Iterable[str], name: str = "label_set") -> LabelSetValidator:
        return cls(frozenset(normalize(label) for label in labels), name)

    def __call__(self, completion: str) -> bool:
        return normalize(completion) in self.labels


@dataclass(frozen=True)
class RegexValidator:
    """The whole answer must match ``pattern`` (e.g. a date, an id, a JSON-ish shape)."""

    pattern: str
    name: str = "regex"

    def __call__(self, completion: str) -> bool:
        return re.fullmatch(self.pattern, completion.strip(), re.DOTALL) is not None


def failed_validator(validators: Sequence[Validator], completion: str) -> str | None:
    """The name of the first validator ``completion`` fails, or None."""
    for validator in validators:
        if not validator(completion):
            return validator.name
    return None


# -- per-caller cap --------------------------------------------------------------------------

T = TypeVar("T")


def effective_cap(cap: float, callers: int) -> float:
    """The share one caller may hold, given how many callers contributed to the build. Below
    ``1/cap`` callers the cap cannot be met by anyone (a lone caller always holds 100%), so it
    relaxes to an equal share: a single-user gateway still gets its data."""
    if callers <= 0:
        return cap
    return max(cap, 1.0 / callers)


def cap_per_caller(rows: Sequence[T], caller_of: Callable[[T], Hashable], share: float) -> list[T]:
    """Keep, in order, at most ``k`` rows per caller, with ``k`` the largest number such that
    no caller holds more than ``share`` of what is kept. Rows earlier in ``rows`` win.

    ``share`` below 1/(callers in ``rows``) can only be met by keeping nothing: a set that one
    caller alone filled stays empty, which is the point when other callers exist elsewhere.
    """
    counts = Counter(caller_of(row) for row in rows)
    limit = _largest_fair_limit(sorted(counts.values()), share)
    taken: Counter[Hashable] = Counter()
    kept = []
    for row in rows:
        caller = caller_of(row)
        if taken[caller] < limit:
            taken[caller] += 1
            kept.append(row)
    return kept


def _largest_fair_limit(counts: list[int], share: float) -> int:
    """Largest k with min(max_count, k) <= share * sum(min(n, k)).

    share * total(k) - k is concave in k and 0 at k = 0, so the feasible k form an interval
    starting at 0 and bisection finds its end.
    """
    if not counts:
        return 0

    def fair(k: int) -> bool:
        kept_total = sum(min(n, k) for n in counts)
        return min(counts[-1], k) <= share * kept_total + 1e-9

    low, high = 0, counts[-1]
    while low < high:
        middle = (low + high + 1) // 2
        if fair(middle):
            low = middle
        else:
            high = middle - 1
    return low
