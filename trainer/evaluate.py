"""Scoring an adapter the way it will be served: through the gateway, on vLLM, greedy.

Ground truth is the data set's completion (a correction, a label, a verified teacher answer);
an answer is right when it matches after normalisation (JSON answers compare as JSON).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    # Token log-probability statistics of the answer, as the gateway's cascade computes them
    # (router.cascade.logprob_stats); None when the server returned none.
    mean_logprob: float | None = None
    min_logprob: float | None = None


class ChatClient(Protocol):
    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int,
             response_format: dict[str, Any] | None = None) -> ChatAnswer: ...


@dataclass(frozen=True)
class ScoredRow:
    correct: bool
    mean_logprob: float | None
    min_logprob: float | None


@dataclass(frozen=True)
class EvalResult:
    model: str
    rows: int
    correct: int
    failed: int  # requests that errored (counted as wrong)
    # Per answered row, for calibrating the cascade threshold of the evaluated version.
    scored: tuple[ScoredRow, ...] = ()
    # Per input row, in input order: right or not (a failed request is False). Two results on the
    # same rows pair up by index (the retrain's regression check compares versions row by row).
    outcomes: tuple[bool, ...] = ()

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rows": self.rows, "correct": self.correct, "failed": self.failed,
                "accuracy": round(self.accuracy, 4)}


def normalise(text: str) -> Any:
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return _SPACES.sub(" ", stripped).strip(" .!\"'").lower()


def expected_answer(row: dict[str, Any]) -> str:
    completion = row["completion"]
    if isinstance(completion, list):
        return completion[-1]["content"]
    return str(completion)


def evaluate(client: ChatClient, model: str, rows: list[dict[str, Any]], *, max_tokens: int = 64,
             response_format: dict[str, Any] | None = None, concurrency: int = 8) -> EvalResult:
    """Accuracy of ``model`` (e.g. ``student:task@v3``) on prompt/completion rows."""

    def score(row: dict[str, Any]) -> ScoredRow | None:
        try:
            answer = client.chat(model, row["prompt"], max_tokens, response_format)
        except Exception:  # noqa: BLE001 - an erroring adapter scores zero on that row
            return None
        correct = normalise(answer.text) == normalise(expected_answer(row))
        return ScoredRow(correct, answer.mean_logprob, answer.min_logprob)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(score, rows))  # in input order
    scored = tuple(a for a in answers if a is not None)
    outcomes = tuple(a is not None and a.correct for a in answers)
    return EvalResult(model, len(rows), sum(outcomes), len(rows) - len(scored), scored, outcomes)
