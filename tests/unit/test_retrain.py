"""The retrain cycle with a fake gateway and a fake trainer: the decision rule, skipping on too
little data, promotion of a better candidate, rejection of a worse one, the lock, the record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from feedback.store import open_database
from tests.conftest import make_settings
from tests.feedback.conftest import LogSeed
from trainer.config import SFTRunConfig, TrainResult
from trainer.evaluate import ChatAnswer, EvalResult, ScoredRow, evaluate, normalise
from trainer.gateway_client import ServedAdapter
from trainer.retrain import (
    MIN_BASELINE_ROWS,
    Cycle,
    RetrainOptions,
    calibration_extra,
    cascade_threshold,
    eval_sample,
    judge,
    parse_every,
    retrain_lock,
    retrain_options,
    run_forever,
)

LABELS = ["card_arrival", "lost_card", "top_up_failed", "exchange_rate"]


class FakeGateway:
    """Implements the GatewayClient methods the cycle uses; each served version answers with a
    fixed policy (a function of the prompt)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers  # version -> callable(prompt messages) -> str
        self.alias: str | None = None
        self.registered: list[str] = []
        self.promoted: list[str] = []
        self.thresholds: dict[str, float | None] = {}
        self.confidence = lambda answer, messages: -0.1 if answer == truth(messages) else -2.0

    def current(self, task: str) -> ServedAdapter | None:
        if self.alias is None:
            return None
        return ServedAdapter(self.alias, task, f"/adapters/{self.alias}", "sha")

    def register(self, task: str, path: str) -> ServedAdapter:
        name = f"{task}@v{len(self.registered) + 1}"
        self.registered.append(name)
        return ServedAdapter(name, task, path, "sha")

    def promote(self, task: str, version: str) -> dict[str, Any]:
        self.promoted.append(version)
        self.alias = version
        return {"version": version}

    def calibrate(self, version: str, min_confidence: float | None) -> dict[str, Any]:
        self.thresholds[version] = min_confidence
        return {"name": version, "min_confidence": min_confidence}

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int,
             response_format: dict[str, Any] | None = None) -> ChatAnswer:
        version = model.removeprefix("student:")
        answer = self.answers[version](messages)
        confidence = self.confidence(answer, messages)
        return ChatAnswer(answer, confidence, confidence)


def fake_trainer(calls: list[Any]):  # noqa: ANN201
    def train(base_dir: Path, rows: list[dict], out_dir: Path, config: SFTRunConfig, init: Path | None) -> TrainResult:
        calls.append((len(rows), init, config.learning_rate))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adapter_config.json").write_text("{}")
        return TrainResult(out_dir, len(rows), 1.0, float(len(rows)), 10, 1.0, 1, 0.5)

    return train


def truth(messages: list[dict]) -> str:
    return messages[-1]["content"].split("#")[1]


def seed_labelled_traffic(db_path: Path, count: int) -> None:
    db = open_database(db_path)
    seed = LogSeed(db)
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        rid = seed.request(f"r{i}", f"message {i} #{label}#", answer="wrong_label", adapter="intents",
                           caller=f"user{i % 7}", created_at=time.time() - 1000 + i)
        seed.feedback(rid, -1, correction=label)
    db.conn.close()


@pytest.fixture
def settings(tmp_path):  # noqa: ANN001, ANN201
    s = make_settings(tmp_path / "home")
    seed_labelled_traffic(s.db_path, 120)
    return s


def cycle(settings, gateway: FakeGateway, calls: list, **options: Any) -> Cycle:  # noqa: ANN001
    opts = RetrainOptions(task="intents", min_new_examples=10, dpo=None, **options)
    return Cycle(settings, opts, gateway, train_sft=fake_trainer(calls))  # type: ignore[arg-type]


def runs(settings) -> list[dict]:  # noqa: ANN001
    db = open_database(settings.db_path)
    try:
        return list(db.query("select * from retrain_runs order by started_at"))
    finally:
        db.conn.close()


