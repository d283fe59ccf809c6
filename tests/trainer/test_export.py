"""`protege adapters export`: the merged folder and its GGUF compute what base + adapter computes.

One export, through the command line against a seeded registry, serves the whole module: merging
and writing half a gigabyte twice over is most of these tests' time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="trainer extra not installed")

from feedback.store import open_database
from gateway import adapter_files as files
from gateway.adapter_export import PROVENANCE_FILE, check_out_dir, resolve_source
from gateway.cli import main
from gateway.errors import ExportError
from gateway.settings import load_settings
from tests.conftest import cached_student_gguf
from tests.trainer.conftest import _sources
from trainer.export import GGUF_FILE, llama_permute, write_gguf
from trainer.lora import save_adapter
from trainer.model_prep import ALL_LINEAR, greedy_completion, load_base, locate_gguf

pytestmark = pytest.mark.training

VERSION = "colours@v1"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
MERGED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", PROVENANCE_FILE}


@dataclass(frozen=True)
class Home:
    config: Path  # settings file: this home, the test student as base
    root: Path
    fingerprint: str  # of the test student

    def export_argv(self, version: str, out: Path, *extra: str) -> list[str]:
        return ["--config", str(self.config), "adapters", "export", version, "--merged", "--out",
                str(out), *extra]


def prompt_ids(tokenizer: Any) -> Any:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def logits(model: Any, ids: Any) -> Any:
    with torch.inference_mode():
        return model(ids).logits[0]


def make_home(root: Path, student_dir: Path) -> Path:
    config = root / "protege.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"home": str(root), "student": {"model_dir": str(student_dir)}}))
    return config


def register(home: Path, adapter_dir: Path, fingerprint: str, name: str = VERSION) -> Path:
    """What the registry does on `adapters load`, minus vLLM: an immutable copy, a row in SQLite."""
    task, number = name.split("@v")
    adapters = home / "adapters"
    target = files.version_dir(adapters, task, int(number))
    shutil.copytree(adapter_dir, target)
    db = open_database(home / "protege.db")
    db.conn.execute(
        "INSERT INTO adapters (name, task, version, path, rank, base_fingerprint, weights_sha256, "
        "source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (name, task, int(number), str(target.relative_to(adapters)), 4, fingerprint,
         files.sha256_file(target / files.WEIGHTS_FILE), str(adapter_dir), time.time()))
    db.conn.close()
    return target


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Single short prompts: on a shared CI box a second OpenMP thread mostly spin-waits (3x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_protege_env() -> Iterator[None]:
    """Nothing from the developer's PROTEGE_* environment reaches the command's settings."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("PROTEGE_"):
                patch.delenv(name)
        yield


@pytest.fixture(scope="module")
def gguf_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF the student is prepared from (extracted when the source is the wheel)."""
    gguf, wheel = _sources()
    if gguf is None and wheel is None:
        return cached_student_gguf()
    return locate_gguf(tmp_path_factory.mktemp("gguf"), gguf, wheel)


@pytest.fixture(scope="module")
def adapter_dir(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every linear layer (Q and K included, whose GGUF rows are permuted) with random
    non-zero lora_B, so that merging it visibly changes the model."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(student_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEAR),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return save_adapter(peft_model, tmp_path_factory.mktemp("adapter") / "colours", student_dir)


@pytest.fixture(scope="module")
def home(student_dir: Path, adapter_dir: Path, no_protege_env: None,
         tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A home whose registry holds VERSION; the base fingerprint is cached where the CLI looks."""
    root = tmp_path_factory.mktemp("home")
    base = files.describe_base(student_dir, root / "adapters" / files.FINGERPRINT_CACHE)
    register(root, adapter_dir, base.fingerprint)
    return Home(make_home(root, student_dir), root, base.fingerprint)


