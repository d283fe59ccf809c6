"""Poison drill (issue #9, feedback integrity): one caller sends corrections with flipped labels.

A real protege SQLite log is seeded with BANKING77 training traffic from several callers: half
escalated to the teacher (its answer is the gold label, in the JSON form of ``bench.banking77``;
the student's wrong draft is kept), half served by the student (right or wrong) with a shadow
teacher answer. One of the callers, the *poisoner*, then sends ``rating=-1`` corrections with a
wrong label on its own requests: 0.5%, 1% and 5% of all logged requests (and none in the clean
run). The wrong label is each intent's neighbour in ``categories.json``, so the poison agrees
with itself instead of being noise.

Each run then goes through what a retrain does with that log: the real builder
(``build_datasets`` with ``options_from_settings``: per-caller cap, filters, held-out split as
configured), SFT with ``trainer.fast_sft.train_sft`` from the base, greedy exact-match accuracy on
a fixed clean sample of the BANKING77 test split (``evaluate_labels``, the same sample for every
run), and the promotion gate ``trainer.retrain.judge`` with the clean run's adapter as the
current one, scored on the poisoned build's own held-out and regression files (as a retrain
would: poisoned held-out rows included).

The clean run trains for ``--budget-s`` of wall time; the poisoned runs then train for the same
number of optimiser steps, so that load on a shared machine cannot make the runs differ.

The issue's bar, per rate: the poisoned adapter's held-out accuracy is within 1 point of the
clean run's, or the gate rejects it. Exit status 1 when a rate misses it (not in ``--quick``).

    python -m bench.poison_drill                          # 2000 requests, 300 test rows, 180 s runs
    python -m bench.poison_drill --budget-s 150 --json bench/out/poison.json
    python -m bench.poison_drill --quick                  # tiny: the harness runs, figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from bench.banking77 import (
    SYSTEM_PROMPT,
    TEACHER_MODEL,
    Row,
    answer_json,
    default_data_dir,
    load_labels,
    load_split,
    messages_for,
)
from bench.loop import REPO_ROOT, TASK
from feedback.builder import PROVENANCE, Manifest, build_datasets, options_from_settings
from feedback.store import open_database
from gateway.settings import Settings, load_settings
from trainer.config import SFTRunConfig
from trainer.evaluate import EvalResult, expected_answer, normalise

CURRENT_VERSION = f"{TASK}@v1"  # the adapter that served the student-routed traffic
POISONER = "poisoner"
T0 = 1_750_000_000.0  # fixed timestamps: every run's log is the same traffic
SFT_TRAIN, SFT_EVAL, REGRESSION = "sft.train.jsonl", "sft.eval.jsonl", "regression.jsonl"
ACCURACY_BAR = 0.01  # the "within 1 point of the clean run"

PromptRow = dict[str, Any]


@dataclass(frozen=True)
class DrillConfig:
    rates: tuple[float, ...] = (0.005, 0.01, 0.05)
    train_requests: int = 2000
    eval_rows: int = 300
    budget_s: float = 180.0
    threads: int = 2
    honest_callers: int = 7
    # Above the default per-caller cap (0.2): the poisoner also floods, so the cap has work to do.
    poisoner_share: float = 0.3
    student_share: float = 0.5
    student_accuracy: float = 0.6
    seed: int = 0


QUICK = DrillConfig(train_requests=200, eval_rows=20, budget_s=5.0)


@dataclass(frozen=True)
class Request:
    """One logged request of the simulated traffic."""

    id: str
    caller: str
    text: str
    label: str
    route: str  # "teacher" (escalated) or "student"
    answer: str  # what the caller got
    draft: str | None  # the student's replaced draft (escalations)
    shadow: str | None  # the teacher's shadow answer (student-served requests)


@dataclass(frozen=True)
class DrillData:
    train: list[Row]
    test: list[Row]
    labels: list[str]


class Student(Protocol):
    """Training and scoring, behind one seam so that a test can run the harness without torch."""

    def train(self, rows: list[PromptRow], out_dir: Path, budget_s: float | None, max_steps: int | None) -> int:
        """Train an adapter into ``out_dir`` from the base; returns the optimiser steps taken."""
        ...

    def accuracy(self, adapter_dir: Path, rows: list[PromptRow], labels: list[str]) -> float: ...

    def answers(self, adapter_dir: Path, prompts: list[list[dict[str, str]]]) -> list[str]: ...


@dataclass(frozen=True)
class GateOutcome:
    promoted: bool
    reason: str
    scores: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class RunResult:
    rate: float
    poisoned_in_log: int
    poisoned_in_train: int  # poisoned rows in sft.train.jsonl (matched through provenance)
    poisoned_in_eval: int  # poisoned rows in sft.eval.jsonl, which the gate scores against
    poisoner_train_share: float  # the poisoner's share of sft.train.jsonl, after the cap
    train_rows: int
    steps: int
    accuracy: float
    data_dir: str
    gate: GateOutcome | None  # None for the clean run: it is the "current" adapter

    def holds(self, clean_accuracy: float) -> bool:
        rejected = self.gate is not None and not self.gate.promoted
        return rejected or self.accuracy >= clean_accuracy - ACCURACY_BAR - 1e-9


# -- the log ----------------------------------------------------------------------------------


def plan_traffic(train: Sequence[Row], labels: Sequence[str], config: DrillConfig) -> list[Request]:
    """The same traffic for every run: who asked what, which route answered, and how."""
    rng = random.Random(config.seed)
    traffic = []
    for i, row in enumerate(rng.sample(list(train), config.train_requests)):
        poisoner = rng.random() < config.poisoner_share
        caller = POISONER if poisoner else f"caller-{rng.randrange(config.honest_callers)}"
        gold = answer_json(row.label)
        wrong = answer_json(rng.choice([label for label in labels if label != row.label]))
        request_id = f"req-{i:05d}"
        if rng.random() < config.student_share:
            served = gold if rng.random() < config.student_accuracy else wrong
            traffic.append(Request(request_id, caller, row.text, row.label, "student", served, None, gold))
        else:
            traffic.append(Request(request_id, caller, row.text, row.label, "teacher", gold, wrong, None))
    return traffic


def flipped(label: str, labels: Sequence[str]) -> str:
    return labels[(labels.index(label) + 1) % len(labels)]


def poison_plan(traffic: Sequence[Request], labels: Sequence[str], rate: float, seed: int) -> dict[str, str]:
    """Request id -> the wrong label the poisoner sends as a correction, on ``rate`` of all requests.

    The poisoner's requests are taken in one fixed order, so a larger rate poisons a superset of
    the rows of a smaller one and runs differ only by the added poison."""
    theirs = [r for r in traffic if r.caller == POISONER]
    random.Random(seed).shuffle(theirs)
    count = round(rate * len(traffic))
    if count > len(theirs):
        raise ValueError(f"rate {rate} needs {count} poisoned rows but the poisoner made {len(theirs)} requests")
    return {r.id: flipped(r.label, labels) for r in theirs[:count]}


def seed_log(db_path: Path, traffic: Sequence[Request], poison: dict[str, str]) -> None:
    """Write the traffic, shadow answers and the poisoner's corrections straight into a fresh log."""
    db = open_database(db_path)
    try:
        db["requests"].insert_all(_request_row(i, r) for i, r in enumerate(traffic))
        db["shadow_labels"].insert_all(
            {"request_id": r.id, "teacher_answer": r.shadow, "teacher_model": TEACHER_MODEL,
             "finish_reason": "stop", "created_at": T0 + i}
            for i, r in enumerate(traffic) if r.shadow is not None)
        later = T0 + len(traffic)
        db["feedback"].insert_all(
            {"request_id": request_id, "caller": POISONER, "rating": -1.0, "correction": answer_json(label),
             "created_at": later, "updated_at": later}
            for request_id, label in poison.items())
    finally:
        db.conn.close()