def test_better_candidate_is_promoted_and_recorded(settings) -> None:  # noqa: ANN001
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    calls: list = []
    report = cycle(settings, gateway, calls).run()
    assert report.status == "promoted", report.reason
    assert gateway.promoted == ["intents@v1"]
    assert report.metrics["candidate_heldout"]["accuracy"] == 1.0
    assert report.metrics["current_heldout"]["accuracy"] == 0.0
    assert calls and calls[0][1] is None  # first cycle: trained from base
    [run] = runs(settings)
    assert run["status"] == "promoted" and run["candidate"] == "intents@v1" and run["parent"] == "base@v0"
    assert json.loads(run["data_counts"])["sft.train.jsonl"] > 0
    assert run["data_hash"] and json.loads(run["hyperparameters"])["sft"]["learning_rate"] > 0
    timings = json.loads(run["metrics"])["timings"]
    assert set(timings) == {"data_s", "train_s", "evaluate_s"} and min(timings.values()) >= 0
    assert "wall time" in report.summary() and "train " in report.summary()


def test_worse_candidate_is_rejected_and_alias_stays(settings) -> None:  # noqa: ANN001
    gateway = FakeGateway({"intents@v1": truth, "intents@v2": lambda m: "lost_card"})
    gateway.alias = "intents@v1"
    gateway.registered = ["intents@v1"]
    calls: list = []
    report = cycle(settings, gateway, calls).run()
    assert report.status == "rejected"
    assert "does not beat" in report.reason
    assert gateway.alias == "intents@v1" and gateway.promoted == []
    assert calls[0][1] == Path("/adapters/intents@v1")  # continued from the current adapter


@pytest.mark.parametrize(("served", "continue_rate", "expected"), [
    (None, 2e-4, 1e-3),  # a new adapter: the fresh rate
    ("intents@v1", 2e-4, 2e-4),  # continuing the served one: its own rate
    ("intents@v1", None, 1e-3),  # no continuation rate set: the fresh one, as before
])
def test_a_continuation_trains_at_its_own_peak_rate(tmp_path: Path, served: str | None,
                                                   continue_rate: float | None, expected: float) -> None:
    settings = make_settings(tmp_path / "home")
    seed_labelled_traffic(settings.db_path, 120)
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth, "intents@v2": truth})
    if served:
        gateway.alias, gateway.registered = served, [served]
    calls: list = []
    cycle(settings, gateway, calls, sft=SFTRunConfig(learning_rate=1e-3), continue_learning_rate=continue_rate).run()
    assert calls[0][2] == expected
    [run] = runs(settings)
    assert json.loads(run["hyperparameters"])["continue_learning_rate"] == continue_rate


def test_settings_set_the_continuation_rate(tmp_path: Path) -> None:
    options = retrain_options(make_settings(tmp_path, trainer={"sft_continue_learning_rate": 2e-4}), "banking77")
    assert options.continue_learning_rate == 2e-4
    assert retrain_options(make_settings(tmp_path / "b"), "banking77").continue_learning_rate is None


def test_the_regression_check_is_recorded_with_the_cycle(settings) -> None:  # noqa: ANN001
    # intents@v1 (served) gets every intent but exchange_rate right; users liked 80 of its answers:
    # the held-out ones make the regression set.
    db = open_database(settings.db_path)
    seed = LogSeed(db)
    for i in range(80):
        label = LABELS[i % 3]
        rid = seed.request(f"liked{i}", f"liked message {i} #{label}#", answer=label, adapter="intents",
                           adapter_version="intents@v1", caller=f"user{i % 7}", created_at=time.time() - 500 + i)
        seed.feedback(rid, 1)
    db.conn.close()

    def served(messages: list[dict]) -> str:
        return "lost_card" if truth(messages) == "exchange_rate" else truth(messages)

    gateway = FakeGateway({"intents@v1": served, "intents@v2": truth})
    gateway.alias, gateway.registered = "intents@v1", ["intents@v1"]
    report = cycle(settings, gateway, []).run()
    assert report.status == "promoted", report.reason
    check = report.metrics["regression_check"]
    rows = report.metrics["current_regression"]["rows"]
    assert rows > 0 and check["verdict"] == "pass"
    assert (check["regression_kept"], check["regression_current_right"]) == (rows, rows)
    assert f"; kept {rows}/{rows} of the answers users confirmed" in report.reason
    [run] = runs(settings)
    assert json.loads(run["metrics"])["regression_check"] == check


