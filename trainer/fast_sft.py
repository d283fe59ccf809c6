"""Fast LoRA training of the student on CPU: TRL's SFTTrainer/DPOTrainer, configured for throughput.

What makes SFT fast here (measured in docs/trainer.md):

* no gradient checkpointing (TRL 1.16 turns it on by default; on CPU it only costs time), fp32;
* padding-free batches (one concatenated row, per-example positions; transformers builds the
  block-diagonal mask from them) or, alternatively, length-grouped padded batches;
* loss and logits only on completion tokens: the backbone's hidden states are gathered at the
  completion positions *before* the 49k-vocabulary lm_head (TRL's fused head scores every position
  on CPU and adds entropy/accuracy metrics);
* optionally LoRA on the top layers only, so the frozen lower layers run forward without autograd;
* torch threads = usable cores.

Everything else (tokenisation, labels, collation, optimiser, schedule) is stock TRL/transformers.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import DPORunConfig, LoraPlacement, SFTRunConfig, TrainResult
from trainer.lora import attach_lora, check_adapter_dir, save_adapter

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Row = dict[str, Any]
log = logging.getLogger(__name__)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(busy_cores: Callable[[], float] | None = None) -> int:
    """Usable cores not kept busy right now by other processes, at least 1.

    OpenMP threads spin-wait for each other: with one thread per core and another process on one
    of the cores, a step runs several times slower than with one thread (docs/trainer.md).
    Measured over a short window, not with the load average: that lags by a minute, and a
    retrain starts right after its own evaluation kept vLLM busy.
    """
    busy = (busy_cores or cpu_busy_now)()
    return max(1, usable_cores() - int(busy + 0.5))


def cpu_busy_now(window_s: float = 0.5) -> float:
    """Cores busy during the next ``window_s`` seconds (all processes; this one is asleep), from
    /proc/stat; the 1-minute load average where there is no /proc."""
    try:
        before = _cpu_jiffies()
        time.sleep(window_s)
        after = _cpu_jiffies()
    except OSError:
        return os.getloadavg()[0]
    busy, total = after[0] - before[0], after[1] - before[1]
    return os.cpu_count() * busy / total if total > 0 else 0.0  # type: ignore[operator]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as handle:
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        fields = [int(value) for value in handle.readline().split()[1:9]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def set_threads(threads: int | None) -> int:
    import torch

    count = threads or idle_cores()
    torch.set_num_threads(count)
    return count


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- data ---------------------------------------------------------------------------------------


def tokenize_row(tokenizer: PreTrainedTokenizerBase, row: Row) -> tuple[list[int], int]:
    """Token ids of prompt+completion and the prompt's length, as TRL tokenises a conversational
    prompt/completion row (the completion starts where the two tokenisations diverge)."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                         return_dict=True)["input_ids"]
    shared = 0
    for a, b in zip(prompt, full, strict=False):
        if a != b:
            break
        shared += 1
    return list(full), shared


def build_dataset(tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row],
                  max_length: int) -> tuple[Dataset, int]:
    """Pre-tokenised dataset (input_ids + completion_mask) and the count of rows dropped as too long.

    Tokenising here rather than in TRL lets padding-free training drop over-long rows instead of
    truncating them (TRL refuses max_length with padding-free and no packing).
    """
    from datasets import Dataset

    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    for row in rows:
        ids, prompt_len = tokenize_row(tokenizer, row)
        if len(ids) > max_length or prompt_len >= len(ids):
            continue
        input_ids.append(ids)
        masks.append([0] * prompt_len + [1] * (len(ids) - prompt_len))
    if not input_ids:
        raise ValueError(f"no usable rows: all {len(rows)} are longer than {max_length} tokens "
                         "or have an empty completion")
    dataset = Dataset.from_dict({"input_ids": input_ids, "completion_mask": masks})
    return dataset, len(rows) - len(input_ids)


# --- the completion-only loss -------------------------------------------------------------------


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Leading positions that every row of a padded batch shares and that predict no label.

    Typically the system prompt: it can then run once per batch instead of once per row.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    common = int(same.long().cumprod(dim=0).sum())
    first_scored = int((labels != -100).long().argmax(dim=1).min())
    # the hidden state at first_scored - 1 predicts the first label: it must be in the suffix
    return max(0, min(common, first_scored - 1))