def _request_row(index: int, request: Request) -> dict[str, Any]:
    student = request.route == "student"
    return {
        "id": request.id, "created_at": T0 + index, "caller": request.caller, "requested_model": "auto",
        "route": request.route, "reason": "student" if student else "low_confidence",
        "adapter": TASK, "adapter_version": CURRENT_VERSION if student else None, "stream": 0,
        "messages": json.dumps(messages_for(request.text)), "params": json.dumps({"max_tokens": 32}),
        "answer": request.answer, "draft": request.draft, "status": "ok", "http_status": 200,
    }


# -- data sets --------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def poisoned_rows(manifest: Manifest, poison: dict[str, str]) -> dict[str, int]:
    """Poisoned rows per data set file: rows taught by one of the poisoner's corrections (a
    poisoned request whose correction was overruled still yields the teacher's clean row)."""
    counts: dict[str, int] = {}
    for entry in read_jsonl(manifest.path / PROVENANCE):
        if entry["caller"] == POISONER and entry["request_id"] in poison and entry["source"] == "correction":
            counts[entry["file"]] = counts.get(entry["file"], 0) + 1
    return counts


def caller_share(manifest: Manifest, file: str, caller: str) -> float:
    rows = [e for e in read_jsonl(manifest.path / PROVENANCE) if e["file"] == file]
    return sum(e["caller"] == caller for e in rows) / len(rows) if rows else 0.0


