"""Run configurations of the student trainer (SFT, DPO, KTO) and what a run returns.

Plain dataclasses with help text in ``metadata``, TRL-style, so a CLI can build arguments from them.
The trainer never reads the environment: the caller (``protege train``) builds these from Settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.model_prep import ALL_LINEAR


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LoraPlacement:
    """Where the LoRA adapters sit and how big they are."""

    rank: int = field(default=16, metadata=_help(
        "LoRA rank. Must not exceed the student server's max LoRA rank (vLLM --max-lora-rank)."))
    alpha: float = field(default=32.0, metadata=_help("LoRA alpha; the update is scaled by alpha/rank."))
    dropout: float = field(default=0.0, metadata=_help(
        "LoRA dropout. 0 lets peft skip the dropout op entirely (faster on CPU)."))
    target_modules: tuple[str, ...] = field(default=ALL_LINEAR, metadata=_help(
        "Linear layers that get adapters; all seven of a Llama block is what vLLM CPU LoRA accepts."))
    top_layers: int | None = field(default=10, metadata=_help(
        "Put adapters only on the top N decoder layers (None: every layer). The frozen lower layers "
        "then run forward only, with no autograd graph: on SmolLM2 (30 layers) the top 10 train "
        "1.9x faster in 0.7x the memory and reached higher accuracy per minute on BANKING77 than "
        "all 30 (docs/trainer.md)."))


@dataclass(frozen=True)
class SFTRunConfig:
    """Supervised fine-tuning of a LoRA adapter on prompt/completion rows."""

    lora: LoraPlacement = field(default_factory=LoraPlacement, metadata=_help(
        "Adapter shape; ignored when continuing from an existing adapter (its own shape is kept)."))
    learning_rate: float = field(default=2e-4, metadata=_help("Peak AdamW learning rate."))
    lr_scheduler: str = field(default="cosine", metadata=_help(
        "`linear` or `cosine`: warm-up, then a decay to zero at the last step or at the end of "
        "time_budget_s, whichever comes first (fast_sft.budget_aware_lambda). Any other "
        "transformers scheduler name is used as transformers defines it (over steps only)."))
    warmup_steps: int = field(default=5, metadata=_help("Linear warm-up steps."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    batch_size: int = field(default=16, metadata=_help("Examples per optimiser step."))
    epochs: float = field(default=1.0, metadata=_help("Passes over the rows (fractions allowed)."))
    max_steps: int | None = field(default=None, metadata=_help(
        "Stop after this many optimiser steps (overrides epochs)."))
    time_budget_s: float | None = field(default=None, metadata=_help(
        "Stop after the first step that ends past this many seconds of training."))
    budget_clock: Literal["wall", "cpu"] = field(default="wall", metadata=_help(
        "What time_budget_s counts: wall seconds, or this process's CPU seconds (fair comparisons "
        "on a machine other jobs share)."))
    max_length: int = field(default=512, metadata=_help(
        "Rows whose tokenised prompt+completion is longer are dropped (never truncated: a cut "
        "completion would teach the model to stop mid-answer)."))
    padding_free: bool = field(default=False, metadata=_help(
        "Concatenate a batch into one row with per-example positions (block-diagonal attention). "
        "False: length-grouped padded batches, which waste almost nothing on padding and on CPU "
        "avoid the (batch tokens)^2 attention mask; measured in docs/trainer.md."))
    share_prefix: bool = field(default=True, metadata=_help(
        "Run the tokens that all rows of a batch begin with (the system prompt, typically) once "
        "per batch, as a KV cache, instead of once per row. Exact; padded batches only."))
    threads: int | None = field(default=None, metadata=_help(
        "torch intra-op threads; None: the usable cores not busy right now (/proc/stat over 0.5 s), at "
        "least 1. OpenMP threads spin-wait, so sharing a busy core costs far more than it gives."))
    seed: int = field(default=0, metadata=_help("Seed of the shuffle and the LoRA initialisation."))
    logging_steps: int = field(default=10, metadata=_help("Steps between loss log lines."))


@dataclass(frozen=True)
class DPORunConfig:
    """Preference tuning (DPO) on top of an SFT adapter; never on the bare base."""

    beta: float = field(default=0.1, metadata=_help("DPO beta: strength of the pull to the reference."))
    learning_rate: float = field(default=5e-6, metadata=_help(
        "Peak learning rate; DPO wants 5e-6..1e-5, far below SFT."))
    batch_size: int = field(default=8, metadata=_help("Preference pairs per optimiser step."))
    epochs: float = field(default=1.0, metadata=_help("Passes over the pairs."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many steps."))
    max_length: int = field(default=512, metadata=_help("Longest prompt+completion kept, in tokens."))
    threads: int | None = field(default=None, metadata=_help(
        "torch threads; None: the usable cores not already busy, at least 1."))
    seed: int = field(default=0, metadata=_help("Seed of the shuffle."))


@dataclass(frozen=True)
class KTORunConfig:
    """KTO on thumbs up/down (unpaired desirable/undesirable completions), continuing the served
    adapter; the reference is a frozen copy of the adapter it starts from."""

    lora: LoraPlacement = field(default_factory=LoraPlacement, metadata=_help(
        "Adapter shape when there is no adapter to continue (the task is still served by base@v0)."))
    beta: float = field(default=0.1, metadata=_help(
        "KTO beta: strength of the pull to the reference (higher: stays closer)."))
    learning_rate: float = field(default=1e-5, metadata=_help(
        "Peak learning rate. The KTO paper uses 5e-6..1e-5 at beta 0.1; a LoRA update tolerates the "
        "top of that range, far below SFT."))
    batch_size: int = field(default=8, metadata=_help(
        "Rows per optimiser step; at least 2: the KL reference point is estimated from the batch's "
        "own completions paired with the other rows' prompts."))
    epochs: float = field(default=1.0, metadata=_help("Passes over the rows."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many steps."))
    max_length: int = field(default=512, metadata=_help("Longest prompt+completion kept, in tokens."))
    desirable_weight: float | None = field(default=None, metadata=_help(
        "Loss weight of thumbs-up rows; None: balanced from the counts (see undesirable_weight)."))
    undesirable_weight: float | None = field(default=None, metadata=_help(
        "Loss weight of thumbs-down rows; None: balanced from the counts. The KTO paper (eq. 8) wants "
        "desirable_weight * n_up / (undesirable_weight * n_down) in [1, 4/3]: the rarer side is "
        "up-weighted to ratio 1 and the other kept at 1."))
    threads: int | None = field(default=None, metadata=_help(
        "torch threads; None: the usable cores not already busy, at least 1."))
    seed: int = field(default=0, metadata=_help("Seed of the one shuffle of the rows."))


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced and what it cost."""

    out_dir: Path
    examples: int  # rows consumed, counting repeats across epochs
    seconds: float  # wall time of the training loop only (not loading or tokenising)
    examples_per_s: float
    tokens: int  # non-padding tokens through the model
    cpu_seconds: float  # CPU time of this process during the training loop (all threads)
    peak_rss_bytes: int  # peak resident memory of this process so far (ru_maxrss)
    final_loss: float
