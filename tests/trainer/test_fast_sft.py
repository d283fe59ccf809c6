"""trainer.fast_sft and trainer.lora: the completion-only loss, the data, and real training."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="trainer extra not installed")

from trainer.config import DPORunConfig, LoraPlacement, SFTRunConfig
from trainer.fast_sft import (
    budget_aware_lambda,
    build_dataset,
    completion_nll,
    decay_factor,
    cpu_busy_now,
    generate_greedy,
    idle_cores,
    label_accuracy,
    load_for_training,
    make_sft_trainer,
    run_trainer,
    shared_prefix_length,
    tokenize_row,
    train_dpo,
    train_sft,
    usable_cores,
)
from trainer.lora import attach_lora, layer_indices, lora_config
from trainer.model_prep import greedy_completion

# Two layers at the top, a handful of rows: enough to exercise every code path in seconds.
TINY = SFTRunConfig(lora=LoraPlacement(rank=4, alpha=8.0, top_layers=2), batch_size=4,
                    max_steps=2, warmup_steps=0, learning_rate=1e-3, threads=2, logging_steps=1)


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def reference_nll(model: Any, input_ids: Any, labels: Any, **inputs: Any) -> Any:
    """The plain way: full logits at every position, masked mean cross-entropy."""
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def padded_batch() -> tuple[Any, Any, Any]:
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    return input_ids, attention_mask, labels


def test_completion_nll_matches_full_logits_cross_entropy() -> None:
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    fast = completion_nll(model, input_ids, labels, attention_mask=attention_mask)
    reference = reference_nll(model, input_ids, labels, attention_mask=attention_mask)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_completion_nll_gradients_match_the_reference() -> None:
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    completion_nll(model, input_ids, labels, attention_mask=attention_mask).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_nll(model, input_ids, labels, attention_mask=attention_mask).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_completion_nll_on_a_padding_free_row_matches_separate_rows() -> None:
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    lengths = attention_mask.sum(1).tolist()
    packed_ids = torch.cat([input_ids[i, :n] for i, n in enumerate(lengths)])[None]
    packed_labels = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = completion_nll(model, packed_ids, packed_labels, position_ids=positions)
    reference = reference_nll(model, input_ids, labels, attention_mask=attention_mask)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-6)


def test_completion_nll_divides_by_num_items_when_given() -> None:
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    mean = completion_nll(model, input_ids, labels, attention_mask=attention_mask)
    scored = int((labels[:, 1:] != -100).sum())
    summed = completion_nll(model, input_ids, labels, attention_mask=attention_mask, num_items=1)
    torch.testing.assert_close(summed, mean * scored)


def prefix_batch() -> tuple[Any, Any, Any]:
    """Three right-padded rows that begin with the same four tokens (a 'system prompt')."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 20, 21, 0, 0],
                              [5, 6, 7, 8, 30, 31, 32, 0]])
    attention_mask = (torch.arange(8)[None] < torch.tensor([[8], [6], [7]])).long()
    labels = torch.full_like(input_ids, -100)
    labels[0, 6:8], labels[1, 5:6], labels[2, 5:7] = input_ids[0, 6:8], input_ids[1, 5:6], input_ids[2, 5:7]
    return input_ids, attention_mask, labels


def test_shared_prefix_stops_before_the_first_scored_position() -> None:
    input_ids, _, labels = prefix_batch()
    assert shared_prefix_length(input_ids, labels) == 4
    early = labels.clone()
    early[1, 3] = 8  # a row scored from position 3 needs position 2's hidden state in the suffix
    assert shared_prefix_length(input_ids, early) == 2
    assert shared_prefix_length(input_ids[:1], labels[:1]) == 0


def test_shared_prefix_loss_and_gradients_match_the_reference() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj",
                                                                         "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the prefix's LoRA weights get a real gradient
            torch.nn.init.normal_(param, std=0.1)
    input_ids, attention_mask, labels = prefix_batch()
    shared = completion_nll(model, input_ids, labels, attention_mask=attention_mask,
                            share_prefix=True)
    shared.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = reference_nll(model, input_ids, labels, attention_mask=attention_mask)
    reference.backward()
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_upper_layer_placement() -> None:
    assert layer_indices(30, None) is None
    assert layer_indices(30, 30) is None
    assert layer_indices(30, 3) == [27, 28, 29]
    with pytest.raises(ValueError):
        layer_indices(30, 0)
    config = lora_config(LoraPlacement(rank=8, top_layers=2), num_layers=30)
    assert config.r == 8 and config.layers_to_transform == [28, 29]


