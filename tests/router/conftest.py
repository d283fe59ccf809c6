"""Router fixtures: request builders, a seeded synthetic traffic generator, a seeded SQLite log.

The synthetic traffic is built to look like what the router meets: conversations on topics of
different difficulty for the student, a system prompt, and sometimes an earlier exchange (which
makes the student worse, as context distracts a small model). Whether the student's answer is
bad is drawn from a known probability, so tests can check what was learned against the truth.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from feedback.store import open_database
from gateway.settings import RouterSettings
from router.types import Message, RequestFeatures

REPO_ROOT = Path(__file__).resolve().parents[2]

FILLER = "please can you i my the a to for is it on with this that about me we our help need".split()
# topic -> (difficulty logit, its words)
TOPICS: dict[str, tuple[float, list[str]]] = {
    "balance": (-2.5, "balance account check current available funds statement savings amount show".split()),
    "card_arrival": (-2.0, "card arrive delivery post mail arrived waiting new shipped tracking".split()),
    "pin": (-1.5, "pin code reset forgot change unlock blocked atm digits number".split()),
    "transfer": (-0.5, "transfer send money beneficiary sepa pending recipient wire iban arrived".split()),
    "exchange": (0.0, "exchange rate currency fee euro dollar pound conversion foreign abroad".split()),
    "dispute": (1.0, "dispute charge merchant refund twice unauthorised chargeback claim reversed seller".split()),
    "crypto": (1.5, "crypto bitcoin wallet ethereum token exchange blockchain withdrawal stake coins".split()),
    "legal": (2.5, "legal court inheritance probate deceased estate power attorney garnishment subpoena".split()),
}
TOPIC_NAMES = sorted(TOPICS)
CONTEXT_PENALTY = 1.0  # logit added when an earlier exchange precedes the question


@dataclass(frozen=True)
class SyntheticRequest:
    messages: tuple[Message, ...]
    p_bad: float
    bad: bool


def _sentence(rng: np.random.Generator, topic: str) -> str:
    words = TOPICS[topic][1]
    length = int(rng.integers(5, 14))
    picks = [
        words[int(rng.integers(len(words)))] if rng.random() < 0.55 else FILLER[int(rng.integers(len(FILLER)))]
        for _ in range(length)
    ]
    return " ".join(picks) + "?"


def synthetic_requests(count: int, seed: int) -> list[SyntheticRequest]:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        topic = TOPIC_NAMES[int(rng.integers(len(TOPIC_NAMES)))]
        messages: tuple[Message, ...] = (Message("system", "You are the bank's assistant. Be brief."),)
        with_context = rng.random() < 0.3
        if with_context:
            earlier = TOPIC_NAMES[int(rng.integers(len(TOPIC_NAMES)))]
            messages += (Message("user", _sentence(rng, earlier)), Message("assistant", f"That is about {earlier}."))
        messages += (Message("user", _sentence(rng, topic)),)
        logit = TOPICS[topic][0] + CONTEXT_PENALTY * with_context + float(rng.normal(0.0, 0.5))
        p_bad = 1.0 / (1.0 + math.exp(-logit))
        requests.append(SyntheticRequest(messages, p_bad, bool(rng.random() < p_bad)))
    return requests


def messages_json(messages: Sequence[Message]) -> str:
    return json.dumps([{"role": m.role, "content": m.content} for m in messages])


def write_log(db_path: Path, requests: Sequence[SyntheticRequest], seed: int, labelled_share: float = 0.6) -> None:
    """Log student-served `auto` traffic; a share of it labelled by shadow samples or feedback."""
    rng = np.random.default_rng(seed)
    db = open_database(db_path)
    rows, shadow, feedback = [], [], []
    for index, request in enumerate(requests):
        request_id, created_at = f"r{index:06d}", 1_700_000_000.0 + index
        student_answer = "wrong" if request.bad else "right"
        rows.append(
            {
                "id": request_id, "created_at": created_at, "caller": "tests", "requested_model": "auto",
                "route": "student", "reason": "student", "adapter": "support",
                "adapter_version": f"v{1 + index // 1000}",
                "messages": messages_json(request.messages), "answer": student_answer, "status": "ok",
            }
        )
        draw = rng.random()
        if draw < labelled_share / 2:
            shadow.append({"request_id": request_id, "teacher_answer": "Right ", "created_at": created_at})
        elif draw < labelled_share:
            feedback.append({"request_id": request_id, "caller": "tests", "rating": -1.0 if request.bad else 1.0,
                             "created_at": created_at, "updated_at": created_at})
    db["requests"].insert_all(rows)
    db["shadow_labels"].insert_all(shadow)
    db["feedback"].insert_all(feedback)
    db.conn.close()


@pytest.fixture
def make_features() -> Callable[..., RequestFeatures]:
    def build(
        *turns: tuple[str, str],
        requested_model: str = "auto",
        adapter: str | None = None,
        estimated_tokens: int = 50,
        has_tools: bool = False,
        caller: str = "anonymous",
        route_header: str | None = None,
        teacher_available: bool = True,
        stream: bool = False,
        response_format: str | None = None,
        json_schema: dict | None = None,
        label_set: frozenset[str] | None = None,
        student_calibrated: bool | None = None,
    ) -> RequestFeatures:
        messages = tuple(Message(role, content) for role, content in turns) or (Message("user", "hello"),)
        return RequestFeatures(
            requested_model=requested_model, adapter=adapter, messages=messages, estimated_tokens=estimated_tokens,
            has_tools=has_tools, response_format=response_format, caller=caller, route_header=route_header,
            teacher_available=teacher_available, stream=stream, json_schema=json_schema, label_set=label_set,
            student_calibrated=student_calibrated,
        )

    return build


@pytest.fixture
def settings() -> Callable[..., RouterSettings]:
    def build(**values: object) -> RouterSettings:
        return RouterSettings.model_validate(values)

    return build


@pytest.fixture(scope="session")
def trained_artefact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One difficulty model trained on a seeded synthetic log (30% teacher share), for many tests."""
    from router.train import train_difficulty

    home = tmp_path_factory.mktemp("router")
    db_path = home / "log.db"
    write_log(db_path, synthetic_requests(12_000, seed=1), seed=2)
    report = train_difficulty(db_path, home / "artefact", target_teacher_share=0.3, target_quality=None,
                              adapter="support")
    return db_path, report


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    configured = os.environ.get("PROTEGE_BANKING77")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data" / "banking77"
    if not (path / "train.csv").exists():
        pytest.skip(f"BANKING77 not found at {path} (set PROTEGE_BANKING77)")
    return path