def test_too_little_new_data_skips_without_training(settings) -> None:  # noqa: ANN001
    gateway = FakeGateway({"base@v0": lambda m: "x", "intents@v1": truth})
    calls: list = []
    cycle(settings, gateway, calls).run()
    second = cycle(settings, gateway, calls).run()  # nothing new since the first cycle
    assert second.status == "skipped" and "new training rows" in second.reason
    assert len(calls) == 1


def test_a_second_cycle_refuses_while_the_lock_is_held(settings) -> None:  # noqa: ANN001
    gateway = FakeGateway({"base@v0": lambda m: "x"})
    with retrain_lock(settings.home):
        report = cycle(settings, gateway, []).run()
    assert report.status == "skipped" and "lock" in report.reason


def split(rows: int, current_right: int, kept: int, candidate_other: int = 0) -> tuple[EvalResult, EvalResult]:
    """Current and candidate results on the same ``rows``: the current version gets the first
    ``current_right`` right; the candidate gets ``kept`` of those and ``candidate_other`` of the rest."""
    current = tuple(i < current_right for i in range(rows))
    candidate = tuple(i < kept or current_right <= i < current_right + candidate_other for i in range(rows))
    return (EvalResult("current", rows, sum(current), 0, (), current),
            EvalResult("candidate", rows, sum(candidate), 0, (), candidate))


def scores_of(heldout: tuple[EvalResult, EvalResult], regression: tuple[EvalResult, EvalResult] | None = None,
              ) -> dict[str, EvalResult]:
    scores = {"current_heldout": heldout[0], "candidate_heldout": heldout[1]}
    if regression is not None:
        scores.update(current_regression=regression[0], candidate_regression=regression[1])
    return scores


@pytest.mark.parametrize(("cand", "cur", "cand_r", "cur_r", "verdict"), [
    (0.80, 0.70, 1.0, 1.0, True),
    (0.705, 0.70, 1.0, 1.0, False),  # under the margin
    (0.90, 0.70, 0.90, 1.0, False),  # kept 900 of 1000 confirmed answers, all of the held-out ones
    (0.90, 0.70, 0.99, 1.0, True),  # within tolerance
])
def test_decision_rule(cand, cur, cand_r, cur_r, verdict) -> None:  # noqa: ANN001
    heldout = split(1000, int(cur * 1000), int(cur * 1000), int((cand - cur) * 1000))
    regression = split(1000, int(cur_r * 1000), int(cand_r * 1000))
    assert judge(scores_of(heldout, regression), margin=0.01, tolerance=0.02).promote is verdict


def test_a_much_better_candidate_may_lose_a_few_confirmed_answers() -> None:
    # The measured cycle 2 of docs/benchmarks.md: held-out 62/161 -> 112/161, the candidate
    # keeping 48 of the current version's 62 right answers there; on the 15 regression rows (all
    # right for the current version, by construction) it keeps 11. The old check (1.000 -> 0.733
    # against a 0.02 tolerance) rejected it.
    heldout = split(161, 62, 48, 64)
    assert (heldout[0].correct, heldout[1].correct) == (62, 112)
    decision = judge(scores_of(heldout, split(15, 15, 11)), margin=0.01, tolerance=0.02)
    assert decision.promote, decision.reason
    assert decision.reason.startswith("held-out accuracy 0.385 -> 0.696; kept 11/15 ")
    assert "48/62" in decision.reason and "no significant regression" in decision.reason
    check = decision.regression_check
    assert check is not None and check["test"] == "z" and check["verdict"] == "pass"
    assert (check["regression_kept"], check["regression_current_right"],
            check["heldout_kept"], check["heldout_current_right"]) == (11, 15, 48, 62)
    assert 0 < check["z"] < 1.645


def test_forgetting_the_confirmed_answers_more_than_others_is_rejected() -> None:
    heldout = split(161, 62, 58, 60)
    decision = judge(scores_of(heldout, split(15, 15, 3)), margin=0.01, tolerance=0.02)
    promoted, reason = decision.promote, decision.reason
    assert not promoted
    assert reason.startswith("regression: kept 3/15 ") and "58/62" in reason and "> 1.645" in reason


