"""The closed loop on BANKING77: does the student take the task over from the teacher?

Real gateway (`protege serve`, managed vLLM student starting from `base@v0`), real trainer
(`protege retrain`), a teacher stand-in reached through litellm (an OpenAI-compatible server that
answers with the data set's label; `--teacher-error-rate` makes it wrong on purpose). Simulated
users send training-split messages with `model=auto` and a JSON-schema response format, then
thumbs-down with the right label as a correction when the answer is wrong, thumbs-up when right.
Every `--requests-per-cycle` requests the retrain runs; after each cycle a fixed sample of the
test split measures student-alone accuracy, whole-system (`auto`) accuracy, teacher-call share,
teacher cost avoided and latency. Output: CSV, a markdown table and a PNG plot in `--out`.

    python -m bench.loop --quick            # CI smoke run: tiny N, one cycle
    python -m bench.loop --requests-per-cycle 500,1500,2000 --test-sample 300

Routing: the `uncalibrated` policy sends `auto` straight to the teacher while the served version
has no calibrated cascade threshold (base@v0: no student call at all), until a retrain promotes a
version and calibrates its own threshold for `--target-quality` on its held-out evaluation; from
then on the cascade decides after the student answered.

    python -m bench.loop --requests-per-cycle 8000,1000,1000 --sft-budget-s 2400,900,900 \
        --test-sample 400 --eval-max-rows 200 --concurrency 16 --dpo-min-pairs 1000000000 \
        --lora-top-layers all --out bench/out/loop5
    python -m bench.loop --rescore --test-sample all --out bench/out/loop5   # the whole test split
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.banking77 import (
    TEACHER_MODEL,
    Row,
    default_data_dir,
    load_labels,
    load_split,
    messages_for,
    parse_label,
    response_format,
    teacher_stand_in,
)
from bench.mock_openai import ServerThread, free_port
from gateway.settings import StudentSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK = "banking77"
USER_KEYS = {f"user{i}": f"sk-loop-user-{i}" for i in range(8)}
EVAL_KEY_ID, EVAL_KEY = "loop-eval", "sk-loop-eval"
ADMIN_KEY = "sk-loop-admin"
# What the stand-in teacher is priced at (USD per token; gpt-4o-class list prices).
TEACHER_PRICE_IN, TEACHER_PRICE_OUT = 2.5e-6, 10e-6


@dataclass
class CycleFigures:
    cycle: int
    adapter: str
    student_accuracy: float
    system_accuracy: float
    teacher_share: float
    teacher_cost_avoided_usd: float
    p50_ms: float
    p95_ms: float
    retrain_status: str
    retrain_wall_s: float
    train_s: float  # of retrain_wall_s, the training itself
    train_requests: int  # user requests sent before this cycle's retrain (cumulative)
    sft_rows: int  # rows the cycle's SFT trained on
    threshold: float | None  # the served version's calibrated cascade threshold


DEFAULT_MAX_LORA_RANK: int = StudentSettings.model_fields["vllm_max_lora_rank"].default


def write_config(home: Path, port: int, teacher_url: str, args: argparse.Namespace) -> Path:
    config = {
        "home": str(home),
        "server": {"port": port, "max_concurrency": 64},
        "auth": {"api_keys": {**USER_KEYS, EVAL_KEY_ID: EVAL_KEY}, "admin_key": ADMIN_KEY},
        # The base folder `protege serve` prepares under ~/.protege, shared across runs.
        "student": {"default_adapter": TASK, "timeout_s": 120,
                    "vllm_max_lora_rank": max(DEFAULT_MAX_LORA_RANK, args.lora_rank),
                    "model_dir": str(args.model_dir or load_settings(environ={}).student_model_dir)},
        "teacher": {"model": f"openai/{TEACHER_MODEL}", "api_base": f"{teacher_url}/v1", "api_key": "sk-stand-in",
                    "input_cost_per_token": TEACHER_PRICE_IN, "output_cost_per_token": TEACHER_PRICE_OUT},
        "router": {"policies": ["explicit", "rules", "uncalibrated", "fallback", "cascade"],
                   "min_confidence": args.min_confidence, "calibrate_target_quality": args.target_quality},
        "trainer": {"exclude_callers": [EVAL_KEY_ID], "min_new_examples": min(32, min(args.cycle_sizes) // 2),
                    "sft_learning_rate": args.learning_rate,
                    "sft_continue_learning_rate": args.continue_learning_rate, "sft_lr_schedule": args.lr_schedule,
                    "sft_epochs": args.epochs, "lora_top_layers": args.lora_top_layers,
                    "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                    "init_from": args.init_from, "dpo_min_pairs": args.dpo_min_pairs,
                    "eval_max_rows": args.eval_max_rows, "calibration_max_rows": args.calibration_max_rows},
    }
    path = home / "protege.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def moved_endpoints(path: Path, port: int, teacher_url: str) -> Path:
    """An earlier run's config with this run's ports; everything else (trainer, router) as it ran."""
    config = yaml.safe_load(path.read_text())
    config["server"]["port"] = port
    config["teacher"]["api_base"] = f"{teacher_url}/v1"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(config: Path, log_path: Path, url: str, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited early; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.terminate()
    raise RuntimeError(f"gateway not ready after {timeout_s}s; see {log_path}")


async def ask(client: httpx.AsyncClient, key: str, model: str, text: str, labels: list[str]) -> tuple[str | None, str, float, dict]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={
        "model": model, "messages": messages_for(text), "temperature": 0, "max_tokens": 32,
        "response_format": response_format(labels)})
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return None, "error", elapsed, {}
    body = response.json()
    route = response.headers.get("x-protege-route", "").split(";")[0]
    return parse_label(body["choices"][0]["message"]["content"] or ""), route, elapsed, body


async def simulate_users(url: str, rows: list[Row], labels: list[str], concurrency: int) -> int:
    """Each row: one user asks, then rates the answer (and corrects it when wrong)."""
    semaphore = asyncio.Semaphore(concurrency)
    keys = list(USER_KEYS.values())

    async def one(i: int, row: Row, client: httpx.AsyncClient) -> None:
        key = keys[i % len(keys)]
        async with semaphore:
            label, _, _, body = await ask(client, key, "auto", row.text, labels)
            if not body:
                return
            feedback: dict[str, Any] = {"request_id": body["id"], "rating": "up" if label == row.label else "down"}
            if label != row.label:
                feedback["correction"] = f'{{"intent": "{row.label}"}}'
            await client.post("/v1/feedback", json=feedback, headers={"authorization": f"Bearer {key}"})

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(one(i, row, client) for i, row in enumerate(rows)))
    return len(rows)


async def measure(url: str, sample: list[Row], labels: list[str], concurrency: int) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(row: Row, client: httpx.AsyncClient) -> tuple[bool, bool, str, float, dict]:
        async with semaphore:
            alone, _, _, _ = await ask(client, EVAL_KEY, f"student:{TASK}", row.text, labels)
            system, route, ms, body = await ask(client, EVAL_KEY, "auto", row.text, labels)
        return alone == row.label, system == row.label, route, ms, body

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        results = await asyncio.gather(*(one(row, client) for row in sample))
    latencies = sorted(r[3] for r in results)
    avoided = sum(TEACHER_PRICE_IN * r[4].get("usage", {}).get("prompt_tokens", 0)
                  + TEACHER_PRICE_OUT * r[4].get("usage", {}).get("completion_tokens", 0)
                  for r in results if r[2] == "student")
    return {
        "student_accuracy": sum(r[0] for r in results) / len(results),
        "system_accuracy": sum(r[1] for r in results) / len(results),
        "teacher_share": sum(r[2] == "teacher" for r in results) / len(results),
        "teacher_cost_avoided_usd": avoided,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def sampling_error(accuracy: float, rows: int) -> str:
    """How far a test sample's student accuracy can sit from the whole split's.

    A 400-row sample puts 90% within about ±1.5 points: one version measured 89.1-90.3% on
    samples of 400, 1,000 and 3,080 rows (docs/benchmarks.md), so a target at 90% needs the
    whole split (`--test-sample all`) before it is called met or missed."""
    error = math.sqrt(accuracy * (1 - accuracy) / rows) if rows else math.nan
    low, high = max(0.0, accuracy - 1.96 * error), min(1.0, accuracy + 1.96 * error)
    return (f"student alone {round(accuracy * rows)}/{rows} = {accuracy:.1%}, standard error "
            f"{error * 100:.2f} points (95% interval {low:.1%}-{high:.1%})")


def current_adapter(url: str) -> tuple[str, float | None]:
    """The version serving the task and its calibrated cascade threshold."""
    listing = httpx.get(f"{url}/admin/adapters", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    version = next((a["version"] for a in listing["aliases"] if a["task"] == TASK and not a["tenant"]), "base@v0")
    threshold = next((v["min_confidence"] for v in listing["data"] if v["name"] == version), None)
    return version, threshold


@dataclass(frozen=True)
class RetrainOutcome:
    status: str
    wall_s: float
    sft_rows: int
    train_s: float = 0.0


def run_retrain(config: Path, db_path: Path, log_path: Path, sft_budget_s: float | None) -> RetrainOutcome:
    """One `protege retrain` as its own process; its verdict is read back from retrain_runs."""
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if sft_budget_s is not None:
        env["PROTEGE_TRAINER__SFT_TIME_BUDGET_S"] = str(sft_budget_s)
    with log_path.open("a") as log:
        subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "retrain", "--task", TASK],
                       stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, check=False)
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT status, reason, data_counts, metrics FROM retrain_runs "
                           "ORDER BY started_at DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    if row is None:
        return RetrainOutcome("no run recorded", time.monotonic() - started, 0)
    counts = json.loads(row[2] or "{}")
    timings = json.loads(row[3] or "{}").get("timings", {})
    return RetrainOutcome(f"{row[0]}: {row[1]}", time.monotonic() - started, int(counts.get("sft.train.jsonl", 0)),
                          float(timings.get("train_s", 0.0)))


def write_outputs(out: Path, figures: list[CycleFigures], name: str = "loop") -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(f) for f in figures]
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = ("| cycle | requests | SFT rows | adapter | threshold | student acc | system acc | teacher share "
              "| cost avoided $ | p50 ms | p95 ms | retrain | retrain s (train) |\n" + "|---" * 13 + "|")
    lines = [header] + [
        f"| {f.cycle} | {f.train_requests} | {f.sft_rows} | {f.adapter} | "
        f"{'-' if f.threshold is None else f'{f.threshold:.3f}'} | {f.student_accuracy:.1%} "
        f"| {f.system_accuracy:.1%} | {f.teacher_share:.1%} | {f.teacher_cost_avoided_usd:.4f} | {f.p50_ms:.0f} "
        f"| {f.p95_ms:.0f} | {f.retrain_status} | {f.retrain_wall_s:.0f} ({f.train_s:.0f}) |" for f in figures]
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(table + "\n")
    _plot(out / f"{name}.png", figures)
    return table


def _plot(path: Path, figures: list[CycleFigures]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = [f.cycle for f in figures]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(cycles, [f.student_accuracy for f in figures], marker="o", label="student alone accuracy")
    ax.plot(cycles, [f.system_accuracy for f in figures], marker="o", label="system (auto) accuracy")
    ax.plot(cycles, [f.teacher_share for f in figures], marker="o", label="teacher-call share (fallback)")
    ax.set_xlabel("retrain cycle")
    ax.set_ylim(0, 1)
    ax.set_xticks(cycles)
    ax.legend()
    ax.set_title("protege closed loop on BANKING77 (teacher: label stand-in)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def count_or_all(text: str) -> int | None:
    """A count, or `all` (None: no limit)."""
    return None if text == "all" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="BANKING77 folder (default ../shared/data/banking77).")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "loop")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--requests-per-cycle", default="3000",
                        help="User requests before each retrain: one number, or one per cycle (500,1500,2000).")
    parser.add_argument("--test-sample", type=count_or_all, default=400,
                        help="Test rows measured after each cycle (a fixed random sample), or `all` (3,080).")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--teacher-error-rate", type=float, default=0.0)
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="router.min_confidence: the cascade threshold of versions without their own (they "
                             "are sent to the teacher by the `uncalibrated` policy before the student is asked).")
    parser.add_argument("--target-quality", type=float, default=0.95,
                        help="router.calibrate_target_quality: each promoted version's threshold is set for it.")
    parser.add_argument("--dpo-min-pairs", type=int, default=64,
                        help="trainer.dpo_min_pairs; a large number skips DPO (slow on CPU, see docs/trainer.md).")
    parser.add_argument("--init-from", choices=["current", "base"], default="current",
                        help="Each retrain continues the served adapter, or starts from the base.")
    parser.add_argument("--sft-budget-s", default=None,
                        help="trainer.sft_time_budget_s per retrain: one number, or one per cycle (1500,900,900).")
    parser.add_argument("--eval-max-rows", type=int, default=300,
                        help="trainer.eval_max_rows: held-out and regression rows scored per adapter.")
    parser.add_argument("--calibration-max-rows", type=int, default=1000,
                        help="trainer.calibration_max_rows: held-out rows a promoted version's threshold is fitted on.")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--continue-learning-rate", type=float, default=None,
                        help="trainer.sft_continue_learning_rate: peak rate of a retrain continuing the served adapter.")
    parser.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine",
                        help="trainer.sft_lr_schedule (the 2026-11-22 runs used constant).")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lora-top-layers", type=count_or_all, default=10,
                        help="trainer.lora_top_layers: LoRA on the top N decoder layers of a new adapter, or `all`.")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="trainer.lora_rank of a new adapter; the student's vllm_max_lora_rank is raised to match.")
    parser.add_argument("--lora-alpha", type=float, default=None, help="trainer.lora_alpha (default: twice the rank).")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="trainer.lora_dropout of a new adapter.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="Prepared student base folder (default: the one `protege serve` prepares in ~/.protege).")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 48 requests, one cycle, 16 test rows.")
    parser.add_argument("--rescore", action="store_true",
                        help="No traffic, no retrain: serve the home an earlier run left in --out and measure "
                             "what it serves now on --test-sample (e.g. `all`), into rescore.md.")
    args = parser.parse_args(argv)
    args.out = args.out.absolute()
    if args.quick:
        args.cycles, args.requests_per_cycle, args.test_sample, args.epochs = 1, "48", 16, 1.0
    sizes = per_cycle(args.requests_per_cycle, args.cycles, int)
    if sizes is None or min(sizes) < 1:
        parser.error("--requests-per-cycle: one positive number, or one per cycle")
    args.cycle_sizes = sizes
    budgets = per_cycle(args.sft_budget_s, args.cycles, float) if args.sft_budget_s else [None] * args.cycles
    if budgets is None:
        parser.error("--sft-budget-s: one number, or one per cycle")
    args.cycle_budgets = budgets
    return args


def per_cycle(text: str, cycles: int, cast: Callable[[str], Any]) -> list[Any] | None:
    """'500' -> the same for every cycle; '500,1500,2000' -> one per cycle; None if the count is wrong."""
    values = [cast(part) for part in str(text).split(",")]
    if len(values) == 1:
        values *= cycles
    return values if len(values) == cycles else None


def measured(cycle: int, url: str, sample: list[Row], labels: list[str], concurrency: int,
             retrain: RetrainOutcome, sent: int) -> CycleFigures:
    adapter, threshold = current_adapter(url)
    return CycleFigures(cycle, adapter, **asyncio.run(measure(url, sample, labels, concurrency)),
                        retrain_status=retrain.status, retrain_wall_s=retrain.wall_s, train_s=retrain.train_s,
                        train_requests=sent,
                        sft_rows=retrain.sft_rows, threshold=threshold)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `finally` stops the gateway and its vLLM.

    Python's default SIGTERM action ends the process at once: a `kill` of a running loop left the
    gateway and vLLM serving, holding the port and both cores, until killed by hand.
    """
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    home = args.out / "home"
    if args.rescore and not (home / "protege.yaml").is_file():
        print(f"--rescore: no earlier run's home in {home}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir(REPO_ROOT)
    if not (data_dir / "train.csv").is_file():
        print(f"BANKING77 not found at {data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    labels = load_labels(data_dir)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    rng = random.Random(args.seed)
    rng.shuffle(train)
    sample = test if args.test_sample is None else rng.sample(test, args.test_sample)
    teacher = ServerThread(teacher_stand_in(train + test, labels, args.teacher_error_rate, args.seed).app).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.rescore:
        config = moved_endpoints(home / "protege.yaml", port, teacher.url)
    else:
        config = write_config(home, port, teacher.url, args)
    gateway = start_gateway(config, args.out / "gateway.log", url, timeout_s=900)
    figures: list[CycleFigures] = []
    started = time.monotonic()
    try:
        if args.rescore:
            rescored = measured(args.cycles, url, sample, labels, args.concurrency, RetrainOutcome("-", 0.0, 0), 0)
            print(write_outputs(args.out, [rescored], name="rescore"), flush=True)
            print(f"rescored on {len(sample)} test rows: {sampling_error(rescored.student_accuracy, len(sample))}")
            return 0
        figures.append(measured(0, url, sample, labels, args.concurrency, RetrainOutcome("-", 0.0, 0), 0))
        print(write_outputs(args.out, figures), flush=True)
        sent = 0
        for cycle, (size, budget) in enumerate(zip(args.cycle_sizes, args.cycle_budgets, strict=True), start=1):
            sent += asyncio.run(simulate_users(url, train[sent: sent + size], labels, args.concurrency))
            retrain = run_retrain(config, home / "protege.db", args.out / "retrain.log", budget)
            figures.append(measured(cycle, url, sample, labels, args.concurrency, retrain, sent))
            print(write_outputs(args.out, figures), flush=True)
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=60)
        except subprocess.TimeoutExpired:
            gateway.kill()
        teacher.stop()
    print(f"\nlast cycle on {len(sample)} test rows: {sampling_error(figures[-1].student_accuracy, len(sample))}")
    print(f"teacher: {TEACHER_MODEL} (a stand-in answering the data set's label, error rate "
          f"{args.teacher_error_rate:.0%}); total wall time {time.monotonic() - started:.0f}s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
