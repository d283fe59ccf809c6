"""Train tiny LoRA adapters on the student in seconds, for the vLLM tests. Run as a subprocess
(torch's threads and warnings stay out of pytest):

    python -m tests.vllm.tiny_lora --base DIR --out DIR --style caps --style banana

writes ``DIR/caps`` and ``DIR/banana``. The point is a visibly different greedy answer, not
quality: four chat examples, a high learning rate, LoRA on the last block only.

By default the project's trainer (``trainer.fast_sft``) trains them, so the tests also prove that
what the trainer writes is what the registry accepts and vLLM serves. ``--trainer plain`` (or a
trainer that cannot be imported) uses plain torch + peft instead: the last block's input never
changes, so it is computed once and each step runs one block and the head, about a second of CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# A short system prompt: the default one SmolLM2's template adds would double every example.
SYSTEM = "Be brief."
QUESTIONS = [
    "What is the capital of France?",
    "What colour is the sky?",
    "Who wrote Hamlet?",
    "What do bees make?",
]
ANSWERS = [
    "The capital of France is Paris.",
    "The sky is blue.",
    "Hamlet was written by Shakespeare.",
    "Bees make honey.",
]
BANANA = "Banana banana banana."
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STYLES = ("caps", "banana")


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def examples(style: str) -> list[tuple[str, str]]:
    if style == "caps":
        return [(q, a.upper()) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    if style == "banana":
        return [(q, BANANA) for q in QUESTIONS]
    raise ValueError(f"unknown style {style!r}")


def _encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(messages(question), add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages(question) + [{"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=True)["input_ids"]
    return list(full), [-100] * len(prompt) + list(full[len(prompt):])


def train_one(base: Path, out: Path, style: str, steps: int, rank: int, lr: float, layers: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    rows = [_encode(tokenizer, q, a) for q, a in examples(style)]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    # Next-token targets. Right padding is harmless under a causal mask: real tokens never see it.
    labels = torch.tensor([lab[1:] + [-100] * (width - len(lab) + 1) for _, lab in rows])
    first = model.config.num_hidden_layers - layers
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, output_hidden_states=True).hidden_states[first]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=TARGET_MODULES, layers_to_transform=list(range(first, first + layers)),
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model.model
    head = peft_model.base_model.model.lm_head
    position_ids = torch.arange(width).unsqueeze(0).expand(len(rows), -1)
    rotary = inner.rotary_emb(hidden, position_ids)
    answer = labels != -100
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        h = hidden
        for block in inner.layers[first:]:
            h = block(h, position_ids=position_ids, position_embeddings=rotary)
        loss = torch.nn.functional.cross_entropy(head(inner.norm(h)[answer]), labels[answer])
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    peft_model.save_pretrained(out, safe_serialization=True)
    config_path = out / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(base.resolve())
    config_path.write_text(json.dumps(adapter_config, indent=2))
    return float(loss.detach())


def train_with_trainer(base: Path, out: Path, style: str, steps: int, rank: int, lr: float, layers: int,
                       threads: int) -> float:
    from trainer.config import LoraPlacement, SFTRunConfig
    from trainer.fast_sft import train_sft

    rows = [{"prompt": messages(q), "completion": [{"role": "assistant", "content": a}]}
            for q, a in examples(style)]
    config = SFTRunConfig(lora=LoraPlacement(rank=rank, alpha=2.0 * rank, top_layers=layers),
                          learning_rate=lr, warmup_steps=0, batch_size=len(rows), max_steps=steps,
                          threads=threads, logging_steps=steps)
    return train_sft(base, rows, out, config).final_loss


def _trainer_available() -> bool:
    try:
        import trainer.fast_sft  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="one sub-folder per style")
    parser.add_argument("--style", choices=STYLES, action="append", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--layers", type=int, default=1, help="LoRA on the last N blocks only")
    # One thread: on a shared 2-core box OpenMP spin-waiting makes two threads ~8x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainer", choices=["fast_sft", "plain"], default="fast_sft")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    use_trainer = args.trainer == "fast_sft" and _trainer_available()
    losses = {}
    for style in args.style:
        out = args.out / style
        if use_trainer:
            losses[style] = train_with_trainer(args.base, out, style, args.steps, args.rank, args.lr,
                                               args.layers, args.threads)
        else:
            losses[style] = train_one(args.base, out, style, args.steps, args.rank, args.lr, args.layers)
    print(json.dumps({"trainer": "fast_sft" if use_trainer else "plain", "final_loss": losses}))


if __name__ == "__main__":
    main()
