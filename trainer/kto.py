"""KTO of the student on thumbs up/down: TRL's KTOTrainer on a LoRA adapter, configured for CPU.

KTO learns from unpaired judgements ("this answer was good", "this one was bad"), which is all
that thumbs give; DPO needs a better and a worse answer to the same prompt. As with DPO here, the
trained adapter continues the one it starts from and TRL keeps a frozen copy of it as reference.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import KTORunConfig, TrainResult
from trainer.fast_sft import quiet_logging, run_preference_trainer, seeded_lora_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]


def balanced_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) for these counts of thumbs up and down.

    The KTO paper (eq. 8, and TRL's check) wants desirable_weight * n_up / (undesirable_weight *
    n_down) in [1, 4/3]. Up-weighting only the rarer side, to ratio 1, leaves the common side's
    loss scale (and so the learning rate's meaning) unchanged.
    """
    if desirable < 1 or undesirable < 1:
        raise ValueError(f"KTO needs thumbs up and thumbs down rows; got {desirable} up, {undesirable} down")
    if desirable >= undesirable:
        return 1.0, desirable / undesirable
    return undesirable / desirable, 1.0


def loss_weights(config: KTORunConfig, labels: Sequence[bool]) -> tuple[float, float]:
    """The configured weights, each one left unset taken from ``balanced_weights``."""
    up = sum(1 for label in labels if label)
    desirable, undesirable = balanced_weights(up, len(labels) - up)
    return (config.desirable_weight if config.desirable_weight is not None else desirable,
            config.undesirable_weight if config.undesirable_weight is not None else undesirable)


def kto_arguments(config: KTORunConfig, scratch_dir: Path, weights: tuple[float, float]) -> Any:
    """The KTOConfig protege trains with: TRL's, minus what costs time on CPU."""
    from trl import KTOConfig

    return KTOConfig(
        output_dir=str(scratch_dir),
        beta=config.beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        max_length=config.max_length,
        gradient_checkpointing=False,  # TRL's default is True: recomputation is pure loss on CPU
        bf16=False,  # TRL's default is True; CPUs without AMX run bf16 slower than fp32
        use_cpu=True,
        precompute_ref_log_probs=False,
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
    )


def make_kto_trainer(policy: PeftModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row], config: KTORunConfig,
                     scratch_dir: Path) -> Any:
    """The configured TRL KTOTrainer for a LoRA-wrapped ``policy`` (see ``train_kto``).

    Given a PeftModel, TRL adds a frozen copy of its adapter as "ref": the reference policy is
    the adapter training starts from.
    """
    from datasets import Dataset
    from trl import KTOTrainer

    weights = loss_weights(config, [bool(row["label"]) for row in rows])
    # KTOTrainer samples in order (each row's KL completion is fixed against its batch
    # neighbours) and the build writes rows by time: shuffle once so batches mix up and down.
    shuffled = [dict(row) for row in rows]
    random.Random(config.seed).shuffle(shuffled)
    trainer = KTOTrainer(model=policy, args=kto_arguments(config, scratch_dir, weights),
                         train_dataset=Dataset.from_list(shuffled), processing_class=tokenizer)
    quiet_logging(trainer)
    return trainer


def train_kto(base_dir: Path, rows: Sequence[Row], out_dir: Path, config: KTORunConfig,
              init_adapter: Path | None = None) -> TrainResult:
    """KTO-tune an adapter on thumbs and save the result (standard peft) to ``out_dir``.

    ``rows`` are TRL conversational unpaired preference rows: ``{"prompt": [...], "completion":
    [assistant message], "label": bool}`` (True: thumbs up). ``init_adapter`` is the adapter to
    continue; None starts a fresh LoRA on the base (zero-initialised, so the reference is the
    base itself, as ``base@v0`` serves it).
    """
    policy, tokenizer = seeded_lora_model(Path(base_dir), config.lora, init_adapter, config.threads, config.seed)
    with tempfile.TemporaryDirectory(prefix="protege-kto-") as scratch:
        trainer = make_kto_trainer(policy, tokenizer, rows, config, Path(scratch))
        return run_preference_trainer(trainer, policy, Path(base_dir), Path(out_dir),
                                      len(rows) * max(1, math.ceil(config.epochs)), config.batch_size)