# -- the gate ---------------------------------------------------------------------------------


class AnswerCache:
    """Greedy answers per (adapter, prompt): the clean adapter is asked the same held-out prompts
    by every poisoned run's gate, and answering is most of a run's scoring time."""

    def __init__(self, student: Student) -> None:
        self.student = student
        self.known: dict[tuple[str, str], str] = {}

    def answers(self, adapter_dir: Path, rows: Sequence[PromptRow]) -> list[str]:
        keys = [(str(adapter_dir), json.dumps(row["prompt"], sort_keys=True)) for row in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in self.known))
        if missing:
            found = self.student.answers(adapter_dir, [json.loads(prompt) for _, prompt in missing])
            self.known.update(zip(missing, found, strict=True))
        return [self.known[k] for k in keys]


def score_rows(name: str, rows: Sequence[PromptRow], answers: Sequence[str]) -> EvalResult:
    """As ``trainer.evaluate.evaluate`` scores a served adapter: normalised (JSON as JSON) match."""
    outcomes = tuple(normalise(a) == normalise(expected_answer(r)) for a, r in zip(answers, rows, strict=True))
    return EvalResult(name, len(rows), sum(outcomes), 0, (), outcomes)


def gate(cache: AnswerCache, clean_dir: Path, candidate_dir: Path, manifest: Manifest,
         settings: Settings) -> GateOutcome:
    """``judge`` with the clean adapter as the current one, on the poisoned build's own rows."""
    from trainer.retrain import eval_sample, judge

    limit = settings.trainer.eval_max_rows
    scores: dict[str, EvalResult] = {}
    for split, file in (("heldout", SFT_EVAL), ("regression", REGRESSION)):
        rows = eval_sample(read_jsonl(manifest.path / file), limit)
        if not rows:
            continue
        for who, adapter in (("current", clean_dir), ("candidate", candidate_dir)):
            scores[f"{who}_{split}"] = score_rows(who, rows, cache.answers(adapter, rows))
    decision = judge(scores, settings.trainer.promote_margin, settings.trainer.regression_tolerance)
    return GateOutcome(decision.promote, decision.reason, {name: result.to_dict() for name, result in scores.items()})


# -- the drill --------------------------------------------------------------------------------


def held_out_sample(data: DrillData, config: DrillConfig) -> tuple[list[PromptRow], list[str]]:
    """The fixed clean held-out sample: same rows, same order, for every run."""
    sample = random.Random(config.seed).sample(data.test, config.eval_rows)
    return [{"prompt": messages_for(r.text)} for r in sample], [answer_json(r.label) for r in sample]