def _hidden_states(backbone: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                   prefix: int) -> torch.Tensor:
    """Last hidden states from position ``prefix`` on; the shared prefix runs once, as a KV cache
    repeated over the batch (gradients flow back through it into the prefix's LoRA weights)."""
    if prefix == 0:
        return backbone(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=False).last_hidden_state
    cache = backbone(input_ids=input_ids[:1, :prefix], use_cache=True).past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    return backbone(input_ids=input_ids[:, prefix:], attention_mask=attention_mask,
                    past_key_values=cache, use_cache=True).last_hidden_state


def completion_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None,
                   num_items: int | torch.Tensor | None = None,
                   share_prefix: bool = False) -> torch.Tensor:
    """Mean next-token NLL over the positions whose label is not -100.

    Equals ``cross_entropy(model(...).logits[:, :-1], labels[:, 1:], ignore_index=-100)`` but
    applies the lm_head only at the scored positions: with a few completion tokens per row, the
    full (tokens x 49k) logits are most of the step's time and memory. ``num_items`` overrides the
    divisor (transformers passes the batch's token count for gradient accumulation).
    ``share_prefix`` runs the rows' common leading tokens once (padded batches only).
    """
    import torch.nn.functional as F

    causal_lm = _causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    prefix = shared_prefix_length(input_ids, labels) if share_prefix and position_ids is None else 0
    hidden = _hidden_states(backbone, input_ids, attention_mask, position_ids, prefix)
    targets = labels[:, prefix + 1:]
    scored = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][scored])
    total = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
    divisor = scored.sum() if num_items is None else num_items
    return total / max(int(divisor), 1)


# --- the learning-rate schedule -----------------------------------------------------------------

DECAY_SHAPES = ("linear", "cosine")


def decay_factor(shape: str, progress: float) -> float:
    """Multiplier of the peak learning rate at ``progress`` (0..1) through the run."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay shape {shape!r}; expected one of {DECAY_SHAPES}")


def budget_aware_lambda(shape: str, warmup_steps: int, total_steps: int, budget_s: float | None,
                        clock: Callable[[], float]) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up, then a decay to zero at whichever end comes first, the
    last step or the time budget.

    transformers' schedules decay over a step count; a time-budgeted run does not know how many
    steps it will get (that depends on the machine and on what else runs on it), so a step-based
    decay would stop near its peak. Progress is measured here on both axes and the larger wins.
    The clock starts now: the Trainer builds its scheduler right before the first step.
    """
    started = clock()

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        by_time = (clock() - started) / budget_s if budget_s else 0.0
        return decay_factor(shape, max(by_steps, by_time))

    return factor


def _batch_stats(inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(examples, real tokens) of a collated batch, padded or padding-free."""
    position_ids = inputs.get("position_ids")
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        return int(mask.shape[0]), int(mask.sum())
    if position_ids is not None:
        return int((position_ids == 0).sum()), int(position_ids.numel())
    ids = inputs["input_ids"]
    return int(ids.shape[0]), int(ids.numel())


# --- trainer ------------------------------------------------------------------------------------


def _trainer_classes() -> tuple[type, type]:
    # Defined lazily: importing trl/transformers at module import would slow every CLI start.
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss gathers completion positions before the lm_head; no extra metrics."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.share_prefix = False
            self.examples_seen = 0
            self.tokens_seen = 0
            self.recent_losses: list[float] = []
            # total steps -> LambdaLR factor; None: transformers' own scheduler
            self.lr_factor_for: Callable[[int], Callable[[int], float]] | None = None

        def create_scheduler(self, num_training_steps, optimizer=None):  # type: ignore[override]
            if self.lr_factor_for is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            from torch.optim.lr_scheduler import LambdaLR

            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.lr_factor_for(num_training_steps))
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            loss = completion_nll(model, inputs["input_ids"], inputs["labels"],
                                  attention_mask=inputs.get("attention_mask"),
                                  position_ids=inputs.get("position_ids"),
                                  num_items=num_items_in_batch,
                                  share_prefix=self.share_prefix)
            if model.training:
                examples, tokens = _batch_stats(inputs)
                self.examples_seen += examples
                self.tokens_seen += tokens
                self.recent_losses = (self.recent_losses + [float(loss.detach())])[-10:]
            return (loss, None) if return_outputs else loss

    class TimeBudget(TrainerCallback):
        """Stops training after the first step that ends past the budget on ``clock``."""

        def __init__(self, budget_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
            self.budget_s = budget_s
            self.clock = clock
            self.started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.started = self.clock()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.clock() - self.started >= self.budget_s:
                control.should_training_stop = True

    return CompletionOnlySFTTrainer, TimeBudget


def quiet_logging(trainer: Any) -> None:
    """Send the Trainer's log lines to our logger instead of print() on stdout."""
    from transformers import PrinterCallback, TrainerCallback

    class ToLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            log.info("step %d: %s", state.global_step, logs)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ToLogger())