def test_against_a_strong_current_version_the_tolerance_is_the_bar() -> None:
    # The candidate keeps every held-out answer the current version gets right: no loss rate to
    # compare with, so 10 of 100 confirmed answers lost is tested against the 2% tolerance.
    heldout = split(200, 100, 100, 50)
    decision = judge(scores_of(heldout, split(100, 100, 90)), margin=0.01, tolerance=0.02)
    assert not decision.promote
    assert decision.reason.startswith("regression: kept 90/100 ") and "100/100" in decision.reason
    assert decision.regression_check is not None and decision.regression_check["test"] == "binomial"
    assert decision.regression_check["p"] < 0.05
    # One lost answer of 100 is within the tolerance.
    assert judge(scores_of(heldout, split(100, 100, 99)), margin=0.01, tolerance=0.02).promote


def test_too_few_held_out_rows_right_means_the_strict_bar() -> None:
    few = MIN_BASELINE_ROWS - 1
    heldout = split(100, few, few // 2, 40)  # the candidate kept half: too few rows to mean anything
    one_lost = judge(scores_of(heldout, split(15, 15, 14)), margin=0.01, tolerance=0.02)
    assert one_lost.promote, one_lost.reason  # P(>= 1 of 15 lost at 2%) = 0.26
    assert "no held-out baseline" in one_lost.reason
    three_lost = judge(scores_of(heldout, split(15, 15, 12)), margin=0.01, tolerance=0.02)
    assert not three_lost.promote and three_lost.reason.startswith("regression: kept 12/15 ")


def test_regression_check_skipped_without_rows_to_compare() -> None:
    heldout = split(100, 20, 20, 30)
    none_right = judge(scores_of(heldout, split(15, 0, 0)), margin=0.01, tolerance=0.02)
    assert none_right.promote and "regression check skipped" in none_right.reason
    assert none_right.reason.startswith("held-out accuracy 0.200 -> 0.500; ")
    totals_only = {"current_regression": EvalResult("m", 15, 15, 0), "candidate_regression": EvalResult("m", 15, 3, 0)}
    decision = judge({**scores_of(heldout), **totals_only}, margin=0.01, tolerance=0.02)
    assert decision.promote and "no per-row outcomes" in decision.reason
    assert judge(scores_of(heldout), margin=0.01, tolerance=0.02).regression_check is None


def test_normalise_and_evaluate_count_errors_as_wrong() -> None:
    assert normalise(' {"intent": "a"} ') == normalise('{"intent":"a"}')
    assert normalise("Card_Arrival.") == normalise("card_arrival")

    class Flaky:
        def chat(self, model, messages, max_tokens, response_format=None):  # noqa: ANN001, ANN201
            if messages[-1]["content"] == "boom":
                raise RuntimeError("down")
            return ChatAnswer("yes")

    rows = [{"prompt": [{"role": "user", "content": c}], "completion": [{"role": "assistant", "content": "yes"}]}
            for c in ("a", "boom", "c")]
    result = evaluate(Flaky(), "student:x", rows)
    assert (result.correct, result.failed, result.rows) == (2, 1, 3)
    assert result.outcomes == (True, False, True)  # per row, in order; the failed request is wrong


def test_outcomes_follow_the_input_order() -> None:
    class Echo:
        def chat(self, model, messages, max_tokens, response_format=None):  # noqa: ANN001, ANN201
            content = messages[-1]["content"]
            if content == "boom":
                raise RuntimeError("down")
            return ChatAnswer(content)

    rows = [{"prompt": [{"role": "user", "content": c}], "completion": "yes"}
            for c in ("yes", "no", "boom", "yes", "no", "yes")]
    result = evaluate(Echo(), "student:x", rows, concurrency=3)
    assert result.outcomes == (True, False, False, True, False, True)
    assert (result.correct, result.failed, len(result.scored)) == (3, 1, 5)
    assert "outcomes" not in result.to_dict()


def test_schedule_parsing_and_loop() -> None:
    assert parse_every("6h") == 21600 and parse_every("30m") == 1800
    with pytest.raises(ValueError):
        parse_every("soon")

    class Done:
        def run(self):  # noqa: ANN201
            class R:
                def summary(self) -> str:
                    return "ok"
            return R()

    sleeps: list[float] = []
    run_forever(lambda: Done(), 5.0, sleep=sleeps.append, max_cycles=3)  # type: ignore[arg-type,return-value]
    assert sleeps == [5.0, 5.0]


def test_promotion_gives_the_candidate_its_own_cascade_threshold(tmp_path) -> None:  # noqa: ANN001
    # Right answers come with confidence -0.1, wrong ones with -2.0: the threshold must keep the
    # first on the student and escalate the second. 400 rows: enough held-out ones to calibrate.
    settings = make_settings(tmp_path / "home")
    seed_labelled_traffic(settings.db_path, 400)

    def mostly_right(messages: list[dict]) -> str:
        return "lost_card" if truth(messages) == "exchange_rate" else truth(messages)

    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": mostly_right})
    report = cycle(settings, gateway, []).run()
    assert report.status == "promoted", report.reason
    assert report.metrics["candidate_heldout"]["rows"] >= 20
    threshold = gateway.thresholds["intents@v1"]
    assert threshold is not None and -2.0 < threshold < -0.1
    calibration = report.metrics["calibration"]
    assert calibration["min_confidence"] == threshold and calibration["reached_target"]
    assert 0 < calibration["teacher_share"] < 0.5 and calibration["quality"] >= 0.95
    [run] = runs(settings)
    assert json.loads(run["metrics"])["calibration"]["min_confidence"] == threshold


def test_threshold_is_fitted_on_more_held_out_rows_than_the_judge_scores(tmp_path) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path / "home")
    seed_labelled_traffic(settings.db_path, 400)
    asked: dict[str, list[str]] = {}

    def recorded(version: str, policy: Any) -> Any:  # noqa: ANN401
        def answer(messages: list[dict]) -> str:
            asked.setdefault(version, []).append(messages[-1]["content"])
            return policy(messages)
        return answer

    gateway = FakeGateway({"base@v0": recorded("base@v0", lambda m: "wrong_label"),
                           "intents@v1": recorded("intents@v1", truth)})
    report = cycle(settings, gateway, [], eval_max_rows=10, calibration_max_rows=30).run()
    assert report.status == "promoted", report.reason
    judged = report.metrics["candidate_heldout"]["rows"]
    assert judged == 10 and report.metrics["current_heldout"]["rows"] == 10
    assert report.metrics["calibration"]["rows"] > judged
    # The extra rows are scored once, for the promoted candidate only; never twice, never for base.
    assert len(set(asked["intents@v1"])) == len(asked["intents@v1"])
    assert len(asked["base@v0"]) == 10


