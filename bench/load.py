"""Steady-rate load against a real gateway process, with a fast mock student and teacher.

Everything runs on loopback: one mock OpenAI server process (``bench.mock_openai``) serves as
both the student (aiohttp) and the teacher (litellm, ``openai/`` provider), the gateway runs
as ``python -m gateway.cli serve`` with a generated YAML config, and an aiohttp client sends
requests at a fixed rate (open loop: a slow gateway gets more requests in flight, not fewer).

It then checks what the issue asks of a gateway under load:

* error rate (non-200 answers or transport errors during the steady phase) below 0.1%;
* exactly one log row per accepted request (every ``x-protege-request-id`` answered is in
  SQLite once, and nothing else is);
* the gateway's RSS growth between the end of warm-up and the end of the run;
* overload: a burst far above ``server.max_concurrency`` is answered at once with 429
  ``overloaded`` for the excess, never queued.

Long form (the issue's): ``python -m bench.load --minutes 10``. The test suite runs the CI
form (``tests/reliability/test_load.py``: 2 minutes at 25 RPS) because CI time is precious.
Prints one JSON summary; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.mock_openai import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CALLER_KEY = "sk-load-caller-0123456789"
MESSAGES = [{"role": "user", "content": "say something short"}]
# uvicorn finishes a SIGTERM shut-down (drained) and then re-raises the signal on itself.
CLEAN_EXIT = (0, -signal.SIGTERM)


# -- processes ---------------------------------------------------------------------------------


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without any PROTEGE_* (the config file says everything)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEGE_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra or {})
    return env


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout_s: float = 5.0) -> tuple[int, bytes]:
    """A plain GET on loopback (http.client: no proxies, nothing to close later)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        try:
            if http_get(port, path, timeout_s=2.0)[0] < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered http://{LOOPBACK}:{port}{path} within {timeout_s:.0f}s")
        time.sleep(0.1)


class _Child:
    """A child process whose stdout+stderr are collected by a thread (kept in ``lines``)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout_s)
        self._finish()
        return code

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not stop in time; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._finish()
        return self.proc.returncode

    def kill(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._finish()
        return self.proc.returncode

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far, from /proc."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """Resident set size of the process itself (not its children), from /proc."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


