"""BANKING77 for the closed loop: rows, the prompt the simulated users send, the label schema,
and the teacher stand-in.

BANKING77 (Casanueva et al., 2020, arXiv:2003.04807), CC BY 4.0: 13,083 online-banking customer
messages, 77 intents. The teacher stand-in is honest about what it is: an OpenAI-compatible
server that answers each training/test message with the data set's own label, wrong on purpose
at a configurable rate. It is reached through litellm like any real teacher.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.mock_openai import MockOpenAI

SYSTEM_PROMPT = "Classify the customer's online-banking message. Answer with its intent label."
TEACHER_MODEL = "banking77-label-oracle"


@dataclass(frozen=True)
class Row:
    text: str
    label: str


def default_data_dir(repo_root: Path) -> Path:
    return repo_root.parent / "shared" / "data" / "banking77"


def load_split(data_dir: Path, split: str) -> list[Row]:
    with open(Path(data_dir) / f"{split}.csv", newline="") as handle:
        return [Row(r["text"].strip(), r["category"].strip()) for r in csv.DictReader(handle)]


def load_labels(data_dir: Path) -> list[str]:
    return json.loads((Path(data_dir) / "categories.json").read_text())


def messages_for(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def response_format(labels: list[str]) -> dict[str, Any]:
    """OpenAI structured output: an object whose one field is one of the labels. vLLM enforces it
    (structured outputs), so the student can never invent a label."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "intent",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"intent": {"type": "string", "enum": labels}},
                "required": ["intent"],
                "additionalProperties": False,
            },
        },
    }


def answer_json(label: str) -> str:
    return json.dumps({"intent": label})


def parse_label(answer: str) -> str | None:
    try:
        data = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return None
    return data.get("intent") if isinstance(data, dict) else None


class LabelOracle:
    """answer_fn for MockOpenAI: the gold label of the last user message, except that with
    probability ``error_rate`` it answers a different (random) label."""

    def __init__(self, rows: list[Row], labels: list[str], error_rate: float = 0.0, seed: int = 0) -> None:
        self.gold = {row.text: row.label for row in rows}
        self.labels = labels
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.unknown = 0

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        text = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        label = self.gold.get(str(text).strip())
        if label is None:
            self.unknown += 1
            label = self.labels[0]
        if self.error_rate and self.rng.random() < self.error_rate:
            label = self.rng.choice([other for other in self.labels if other != label])
        return answer_json(label)


def teacher_stand_in(rows: list[Row], labels: list[str], error_rate: float = 0.0, seed: int = 0) -> MockOpenAI:
    return MockOpenAI(answer_fn=LabelOracle(rows, labels, error_rate, seed), model=TEACHER_MODEL)