def run_drill(config: DrillConfig, data: DrillData, settings: Settings, student: Student,
              work_dir: Path) -> list[RunResult]:
    """The clean run, then one run per poison rate; each from a fresh log and data folder."""
    traffic = plan_traffic(data.train, data.labels, config)
    eval_rows, eval_labels = held_out_sample(data, config)
    cache = AnswerCache(student)
    results: list[RunResult] = []
    clean_dir: Path | None = None
    steps: int | None = None
    for rate in (0.0, *config.rates):
        run_dir = work_dir / f"rate-{rate:g}"
        poison = poison_plan(traffic, data.labels, rate, config.seed)
        manifest = build_run(run_dir, traffic, poison, settings)
        rows = read_jsonl(manifest.path / SFT_TRAIN)
        reached = poisoned_rows(manifest, poison)
        _progress(f"rate {rate:g}: {len(poison)} poisoned in the log, {reached.get(SFT_TRAIN, 0)} of "
                  f"{len(rows)} training rows; training")
        adapter = run_dir / "adapter"
        taken = student.train(rows, adapter, config.budget_s if steps is None else None, steps)
        steps = taken if steps is None else steps
        accuracy = student.accuracy(adapter, eval_rows, eval_labels)
        outcome = None if clean_dir is None else gate(cache, clean_dir, adapter, manifest, settings)
        clean_dir = clean_dir or adapter
        results.append(RunResult(
            rate=rate, poisoned_in_log=len(poison), poisoned_in_train=reached.get(SFT_TRAIN, 0),
            poisoned_in_eval=reached.get(SFT_EVAL, 0),
            poisoner_train_share=round(caller_share(manifest, SFT_TRAIN, POISONER), 4), train_rows=len(rows),
            steps=taken, accuracy=accuracy, data_dir=str(manifest.path), gate=outcome))
        _progress(f"rate {rate:g}: {taken} steps, held-out accuracy {accuracy:.3f}"
                  + ("" if outcome is None else f", gate: {outcome.reason}"))
    return results


