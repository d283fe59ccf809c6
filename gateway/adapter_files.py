"""Adapter folders on disk: confinement to ``adapters_dir``, validation against the student base,
and immutable copies. Pure file work (no torch: safetensors headers are JSON), run in a thread.

What "valid" means here is what vLLM would otherwise discover late, or never: the folder is a
peft LoRA in safetensors (never a pickle), its rank fits ``--max-lora-rank``, every tensor pairs
with a base weight of the right shape, and it was trained on this base (a recorded fingerprint,
or else the base's path or folder name in ``base_model_name_or_path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import AdapterError, NotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "protege_adapter.json"  # ours: task, version, base fingerprint (also the trainer's marker)
VERSIONS_DIR = "versions"
FINGERPRINT_CACHE = ".base_fingerprint.json"
MAX_HEADER_BYTES = 64 << 20
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class BaseModelInfo:
    path: Path  # resolved
    shapes: dict[str, tuple[int, ...]]  # weight name -> shape, from the safetensors headers
    fingerprint: str  # sha256 over config.json and every weights file


@dataclass(frozen=True)
class AdapterManifest:
    rank: int
    weights_sha256: str
    base_name: str | None  # base_model_name_or_path as the adapter records it


# -- safetensors headers ------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; raises AdapterError when it is not one."""
    try:
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) != 8:
                raise AdapterError(f"{path.name} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_length)
            if length > MAX_HEADER_BYTES:
                raise AdapterError(f"{path.name} is not a safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path.name} as safetensors: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name} is not a safetensors file (header is not a mapping)")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + length + max(ends, default=0) > size:
        raise AdapterError(f"{path.name} is truncated")
    return header


def _tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def _weights_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise AdapterError(f"no safetensors weights in the student model folder {model_dir}")


# -- the base model -----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_base(model_dir: Path, cache_file: Path | None = None) -> BaseModelInfo:
    """Shapes and fingerprint of the student base. Hashing ~0.5 GB takes a second or two, so the
    fingerprint is cached in ``cache_file``, keyed by each file's size and mtime."""
    model_dir = Path(model_dir).resolve()
    config = model_dir / "config.json"
    if not config.is_file():
        raise AdapterError(f"the student model folder {model_dir} has no config.json (run `protege model prepare`)")
    files = [config, *_weights_files(model_dir)]
    shapes: dict[str, tuple[int, ...]] = {}
    for weights in files[1:]:
        shapes.update(_tensor_shapes(read_safetensors_header(weights)))
    stamp = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    cached = _read_json(cache_file) if cache_file is not None else None
    if cached and cached.get("files") == stamp and isinstance(cached.get("fingerprint"), str):
        return BaseModelInfo(model_dir, shapes, cached["fingerprint"])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    fingerprint = digest.hexdigest()
    if cache_file is not None:
        _write_json_atomic(cache_file, {"files": stamp, "fingerprint": fingerprint})
    return BaseModelInfo(model_dir, shapes, fingerprint)


# -- confinement --------------------------------------------------------------------------


def confine(adapters_dir: Path, path: str | Path) -> Path:
    """Resolve an adapter folder given by an admin (absolute, or relative to ``adapters_dir``)
    and refuse anything outside ``adapters_dir``: ``..`` components, symlinks leading out."""
    root = Path(adapters_dir).resolve()
    given = Path(path)
    if ".." in given.parts:
        raise AdapterError("adapter paths may not contain '..'", param="path", code="path_not_allowed")
    candidate = given if given.is_absolute() else root / given
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFound(f"no adapter folder at {given}", param="path", code="adapter_not_found") from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise AdapterError(f"cannot resolve {given}: {exc}", param="path", code="path_not_allowed") from exc
    if resolved == root or not resolved.is_relative_to(root):
        raise AdapterError(
            f"adapter folders must be inside the adapters folder {root}",
            param="path", code="path_not_allowed",
        )
    if not resolved.is_dir():
        raise AdapterError(f"{given} is not a folder", param="path", code="path_not_allowed")
    return resolved


def confined_file(root: Path, folder: Path, name: str) -> Path:
    """``folder/name`` as a regular file whose real location is inside ``root``."""
    path = folder / name
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError) as exc:
        raise AdapterError(f"the adapter folder has no readable {name}", code="adapter_incomplete") from exc
    if not real.is_relative_to(Path(root).resolve()):
        raise AdapterError(f"{name} is a symlink out of the adapters folder", code="path_not_allowed")
    if not stat.S_ISREG(mode):
        raise AdapterError(f"{name} is not a regular file", code="path_not_allowed")
    return real


# -- validation ---------------------------------------------------------------------------