class MockProcess(_Child):
    """``python -m bench.mock_openai`` on a free loopback port."""

    def __init__(self, latency_ms: float = 0.0, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__([sys.executable, "-m", "bench.mock_openai", "--port", str(self.port),
                          "--latency-ms", str(latency_ms)], _child_env())

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MockProcess:
        self.spawn()
        wait_http(self.port, "/v1/models", timeout_s, self.proc)
        return self

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate(10)


class GatewayProcess(_Child):
    """The real gateway: ``python -m gateway.cli --config <yaml> serve`` on a free loopback port.

    ``config`` is the YAML content (a dict); ``server.port``/``host`` and ``home`` are filled in.
    """

    def __init__(self, home: Path, config: dict[str, Any], port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        config = json.loads(json.dumps(config))  # a private copy
        config.setdefault("home", str(self.home))
        config.setdefault("server", {}).update(host=LOOPBACK, port=self.port)
        self.config = config
        self.config_path = self.home / "protege.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__([sys.executable, "-m", "gateway.cli", "--config", str(self.config_path), "serve"],
                         _child_env(env))

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def db_path(self) -> Path:
        return Path(self.config.get("log", {}).get("db_path") or self.home / "protege.db")

    def start(self, timeout_s: float = 120.0) -> GatewayProcess:
        self.spawn()
        try:
            wait_http(self.port, "/healthz", timeout_s, self.proc)
        except RuntimeError as exc:
            self.kill()
            raise RuntimeError(f"{exc}\n--- gateway output ---\n{self.output[-4000:]}") from None
        return self

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate(30)


def gateway_config(mock_url: str, *, max_concurrency: int = 64, teacher: bool = True,
                   caller_key: str = CALLER_KEY) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"max_concurrency": max_concurrency, "log_level": "warning"},
        "auth": {"api_keys": {"load": caller_key}},
        "student": {"url": f"{mock_url}/v1", "timeout_s": 10},
    }
    if teacher:
        config["teacher"] = {"model": "openai/mock-model", "api_base": f"{mock_url}/v1", "api_key": "sk-load-teacher",
                             "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "timeout_s": 10}
    return config


# -- the load itself ---------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # auto | teacher | stream
    status: int  # HTTP status; 0: transport error
    latency_s: float
    request_id: str | None = None
    error: str | None = None
    finished_at: float = 0.0  # time.monotonic() when the answer was complete
    send_lag_s: float = 0.0  # how late the generator sent it (its own stalls show up here)


async def _one(session: Any, url: str, kind: str, key: str, timeout: Any) -> Outcome:
    import aiohttp

    body: dict[str, Any] = {"model": "teacher" if kind == "teacher" else "auto", "messages": MESSAGES,
                            "max_tokens": 16}
    if kind == "stream":
        body["stream"] = True
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, timeout=timeout,
                                headers={"authorization": f"Bearer {key}"}) as response:
            raw = await response.read()
            status = response.status
            request_id = response.headers.get("x-protege-request-id")
        error = None
        if status == 200 and kind == "stream":
            text = raw.decode()
            if not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                status, error = 599, "stream did not end cleanly"
        elif status != 200:
            error = raw[:200].decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(kind, 0, time.perf_counter() - started, error=f"{exc.__class__.__name__}: {exc}",
                       finished_at=time.monotonic())
    return Outcome(kind, status, time.perf_counter() - started, request_id, error, time.monotonic())


def _pick(rng: random.Random, teacher_share: float, stream_share: float) -> str:
    x = rng.random()
    if x < teacher_share:
        return "teacher"
    if x < teacher_share + stream_share:
        return "stream"
    return "auto"


async def steady_load(url: str, rps: float, duration_s: float, *, key: str = CALLER_KEY,
                      teacher_share: float = 0.1, stream_share: float = 0.1, seed: int = 0,
                      on_tick: Any = None) -> list[Outcome]:
    """Open-loop load: request i starts at t0 + i/rps whatever happened to the earlier ones."""
    import aiohttp

    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=60)
    tasks: list[asyncio.Task[Outcome]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        total = int(rps * duration_s)
        lags: list[float] = []
        for i in range(total):
            delay = t0 + i / rps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, loop.time() - (t0 + i / rps)))
            kind = _pick(rng, teacher_share, stream_share)
            tasks.append(asyncio.ensure_future(_one(session, url, kind, key, timeout)))
            if on_tick is not None:
                on_tick(loop.time() - t0)
        outcomes = list(await asyncio.gather(*tasks))
    for outcome, lag in zip(outcomes, lags, strict=True):
        outcome.send_lag_s = lag
    return outcomes