def build_run(run_dir: Path, traffic: Sequence[Request], poison: dict[str, str], settings: Settings) -> Manifest:
    """A fresh log for one run and the data sets the builder makes of it, as configured."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused --work folder must not add to an old log
    seed_log(run_dir / "protege.db", traffic, poison)
    return build_datasets(run_dir / "protege.db", run_dir / "datasets", options_from_settings(settings, TASK))


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def format_table(results: Sequence[RunResult], eval_rows: int) -> str:
    clean = results[0].accuracy
    lines = [
        ("| poison rate | poisoned in log | in sft.train (of rows) | in sft.eval | poisoner share of sft.train "
         "| steps | held-out accuracy | Δ vs clean | gate (vs clean adapter) | holds |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "– (reference)" if r.gate is None else (
            f"{'promoted' if r.gate.promoted else 'rejected'}: {r.gate.reason}")
        delta = "–" if r.gate is None else f"{100 * (r.accuracy - clean):+.1f} pt"
        lines.append(
            f"| {100 * r.rate:g}% | {r.poisoned_in_log} | {r.poisoned_in_train} ({r.train_rows}) | "
            f"{r.poisoned_in_eval} | {100 * r.poisoner_train_share:.1f}% | {r.steps} | {r.accuracy:.3f} | "
            f"{delta} | {verdict} | {'–' if r.gate is None else ('yes' if r.holds(clean) else 'NO')} |")
    # The bar is 1 point; a proportion on n rows has a standard error of sqrt(p(1-p)/n).
    error = math.sqrt(max(clean * (1 - clean), 1e-9) / max(eval_rows, 1))
    lines.append(f"\nheld-out: {eval_rows} fixed BANKING77 test rows; standard error of one accuracy "
                 f"±{100 * error:.1f} pt")
    return "\n".join(lines)


# -- the real student -------------------------------------------------------------------------


class RealStudent:
    """SmolLM2 + LoRA through ``trainer.fast_sft``: SFT from the base, greedy scoring on CPU."""

    def __init__(self, base_dir: Path, sft: SFTRunConfig, threads: int, answer_texts: Sequence[str]) -> None:
        self.base_dir = base_dir
        self.sft = replace(sft, threads=threads)
        self.threads = threads
        self.answer_texts = list(answer_texts)

    def train(self, rows: list[PromptRow], out_dir: Path, budget_s: float | None, max_steps: int | None) -> int:
        from trainer.fast_sft import train_sft

        config = replace(self.sft, time_budget_s=budget_s, max_steps=max_steps)
        result = train_sft(self.base_dir, rows, out_dir, config, None)
        return max_steps or math.ceil(result.examples / config.batch_size)

    def accuracy(self, adapter_dir: Path, rows: list[PromptRow], labels: list[str]) -> float:
        from trainer.fast_sft import evaluate_labels, set_threads

        set_threads(self.threads)
        return evaluate_labels(self.base_dir, adapter_dir, rows, labels)

    def answers(self, adapter_dir: Path, prompts: list[list[dict[str, str]]]) -> list[str]:
        """Greedy answers the way ``evaluate_labels`` produces them (merged adapter, same length)."""
        from peft import PeftModel

        from trainer.fast_sft import generate_greedy, load_for_training, set_threads

        set_threads(self.threads)
        model, tokenizer = load_for_training(self.base_dir)
        model.config.use_cache = True
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in self.answer_texts)
        return generate_greedy(model, tokenizer, prompts, 2 + longest)


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="BANKING77 folder (default ../shared/data/banking77).")
    parser.add_argument("--config", type=Path, default=None,
                        help="protege YAML settings (trainer cap, split, gate; student model dir).")
    parser.add_argument("--rates", default="0.005,0.01,0.05", help="Poison rates, comma-separated.")
    parser.add_argument("--train-requests", type=int, default=DrillConfig.train_requests)
    parser.add_argument("--eval-rows", type=int, default=DrillConfig.eval_rows, help="Fixed BANKING77 test rows.")
    parser.add_argument("--budget-s", type=float, default=DrillConfig.budget_s,
                        help="Wall seconds of SFT for the clean run; the others train as many steps.")
    parser.add_argument("--threads", type=int, default=DrillConfig.threads)
    parser.add_argument("--poisoner-share", type=float, default=DrillConfig.poisoner_share)
    parser.add_argument("--seed", type=int, default=DrillConfig.seed)
    parser.add_argument("--work", type=Path, default=None, help="Keep logs, data sets and adapters here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--quick", action="store_true",
                        help=f"Tiny smoke run: {QUICK.train_requests} requests, {QUICK.eval_rows} test rows, "
                             f"{QUICK.budget_s:g} s of training.")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> DrillConfig:
    config = DrillConfig(rates=tuple(float(r) for r in args.rates.split(",")), train_requests=args.train_requests,
                         eval_rows=args.eval_rows, budget_s=args.budget_s, threads=args.threads,
                         poisoner_share=args.poisoner_share, seed=args.seed)
    if args.quick:
        config = replace(config, train_requests=QUICK.train_requests, eval_rows=QUICK.eval_rows,
                         budget_s=QUICK.budget_s)
    return config


def main(argv: list[str] | None = None) -> int:
    from trainer.retrain import retrain_options

    args = parse_args(argv)
    data_dir = args.data_dir or default_data_dir(REPO_ROOT)
    if not (data_dir / "train.csv").is_file():
        print(f"BANKING77 not found at {data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    config = config_from(args)
    settings = load_settings(args.config)
    labels = load_labels(data_dir)
    data = DrillData(load_split(data_dir, "train"), load_split(data_dir, "test"), labels)
    student = RealStudent(settings.student_model_dir, retrain_options(settings, TASK).sft, config.threads,
                          [answer_json(label) for label in labels])
    work = args.work or Path(tempfile.mkdtemp(prefix="protege-poison-"))
    started = time.monotonic()
    try:
        results = run_drill(config, data, settings, student, work.absolute())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(results, config.eval_rows))
    print(f"\nsystem prompt: {SYSTEM_PROMPT!r}; per-caller cap {settings.trainer.per_caller_cap}, held-out share "
          f"{settings.trainer.holdout_share}, gate margin {settings.trainer.promote_margin} / regression tolerance "
          f"{settings.trainer.regression_tolerance}; total wall time {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": asdict(config), "results": [asdict(r) for r in results]},
                                        indent=2) + "\n")
    clean = results[0].accuracy
    return 0 if args.quick or all(r.holds(clean) for r in results[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
