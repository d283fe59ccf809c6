"""Turn a conversation into the sparse features the learned difficulty model reads.

One function builds features for training and for serving, so the two can never disagree.
Everything here is plain Python (no numpy): the gateway's decision path must not need the
``router`` extra, and a few hundred dict look-ups beat numpy's per-call overhead at this size.

The whole conversation counts, roles marked: the final user message gives word unigrams and
bigrams, earlier messages give word unigrams tagged with their role, and a few coarse structure
tokens say how long and how deep the conversation is. (Measured on the BANKING77 simulation:
the last message alone gives AUC 0.69, the whole conversation 0.75; character 3-5-grams of the
question added nothing, for 8x the training time and twice the decision time, so they are out.
docs/router.md has the numbers.) Each part is capped so the cost of a decision has a bound
whatever the caller sends; the caps are stored in the artefact, so a model is always served with
the features it was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from router.types import Message

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Role tags. "q" is the final user message (the question being answered now); any other user
# message is "u". Unknown roles share one tag rather than growing the vocabulary.
_ROLE_TAGS = {"system": "s", "developer": "s", "user": "u", "assistant": "a", "tool": "t"}


@dataclass(frozen=True)
class FeatureConfig:
    """Caps and n-gram ranges; saved with the artefact."""

    question_chars: int = 600  # the final user message: its first N characters
    context_messages: int = 4  # earlier messages considered: the last N before the question
    context_chars: int = 300  # of each earlier message: its first N characters

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, int]) -> FeatureConfig:
        return cls(**{name: int(value) for name, value in data.items()})


def conversation_features(messages: Sequence[Message], config: FeatureConfig) -> frozenset[str]:
    """The features present in the conversation.

    Presence, not counts: in a few hundred characters a repeat carries little, and a set lets
    the scorer do its work in C (set intersection, ``math.fsum``) instead of a Python loop.
    """
    question_at = _final_user_index(messages)
    question = messages[question_at].content if question_at is not None else ""
    context = messages[:question_at] if question_at is not None else messages
    # map() with bound methods keeps the per-token work in C: this runs on every decision.
    words = _question_words(question[: config.question_chars])
    for message in context[max(len(context) - config.context_messages, 0) :]:
        tag = _ROLE_TAGS.get(message.role, "o") + ":"
        words.update(map(tag.__add__, _TOKEN.findall(message.content[: config.context_chars].lower())))
    words.update(_structure_tokens(messages, question, question_at))
    return frozenset(words)


def _final_user_index(messages: Sequence[Message]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "user":
            return index
    return None


def _question_words(question: str) -> set[str]:
    tokens = _TOKEN.findall(question.lower())
    words = set(map("q:".__add__, tokens))
    words.update(map("q:".__add__, map(" ".join, zip(tokens, tokens[1:]))))
    return words


def _structure_tokens(messages: Sequence[Message], question: str, question_at: int | None) -> list[str]:
    # Log-ish buckets: the exact length carries little, the order of magnitude a lot.
    roles = {message.role for message in messages}
    return [
        "_turns:" + _bucket(len(messages)),
        "_question_len:" + _bucket(len(question)),
        "_context_len:" + _bucket(sum(len(m.content) for m in messages) - len(question)),
        "_system:" + ("yes" if "system" in roles or "developer" in roles else "no"),
        "_after_assistant:" + ("yes" if "assistant" in roles else "no"),
        "_question_last:" + ("yes" if question_at == len(messages) - 1 else "no"),
    ]


def _bucket(value: int) -> str:
    return str(max(value, 0).bit_length())