async def burst(url: str, count: int, *, key: str = CALLER_KEY) -> list[Outcome]:
    """``count`` requests at once (overload probe)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return list(await asyncio.gather(*[_one(session, url, "auto", key, timeout) for _ in range(count)]))


def logged_ids(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return [row[0] for row in conn.execute("select id from requests")]
    finally:
        conn.close()


def wait_for_rows(db_path: Path, expected: int, timeout_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        ids = logged_ids(db_path)
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadReport:
    duration_s: float
    target_rps: float
    sent: int
    achieved_rps: float
    gateway_cpu_share: float  # CPU seconds of the gateway process per second of the steady phase
    ok: int
    errors: int
    error_rate: float
    error_samples: list[str]
    status_counts: dict[str, int]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    max_send_lag_ms: float | None  # the generator's own worst delay (its stalls, not the gateway's)
    sent_late: int  # requests sent over 100 ms behind schedule
    accepted: int
    rows: int
    missing_rows: int
    extra_rows: int
    duplicate_rows: int
    rss_start_mib: float
    rss_end_mib: float
    rss_peak_mib: float
    rss_growth_mib: float  # end of the steady phase minus end of warm-up
    rss_after_burst_mib: float
    rss_series_mib: list[tuple[float, float]]
    burst_size: int = 0
    burst_429: int = 0
    burst_ok: int = 0
    burst_other: int = 0
    burst_429_p50_ms: float | None = None
    burst_max_ms: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


def run(seconds: float, rps: float, *, max_concurrency: int = 64, mock_latency_ms: float = 5.0,
        teacher_share: float = 0.1, stream_share: float = 0.1, warmup_s: float | None = None,
        burst_size: int | None = None, home: Path | None = None, max_error_rate: float = 0.001,
        rss_limit_mib: float | None = None) -> LoadReport:
    """Start mock + gateway, load them, check; returns the report (processes are stopped)."""
    warmup_s = min(5.0, seconds / 5) if warmup_s is None else warmup_s
    burst_size = max_concurrency * 4 if burst_size is None else burst_size
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="protege-load-")))
        mock = stack.enter_context(MockProcess(latency_ms=mock_latency_ms))
        gateway = stack.enter_context(GatewayProcess(
            home, gateway_config(mock.url, max_concurrency=max_concurrency,
                                 teacher=teacher_share > 0)))
        rss: dict[str, int] = {"peak": gateway.rss_bytes()}
        series: list[tuple[float, float]] = []  # (elapsed s, RSS MiB) every ~5 s
        last_sample = [0.0]

        def sample(elapsed: float) -> None:
            if elapsed - last_sample[0] < 0.5:
                return
            last_sample[0] = elapsed
            now = gateway.rss_bytes()
            rss["peak"] = max(rss["peak"], now)
            if "start" not in rss and elapsed >= warmup_s:
                rss["start"] = now
            if not series or elapsed - series[-1][0] >= 5:
                series.append((round(elapsed, 1), round(now / 2**20, 1)))

        # Warm-up: the first calls import and connect lazily; not part of the error rate.
        warm = asyncio.run(steady_load(gateway.url, 20, 1.0, teacher_share=0.5 if teacher_share else 0,
                                       stream_share=0.2, seed=99))
        started, cpu_started = time.monotonic(), gateway.cpu_seconds()
        outcomes = asyncio.run(steady_load(gateway.url, rps, seconds, teacher_share=teacher_share,
                                           stream_share=stream_share, on_tick=sample))
        elapsed = time.monotonic() - started
        cpu_s = gateway.cpu_seconds() - cpu_started
        rss.setdefault("start", rss["peak"])
        rss["steady_end"] = gateway.rss_bytes()

        burst_outcomes: list[Outcome] = []
        if burst_size:
            burst_outcomes = asyncio.run(burst(gateway.url, burst_size))

        everything = warm + outcomes + burst_outcomes
        # Accepted: anything past parsing and the concurrency check, i.e. not 429 overloaded.
        # A transport error (status 0) may or may not have been accepted: tolerated in the count.
        accepted = [o for o in everything if o.status not in (0, 429)]
        unknown = sum(1 for o in everything if o.status == 0)
        answered = [o.request_id for o in accepted if o.request_id]
        wait_for_rows(gateway.db_path, len(accepted))
        time.sleep(0.3)  # anything extra would show up now
        ids = logged_ids(gateway.db_path)
        rss["end"] = gateway.rss_bytes()
        rss["peak"] = max(rss["peak"], rss["end"])
        code = gateway.terminate(30)
        if code not in CLEAN_EXIT:
            raise RuntimeError(f"gateway exited with {code}:\n{gateway.output[-3000:]}")

    ok = [o for o in outcomes if o.status == 200]
    errors = [o for o in outcomes if o.status != 200]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    answered_set = set(answered)
    id_set = set(ids)
    latencies = [o.latency_s for o in ok]
    b429 = [o for o in burst_outcomes if o.status == 429]
    mib = 1024 * 1024
    report = LoadReport(
        duration_s=round(elapsed, 2), target_rps=rps, sent=len(outcomes),
        achieved_rps=round(len(outcomes) / elapsed, 1), gateway_cpu_share=round(cpu_s / elapsed, 2),
        ok=len(ok), errors=len(errors),
        error_rate=len(errors) / max(1, len(outcomes)),
        error_samples=[f"{o.kind} {o.status} {o.error}" for o in errors[:5]],
        status_counts=statuses,
        latency_p50_ms=_ms(percentile(latencies, 0.5)), latency_p99_ms=_ms(percentile(latencies, 0.99)),
        max_send_lag_ms=_ms(max((o.send_lag_s for o in outcomes), default=0.0)),
        sent_late=sum(1 for o in outcomes if o.send_lag_s > 0.1),
        accepted=len(accepted), rows=len(ids), missing_rows=len(answered_set - id_set),
        extra_rows=max(0, len(id_set) - len(accepted) - unknown), duplicate_rows=len(ids) - len(id_set),
        rss_start_mib=round(rss["start"] / mib, 1), rss_end_mib=round(rss["steady_end"] / mib, 1),
        rss_peak_mib=round(rss["peak"] / mib, 1),
        rss_growth_mib=round((rss["steady_end"] - rss["start"]) / mib, 1),
        rss_after_burst_mib=round(rss["end"] / mib, 1), rss_series_mib=series,
        burst_size=len(burst_outcomes), burst_429=len(b429),
        burst_ok=sum(1 for o in burst_outcomes if o.status == 200),
        burst_other=sum(1 for o in burst_outcomes if o.status not in (200, 429)),
        burst_429_p50_ms=_ms(percentile([o.latency_s for o in b429], 0.5)),
        burst_max_ms=_ms(max((o.latency_s for o in burst_outcomes), default=None)),
    )
    report.checks = {
        "error_rate": report.error_rate < max_error_rate,
        "one_row_per_accepted_request": report.missing_rows == 0 and report.extra_rows == 0
        and report.duplicate_rows == 0 and report.rows >= report.accepted,
        "overload_answers_429": not burst_size or (report.burst_429 > 0 and report.burst_other == 0),
    }
    if rss_limit_mib is not None:
        report.checks["rss_growth"] = report.rss_growth_mib < rss_limit_mib
    return report


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="Steady phase length (long form: 10).")
    length.add_argument("--seconds", type=float, default=None, help="Steady phase length in seconds.")
    parser.add_argument("--rps", type=float, default=100.0, help="Requests per second (open loop).")
    parser.add_argument("--max-concurrency", type=int, default=64, help="server.max_concurrency of the gateway.")
    parser.add_argument("--mock-latency-ms", type=float, default=5.0, help="Mock student/teacher latency.")
    parser.add_argument("--teacher-share", type=float, default=0.1, help="Share of model=teacher (litellm).")
    parser.add_argument("--stream-share", type=float, default=0.1, help="Share of streamed model=auto.")
    parser.add_argument("--burst", type=int, default=None, help="Overload burst size (default 4x max-concurrency).")
    parser.add_argument("--rss-limit-mib", type=float, default=64.0, help="Largest accepted RSS growth.")
    parser.add_argument("--home", type=Path, default=None, help="Keep the gateway's home (db) here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 1)
    report = run(seconds, args.rps, max_concurrency=args.max_concurrency, mock_latency_ms=args.mock_latency_ms,
                 teacher_share=args.teacher_share, stream_share=args.stream_share, burst_size=args.burst,
                 home=args.home, rss_limit_mib=args.rss_limit_mib)
    summary = json.dumps({**asdict(report), "passed": report.passed}, indent=2)
    print(summary)
    if args.json:
        args.json.write_text(summary + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