def inspect_adapter(folder: Path, base: BaseModelInfo, max_rank: int) -> AdapterManifest:
    """Validate a (copied) adapter folder against the base; raises AdapterError with the reason."""
    if (folder / "adapter_model.bin").exists() and not (folder / WEIGHTS_FILE).exists():
        raise AdapterError("pickle adapters (adapter_model.bin) are refused: save with safetensors",
                           code="adapter_format")
    config = _read_json(folder / CONFIG_FILE)
    if config is None:
        raise AdapterError(f"{CONFIG_FILE} is missing or not JSON", code="adapter_incomplete")
    rank = _check_config(config, max_rank)
    _check_base(config, _read_json(folder / META_FILE) or {}, base)
    header = read_safetensors_header(folder / WEIGHTS_FILE)
    _check_shapes(_tensor_shapes(header), base)
    return AdapterManifest(rank=rank, weights_sha256=sha256_file(folder / WEIGHTS_FILE),
                           base_name=config.get("base_model_name_or_path"))


def _check_config(config: dict[str, Any], max_rank: int) -> int:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})", code="adapter_format")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported by vLLM", code="adapter_format")
    if config.get("modules_to_save"):
        raise AdapterError("adapters with modules_to_save are not supported by vLLM", code="adapter_format")
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"invalid LoRA rank in {CONFIG_FILE}", code="adapter_format")
    rank = max(ranks)
    if rank > max_rank:
        raise AdapterError(
            f"LoRA rank {rank} is above the student's limit {max_rank} (student.vllm_max_lora_rank)",
            code="adapter_rank",
        )
    return rank


def _check_base(config: dict[str, Any], meta: dict[str, Any], base: BaseModelInfo) -> None:
    recorded = meta.get("base_fingerprint")
    if isinstance(recorded, str):
        if recorded != base.fingerprint:
            raise AdapterError("the adapter was trained on another base model (fingerprint differs)",
                               code="base_model_mismatch")
        return
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise AdapterError("the adapter does not say which base model it was trained on "
                           "(base_model_name_or_path)", code="base_model_mismatch")
    if not _same_base(name, base.path):
        raise AdapterError(
            f"the adapter was trained on {name!r}, not on the student base {base.path.name!r}",
            code="base_model_mismatch",
        )


def _same_base(name: str, base_path: Path) -> bool:
    candidate = Path(name)
    if candidate.is_absolute() and candidate.exists():
        return candidate.resolve() == base_path
    # A hub id or a path from another machine: compare the last component, as hub ids and our
    # model folders are both named after the model (SmolLM2-135M-Instruct).
    return candidate.name.lower() == base_path.name.lower()


def _check_shapes(tensors: dict[str, tuple[int, ...]], base: BaseModelInfo) -> None:
    if not tensors:
        raise AdapterError("the adapter has no tensors", code="adapter_format")
    for name, shape in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise AdapterError(f"unexpected tensor {name!r} (only lora_A/lora_B weights are served)",
                               code="adapter_format")
        module, part = match["module"], match["part"]
        base_shape = base.shapes.get(f"{module}.weight")
        if base_shape is None or len(base_shape) != 2 or len(shape) != 2:
            raise AdapterError(f"the adapter targets {module}, which the student base lacks",
                               code="base_model_mismatch")
        out_features, in_features = base_shape
        fits = shape[1] == in_features if part == "A" else shape[0] == out_features
        if not fits:
            raise AdapterError(
                f"{name} has shape {list(shape)}, which does not fit the student's {module} "
                f"{list(base_shape)}: the adapter belongs to another base model",
                code="base_model_mismatch",
            )


# -- immutable copies ---------------------------------------------------------------------


def version_dir(adapters_dir: Path, task: str, version: int) -> Path:
    return Path(adapters_dir) / VERSIONS_DIR / task / f"v{version}"


def stage_copy(adapters_dir: Path, source: Path, task: str) -> Path:
    """Copy the two adapter files into a fresh temporary folder next to the versions; validation
    then runs on the copy, which nobody else writes to."""
    root = Path(adapters_dir).resolve()
    parent = root / VERSIONS_DIR / task
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=parent))
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(confined_file(root, source, name), staging / name)
        meta = confined_meta(root, source)
        if meta is not None:
            _write_json_atomic(staging / META_FILE, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def confined_meta(root: Path, source: Path) -> dict[str, Any] | None:
    if not (source / META_FILE).exists():
        return None
    return _read_json(confined_file(root, source, META_FILE))


def publish(staging: Path, target: Path, meta: dict[str, Any]) -> None:
    """Write our metadata, make the files read-only and move the folder to its final name."""
    existing = _read_json(staging / META_FILE) or {}
    _write_json_atomic(staging / META_FILE, {**existing, **meta})
    for path in staging.iterdir():
        path.chmod(0o444)
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a vLLM running as another user
    if target.exists():
        raise AdapterError(f"{target} already exists", code="version_exists")
    staging.rename(target)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