@pytest.fixture(scope="module")
def exported(home: Home, gguf_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    assert main(home.export_argv(VERSION, out, "--gguf", "--gguf-template", str(gguf_template))) == 0
    return out


@pytest.fixture(scope="module")
def merged(exported: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(exported)


def test_llama_permute_is_what_transformers_undoes_on_gguf_load() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = torch.randn(3 * 2 * 4, 5).numpy()  # 3 heads of 8 rows (two rotary halves of 4)
    permuted = llama_permute(weights, 3)
    assert not (permuted == weights).all()
    processor = LlamaTensorProcessor({"num_attention_heads": 3, "num_key_value_heads": 3})
    assert (processor.process(permuted, "blk.0.attn_q.weight").weights == weights).all()


def test_merged_folder_computes_base_plus_adapter(exported: Path, merged: tuple[Any, Any],
                                                  student_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel

    assert {p.name for p in exported.iterdir()} == MERGED_FILES | {GGUF_FILE}
    assert (exported / "chat_template.jinja").read_text() == (student_dir / "chat_template.jinja").read_text()
    model, tokenizer = merged
    base, base_tokenizer = load_base(student_dir)
    ids = prompt_ids(tokenizer)
    assert torch.equal(ids, prompt_ids(base_tokenizer))
    base_logits = logits(base, ids)
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # unmerged
    expected = logits(reference, ids)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter matters, so the check does too
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)
    assert greedy_completion(model, tokenizer, MESSAGES, 12) == \
        greedy_completion(reference, base_tokenizer, MESSAGES, 12)


def test_provenance_records_the_registered_version_and_base(exported: Path, home: Home,
                                                            adapter_dir: Path, student_dir: Path,
                                                            gguf_template: Path) -> None:
    provenance = json.loads((exported / PROVENANCE_FILE).read_text())
    base_gguf = json.loads((student_dir / "protege_model.json").read_text())["gguf_sha256"]
    assert provenance["adapter"] == VERSION
    assert provenance["adapter_dir"] == str((home.root / "adapters/versions/colours/v1").resolve())
    assert provenance["adapter_weights_sha256"] == files.sha256_file(adapter_dir / files.WEIGHTS_FILE)
    assert provenance["base_model_dir"] == str(student_dir.resolve())
    assert provenance["base_fingerprint"] == home.fingerprint
    assert provenance["base_gguf_sha256"] == base_gguf
    assert provenance["dtype"] == "float32"
    assert provenance["gguf"] == {"file": GGUF_FILE, "tensor_type": "F32", "file_type": 0,
                                  "template": gguf_template.name, "template_sha256": base_gguf}
    exported_at = time.mktime(time.strptime(provenance["exported_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(time.time() - exported_at) < 24 * 3600


def test_gguf_keeps_the_template_metadata_and_loads_as_the_merged_model(
        exported: Path, merged: tuple[Any, Any], gguf_template: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoModelForCausalLM

    written = GGUFReader(exported / GGUF_FILE)
    template = GGUFReader(gguf_template)
    assert template.fields["general.file_type"].contents() == 3  # MOSTLY_Q4_1
    assert written.fields["general.file_type"].contents() == 0  # ALL_F32
    assert [t.name for t in written.tensors] == [t.name for t in template.tensors]
    assert {t.tensor_type for t in written.tensors} == {GGMLQuantizationType.F32}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "general.name"):
        assert written.fields[key].contents() == template.fields[key].contents(), key

    from_gguf = AutoModelForCausalLM.from_pretrained(exported, gguf_file=GGUF_FILE,
                                                     dtype=torch.float32).eval()
    model, tokenizer = merged
    ids = prompt_ids(tokenizer)
    torch.testing.assert_close(logits(from_gguf, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_f16_gguf_halves_the_matrices_and_keeps_the_norms_f32(merged: tuple[Any, Any], gguf_template: Path,
                                                              tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    model, _ = merged
    state = model.state_dict()
    assert write_gguf(state, model.config, gguf_template, tmp_path / "f16.gguf", "f16") == 1
    reader = GGUFReader(tmp_path / "f16.gguf")
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16
    tensors = {t.name: t for t in reader.tensors}
    assert {tensors[n].tensor_type for n in ("blk.0.attn_norm.weight", "output_norm.weight")} == \
        {GGMLQuantizationType.F32}
    assert {tensors[n].tensor_type for n in ("token_embd.weight", "blk.3.attn_k.weight")} == \
        {GGMLQuantizationType.F16}
    k_proj = llama_permute(state["model.layers.3.self_attn.k_proj.weight"].numpy(),
                           model.config.num_key_value_heads)
    assert abs(tensors["blk.3.attn_k.weight"].data.astype("float32") - k_proj).max() < 2e-3


# -- refusals -------------------------------------------------------------------------------------


def test_an_earlier_export_is_kept_without_force(exported: Path, home: Home,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = (exported / PROVENANCE_FILE).read_text()
    assert main(home.export_argv(VERSION, exported)) == 1
    assert "not empty (--force replaces an earlier export)" in capsys.readouterr().err
    assert (exported / PROVENANCE_FILE).read_text() == before


def test_check_out_dir_refuses_what_it_must_not_replace(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "absent", force=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        check_out_dir(tmp_path / "file", force=True)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / PROVENANCE_FILE).write_text("{}")
    with pytest.raises(ExportError, match="not empty"):
        check_out_dir(tmp_path / "earlier", force=False)
    check_out_dir(tmp_path / "earlier", force=True)
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an earlier export"):
        check_out_dir(tmp_path / "someone", force=True)


def test_unknown_versions_fail_cleanly(home: Home, tmp_path: Path, student_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(home.export_argv("colours@v9", out)) == 1
    assert f"no adapter version 'colours@v9' in {home.root / 'protege.db'}" in capsys.readouterr().err
    assert main(home.export_argv("not-a-version", out)) == 1
    assert "no adapter version or adapter folder 'not-a-version'" in capsys.readouterr().err
    assert main(home.export_argv(VERSION, out, "--gguf-type", "f16")) == 2
    assert "--gguf-type and --gguf-template need --gguf" in capsys.readouterr().err

    empty = Home(make_home(tmp_path / "empty-home", student_dir), tmp_path / "empty-home", home.fingerprint)
    assert main(empty.export_argv(VERSION, out)) == 1
    assert "there is no adapter registry at" in capsys.readouterr().err
    assert not (empty.root / "protege.db").exists()  # looking up created no database
    assert not out.exists()


def test_a_tampered_registered_copy_is_refused(home: Home, adapter_dir: Path, student_dir: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = Home(make_home(tmp_path / "home", student_dir), tmp_path / "home", home.fingerprint)
    target = register(other.root, adapter_dir, home.fingerprint)
    (target / files.WEIGHTS_FILE).write_bytes(b"tampered")
    assert main(other.export_argv(VERSION, tmp_path / "out")) == 1
    assert f"changed since {VERSION} was registered" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_adapter_folder_resolves_without_the_registry(home: Home, adapter_dir: Path) -> None:
    source = resolve_source(load_settings(config_file=home.config), str(adapter_dir))
    assert source.version is None and source.adapter_dir == adapter_dir.resolve()
    assert source.weights_sha256 == files.sha256_file(adapter_dir / files.WEIGHTS_FILE)
    assert source.base_fingerprint == home.fingerprint
