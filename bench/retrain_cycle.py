"""Wall time of one `protege retrain` cycle on BANKING77, at a few data sizes.

A real gateway (`protege serve`, managed vLLM student) and the real `protege retrain` process;
the log is seeded directly with what the closed loop's first cycle produces (every `auto`
request escalated to the teacher, the teacher's answer being the data set's label in the loop's
JSON form), so that the figure is the retrain's own cost, not the cost of simulating users.

    python -m bench.retrain_cycle --sizes 500,2000

Sizes are cumulative: the second cycle sees the first cycle's rows plus the new ones, and
continues the adapter the first cycle promoted (`trainer.init_from: current`). Printed per
cycle: SFT rows, wall time and its phases (data build, training, evaluation through vLLM),
decision and held-out accuracies.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.banking77 import (
    answer_json,
    default_data_dir,
    load_labels,
    load_split,
    messages_for,
    response_format,
    teacher_stand_in,
)
from bench.loop import REPO_ROOT, TASK, run_retrain, start_gateway, write_config
from bench.mock_openai import ServerThread, free_port
from feedback.store import open_database


def seed(db_path: Path, rows: list[Any], labels: list[str], start: int) -> None:
    """Log ``rows`` as escalated `auto` requests answered by the teacher."""
    params = json.dumps({"max_tokens": 32, "temperature": 0, "response_format": response_format(labels)})
    now = time.time()
    db = open_database(db_path)
    try:
        db["requests"].insert_all({
            "id": f"seed-{start + i:06d}", "created_at": now - len(rows) + i, "caller": f"user{(start + i) % 8}",
            "requested_model": "auto", "route": "teacher", "reason": "low_confidence", "adapter": TASK,
            "stream": 0, "messages": json.dumps(messages_for(row.text)), "params": params,
            "answer": answer_json(row.label), "draft": answer_json(labels[0]), "status": "ok", "http_status": 200,
        } for i, row in enumerate(rows))
    finally:
        db.conn.close()


def last_run(db_path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM retrain_runs ORDER BY started_at DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    return dict(row) if row else {}


def describe(size: int, run: dict[str, Any]) -> str:
    metrics = json.loads(run.get("metrics") or "{}")
    counts = json.loads(run.get("data_counts") or "{}")
    timings = metrics.get("timings", {})

    def accuracy(name: str) -> str:
        return f"{metrics[name]['accuracy']:.3f}" if name in metrics else "-"

    return (f"| {size} | {counts.get('sft.train.jsonl', 0)} | {counts.get('sft.eval.jsonl', 0)} "
            f"| {run.get('wall_s', 0):.0f} | {timings.get('data_s', 0):.0f} | {timings.get('train_s', 0):.0f} "
            f"| {timings.get('evaluate_s', 0):.0f} | {run.get('status')} | {accuracy('current_heldout')} "
            f"| {accuracy('candidate_heldout')} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "retrain_cycle")
    parser.add_argument("--sizes", default="500,2000", help="Cumulative logged requests before each cycle.")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--dpo-min-pairs", type=int, default=64,
                        help="trainer.dpo_min_pairs (every seeded escalation has a draft, so each is a pair); "
                        "a large number measures SFT-only cycles.")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out = args.out.absolute()
    args.cycle_sizes = [int(n) for n in args.sizes.split(",")]
    if args.cycle_sizes != sorted(args.cycle_sizes) or args.cycle_sizes[0] < 1:
        parser.error("--sizes: increasing positive numbers")
    # What bench.loop.write_config reads.
    args.min_confidence, args.target_quality, args.init_from = 0.0, 0.95, "current"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or default_data_dir(REPO_ROOT)
    labels = load_labels(data_dir)
    train = load_split(data_dir, "train")
    random.Random(args.seed).shuffle(train)
    teacher = ServerThread(teacher_stand_in(train, labels, 0.0, args.seed).app).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = args.out / "home"
    config = write_config(home, port, teacher.url, args)
    gateway = start_gateway(config, args.out / "gateway.log", url, timeout_s=900)
    lines = ["| logged requests | SFT rows | held-out rows | cycle s | data s | train s | evaluate s | decision "
             "| current acc | candidate acc |", "|---" * 10 + "|"]
    try:
        seeded = 0
        for size in args.cycle_sizes:
            seed(home / "protege.db", train[seeded:size], labels, seeded)
            seeded = size
            run_retrain(config, home / "protege.db", args.out / "retrain.log")
            lines.append(describe(size, last_run(home / "protege.db")))
            print("\n".join(lines), flush=True)
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
        teacher.stop()
    (args.out / "retrain_cycle.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
