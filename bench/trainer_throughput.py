"""Trainer throughput (issue 10): stock TRL SFTTrainer vs protege's fast trainer on BANKING77.

Each variant trains in its own fresh subprocess (so peak RSS is honest) on the same rows for the
same wall-clock budget, then is scored on the same held-out rows by greedy generation. Prints a
table and the protege/stock ratios.

    python bench/trainer_throughput.py --data /work/shared/data/banking77 \
        --base-dir ~/.cache/protege-test/smollm2 --budget-s 120

The full comparison in docs/trainer.md uses ``--budget-s 600``; the default is a smoke run.
Variants: ``stock`` (TRL defaults but fp32, LoRA r16 on all linear layers, batch 16),
``protege`` (trainer.fast_sft with its defaults), ``protege-all`` (LoRA on every layer),
``protege-all-noshare`` (and no shared-prefix forward), ``protege-topN`` (LoRA on the top N
layers only), ``protege-packed`` (padding-free packed batches instead of length-grouped padding).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

SHORT_INSTRUCTION = "Classify the customer message into its banking intent label."
Row = dict[str, Any]


@dataclass(frozen=True)
class BenchArgs:
    data: Path
    base_dir: Path
    budget_s: float
    train_rows: int
    eval_rows: int
    batch_size: int
    learning_rate: float
    max_length: int
    prompt: str
    seed: int
    threads: int
    clock: str


@dataclass(frozen=True)
class Measurement:
    variant: str
    examples: int
    train_s: float
    examples_per_s: float
    tokens_per_s: float
    train_cpu_s: float  # CPU seconds of the training loop, all threads
    peak_rss_gib: float
    final_loss: float
    accuracy: float
    eval_s: float


# --- data ---------------------------------------------------------------------------------------


def read_split(data_dir: Path, split: str) -> list[tuple[str, str]]:
    with (data_dir / f"{split}.csv").open(newline="") as handle:
        return [(r["text"], r["category"]) for r in csv.DictReader(handle)]


def system_prompt(kind: str, labels: list[str]) -> str:
    if kind == "short":
        return SHORT_INSTRUCTION
    return ("Classify the customer message into one of these intents: " + ", ".join(labels)
            + ". Answer with the intent only.")


def to_row(text: str, label: str, system: str) -> Row:
    return {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": text}],
            "completion": [{"role": "assistant", "content": label}]}


def load_rows(args: BenchArgs) -> tuple[list[Row], list[Row], list[str]]:
    labels = json.loads((args.data / "categories.json").read_text())
    system = system_prompt(args.prompt, labels)
    rng = random.Random(args.seed)
    train = read_split(args.data, "train")
    test = read_split(args.data, "test")
    rng.shuffle(train)
    rng.shuffle(test)
    train_rows = [to_row(t, c, system) for t, c in train[: args.train_rows]]
    eval_rows = [to_row(t, c, system) for t, c in test[: args.eval_rows]]
    return train_rows, eval_rows, [c for _, c in test[: args.eval_rows]]


# --- variants (run in the worker subprocess) ----------------------------------------------------


def run_protege(args: BenchArgs, variant: str, rows: list[Row], out_dir: Path) -> Any:
    from trainer.config import LoraPlacement, SFTRunConfig
    from trainer.fast_sft import train_sft

    defaults = SFTRunConfig()
    top = defaults.lora.top_layers
    if variant.startswith("protege-top"):
        top = int(variant.removeprefix("protege-top"))
    elif variant in ("protege-all", "protege-all-noshare"):
        top = None
    config = SFTRunConfig(lora=LoraPlacement(top_layers=top), batch_size=args.batch_size,
                          learning_rate=args.learning_rate, max_length=args.max_length,
                          # stock's schedule, so that the two differ in speed only
                          lr_scheduler="constant_with_warmup",
                          time_budget_s=args.budget_s, epochs=50.0, seed=args.seed,
                          padding_free=variant == "protege-packed",
                          share_prefix=variant not in ("protege-packed", "protege-all-noshare"),
                          threads=args.threads, budget_clock=args.clock, logging_steps=1000)
    return train_sft(args.base_dir, rows, out_dir, config)


def run_stock(args: BenchArgs, rows: list[Row], out_dir: Path) -> Any:
    """TRL's SFTTrainer as documented, with only what the comparison needs changed: fp32 (TRL's
    default bf16 autocast is slower still on this CPU), batch size, lr, the LoRA, the budget."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainer.config import SFTRunConfig, TrainResult
    from trainer.fast_sft import (
        _trainer_classes,
        build_dataset,
        peak_rss_bytes,
        set_threads,
    )
    from trainer.lora import save_adapter
    from trainer.model_prep import ALL_LINEAR

    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    model = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
    lengths = build_dataset(tokenizer, rows, args.max_length)[0]["input_ids"]
    mean_tokens = sum(len(ids) for ids in lengths) / len(lengths)
    dataset = Dataset.from_list(rows)
    lora = LoraConfig(r=SFTRunConfig().lora.rank, lora_alpha=SFTRunConfig().lora.alpha,
                      target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
    _, budget_cls = _trainer_classes()
    with tempfile.TemporaryDirectory(prefix="bench-stock-") as scratch:
        config = SFTConfig(output_dir=scratch, per_device_train_batch_size=args.batch_size,
                           learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup",
                           warmup_steps=5, num_train_epochs=50.0, max_length=args.max_length,
                           bf16=False, use_cpu=True, save_strategy="no", report_to="none",
                           disable_tqdm=True, logging_steps=1000, seed=args.seed, data_seed=args.seed)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        trainer.add_callback(budget_cls(args.budget_s, clock))
        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    save_adapter(trainer.model, out_dir, args.base_dir)
    examples = int(output.global_step) * args.batch_size
    return TrainResult(out_dir=out_dir, examples=examples, seconds=seconds,
                       examples_per_s=examples / seconds, tokens=int(examples * mean_tokens),
                       cpu_seconds=cpu,
                       peak_rss_bytes=peak_rss_bytes(), final_loss=float(output.training_loss))


def short_rows(rows: list[Row], base_dir: Path, max_length: int) -> list[Row]:
    """The rows both variants train on: those within max_length tokens (TRL would truncate the
    others, protege drops them; keeping only these makes the two see the same data)."""
    from transformers import AutoTokenizer

    from trainer.fast_sft import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [row for row in rows if len(tokenize_row(tokenizer, row)[0]) <= max_length]


def worker(args: BenchArgs, variant: str) -> Measurement:
    from trainer.fast_sft import evaluate_labels

    train_rows, eval_rows, eval_labels = load_rows(args)
    train_rows = short_rows(train_rows, args.base_dir, args.max_length)
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as scratch:
        out_dir = Path(scratch) / "adapter"
        if variant == "stock":
            result = run_stock(args, train_rows, out_dir)
        else:
            result = run_protege(args, variant, train_rows, out_dir)
        started = time.perf_counter()
        accuracy = evaluate_labels(args.base_dir, out_dir, eval_rows, eval_labels)
        eval_s = time.perf_counter() - started
    return Measurement(
        variant=variant, examples=result.examples, train_s=result.seconds,
        examples_per_s=result.examples_per_s, tokens_per_s=result.tokens / result.seconds,
        train_cpu_s=result.cpu_seconds, peak_rss_gib=result.peak_rss_bytes / 2**30, final_loss=result.final_loss,
        accuracy=accuracy, eval_s=eval_s,
    )


# --- driver -------------------------------------------------------------------------------------


def spawn(args: BenchArgs, variant: str) -> Measurement:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", variant, "--worker-out", out.name,
               *_cli_args(args)]
        subprocess.run(cmd, check=True)
        return Measurement(**json.loads(Path(out.name).read_text()))


