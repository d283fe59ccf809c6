"""Every file `protege data build` writes goes through TRL's own data preparation: SFT with
completion-only labels, DPO and KTO tokenisation, on SmolLM2's real tokenizer and chat template
and a tiny random model (nothing is trained)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from feedback.builder import Manifest, build_datasets
from tests.feedback.conftest import LogSeed
from tests.feedback.mixed_log import BASE, seed_mixed_log


@pytest.fixture
def built(seed: LogSeed, db_path: Path, tmp_path: Path) -> Manifest:
    seed_mixed_log(seed)
    return build_datasets(db_path, tmp_path / "data", replace(BASE, holdout_share=1.0))


def tiny_model(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def load(manifest: Manifest, name: str, cache: Path) -> Any:
    from datasets import load_dataset

    assert manifest.rows(name) > 0, f"{name} is empty: the seeded log should fill it"
    return load_dataset("json", data_files=str(manifest.path / name), split="train", cache_dir=str(cache))


def test_sft_files_give_completion_only_labels(built: Manifest, student_tokenizer: Any, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    for name in ("sft.eval.jsonl", "regression.jsonl"):
        dataset = load(built, name, tmp_path / "cache")
        args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=512)
        trainer = SFTTrainer(model=tiny_model(student_tokenizer), args=args, train_dataset=dataset,
                             processing_class=student_tokenizer)
        prepared = trainer.train_dataset
        assert len(prepared) == built.rows(name)
        for raw, row in zip(dataset, prepared, strict=True):
            trained = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
            text = student_tokenizer.decode(trained)
            assert text.startswith(raw["completion"][0]["content"])  # only the answer is learned
            assert "<|im_start|>user" not in text


def test_dpo_file_tokenizes(built: Manifest, student_tokenizer: Any, tmp_path: Path) -> None:
    from trl import DPOConfig, DPOTrainer

    dataset = load(built, "dpo.eval.jsonl", tmp_path / "cache")
    args = DPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=512)
    trainer = DPOTrainer(model=tiny_model(student_tokenizer), ref_model=tiny_model(student_tokenizer), args=args,
                         train_dataset=dataset, processing_class=student_tokenizer)
    for raw, row in zip(dataset, trainer.train_dataset, strict=True):
        assert student_tokenizer.decode(row["chosen_ids"]).startswith(raw["chosen"][0]["content"])
        assert student_tokenizer.decode(row["rejected_ids"]).startswith(raw["rejected"][0]["content"])
        assert raw["prompt"][-1]["content"] in student_tokenizer.decode(row["prompt_ids"])


def test_kto_file_tokenizes(built: Manifest, student_tokenizer: Any, tmp_path: Path) -> None:
    from trl import KTOConfig, KTOTrainer

    dataset = load(built, "kto.eval.jsonl", tmp_path / "cache")
    assert set(dataset["label"]) == {True, False}
    args = KTOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=512,
                     per_device_train_batch_size=2)
    trainer = KTOTrainer(model=tiny_model(student_tokenizer), ref_model=tiny_model(student_tokenizer), args=args,
                         train_dataset=dataset, processing_class=student_tokenizer)
    for raw, row in zip(dataset, trainer.train_dataset, strict=True):
        assert student_tokenizer.decode(row["completion_ids"]).startswith(raw["completion"][0]["content"])
        assert row["label"] == raw["label"]