def sft_arguments(config: SFTRunConfig, scratch_dir: Path) -> Any:
    """The SFTConfig protege trains with: TRL's, minus what costs time on CPU."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(scratch_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        gradient_checkpointing=False,  # TRL's default is True: recomputation is pure loss on CPU
        bf16=False,  # TRL's default is True; CPUs without AMX run bf16 slower than fp32
        use_cpu=True,
        padding_free=config.padding_free,
        max_length=None,  # build_dataset already dropped over-long rows
        completion_only_loss=True,
        train_sampling_strategy="random" if config.padding_free else "group_by_length",
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        logging_steps=config.logging_steps,
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
    )


def load_for_training(base_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return model, tokenizer


def make_sft_trainer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                     rows: Sequence[Row], config: SFTRunConfig, scratch_dir: Path) -> Any:
    """The configured TRL trainer for an already LoRA-wrapped ``model`` (see ``train_sft``)."""
    dataset, dropped = build_dataset(tokenizer, rows, config.max_length)
    if dropped:
        log.warning("dropped %d of %d rows longer than %d tokens", dropped, len(rows),
                    config.max_length)
    trainer_cls, budget_cls = _trainer_classes()
    trainer = trainer_cls(model=model, args=sft_arguments(config, scratch_dir),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.share_prefix = config.share_prefix
    quiet_logging(trainer)
    clock = time.process_time if config.budget_clock == "cpu" else time.perf_counter
    if config.lr_scheduler in DECAY_SHAPES:
        trainer.lr_factor_for = partial(budget_aware_lambda, config.lr_scheduler, config.warmup_steps,
                                        budget_s=config.time_budget_s, clock=clock)
    if config.time_budget_s is not None:
        trainer.add_callback(budget_cls(config.time_budget_s, clock))
    return trainer


def run_trainer(trainer: Any, out_dir: Path) -> TrainResult:
    """Run ``trainer.train()`` and measure it; saving is the caller's."""
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    losses = trainer.recent_losses
    return TrainResult(
        out_dir=out_dir,
        examples=trainer.examples_seen,
        seconds=seconds,
        examples_per_s=trainer.examples_seen / seconds if seconds > 0 else 0.0,
        tokens=trainer.tokens_seen,
        cpu_seconds=cpu,
        peak_rss_bytes=peak_rss_bytes(),
        final_loss=sum(losses) / len(losses) if losses else math.nan,
    )


def seeded_lora_model(base_dir: Path, placement: LoraPlacement, init_adapter: Path | None,
                      threads: int | None, seed: int) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Threads and seed set, the base loaded, a trainable LoRA attached (fresh or continued)."""
    from transformers import set_seed

    set_threads(threads)
    set_seed(seed)
    model, tokenizer = load_for_training(base_dir)
    return attach_lora(model, placement, init_adapter), tokenizer


def train_sft(base_dir: Path, rows: Sequence[Row], out_dir: Path, config: SFTRunConfig,
              init_adapter: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on prompt/completion rows and save it (standard peft) to ``out_dir``.

    ``rows`` are TRL conversational prompt/completion rows: ``{"prompt": [messages...],
    "completion": [{"role": "assistant", "content": ...}]}``; loss is on the completion only.
    ``init_adapter`` continues training an existing adapter (its rank/placement are kept).
    """
    peft_model, tokenizer = seeded_lora_model(Path(base_dir), config.lora, init_adapter, config.threads,
                                              config.seed)
    with tempfile.TemporaryDirectory(prefix="protege-sft-") as scratch:
        trainer = make_sft_trainer(peft_model, tokenizer, rows, config, Path(scratch))
        result = run_trainer(trainer, Path(out_dir))
    save_adapter(peft_model, Path(out_dir), Path(base_dir))
    return result


