"""Which trainer a retrain cycle runs: KTO alone when only thumbs arrived, SFT (+DPO) when there
are enough new SFT rows; with fake trainers and the fake gateway of test_retrain."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from feedback.store import open_database
from tests.conftest import make_settings
from tests.feedback.conftest import LogSeed
from tests.unit.test_retrain import LABELS, FakeGateway, fake_trainer, runs, truth
from trainer.config import KTORunConfig, TrainResult
from trainer.kto import balanced_weights, loss_weights
from trainer.retrain import Cycle, RetrainOptions

OPTIONS = RetrainOptions(task="intents", min_new_examples=32, kto_min_rows=16, dpo=None)


def seed_thumbs(db_path: Path, up: int, down: int, start: int = 0) -> None:
    """Student answers rated up (right label) or down (wrong label), with no corrections: the
    data gives KTO rows, and SFT rows only from the thumbs up."""
    db = open_database(db_path)
    seed = LogSeed(db)
    for i in range(start, start + up + down):
        label = LABELS[i % len(LABELS)]
        liked = i - start < up
        rid = seed.request(f"t{i}", f"question number {i} about #{label}#",
                           answer=label if liked else f"no idea, sorry ({i})", adapter="intents",
                           caller=f"user{i % 7}", created_at=time.time() - 1000 + i)
        seed.feedback(rid, 1 if liked else -1)
    db.conn.close()


def fake_kto(calls: list[Any]):  # noqa: ANN201
    def train(base_dir: Path, rows: list[dict], out_dir: Path, config: KTORunConfig,
              init: Path | None) -> TrainResult:
        calls.append((rows, init, config))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adapter_config.json").write_text("{}")
        return TrainResult(out_dir, len(rows), 1.0, float(len(rows)), 0, 1.0, 1, 0.4)

    return train


class Trainers:
    """A cycle's fake trainers and what each was called with."""

    def __init__(self) -> None:
        self.sft: list[Any] = []
        self.kto: list[Any] = []

    def cycle(self, settings, gateway: FakeGateway, options: RetrainOptions = OPTIONS) -> Cycle:  # noqa: ANN001
        return Cycle(settings, options, gateway, train_sft=fake_trainer(self.sft),  # type: ignore[arg-type]
                     train_kto=fake_kto(self.kto))


@pytest.fixture
def settings(tmp_path):  # noqa: ANN001, ANN201
    return make_settings(tmp_path / "home")


def test_only_thumbs_runs_kto_alone_on_a_fresh_lora(settings) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=12, down=40)
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    trainers = Trainers()
    report = trainers.cycle(settings, gateway).run()
    assert trainers.sft == []
    [(rows, init, config)] = trainers.kto
    assert init is None  # served by base@v0: a fresh (zero) LoRA, the same policy
    assert config == KTORunConfig()
    labels = [row["label"] for row in rows]
    assert 16 <= len(labels) <= 52 and True in labels and False in labels
    assert all(set(row) == {"prompt", "completion", "label"} for row in rows)
    assert report.method == "kto" and report.candidate == "intents@v1"
    assert report.status == "promoted", report.reason  # evaluated and decided as usual
    assert gateway.promoted == ["intents@v1"]
    assert "trained by kto" in report.summary()
    [run] = runs(settings)
    assert json.loads(run["hyperparameters"])["method"] == "kto"
    assert json.loads(run["hyperparameters"])["kto"]["beta"] == 0.1


def test_kto_continues_the_served_adapter_even_when_sft_starts_from_base(settings) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=12, down=40)
    gateway = FakeGateway({"intents@v1": truth, "intents@v2": truth})
    gateway.alias, gateway.registered = "intents@v1", ["intents@v1"]
    trainers = Trainers()
    report = trainers.cycle(settings, gateway, replace(OPTIONS, init_from="base")).run()
    assert report.method == "kto" and report.parent == "intents@v1"
    assert trainers.kto[0][1] == Path("/adapters/intents@v1")


def test_enough_sft_rows_train_sft_not_kto(settings) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=60, down=40)  # thumbs up are SFT rows too
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    trainers = Trainers()
    report = trainers.cycle(settings, gateway).run()
    assert trainers.kto == []
    [(count, init, learning_rate)] = trainers.sft
    assert count >= 32 and init is None
    assert learning_rate == OPTIONS.sft.learning_rate  # a fresh LoRA: the continue rate does not apply
    assert report.method == "sft"
    assert json.loads(runs(settings)[0]["hyperparameters"])["method"] == "sft"


@pytest.mark.parametrize(("up", "down"), [
    (0, 40),  # thumbs down only: nothing to weigh them against
    (20, 0),  # thumbs up only (too few for SFT)
    (5, 8),  # both kinds, fewer than kto_min_rows
])
def test_too_few_or_one_sided_thumbs_skip(settings, up: int, down: int) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=up, down=down)
    trainers = Trainers()
    report = trainers.cycle(settings, FakeGateway({})).run()
    assert report.status == "skipped" and report.method is None
    assert "new training rows" in report.reason and "new thumbs" in report.reason
    assert trainers.sft == [] and trainers.kto == []


def test_kto_can_be_switched_off(settings) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=12, down=40)
    trainers = Trainers()
    report = trainers.cycle(settings, FakeGateway({}), replace(OPTIONS, kto=None)).run()
    assert report.status == "skipped" and "thumbs" not in report.reason
    assert trainers.kto == []


def test_thumbs_already_used_do_not_retrigger_kto(settings) -> None:  # noqa: ANN001
    seed_thumbs(settings.db_path, up=12, down=40)
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    trainers = Trainers()
    trainers.cycle(settings, gateway).run()
    second = trainers.cycle(settings, gateway).run()
    assert second.status == "skipped" and "0 up / 0 down" in second.reason
    assert len(trainers.kto) == 1


@pytest.mark.parametrize(("up", "down", "weights"), [
    (10, 10, (1.0, 1.0)),
    (10, 40, (4.0, 1.0)),  # rare thumbs up weigh more
    (30, 10, (1.0, 3.0)),
])
def test_loss_weights_balance_the_two_sides(up: int, down: int, weights: tuple[float, float]) -> None:
    assert balanced_weights(up, down) == weights
    desirable, undesirable = weights
    assert 1 <= desirable * up / (undesirable * down) <= 4 / 3  # the KTO paper's range (eq. 8)


def test_configured_loss_weights_win_and_one_sided_data_is_refused() -> None:
    labels = [True] * 10 + [False] * 40
    assert loss_weights(KTORunConfig(), labels) == (4.0, 1.0)
    assert loss_weights(KTORunConfig(desirable_weight=2.0), labels) == (2.0, 1.0)
    with pytest.raises(ValueError, match="thumbs up and thumbs down"):
        loss_weights(KTORunConfig(), [False] * 5)