def test_rows_tokenize_with_the_completion_masked_in(student_tokenizer: Any,
                                                      colour_rows: list[dict]) -> None:
    ids, prompt_len = tokenize_row(student_tokenizer, colour_rows[0])
    assert student_tokenizer.decode(ids[prompt_len:]) == "green<|im_end|>\n"
    prompt_ids = student_tokenizer.apply_chat_template(
        colour_rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]
    assert ids[:prompt_len] == list(prompt_ids)


def test_over_long_rows_are_dropped_not_truncated(student_tokenizer: Any,
                                                  colour_rows: list[dict]) -> None:
    long_row = dict(colour_rows[0], prompt=[{"role": "user", "content": "word " * 200}])
    dataset, dropped = build_dataset(student_tokenizer, [*colour_rows, long_row], max_length=64)
    assert dropped == 1
    assert len(dataset) == len(colour_rows)
    for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"], strict=True):
        assert len(ids) == len(mask) <= 64
        assert mask[0] == 0 and mask[-1] == 1


def test_batched_left_padded_generation_matches_one_by_one(student_dir: Path,
                                                           colour_rows: list[dict]) -> None:
    model, tokenizer = load_for_training(student_dir)
    model.config.use_cache = True
    prompts = [row["prompt"] for row in colour_rows[:3]]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    one_by_one = [tokenizer.decode(greedy_completion(model, tokenizer, p, 6),
                                   skip_special_tokens=True) for p in prompts]
    assert batched == one_by_one
    labels = [batched[0].strip(), "not-an-answer", "also-not"]
    assert label_accuracy(model, tokenizer, colour_rows[:3], labels, max_new_tokens=6) == pytest.approx(1 / 3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_decay_ends_at_the_time_budget_when_it_comes_before_the_last_step() -> None:
    clock = FakeClock()
    # the budget's clock starts when the schedule is made
    factor = budget_aware_lambda("cosine", warmup_steps=2, total_steps=1000, budget_s=10.0, clock=clock)
    assert factor(0) == pytest.approx(1 / 3)  # warm-up
    assert factor(1) == pytest.approx(2 / 3)
    clock.now += 5.0
    assert factor(10) == pytest.approx(0.5)  # half the budget gone, 1% of the steps
    clock.now += 5.0
    assert factor(20) == 0.0


def test_decay_follows_the_steps_when_they_end_first() -> None:
    clock = FakeClock()
    factor = budget_aware_lambda("linear", warmup_steps=0, total_steps=10, budget_s=3600.0, clock=clock)
    assert factor(0) == 1.0
    clock.now += 1.0
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == 0.0
    without_budget = budget_aware_lambda("linear", warmup_steps=0, total_steps=10, budget_s=None, clock=clock)
    assert without_budget(0) == 1.0 and without_budget(8) == pytest.approx(0.2)


def test_decay_shapes() -> None:
    assert decay_factor("cosine", 0.25) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))
    assert decay_factor("linear", 2.0) == 0.0 and decay_factor("cosine", -1.0) == 1.0
    with pytest.raises(ValueError, match="unknown decay shape"):
        decay_factor("step", 0.5)


@pytest.mark.training
@pytest.mark.parametrize(("scheduler", "last_lr"), [("cosine", 0.0), ("constant_with_warmup", 1e-3)])
def test_the_run_ends_at_its_schedules_last_learning_rate(student_dir: Path, colour_rows: list[dict],
                                                           tmp_path: Path, scheduler: str,
                                                           last_lr: float) -> None:
    model, tokenizer = load_for_training(student_dir)
    config = SFTRunConfig(**{**TINY.__dict__, "lr_scheduler": scheduler, "time_budget_s": 3600.0})
    trainer = make_sft_trainer(attach_lora(model, TINY.lora), tokenizer, colour_rows, config, tmp_path)
    run_trainer(trainer, tmp_path / "out")
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(last_lr)


