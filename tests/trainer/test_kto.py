"""trainer.kto: KTO on thumbs, on the real student (a couple of optimiser steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="trainer extra not installed")

from trainer.config import KTORunConfig, LoraPlacement, SFTRunConfig
from trainer.fast_sft import load_for_training, train_sft
from trainer.kto import make_kto_trainer, train_kto
from trainer.lora import attach_lora

TINY = KTORunConfig(lora=LoraPlacement(rank=4, alpha=8.0, top_layers=2), batch_size=4, max_steps=2,
                    learning_rate=1e-4, threads=2)


def thumbs(colour_rows: list[dict]) -> list[dict[str, Any]]:
    """The right colour rated up, a refusal rated down: both kinds, unbalanced (6 up, 2 down)."""
    rows = [{**row, "label": True} for row in colour_rows[:6]]
    refusal = [{"role": "assistant", "content": "I do not know."}]
    return rows + [{"prompt": row["prompt"], "completion": refusal, "label": False}
                   for row in colour_rows[6:]]


@pytest.mark.training
def test_kto_changes_the_trained_adapter_only(student_dir: Path, colour_rows: list[dict],
                                             tmp_path: Path) -> None:
    model, tokenizer = load_for_training(student_dir)
    policy = attach_lora(model, TINY.lora)
    trainer = make_kto_trainer(policy, tokenizer, thumbs(colour_rows), TINY, tmp_path)
    assert (trainer.args.desirable_weight, trainer.args.undesirable_weight) == (1.0, 3.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n and (".28." in n or ".29." in n) for n in trainable)
    assert any(".ref." in n for n in before)  # TRL's frozen reference copy
    trainer.train()
    after = dict(policy.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable  # base weights and the "ref" copy stay as they were


@pytest.mark.training
def test_kto_continues_an_adapter_and_saves_standard_peft(student_dir: Path, colour_rows: list[dict],
                                                          tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    start = train_sft(student_dir, colour_rows, tmp_path / "sft",
                      SFTRunConfig(lora=TINY.lora, batch_size=4, max_steps=1, warmup_steps=0, threads=2))
    result = train_kto(student_dir, thumbs(colour_rows), tmp_path / "kto", TINY, start.out_dir)
    before = load_file(start.out_dir / "adapter_model.safetensors")
    after = load_file(result.out_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # only the trained adapter is saved, not "ref"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(student_dir.resolve())
    assert result.examples == 2 * TINY.batch_size and result.final_loss > 0

    model, tokenizer = load_for_training(student_dir)
    ids = tokenizer("the sky is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        base_logits = model(ids).logits.clone()
        loaded = PeftModel.from_pretrained(model, str(result.out_dir))
        assert not torch.equal(loaded(ids).logits, base_logits)
