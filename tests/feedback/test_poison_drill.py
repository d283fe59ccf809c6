"""The poison drill's harness (``bench.poison_drill``) in its quick sizes, with a memorising fake
student instead of torch: the real log, builder and gate run; training is the script's job."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from bench.banking77 import Row, answer_json
from bench.poison_drill import (
    POISONER,
    QUICK,
    SFT_TRAIN,
    DrillData,
    PromptRow,
    config_from,
    format_table,
    parse_args,
    plan_traffic,
    poison_plan,
    read_jsonl,
    run_drill,
)
from gateway.settings import load_settings

WORDS = ("card", "transfer", "top", "up", "pending", "refund", "fee", "cash", "atm", "pin", "blocked", "lost",
         "stolen", "exchange", "rate", "limit", "verify", "identity", "account", "closed", "charge", "salary",
         "wallet", "apple", "google", "virtual", "physical", "arrive", "declined", "failed")


def synthetic_data(rows: int = 300, labels: int = 10) -> DrillData:
    """Distinct messages (random word sequences: no two are near-duplicates) with ten intents."""
    rng = random.Random(7)
    names = [f"intent_{k}" for k in range(labels)]
    texts = {" ".join(rng.choice(WORDS) for _ in range(9)) for _ in range(rows)}
    data = [Row(text, names[i % labels]) for i, text in enumerate(sorted(texts))]
    # The test split repeats the training split: a memorising fake then shows what it was taught.
    return DrillData(train=data, test=data, labels=names)


def user_text(prompt: list[dict[str, str]]) -> str:
    return next(m["content"] for m in prompt if m["role"] == "user")


class MemorisingStudent:
    """Answers a prompt it was trained on with the taught completion, anything else with nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, int | None]] = []

    def train(self, rows: list[PromptRow], out_dir: Path, budget_s: float | None, max_steps: int | None) -> int:
        self.calls.append((budget_s, max_steps))
        out_dir.mkdir(parents=True)
        memory = {user_text(r["prompt"]): r["completion"][-1]["content"] for r in rows}
        (out_dir / "memory.json").write_text(json.dumps(memory))
        return max_steps or math.ceil(len(rows) / 16)

    def answers(self, adapter_dir: Path, prompts: list[list[dict[str, str]]]) -> list[str]:
        memory = json.loads((adapter_dir / "memory.json").read_text())
        return [memory.get(user_text(p), "") for p in prompts]

    def accuracy(self, adapter_dir: Path, rows: list[PromptRow], labels: list[str]) -> float:
        answers = self.answers(adapter_dir, [r["prompt"] for r in rows])
        return sum(a == label for a, label in zip(answers, labels, strict=True)) / len(rows)


def test_quick_flag_shrinks_the_sizes_and_keeps_the_rates() -> None:
    config = config_from(parse_args(["--quick", "--rates", "0.01,0.05", "--threads", "1"]))
    assert (config.train_requests, config.eval_rows, config.budget_s) == (200, 20, 5.0)
    assert (config.rates, config.threads) == ((0.01, 0.05), 1)


def test_poison_plan_is_nested_and_flips_to_the_neighbour_label() -> None:
    data = synthetic_data()
    traffic = plan_traffic(data.train, data.labels, QUICK)
    small, large = (poison_plan(traffic, data.labels, rate, seed=0) for rate in (0.01, 0.05))
    assert (len(small), len(large)) == (2, 10)  # of 200 requests
    assert small.items() <= large.items()
    by_id = {r.id: r for r in traffic}
    for request_id, wrong in large.items():
        request = by_id[request_id]
        assert request.caller == POISONER
        assert wrong == data.labels[(data.labels.index(request.label) + 1) % len(data.labels)]


def test_by_default_no_poisoned_correction_reaches_training(tmp_path: Path) -> None:
    # Every poisoned correction contradicts the teacher's own answer (served or shadow) to that
    # request: with trainer.corrections_against_teacher = "drop" none is trained or scored on.
    data = synthetic_data()
    settings = load_settings(overrides={"home": str(tmp_path / "home")}, environ={})
    results = run_drill(QUICK, data, settings, MemorisingStudent(), tmp_path / "work")
    assert [r.poisoned_in_log for r in results] == [0, 1, 2, 10]
    assert [(r.poisoned_in_train, r.poisoned_in_eval) for r in results] == [(0, 0)] * 4
    assert [r.accuracy for r in results[1:]] == [results[0].accuracy] * 3
    manifest = json.loads((Path(results[-1].data_dir) / "manifest.json").read_text())
    assert manifest["requests"]["correction_overruled_by_teacher"] == 10


def test_quick_drill_counts_the_poison_that_reaches_training_and_gates_it(tmp_path: Path) -> None:
    # With corrections allowed to overrule the teacher, the poison gets in: the cap and the gate
    # are what is left, and the drill measures them.
    data = synthetic_data()
    settings = load_settings(overrides={"home": str(tmp_path / "home"),
                                        "trainer": {"corrections_against_teacher": "keep"}}, environ={})
    student = MemorisingStudent()

    results = run_drill(QUICK, data, settings, student, tmp_path / "work")

    assert [r.rate for r in results] == [0.0, 0.005, 0.01, 0.05]
    assert [r.poisoned_in_log for r in results] == [0, 1, 2, 10]
    # The clean run trains on the time budget; every poisoned run then takes its step count.
    clean_steps = results[0].steps
    assert student.calls == [(QUICK.budget_s, None)] + [(None, clean_steps)] * 3
    gold = {r.text: answer_json(r.label) for r in data.train}
    for result in results:
        # Independent of provenance: a training row whose completion is not the gold label is poison
        # (every clean source in this traffic, teacher or shadow, answers the gold label).
        rows = read_jsonl(Path(result.data_dir) / SFT_TRAIN)
        wrong = sum(r["completion"][-1]["content"] != gold[user_text(r["prompt"])] for r in rows)
        assert result.poisoned_in_train == wrong
        assert result.poisoned_in_train + result.poisoned_in_eval <= result.poisoned_in_log
        # The cap holds the flooding poisoner (30% of the traffic) to its share of the file.
        assert result.poisoner_train_share <= settings.trainer.per_caller_cap + 1e-9
    assert results[-1].poisoned_in_train > 0
    assert results[0].gate is None
    for result in results[1:]:
        # The memoriser knows no held-out prompt: the candidate cannot beat the clean adapter there.
        assert result.gate is not None and not result.gate.promoted
        assert "does not beat" in result.gate.reason
        assert result.gate.scores["candidate_heldout"]["rows"] > 0
        assert result.holds(results[0].accuracy)
    table = format_table(results, QUICK.eval_rows)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(results)  # header + runs
    assert "| 5% | 10 |" in table and "rejected: held-out accuracy" in table
