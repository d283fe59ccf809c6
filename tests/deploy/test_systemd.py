"""deploy/systemd: the units pass `systemd-analyze verify` and run the gateway with a managed vLLM
and the retrain as a timer-driven oneshot service."""

from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, read_env_file, run, settings_from

SYSTEMD = DEPLOY / "systemd"
UNITS = ["protege-gateway.service", "protege-retrain@.service", "protege-retrain@.timer"]
INSTANCES = ["protege-gateway.service", "protege-retrain@base.service", "protege-retrain@base.timer"]


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


def environment(name: str) -> dict[str, str]:
    lines = re.findall(r"^Environment=(\S+)$", (SYSTEMD / name).read_text(), re.MULTILINE)
    return dict(line.split("=", 1) for line in lines)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    # The venv is not installed here: point ExecStart at a binary that exists.
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/protege/.venv/bin/protege", "/bin/true")
        (tmp_path / name).write_text(text)
    # Verifying instances loads the templates (protege-retrain@.service) with %i = base.
    result = run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in INSTANCES)])
    assert result.returncode == 0, result.stdout + result.stderr
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line]
    assert complaints == []


def test_gateway_unit() -> None:
    service = unit("protege-gateway.service")["Service"]
    assert service["ExecStart"].split()[1:] == ["serve"]
    assert service["User"] == "protege" and service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "-/etc/protege/protege.env"
    assert service["KillMode"] == "mixed"  # the gateway stops its own vLLM child
    env = environment("protege-gateway.service")
    assert env["PROTEGE_HOME"] == f"/var/lib/{service['StateDirectory']}"
    settings = settings_from(SYSTEMD / "protege.yaml", {**read_env_file(DEPLOY / "protege.env.example"), **env})
    assert settings.student.url is None  # managed vLLM, on loopback
    assert settings.student.vllm_host == "127.0.0.1"
    assert str(settings.home) == env["PROTEGE_HOME"]
    # Long enough for the gateway to stop vLLM gracefully.
    assert int(service["TimeoutStopSec"]) > settings.student.vllm_stop_timeout_s


def test_retrain_timer_and_service() -> None:
    timer = unit("protege-retrain@.timer")
    assert timer["Timer"]["Unit"] == "protege-retrain@%i.service"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = unit("protege-retrain@.service")["Service"]
    assert service["Type"] == "oneshot"  # never two runs at once
    assert service["ExecStart"].split()[1:] == ["retrain", "--task", "%i"]
    assert environment("protege-retrain@.service") == environment("protege-gateway.service")
    assert service["EnvironmentFile"] == unit("protege-gateway.service")["Service"]["EnvironmentFile"]


def test_timer_schedule_is_every_six_hours() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    calendar = unit("protege-retrain@.timer")["Timer"]["OnCalendar"]
    result = run([analyze, "calendar", "--iterations=5", calendar])
    assert result.returncode == 0, result.stderr
    hours = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ \S+ (\d\d):00:00", result.stdout)
    assert len(hours) == 5 and {int(h) % 6 for h in hours} == {0}, result.stdout