def test_rejected_candidate_keeps_no_threshold_and_calibration_can_be_off(tmp_path) -> None:  # noqa: ANN001
    gateway = FakeGateway({"intents@v1": truth, "intents@v2": lambda m: "lost_card"})
    gateway.alias, gateway.registered = "intents@v1", ["intents@v1"]
    rejecting = make_settings(tmp_path / "a")
    seed_labelled_traffic(rejecting.db_path, 120)
    assert cycle(rejecting, gateway, []).run().status == "rejected"
    assert gateway.thresholds == {}

    off = make_settings(tmp_path / "b", router={"calibrate_target_quality": None})
    seed_labelled_traffic(off.db_path, 120)
    fresh = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    report = cycle(off, fresh, []).run()
    assert report.status == "promoted" and fresh.thresholds == {} and "calibration" not in report.metrics


def test_cascade_threshold_needs_enough_rows_with_confidence() -> None:
    few = tuple(ScoredRow(i % 2 == 0, -0.5, -1.0) for i in range(10))
    assert cascade_threshold(few, 0.95, "mean") is None
    rows = tuple(ScoredRow(i % 4 != 0, -3.0 if i % 4 == 0 else -0.2, -5.0 if i % 4 == 0 else -0.4)
                 for i in range(40))
    by_mean = cascade_threshold(rows, 0.95, "mean")
    by_min = cascade_threshold(rows, 0.95, "min")
    assert by_mean is not None and -3.0 < by_mean.min_confidence < -0.2
    assert by_min is not None and -5.0 < by_min.min_confidence < -0.4
    assert by_mean.teacher_share == pytest.approx(0.25)


