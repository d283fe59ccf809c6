"""The vLLM supervisor with a stand-in server process: command and environment, restart on
crash with back-off, on_ready after every start, hang watchdog, clean stop of the whole group."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from gateway import vllm_server
from gateway.errors import BackendUnavailable
from gateway.settings import Settings
from gateway.vllm_server import (
    VllmSupervisor,
    check_vllm_installed,
    diagnose_vllm_failure,
    vllm_command,
    vllm_environment,
)
from tests.conftest import make_settings

FAKE_SERVER = Path(__file__).with_name("fake_vllm_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(tmp_path: Path, **student: object) -> Settings:
    return make_settings(tmp_path / "home", student={
        "vllm_port": free_port(), "vllm_restart_backoff_s": 0.05, "vllm_stop_timeout_s": 2.0,
        "vllm_start_timeout_s": 20.0, **student})


def test_command_and_environment_come_from_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, student={
        "model_dir": str(tmp_path / "m"), "served_model_name": "smol", "vllm_port": 8123,
        "vllm_max_loras": 3, "vllm_max_lora_rank": 32, "vllm_max_model_len": 1024,
        "vllm_extra_args": ["--seed", "7"], "vllm_cpu_threads": "0-1", "api_key": "student-secret"})
    command = vllm_command(settings, "/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    for part in (f"--model {tmp_path / 'm'}", "--served-model-name smol", "--dtype float32", "--enable-lora",
                 "--max-loras 3", "--max-lora-rank 32", "--max-model-len 1024", "--host 127.0.0.1",
                 "--port 8123", "--seed 7"):
        assert part in joined
    assert "student-secret" not in joined
    env = vllm_environment(settings, {"PATH": "/bin", "PROTEGE_AUTH__ADMIN_KEY": "x", "HOME": "/h"})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_API_KEY"] == "student-secret" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/bin" and "PROTEGE_AUTH__ADMIN_KEY" not in env


def test_default_thread_binding_covers_every_usable_cpu(tmp_path: Path) -> None:
    env = vllm_environment(make_settings(tmp_path), {})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def test_known_failures_get_an_actionable_message() -> None:
    assert "pip install 'protege[student]'" in diagnose_vllm_failure("No module named 'vllm'", "py")
    hint = diagnose_vllm_failure("RuntimeError: operator torchvision::nms does not exist", "/v/python")
    assert "/v/python -m pip uninstall -y torchvision torchaudio torchcodec" in hint
    assert diagnose_vllm_failure("all fine", "py") is None


def _fake_python(tmp_path: Path, output: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho \"{output}\" >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_check_vllm_installed_explains_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="uninstall -y torchvision"):
        check_vllm_installed(_fake_python(tmp_path, "operator torchvision::nms does not exist"))
    with pytest.raises(BackendUnavailable, match="cannot be imported") as info:
        check_vllm_installed(_fake_python(tmp_path, "SomeError: odd"))
    assert info.value.code == "vllm_not_installed"


class Harness:
    def __init__(self, tmp_path: Path, mode: str, **student: object) -> None:
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.settings = settings_for(tmp_path, **student)
        self.ready_calls = 0
        port = self.settings.student.vllm_port
        command = [sys.executable, str(FAKE_SERVER), str(port), mode, str(self.state)]
        self.supervisor = VllmSupervisor(self.settings, self.on_ready, command=command, environ=dict(os.environ))

    async def on_ready(self) -> None:
        self.ready_calls += 1

    def starts(self) -> int:
        path = self.state / "starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def children(self) -> list[int]:
        return [int(p.read_text()) for p in self.state.glob("child.*")]


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the fake server, is gone too).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_crash_restarts_and_on_ready_runs_again_then_stop_kills_the_group(tmp_path: Path) -> None:
    harness = Harness(tmp_path, "serve")

    async def scenario() -> None:
        supervisor = harness.supervisor
        await supervisor.start()
        await supervisor.wait_ready(20)
        assert supervisor.ready and harness.ready_calls == 1 and await supervisor.healthy()
        assert supervisor.base_url.endswith(f":{harness.settings.student.vllm_port}/v1")
        first_pid = supervisor.pid
        os.kill(first_pid, signal.SIGKILL)  # a crash
        await _until(lambda: harness.ready_calls == 2)
        assert supervisor.pid != first_pid and supervisor.restarts == 1 and harness.starts() == 2
        await supervisor.stop()
        assert not supervisor.ready and supervisor.pid is None

    asyncio.run(scenario())
    assert harness.children()
    deadline = time.monotonic() + 10  # SIGKILL is delivered at once, dying takes a moment on a busy box
    while any(_alive(pid) for pid in harness.children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in harness.children())
    assert "--served-model-name" not in (harness.settings.home / "logs" / "vllm.log").read_text()


def test_first_start_failure_fails_wait_ready_with_the_fix(tmp_path: Path) -> None:
    harness = Harness(tmp_path, "fail")

    async def scenario() -> None:
        await harness.supervisor.start()
        with pytest.raises(BackendUnavailable, match="vLLM is not installed"):
            await harness.supervisor.wait_ready(20)
        await harness.supervisor.stop()

    asyncio.run(scenario())
    assert harness.ready_calls == 0


def test_failing_on_ready_on_first_start_fails_wait_ready(tmp_path: Path) -> None:
    harness = Harness(tmp_path, "serve")

    async def broken() -> None:
        raise RuntimeError("no base adapter")

    harness.supervisor._on_ready = broken

    async def scenario() -> None:
        await harness.supervisor.start()
        with pytest.raises(BackendUnavailable, match="no base adapter"):
            await harness.supervisor.wait_ready(20)
        await harness.supervisor.stop()

    asyncio.run(scenario())


def test_a_hung_server_is_killed_and_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_server, "WATCHDOG_INTERVAL_S", 0.1)
    harness = Harness(tmp_path, "hang")

    async def short_health(timeout: float, original=harness.supervisor._health) -> bool:
        return await original(min(timeout, 0.3))

    harness.supervisor._health = short_health

    async def scenario() -> None:
        await harness.supervisor.start()
        await harness.supervisor.wait_ready(20)
        (harness.state / "hang").write_text("")
        await _until(lambda: harness.starts() == 2)
        (harness.state / "hang").unlink()
        await _until(lambda: harness.ready_calls == 2)
        await harness.supervisor.stop()

    asyncio.run(scenario())


def test_a_missing_interpreter_fails_wait_ready_at_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    async def on_ready() -> None:
        pass

    async def scenario() -> None:
        supervisor = VllmSupervisor(settings, on_ready, command=[str(tmp_path / "no-python"), "-m", "vllm"])
        await supervisor.start()
        with pytest.raises(BackendUnavailable, match="cannot start vLLM"):
            await supervisor.wait_ready(20)
        await supervisor.stop()

    asyncio.run(scenario())


def test_log_is_rotated_past_its_cap(tmp_path: Path) -> None:
    log_file = tmp_path / "vllm.log"
    log_file.write_bytes(b"x" * 100)
    vllm_server.rotate_log(log_file, max_bytes=10)
    assert not log_file.exists() and (tmp_path / "vllm.log.1").stat().st_size == 100


def test_port_in_use_is_refused_up_front(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = make_settings(tmp_path, student={"vllm_port": busy.getsockname()[1]})

        async def on_ready() -> None:
            pass

        async def scenario() -> None:
            supervisor = VllmSupervisor(settings, on_ready, command=["true"])
            with pytest.raises(BackendUnavailable, match="already in use"):
                await supervisor.start()
            await supervisor.stop()

        asyncio.run(scenario())