@pytest.mark.training
def test_training_changes_lora_weights_only(student_dir: Path, colour_rows: list[dict],
                                            tmp_path: Path) -> None:
    model, tokenizer = load_for_training(student_dir)
    peft_model = attach_lora(model, TINY.lora)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and (".28." in n or ".29." in n) for n in trainable)
    trainer = make_sft_trainer(peft_model, tokenizer, colour_rows, TINY, tmp_path)
    result = run_trainer(trainer, tmp_path / "out")
    after = dict(peft_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable
    assert result.examples == 2 * TINY.batch_size
    assert result.tokens > result.examples and result.final_loss > 0


@pytest.mark.training
def test_saved_adapter_is_standard_peft_and_continues(student_dir: Path, colour_rows: list[dict],
                                                      tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    first = train_sft(student_dir, colour_rows, tmp_path / "v1", TINY)
    assert sorted(p.name for p in first.out_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((first.out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(student_dir.resolve())
    assert config["layers_to_transform"] == [28, 29]

    model, tokenizer = load_for_training(student_dir)
    ids = tokenizer("the sky is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        base_logits = model(ids).logits.clone()
        loaded = PeftModel.from_pretrained(model, str(first.out_dir))
        assert not torch.equal(loaded(ids).logits, base_logits)

    second = train_sft(student_dir, colour_rows, tmp_path / "v2",
                       SFTRunConfig(**{**TINY.__dict__, "lora": LoraPlacement(rank=16)}),
                       init_adapter=first.out_dir)
    v1 = load_file(first.out_dir / "adapter_model.safetensors")
    v2 = load_file(second.out_dir / "adapter_model.safetensors")
    assert v1.keys() == v2.keys()  # the continued adapter keeps its shape, not the new config's
    assert all(v1[k].shape == v2[k].shape for k in v1)
    assert any(not torch.equal(v1[k], v2[k]) for k in v1)


@pytest.mark.training
def test_dpo_moves_the_sft_adapter(student_dir: Path, colour_rows: list[dict],
                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sft = train_sft(student_dir, colour_rows, tmp_path / "sft", TINY)
    pairs = [{"prompt": row["prompt"], "chosen": row["completion"],
              "rejected": [{"role": "assistant", "content": "I do not know."}]}
             for row in colour_rows[:4]]
    result = train_dpo(student_dir, pairs, tmp_path / "dpo",
                       DPORunConfig(batch_size=2, max_steps=1, learning_rate=1e-5, threads=2),
                       sft.out_dir)
    before = load_file(sft.out_dir / "adapter_model.safetensors")
    after = load_file(result.out_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # only the trained adapter is saved, not "ref"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(student_dir.resolve())


def test_banking77_bench_rows_fit_the_trainer(banking77_dir: Path, student_tokenizer: Any) -> None:
    from bench.trainer_throughput import BenchArgs, load_rows

    args = BenchArgs(data=banking77_dir, base_dir=Path("unused"), budget_s=1.0, train_rows=64,
                     eval_rows=16, batch_size=16, learning_rate=1e-3, max_length=64,
                     prompt="short", seed=0, threads=1, clock="wall")
    train, held_out, labels = load_rows(args)
    categories = set(json.loads((banking77_dir / "categories.json").read_text()))
    assert len(train) == 64 and len(held_out) == len(labels) == 16
    assert {row["completion"][0]["content"] for row in train} <= categories
    assert [row["completion"][0]["content"] for row in held_out] == labels
    dataset, dropped = build_dataset(student_tokenizer, train, max_length=64)
    assert dropped < len(train) // 5  # ~6% of BANKING77 rows pass 64 tokens with the short prompt
    assert len(dataset) == len(train) - dropped


def test_threads_go_to_the_cores_nothing_else_is_using() -> None:
    cores = usable_cores()
    assert idle_cores(lambda: 0.0) == cores
    assert idle_cores(lambda: 0.9) == max(1, cores - 1)
    assert idle_cores(lambda: 64.0) == 1  # never fewer than one
    assert 0.0 <= cpu_busy_now(0.05) <= (os.cpu_count() or 1) + 0.01