@pytest.mark.parametrize(("schedule", "scheduler"), [(None, "cosine"), ("linear", "linear"),
                                                     ("constant", "constant_with_warmup")])
def test_settings_pick_the_sft_learning_rate_schedule(tmp_path: Path, schedule: str | None,
                                                      scheduler: str) -> None:
    trainer = {"sft_time_budget_s": 900} if schedule is None else {"sft_lr_schedule": schedule}
    options = retrain_options(make_settings(tmp_path, trainer=trainer), "banking77")
    assert options.sft.lr_scheduler == scheduler


@pytest.mark.parametrize(("top_layers", "expected"), [("default", 10), (30, 30), (None, None)])
def test_settings_place_a_new_adapters_lora_layers(tmp_path: Path, top_layers: object,
                                                   expected: int | None) -> None:
    trainer = {} if top_layers == "default" else {"lora_top_layers": top_layers}
    options = retrain_options(make_settings(tmp_path, trainer=trainer), "banking77")
    assert options.sft.lora.top_layers == expected


def test_lora_top_layers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="lora_top_layers"):
        make_settings(tmp_path, trainer={"lora_top_layers": 0})


def _prompt_rows(ids: range) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"message {i}"}], "completion": []} for i in ids]


def test_eval_sample_spreads_over_all_traffic_not_the_oldest() -> None:
    rows = _prompt_rows(range(1000))
    sample = eval_sample(rows, 100)
    positions = [rows.index(row) for row in sample]
    assert len(sample) == 100 and positions == sorted(positions)  # file (arrival) order kept
    assert positions[-1] >= 900 and positions[0] < 100  # the newest traffic is scored too
    assert eval_sample(list(reversed(rows)), 100) == list(reversed(sample))  # chosen by content, not place
    assert eval_sample(rows[:50], 100) == rows[:50]


def test_calibration_extra_continues_the_judged_sample() -> None:
    rows = _prompt_rows(range(500))
    judged, extra = eval_sample(rows, 100), calibration_extra(rows, 100, 300)
    assert len(extra) == 200 and not [row for row in extra if row in judged]
    assert sorted(judged + extra, key=rows.index) == eval_sample(rows, 300)
    assert calibration_extra(rows, 100, 50) == [] and calibration_extra(rows[:80], 100, 300) == []


def test_eval_sample_keeps_its_rows_as_traffic_grows() -> None:
    before = eval_sample(_prompt_rows(range(1000)), 100)
    after = eval_sample(_prompt_rows(range(1100)), 100)
    # A row leaves the sample only for a new row with a smaller hash: ~100/1100 of it turns over.
    kept = [row for row in after if row in before]
    assert len(kept) >= 80
    assert all(row in before for row in after if int(row["prompt"][0]["content"].split()[1]) < 1000)


def test_the_cycle_scores_at_most_eval_max_rows(settings) -> None:  # noqa: ANN001
    gateway = FakeGateway({"base@v0": lambda m: "wrong_label", "intents@v1": truth})
    report = cycle(settings, gateway, [], eval_max_rows=5).run()
    assert report.metrics["candidate_heldout"]["rows"] == report.metrics["current_heldout"]["rows"] == 5


def test_settings_shape_a_new_adapters_lora(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, trainer={"lora_rank": 32, "lora_dropout": 0.1},
                             student={"vllm_max_lora_rank": 64})
    lora = retrain_options(settings, "banking77").sft.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (32, 64.0, pytest.approx(0.1))
    explicit = make_settings(tmp_path, trainer={"lora_rank": 32, "lora_alpha": 32.0},
                             student={"vllm_max_lora_rank": 32})
    assert retrain_options(explicit, "banking77").sft.lora.alpha == 32.0


def test_default_lora_shape_is_rank_16_alpha_32_without_dropout(tmp_path: Path) -> None:
    lora = retrain_options(make_settings(tmp_path), "banking77").sft.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (16, 32.0, 0.0)


def test_a_lora_rank_above_the_students_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="vllm_max_lora_rank"):
        make_settings(tmp_path, trainer={"lora_rank": 64}, student={"vllm_max_lora_rank": 16})
