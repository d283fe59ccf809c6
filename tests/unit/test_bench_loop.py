"""The closed-loop benchmark's command line and config handling (the loop itself runs in .ci/run)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.loop import main, moved_endpoints, parse_args, sampling_error, write_config
from gateway.settings import load_settings


def test_lora_layers_and_test_sample_accept_all(tmp_path: Path) -> None:
    args = parse_args(["--lora-top-layers", "all", "--test-sample", "all", "--out", str(tmp_path)])
    assert args.lora_top_layers is None
    assert args.test_sample is None
    config = write_config(tmp_path / "home", 8000, "http://127.0.0.1:9", args)
    assert load_settings(config_file=config, environ={}).trainer.lora_top_layers is None


def test_defaults_keep_the_top_ten_layers_and_a_sample(tmp_path: Path) -> None:
    args = parse_args(["--out", str(tmp_path)])
    assert (args.lora_top_layers, args.test_sample) == (10, 400)
    config = write_config(tmp_path / "home", 8000, "http://127.0.0.1:9", args)
    assert load_settings(config_file=config, environ={}).trainer.lora_top_layers == 10


def test_rescoring_moves_only_the_ports_of_the_earlier_run(tmp_path: Path) -> None:
    ran = parse_args(["--lora-top-layers", "all", "--learning-rate", "3e-4", "--out", str(tmp_path)])
    config = write_config(tmp_path / "home", 8000, "http://127.0.0.1:9", ran)
    moved = yaml.safe_load(moved_endpoints(config, 8123, "http://127.0.0.1:9999").read_text())
    assert moved["server"]["port"] == 8123
    assert moved["teacher"]["api_base"] == "http://127.0.0.1:9999/v1"
    assert moved["trainer"]["lora_top_layers"] is None
    assert moved["trainer"]["sft_learning_rate"] == pytest.approx(3e-4)


def test_rescore_without_an_earlier_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rescore", "--out", str(tmp_path)]) == 2
    assert "no earlier run's home" in capsys.readouterr().err


def test_a_larger_lora_rank_raises_the_students_limit_to_match(tmp_path: Path) -> None:
    args = parse_args(["--lora-rank", "64", "--lora-dropout", "0.1", "--out", str(tmp_path)])
    settings = load_settings(config_file=write_config(tmp_path / "home", 8000, "http://127.0.0.1:9", args),
                             environ={})
    assert (settings.trainer.lora_rank, settings.student.vllm_max_lora_rank) == (64, 64)
    assert settings.trainer.lora_dropout == pytest.approx(0.1)


def test_sigterm_runs_the_loops_cleanup(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    script = (
        "import time\nfrom bench.loop import exit_on_sigterm\nexit_on_sigterm()\n"
        f"try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    open({str(marker)!r}, 'w').close()\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[2]) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.is_file()


def test_sampling_error_shows_a_400_row_sample_cannot_settle_a_target_at_90_percent() -> None:
    # loop8's v1: 358/400 on the loop's sample, 2,782/3,080 on the whole test split
    sample, whole = sampling_error(358 / 400, 400), sampling_error(2782 / 3080, 3080)
    assert sample == "student alone 358/400 = 89.5%, standard error 1.53 points (95% interval 86.5%-92.5%)"
    assert whole == "student alone 2782/3080 = 90.3%, standard error 0.53 points (95% interval 89.3%-91.4%)"


def test_sampling_error_stays_inside_zero_and_one() -> None:
    assert sampling_error(1.0, 16).endswith("standard error 0.00 points (95% interval 100.0%-100.0%)")
    assert "(95% interval 0.0%-" in sampling_error(0.01, 16)
