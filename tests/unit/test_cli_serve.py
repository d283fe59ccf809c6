"""`protege serve` hands uvicorn an app built from Settings, with start-up's objects frozen out
of the garbage collector's full passes."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.cli import main


def test_serve_freezes_start_up_objects_before_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, host: str, port: int, **options: Any) -> None:  # noqa: ANN401
        seen.update(frozen=gc.get_freeze_count(), host=host, port=port, loop=options["loop"])

    monkeypatch.setattr(uvicorn, "run", fake_run)
    gc.unfreeze()
    config = tmp_path / "protege.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\nserver:\n  port: 8123\n")
    try:
        assert main(["--config", str(config), "serve", "--student-url", "http://127.0.0.1:9/v1"]) == 0
    finally:
        gc.unfreeze()
    assert seen["port"] == 8123 and seen["loop"] == "uvloop"
    assert seen["frozen"] > 1000  # the imported modules and the built app, at least