def _cli_args(args: BenchArgs) -> list[str]:
    return ["--data", str(args.data), "--base-dir", str(args.base_dir), "--budget-s",
            str(args.budget_s), "--train-rows", str(args.train_rows), "--eval-rows",
            str(args.eval_rows), "--batch-size", str(args.batch_size), "--lr",
            str(args.learning_rate), "--max-length", str(args.max_length), "--prompt", args.prompt,
            "--seed", str(args.seed), "--threads", str(args.threads), "--clock", args.clock]


def table(results: list[Measurement]) -> str:
    head = (f"{'variant':<16}{'examples':>9}{'train s':>9}{'ex/s':>8}{'tok/s':>8}"
            f"{'ex/cpu-s':>10}{'peak RSS':>10}{'loss':>8}{'accuracy':>10}")
    lines = [head, "-" * len(head)]
    for m in results:
        lines.append(f"{m.variant:<16}{m.examples:>9}{m.train_s:>9.1f}{m.examples_per_s:>8.2f}"
                     f"{m.tokens_per_s:>8.0f}{m.examples / m.train_cpu_s:>10.2f}"
                     f"{m.peak_rss_gib:>8.2f}Gi"
                     f"{m.final_loss:>8.3f}{m.accuracy:>10.3f}")
    stock = next((m for m in results if m.variant == "stock"), None)
    if stock is not None:
        for m in results:
            if m is stock:
                continue
            acc = f"{m.accuracy / stock.accuracy:.1f}x" if stock.accuracy > 0 else "n/a (stock 0)"
            lines.append(f"{m.variant} / stock: {m.examples_per_s / stock.examples_per_s:.1f}x "
                         f"examples/s, {m.peak_rss_gib / stock.peak_rss_gib:.2f}x peak RSS, "
                         f"accuracy {acc} after the same {stock.train_s:.0f} s budget")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[BenchArgs, list[str], str | None, str | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="BANKING77 folder (train/test csv)")
    p.add_argument("--base-dir", type=Path, required=True, help="prepared student (model_prep)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="training budget per variant, seconds (full comparison: 600)")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--prompt", choices=["short", "labels"], default="short",
                   help="system message: short instruction, or the 77 labels listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every variant (default: idle cores when the run starts)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the budget counts: wall seconds, or the worker's CPU seconds (fair "
                   "when other jobs share the machine)")
    p.add_argument("--variants", default="stock,protege",
                   help="comma list of stock, protege (defaults), protege-all (LoRA on every layer), "
                   "protege-all-noshare, protege-topN, protege-packed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.threads is None:
        from trainer.fast_sft import idle_cores

        ns.threads = idle_cores()
    args = BenchArgs(data=ns.data, base_dir=ns.base_dir.expanduser(), budget_s=ns.budget_s,
                     train_rows=ns.train_rows, eval_rows=ns.eval_rows, batch_size=ns.batch_size,
                     learning_rate=ns.lr, max_length=ns.max_length, prompt=ns.prompt, seed=ns.seed,
                     threads=ns.threads, clock=ns.clock)
    return args, ns.variants.split(","), ns.worker, ns.worker_out


def main(argv: list[str] | None = None) -> int:
    args, variants, worker_variant, worker_out = parse(argv)
    if worker_variant is not None:
        measurement = worker(args, worker_variant)
        Path(worker_out).write_text(json.dumps(asdict(measurement)))
        return 0
    print(f"budget {args.budget_s:.0f} s per variant, batch {args.batch_size}, lr "
          f"{args.learning_rate}, prompt={args.prompt}, rows <= {args.max_length} tokens, "
          f"{args.eval_rows} held-out rows, {args.threads} thread(s), {args.clock} clock",
          flush=True)
    results = []
    for variant in variants:
        results.append(spawn(args, variant))
        print(json.dumps(asdict(results[-1])), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
