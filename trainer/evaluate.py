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


class ChatClient(Protocol):
    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int,
             response_format: dict[str, Any] | None = None) -> str: ...


@dataclass(frozen=True)
class EvalResult:
    model: str
    rows: int
    correct: int
    failed: int  # requests that errored (counted as wrong)

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

    def score(row: dict[str, Any]) -> tuple[bool, bool]:
        try:
            answer = client.chat(model, row["prompt"], max_tokens, response_format)
        except Exception:  # noqa: BLE001 - an erroring adapter scores zero on that row
            return False, True
        return normalise(answer) == normalise(expected_answer(row)), False

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(score, rows))
    return EvalResult(model, len(rows), sum(ok for ok, _ in outcomes), sum(err for _, err in outcomes))
