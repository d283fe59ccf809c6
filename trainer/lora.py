"""LoRA adapters of the student: build, attach (fresh or continued), save in standard peft format.

The saved folder is exactly what peft and vLLM load: ``adapter_config.json`` (with
``base_model_name_or_path`` set to the base folder) and ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import LoraPlacement

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def layer_indices(num_layers: int, top_layers: int | None) -> list[int] | None:
    """Decoder layers that get adapters: the top ``top_layers`` of ``num_layers`` (None: all)."""
    if top_layers is None or top_layers >= num_layers:
        return None
    if top_layers < 1:
        raise ValueError(f"top_layers must be at least 1, got {top_layers}")
    return list(range(num_layers - top_layers, num_layers))


def lora_config(placement: LoraPlacement, num_layers: int) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=placement.rank,
        lora_alpha=placement.alpha,
        lora_dropout=placement.dropout,
        target_modules=list(placement.target_modules),
        layers_to_transform=layer_indices(num_layers, placement.top_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, placement: LoraPlacement,
                init_adapter: Path | None = None) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA: fresh from ``placement`` or continued from a saved one.

    A continued adapter keeps its own rank and placement; ``placement`` is then ignored.
    """
    from peft import PeftModel, get_peft_model

    if init_adapter is not None:
        check_adapter_dir(init_adapter)
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    return get_peft_model(model, lora_config(placement, model.config.num_hidden_layers))


def check_adapter_dir(adapter_dir: Path) -> None:
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (adapter_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter: missing {', '.join(missing)}")


def save_adapter(model: PeftModel, out_dir: Path, base_dir: Path,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Save the adapter atomically (temp folder, then rename) with ``base_model_name_or_path`` set."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp_dir), safe_serialization=True)
        _pin_base(tmp_dir, base_dir)
        for name, text in (extra_files or {}).items():
            (tmp_dir / name).write_text(text)
        tmp_dir.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _pin_base(adapter_dir: Path, base_dir: Path) -> None:
    # peft records whatever name the model was loaded under; vLLM and peft need the real folder.
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def trainable_parameter_count(model: PeftModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