# --- evaluation (benchmark only; production evaluates through vLLM) ----------------------------


def generate_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[list[dict]], max_new_tokens: int,
                    batch_size: int = 32) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def label_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   rows: Sequence[Row], labels: Sequence[str],
                   max_new_tokens: int | None = None) -> float:
    """Share of rows whose greedy answer, stripped, equals the expected label.

    Generation stops at the longest label's length plus two (end of turn) unless told otherwise.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    if not rows:
        raise ValueError("no rows to evaluate")
    if max_new_tokens is None:
        max_new_tokens = 2 + max(len(tokenizer(label, add_special_tokens=False)["input_ids"])
                                 for label in labels)
    answers = generate_greedy(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
    hits = sum(answer.strip() == label for answer, label in zip(answers, labels, strict=True))
    return hits / len(rows)


def evaluate_labels(base_dir: Path, adapter_dir: Path | None, rows: Sequence[Row],
                    labels: Sequence[str]) -> float:
    """Greedy exact-match accuracy of base (+ adapter) on ``rows`` (their ``prompt`` only).

    ``labels[i]`` is the expected answer of ``rows[i]``.
    """
    from peft import PeftModel

    model, tokenizer = load_for_training(Path(base_dir))
    model.config.use_cache = True
    if adapter_dir is not None:
        check_adapter_dir(Path(adapter_dir))
        # Merged weights generate faster and give the same greedy answers.
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return label_accuracy(model, tokenizer, rows, labels)


# --- DPO ----------------------------------------------------------------------------------------


def train_dpo(base_dir: Path, pairs: Sequence[Row], out_dir: Path, config: DPORunConfig,
              sft_adapter: Path) -> TrainResult:
    """Preference-tune an SFT adapter with TRL's DPOTrainer and save the result to ``out_dir``.

    ``pairs`` are TRL conversational preference rows: ``{"prompt": [...], "chosen": [assistant
    message], "rejected": [assistant message]}``. The reference policy is the SFT adapter itself
    (TRL keeps a frozen copy of it as the ``ref`` adapter), never the bare base.
    """
    from datasets import Dataset
    from peft import PeftModel
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    check_adapter_dir(Path(sft_adapter))
    set_threads(config.threads)
    set_seed(config.seed)
    model, tokenizer = load_for_training(Path(base_dir))
    # Given a PeftModel, TRL freezes a copy of its adapter as "ref": the reference is the SFT policy.
    policy = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
    dataset = Dataset.from_list([dict(pair) for pair in pairs])
    with tempfile.TemporaryDirectory(prefix="protege-dpo-") as scratch:
        args = DPOConfig(
            output_dir=scratch, beta=config.beta, learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size, num_train_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            max_length=config.max_length, gradient_checkpointing=False, bf16=False, use_cpu=True,
            precompute_ref_log_probs=False, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=config.seed, data_seed=config.seed, logging_steps=1,
        )
        trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
        quiet_logging(trainer)
        return run_preference_trainer(trainer, policy, Path(base_dir), Path(out_dir),
                                      len(pairs) * max(1, math.ceil(config.epochs)), config.batch_size)


def run_preference_trainer(trainer: Any, policy: PeftModel, base_dir: Path, out_dir: Path,
                           max_examples: int, batch_size: int) -> TrainResult:
    """Train a DPO/KTO ``trainer`` whose policy continues an adapter, then save only that adapter
    (TRL keeps a frozen copy of it as "ref", the reference policy)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if "ref" in policy.peft_config:
        policy.delete_adapter("ref")
    save_adapter(policy, out_dir, base_dir)
    examples = min(max(int(output.global_step), 1) * batch_size, max_examples)
    return TrainResult(out_dir=out_dir, examples=examples, seconds=seconds,
                       examples_per_s=examples / seconds if seconds > 0 else 0.0, tokens=0,
                       cpu_seconds=cpu, peak_rss_bytes=peak_rss_bytes(),
                       final_loss=float(output.training_loss))
