"""Gateway overhead: protege against the LiteLLM proxy and direct-to-upstream, in ONE run.

    python -m bench.gateway_overhead                 # full run, about 4-5 minutes
    python -m bench.gateway_overhead --quick         # under a minute
    python -m bench.gateway_overhead --profile 10    # and py-spy protege for 10 s at the end

What runs, each as its own process bound to 127.0.0.1 and stopped at the end:
- the upstream: ``bench/mock_openai.py`` (a real OpenAI-compatible HTTP server, echo answers);
- "direct": the mock itself, the zero-overhead reference;
- "pass-through": uvicorn (uvloop, httptools) + Starlette + a pooled aiohttp session forwarding
  the bytes and nothing else. It is the floor for any gateway on protege's stack: what the
  extra hop alone costs on this machine;
- protege: ``protege serve --student-url <mock>/v1`` with SQLite logging on (a fresh
  ``PROTEGE_HOME``) and an API key, asked with ``model="student"`` (gateway -> student HTTP) and
  ``model="auto"`` (through the router);
- the LiteLLM proxy: ``litellm --config cfg.yaml`` with one model, ``openai/mock-model`` at the
  mock's ``api_base``, a master key, no database (its own venv: ``--litellm-bin``, default
  /tmp/litellm-proxy/bin/litellm, made with ``pip install 'litellm[proxy]==1.104.0'``).

Two measurements; the targets take turns round by round, so that a noisy machine hurts all alike:
1. max throughput: wrk (one thread, a Lua POST script) at a few connection counts, and the
   server's CPU time per request (from /proc; steadier than RPS when other jobs share the cores);
2. latency at fixed rates: an open-loop generator (aiohttp, its own process) sends at a fixed
   rate whatever the answers do; latency is from sending a request to its last byte. "Added"
   latency is a target's percentile minus direct's at the same rate. A target is not run at
   rates over 60% of its max throughput (an open loop would measure its queue); one that drops
   requests at ``--max-in-flight`` or fails more than 1% of them is marked saturated.

Prints markdown, and writes ``bench/out/gateway_overhead.{md,csv,json}`` and the servers' logs
(``bench/out/`` is git-ignored). docs/benchmarks.md has a run and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"
DEFAULT_LITELLM = "/tmp/litellm-proxy/bin/litellm"
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark, please."}]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Both gateways check a key (LiteLLM's proxy refuses to start without a master key); the mock ignores it.
API_KEY = "sk-bench-0123456789abcdef"
# Fixed-rate runs stop at this share of a target's max RPS (wrk): past it, noise on a shared machine
# tips it into an ever-growing queue.
MAX_LOAD = 0.6


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A server we started: its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, url: str, timeout_s: float) -> float:
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout_s:.0f}s; see {self.log_path}")

    def pids(self) -> list[int]:
        return [self.pid, *_descendants(self.pid)]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)  # uvicorn: graceful, the log writer drains
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes, all their threads (/proc/PID/task/TID/schedstat: ns, so
    precise even over a few requests; utime+stime from /proc/PID/stat where that is missing)."""
    total = 0.0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            total += sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9
        except (OSError, ValueError, IndexError):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(parts[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Target:
    name: str
    url: str  # the chat-completions URL
    model: str
    server: Proc  # whose CPU time counts for this target
    body: bytes = b""

    def __post_init__(self) -> None:
        self.body = json.dumps({"model": self.model, "messages": MESSAGES, "max_tokens": 16}).encode()


def check_target(target: Target) -> str:
    request = urllib.request.Request(target.url, data=target.body, headers={"content-type": "application/json",
                                                                     "authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    content = body["choices"][0]["message"]["content"]
    if "hello" not in content:
        raise RuntimeError(f"{target.name}: unexpected answer {body!r}")
    return body.get("model", "")


# -- wrk: max throughput ----------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def run_wrk(wrk: str, target: Target, connections: int, duration_s: float, script: Path) -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
           "-s", str(script), target.url]
    cpu_before = target.server.cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    cpu = target.server.cpu_seconds() - cpu_before
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed on {target.name}: {out.stdout}\n{out.stderr}")
    result = json.loads(line[len("WRKJSON "):])
    result["errors"] = sum(result[k] for k in ("status", "connect", "read", "write", "timeout"))
    result["cpu_s"] = cpu
    return result


# -- the floor: a bare pass-through on protege's stack (runs as its own process) ---------------


def passthrough_main(port: int, upstream: str) -> None:
    """uvicorn (uvloop, httptools) + Starlette + one pooled aiohttp session, as protege runs, and
    nothing else: what any gateway on this stack pays for the extra hop on this machine."""
    import aiohttp
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    session: aiohttp.ClientSession | None = None

    async def chat(request: Request) -> Response:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=30))
        body = await request.body()
        async with session.post(upstream, data=body, headers={"content-type": "application/json"}) as response:
            data = await response.read()
            return Response(data, status_code=response.status, media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(b"ok")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/ready", ready)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools")


# -- the open-loop fixed-rate generator (runs as its own process) -----------------------------


async def _open_loop(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    rate, chunk_s, max_in_flight = spec["rate"], spec["chunk_s"], spec["max_in_flight"]
    targets = spec["targets"]
    results: dict[str, dict[str, Any]] = {
        t["name"]: {"latencies_ms": [], "chunks": [], "lag_ms": [], "errors": 0, "dropped": 0, "sent": 0,
                    "window_s": 0.0, "cpu_s": 0.0}
        for t in targets
    }
    headers = {"content-type": "application/json", "authorization": f"Bearer {spec['api_key']}"}
    timeout = aiohttp.ClientTimeout(total=spec["timeout_s"])
    # keep-alive shorter than the servers' 5 s, so an idle pooled connection is never a closed one
    connector = aiohttp.TCPConnector(limit=max_in_flight, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(url: str, body: bytes, res: dict[str, Any], record: bool) -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if record:
                if ok:
                    res["latencies_ms"].append((time.perf_counter() - t0) * 1000)
                else:
                    res["errors"] += 1

        for round_no in range(spec["rounds"]):
            order = targets[round_no % len(targets):] + targets[:round_no % len(targets)]
            for target in order:
                url, body, res = target["url"], target["body"].encode(), results[target["name"]]
                for _ in range(spec["warmup"]):  # fresh connections, caches: not measured
                    await one(url, body, res, record=False)
                cpu_before = cpu_seconds(target["pids"])
                first = len(res["latencies_ms"])
                tasks: set[asyncio.Task[None]] = set()
                n = int(rate * chunk_s)
                start = time.perf_counter() + 0.01
                for i in range(n):
                    due = start + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    res["lag_ms"].append(max(0.0, (time.perf_counter() - due) * 1000))
                    if len(tasks) >= max_in_flight:
                        res["dropped"] += 1  # the target is not keeping up: open loop, never wait
                        continue
                    task = asyncio.create_task(one(url, body, res, record=True))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    res["sent"] += 1
                if tasks:
                    await asyncio.wait(tasks, timeout=spec["timeout_s"])
                res["window_s"] += n / rate
                res["chunks"].append(res["latencies_ms"][first:])
                res["cpu_s"] += cpu_seconds(target["pids"]) - cpu_before
    return results


def loadgen_main(spec_json: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    spec = json.loads(spec_json)
    results = asyncio.run(_open_loop(spec))
    for res in results.values():
        del res["latencies_ms"]  # the same numbers are in "chunks"
    # A file, not stdout: the event loop may leave stdout non-blocking, and a large write to a
    # non-blocking pipe is cut short.
    Path(spec["out"]).write_text(json.dumps(results))


def run_fixed_rate(targets: list[Target], rate: float, chunk_s: float, rounds: int, warmup: int,
                   max_in_flight: int, timeout_s: float, out_path: Path) -> dict[str, dict[str, Any]]:
    spec = {"rate": rate, "chunk_s": chunk_s, "rounds": rounds, "warmup": warmup, "max_in_flight": max_in_flight,
            "timeout_s": timeout_s, "api_key": API_KEY, "out": str(out_path),
            "targets": [{"name": t.name, "url": t.url, "body": t.body.decode(), "pids": t.server.pids()}
                        for t in targets]}
    budget = rounds * len(targets) * (chunk_s + timeout_s + 5) + 30
    out = subprocess.run([sys.executable, "-m", "bench.gateway_overhead", "--loadgen", json.dumps(spec)],
                         capture_output=True, text=True, timeout=budget, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-3000:]}")
    return json.loads(out_path.read_text())


# -- statistics and output --------------------------------------------------------------------

LABELS = {
    "direct": "direct to mock (reference)",
    "passthrough": "bare pass-through (floor)",
    "protege_student": "protege, model=student",
    "protege_auto": "protege, model=auto",
    "litellm": "LiteLLM proxy",
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.{digits}f}"


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    wrk: list[dict[str, Any]] = field(default_factory=list)  # one row per (target, connections)
    rates: list[dict[str, Any]] = field(default_factory=list)  # one row per (rate, target)
    summary: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    log_rows: int | None = None
    profile: str | None = None


def summarize_wrk(chunks: dict[tuple[str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for (name, conns), parts in chunks.items():
        requests = sum(p["requests"] for p in parts)
        seconds = sum(p["duration_us"] for p in parts) / 1e6
        cpu = sum(p["cpu_s"] for p in parts)
        rows.append({
            "target": name, "connections": conns, "rounds": len(parts), "requests": requests,
            "rps": requests / seconds if seconds else 0.0,
            "rps_rounds": [round(p["requests"] / (p["duration_us"] / 1e6), 1) for p in parts],
            "p50_ms": statistics.median(p["p50_us"] for p in parts) / 1000,
            "p99_ms": max(p["p99_us"] for p in parts) / 1000,
            "errors": sum(p["errors"] for p in parts),
            "cpu_ms_per_req": cpu * 1000 / requests if requests else float("nan"),
        })
    return rows


def max_rps(report: Report) -> dict[str, float]:
    best: dict[str, float] = {}
    for row in report.wrk:
        best[row["target"]] = max(best.get(row["target"], 0.0), row["rps"])
    return best


def round_percentile(res: dict[str, Any], q: float) -> float:
    """The median over the rounds of each round's percentile: one round hit by a machine-wide
    stall (they happen here: other jobs share the cores) moves it less than pooling would."""
    values = [percentile(chunk, q) for chunk in res["chunks"] if chunk]
    return statistics.median(values) if values else float("nan")


def summarize_rate(rate: float, raw: dict[str, dict[str, Any]], skipped: dict[str, float]) -> list[dict[str, Any]]:
    base = raw.get("direct")
    base_p50 = round_percentile(base, 50) if base else float("nan")
    base_p99 = round_percentile(base, 99) if base else float("nan")
    rows = []
    for name in LABELS:
        if name in skipped:
            rows.append({"rate": rate, "target": name, "skipped": True, "saturated": True,
                         "max_rps": skipped[name]})
            continue
        if name not in raw:
            continue
        res = raw[name]
        lat = [value for chunk in res["chunks"] for value in chunk]
        achieved = len(lat) / res["window_s"] if res["window_s"] else 0.0
        scheduled = res["sent"] + res["dropped"]
        p50, p99 = round_percentile(res, 50), round_percentile(res, 99)
        rows.append({
            "rate": rate, "target": name, "skipped": False, "completed": len(lat), "errors": res["errors"],
            "dropped": res["dropped"], "achieved_rps": achieved,
            # could not keep up: requests dropped at the in-flight cap, or failed (timeouts included)
            "saturated": res["dropped"] + res["errors"] > 0.01 * scheduled,
            "p50_ms": p50, "p90_ms": round_percentile(res, 90), "p99_ms": p99,
            "pooled_p50_ms": percentile(lat, 50), "pooled_p99_ms": percentile(lat, 99), "max_ms": max(lat, default=0.0),
            "added_p50_ms": p50 - base_p50, "added_p99_ms": p99 - base_p99,
            "send_lag_p99_ms": percentile(res["lag_ms"], 99),
            "cpu_ms_per_req": res["cpu_s"] * 1000 / len(lat) if lat else float("nan"),
        })
    return rows


def build_summary(report: Report) -> None:
    best = max_rps(report)
    cpu: dict[str, float] = {}
    for name in best:
        cpu[name] = statistics.median(r["cpu_ms_per_req"] for r in report.wrk if r["target"] == name)
    figures: dict[str, Any] = {"max_rps": best, "cpu_ms_per_req": cpu}
    lines = report.summary
    lines.append("max RPS: " + ", ".join(f"{LABELS[n]} {best[n]:.0f}" for n in LABELS if n in best))
    if best.get("litellm"):
        for name in ("protege_student", "protege_auto"):
            if name in best:
                ratio = best[name] / best["litellm"]
                figures[f"{name}_over_litellm_rps"] = ratio
                lines.append(f"{LABELS[name]} / LiteLLM max RPS: **{ratio:.1f}×** "
                             f"({'meets' if ratio >= 10 else 'MISSES'} the ≥10× target); server CPU per request "
                             f"{cpu[name]:.2f} ms vs LiteLLM {cpu['litellm']:.2f} ms "
                             f"({cpu['litellm'] / cpu[name]:.0f}× less)")
    if best.get("direct") and best.get("protege_student"):
        lines.append(f"protege (student) reaches {best['protege_student'] / best['direct']:.0%} of direct-to-mock RPS "
                     f"and {best['protege_student'] / best.get('passthrough', float('nan')):.0%} of the bare "
                     f"pass-through's (wrk, the mock and the gateway share the cores)")
    measured = [r for r in report.rates if not r["skipped"]]
    for name in ("protege_student", "protege_auto"):
        rows = [r for r in measured if r["target"] == name]
        if not rows:
            continue
        worst = max(r["added_p50_ms"] for r in rows)
        figures[f"{name}_worst_added_p50_ms"] = worst
        lines.append(f"{LABELS[name]} added p50: " + ", ".join(f"{r['added_p50_ms']:.2f} ms @{r['rate']:.0f}"
                                                             for r in rows)
                     + f" ({'meets' if worst <= 1.0 else 'MISSES'} the ≤1 ms target); added p99: "
                     + ", ".join(f"{r['added_p99_ms']:.2f} ms @{r['rate']:.0f}" for r in rows))
    floor = {r["rate"]: r for r in measured if r["target"] == "passthrough"}
    prot = {r["rate"]: r for r in measured if r["target"] == "protege_student"}
    if floor and prot:
        lines.append("of which the bare hop (pass-through minus direct): "
                     + ", ".join(f"{floor[k]['added_p50_ms']:.2f} ms @{k:.0f}" for k in sorted(floor))
                     + "; protege's own share (protege minus pass-through, p50): "
                     + ", ".join(f"{prot[k]['p50_ms'] - floor[k]['p50_ms']:.2f} ms @{k:.0f}"
                                 for k in sorted(prot) if k in floor))
    lite = {r["rate"]: r for r in measured if r["target"] == "litellm"}
    ratios = [f"{lite[k]['added_p50_ms'] / prot[k]['added_p50_ms']:.0f}× @{k:.0f}"
              + (" (LiteLLM saturated)" if lite[k]["saturated"] else "")
              for k in sorted(lite) if k in prot and prot[k]["added_p50_ms"] > 0]
    if ratios:
        lines.append("LiteLLM added p50 / protege (student) added p50: " + ", ".join(ratios))
    over = sorted({r["rate"] for r in report.rates if r["skipped"] and r["target"] == "litellm"})
    if over:
        lines.append("LiteLLM not run at " + ", ".join(f"{k:.0f}" for k in over)
                     + " RPS: above 60% of its max throughput, an open loop only measures its queue")
    report.figures = figures


def render(report: Report) -> str:
    m = report.meta
    lines = [
        f"gateway overhead — {m['started']} — commit {m['commit']} — {m['mode']} run, {m['wall_s']:.0f} s",
        "",
        f"- command: `{m['command']}`",
        f"- machine: {m['cpus']} CPUs, {m['platform']}; load average (1/5/15 min): at start {m['load_start']}, "
        f"after the throughput runs {m.get('load_mid', '–')}, at the end {m.get('load_end', '–')}",
        f"- versions: python {m['python']}, LiteLLM proxy {m.get('litellm_version', '–')}, wrk {m['wrk']}",
        "- upstream: bench/mock_openai.py (echo, no added latency). protege: `protege serve --student-url`, "
        "SQLite logging on. LiteLLM proxy: one `openai/mock-model` deployment, defaults otherwise. Both check an "
        "API key (LiteLLM: master key, no database). Bare pass-through: uvicorn+Starlette+aiohttp forwarding the "
        "bytes, no logic (the floor for a gateway on protege's stack).",
        "",
        f"#### Max throughput (wrk -t1, closed loop, {m['wrk_rounds']} interleaved round(s) of "
        f"{m['wrk_seconds']:.0f} s; "
        "requests/s)",
        "",
    ]
    conns = sorted({r["connections"] for r in report.wrk})
    lines.append("| target | " + " | ".join(f"c={c}" for c in conns)
                 + " | max RPS | server CPU ms/req | p50 ms @max | errors |")
    lines.append("|---|" + "---:|" * (len(conns) + 4))
    for key, label in LABELS.items():
        rows = [r for r in report.wrk if r["target"] == key]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["rps"])
        cpu = statistics.median(r["cpu_ms_per_req"] for r in rows)
        cells = [fmt(next((r["rps"] for r in rows if r["connections"] == c), None), 0) for c in conns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{best['rps']:.0f}** | {cpu:.3f} | "
                     f"{best['p50_ms']:.2f} | {sum(r['errors'] for r in rows)} |")
    lines += ["", "server CPU ms/req: CPU time of that target's server process (all threads) per request: the "
              "mock's for direct, the gateway's alone (not the mock's) otherwise.", ""]
    lines += [f"#### Latency at fixed rates (open loop, {m['rate_rounds']} interleaved round(s) of "
              f"{m['rate_seconds']:g} s"
              " per target; ms, median over the rounds of each round's percentile; added = minus direct at the same "
              "rate)", "",
              "| rate | target | achieved RPS | p50 | p90 | p99 | added p50 | added p99 | server CPU ms/req "
              "| errors/dropped |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report.rates:
        label = LABELS[row["target"]]
        if row["skipped"]:
            lines.append(f"| {row['rate']:.0f} | {label} | not run: over 60% of its max {row['max_rps']:.0f} RPS "
                         "| | | | | | | |")
            continue
        sat = " (saturated)" if row["saturated"] else ""
        lines.append(f"| {row['rate']:.0f} | {label}{sat} | {row['achieved_rps']:.0f} | {fmt(row['p50_ms'])} | "
                     f"{fmt(row['p90_ms'])} | {fmt(row['p99_ms'])} | {fmt(row['added_p50_ms'])} | "
                     f"{fmt(row['added_p99_ms'])} | {fmt(row['cpu_ms_per_req'], 3)} | "
                     f"{row['errors']}/{row['dropped']} |")
    lines += ["", "#### Summary", ""]
    lines += [f"- {line}" for line in report.summary]
    if report.log_rows is not None:
        lines.append(f"- protege's SQLite log held {report.log_rows} rows at shutdown (a row per request it "
                     "answered, warm-ups included)")
    if report.profile:
        lines += ["", "#### protege profile (py-spy, model=student under wrk)", "", "```", report.profile, "```"]
    return "\n".join(lines) + "\n"


def write_outputs(report: Report, text: str, out: Path) -> None:
    (out / "gateway_overhead.md").write_text(text)
    (out / "gateway_overhead.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    with open(out / "gateway_overhead.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "target", "connections_or_rate", "rps", "p50_ms", "p90_ms", "p99_ms",
                         "added_p50_ms", "added_p99_ms", "cpu_ms_per_req", "errors", "dropped", "saturated",
                         "pooled_p99_ms", "max_ms"])
        for r in report.wrk:
            writer.writerow(["wrk", r["target"], r["connections"], f"{r['rps']:.1f}", f"{r['p50_ms']:.3f}", "",
                             f"{r['p99_ms']:.3f}", "", "", f"{r['cpu_ms_per_req']:.4f}", r["errors"], "", ""])
        for r in report.rates:
            if r["skipped"]:
                writer.writerow(["rate", r["target"], r["rate"], "", "", "", "", "", "", "", "", "", "skipped"])
                continue
            writer.writerow(["rate", r["target"], r["rate"], f"{r['achieved_rps']:.1f}", f"{r['p50_ms']:.3f}",
                             f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['added_p50_ms']:.3f}",
                             f"{r['added_p99_ms']:.3f}", f"{r['cpu_ms_per_req']:.4f}", r["errors"], r["dropped"],
                             r["saturated"], f"{r['pooled_p99_ms']:.3f}", f"{r['max_ms']:.3f}"])


# -- profiling ----------------------------------------------------------------------------------


def profile_protege(pyspy: str, protege: Proc, wrk: str, target: Target, script: Path, connections: int,
                    seconds: int, out_dir: Path) -> str:
    raw = out_dir / "protege_profile.txt"
    spy = subprocess.Popen([pyspy, "record", "-p", str(protege.pid), "-f", "raw", "-o", str(raw),
                            "-d", str(seconds + 2), "--function", "--nonblocking", "-r", "200"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    run_wrk(wrk, target, connections, seconds, script)
    _, err = spy.communicate(timeout=seconds + 60)
    if not raw.exists():
        return f"py-spy failed: {err.decode(errors='replace')[-500:]}"
    return summarize_folded(raw.read_text())


def summarize_folded(text: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (folded) output."""
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    if not total:
        return "no samples"
    out = [f"{total} samples (native time is charged to the Python function that called it)", "",
           "self %  function"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "incl % function (protege code)"]
    ours = [(f, n) for f, n in incl.items() if any(p in f for p in ("gateway/", "feedback/", "router/"))]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in sorted(ours, key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


def _short_frame(frame: str) -> str:
    # "func (path/to/site-packages/pkg/mod.py:12)" -> "func (pkg/mod.py:12)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


# -- the run -----------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "gateway", "feedback", "router"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def litellm_config(mock_url: str) -> str:
    return (
        "model_list:\n"
        "  - model_name: mock\n"
        "    litellm_params:\n"
        "      model: openai/mock-model\n"
        f"      api_base: {mock_url}/v1\n"
        "      api_key: sk-bench\n"
    )


def interleaved(targets: list[Target], round_no: int) -> list[Target]:
    shift = round_no % len(targets)
    return targets[shift:] + targets[:shift]


def start_servers(args: argparse.Namespace, work: Path, report: Report) -> tuple[list[Proc], list[Target]]:
    procs: list[Proc] = []
    mock_port, floor_port, protege_port, litellm_port = (free_port() for _ in range(4))
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = Proc("mock", [sys.executable, "-m", "bench.mock_openai", "--port", str(mock_port)], work / "mock.log")
    procs.append(mock)
    floor = Proc("passthrough", [sys.executable, "-m", "bench.gateway_overhead", "--passthrough", str(floor_port),
                                 f"{mock_url}/v1/chat/completions"], work / "passthrough.log")
    procs.append(floor)
    env = {**os.environ, "PROTEGE_HOME": str(work / "home"), "PROTEGE_SERVER__LOG_LEVEL": "warning",
           "PROTEGE_AUTH__API_KEYS": json.dumps({"bench": API_KEY})}
    env.pop("PROTEGE_CONFIG", None)
    protege = Proc("protege", [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
                               "--port", str(protege_port), "--student-url", f"{mock_url}/v1"],
                   work / "protege.log", env=env)
    procs.append(protege)
    litellm = None
    if not args.no_litellm:
        cfg = work / "litellm.yaml"
        cfg.write_text(litellm_config(mock_url))
        lenv = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": API_KEY}
        litellm = Proc("litellm", [args.litellm_bin, "--config", str(cfg), "--host", "127.0.0.1",
                                   "--port", str(litellm_port)], work / "litellm.log", env=lenv, cwd=work)
        procs.append(litellm)
        version = subprocess.run([str(Path(args.litellm_bin).parent / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('litellm'))"],
                                 capture_output=True, text=True)
        report.meta["litellm_version"] = version.stdout.strip() or "?"
    try:
        mock.wait_ready(f"{mock_url}/v1/models", 60)
        floor.wait_ready(f"http://127.0.0.1:{floor_port}/ready", 60)
        protege.wait_ready(f"http://127.0.0.1:{protege_port}/readyz", 120)
        if litellm is not None:
            took = litellm.wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness", 180)
            print(f"LiteLLM proxy ready after {took:.1f}s", flush=True)
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        raise
    protege_url = f"http://127.0.0.1:{protege_port}/v1/chat/completions"
    targets = [Target("direct", f"{mock_url}/v1/chat/completions", "mock-model", mock),
               Target("passthrough", f"http://127.0.0.1:{floor_port}/v1/chat/completions", "mock-model", floor),
               Target("protege_student", protege_url, "student", protege)]
    if not args.no_auto:
        targets.append(Target("protege_auto", protege_url, "auto", protege))
    if litellm is not None:
        targets.append(Target("litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions", "mock", litellm))
    return procs, targets


def measure(args: argparse.Namespace, targets: list[Target], work: Path, report: Report) -> None:
    m = report.meta
    for target in targets:
        for _ in range(m["warmup"]):  # answers are right; lazy imports and caches warmed before anything is timed
            check_target(target)
    scripts = {}
    for target in targets:
        scripts[target.name] = work / f"{target.name}.lua"
        scripts[target.name].write_text(WRK_LUA.replace("{{", "{").replace("}}", "}")
                                        .replace("{body}", target.body.decode()).replace("{key}", API_KEY))

    # 1. max throughput, targets interleaved
    chunks: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for conns in m["connections"]:
        for round_no in range(m["wrk_rounds"]):
            for target in interleaved(targets, round_no):
                result = run_wrk(args.wrk, target, conns, m["wrk_seconds"], scripts[target.name])
                chunks[(target.name, conns)].append(result)
                print(f"  wrk c={conns:<4} {target.name:<16} {result['requests'] / (result['duration_us'] / 1e6):8.0f}"
                      f" RPS  p50 {result['p50_us'] / 1000:7.2f} ms  server cpu "
                      f"{result['cpu_s'] * 1000 / max(1, result['requests']):.3f} ms/req  errors {result['errors']}",
                      flush=True)
    report.wrk = summarize_wrk(chunks)
    m["load_mid"] = loadavg()

    # 2. latency at fixed rates, targets interleaved; a target is not pushed past 60% of its max
    best = max_rps(report)
    for rate in m["rates"]:
        skipped = {t.name: best[t.name] for t in targets if rate > MAX_LOAD * best[t.name]}
        running = [t for t in targets if t.name not in skipped]
        raw = run_fixed_rate(running, rate, m["rate_seconds"], m["rate_rounds"], warmup=10,
                             max_in_flight=args.max_in_flight, timeout_s=10.0, out_path=work / f"rate_{rate:g}.json")
        rows = summarize_rate(rate, raw, skipped)
        report.rates += rows
        for row in rows:
            if row["skipped"]:
                print(f"  rate {rate:5.0f} {row['target']:<16} not run (max {row['max_rps']:.0f} RPS)", flush=True)
                continue
            print(f"  rate {rate:5.0f} {row['target']:<16} achieved {row['achieved_rps']:6.1f}"
                  f"  p50 {row['p50_ms']:7.2f}"
                  f"  p99 {row['p99_ms']:7.2f}  added p50 {row['added_p50_ms']:6.2f}  dropped {row['dropped']}"
                  f"{'  SATURATED' if row['saturated'] else ''}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--passthrough", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="Short run (under a minute).")
    parser.add_argument("--connections", type=int, nargs="+",
                        help="wrk connection counts (default 8 32 128; quick 32).")
    parser.add_argument("--wrk-seconds", type=int, help="Seconds per wrk run (default 3; quick 2).")
    parser.add_argument("--wrk-rounds", type=int, help="Rounds of wrk runs, targets interleaved (default 2; quick 1).")
    parser.add_argument("--rates", type=float, nargs="+",
                        help="Fixed rates, RPS (default 20 50 100 200; quick 20 100).")
    parser.add_argument("--rate-seconds", type=float, help="Seconds per fixed-rate run (default 1.5; quick 1).")
    parser.add_argument("--rate-rounds", type=int,
                        help="Rounds of fixed-rate runs, targets interleaved (default 6; quick 2).")
    parser.add_argument("--max-in-flight", type=int, default=64, help="Open-loop cap; beyond it requests are dropped.")
    parser.add_argument("--no-litellm", action="store_true", help="Leave the LiteLLM proxy out.")
    parser.add_argument("--no-auto", action="store_true", help="Leave protege's model=auto target out.")
    parser.add_argument("--litellm-bin", default=os.environ.get("PROTEGE_BENCH_LITELLM", DEFAULT_LITELLM),
                        help=f"The proxy's `litellm` command (default {DEFAULT_LITELLM}; env PROTEGE_BENCH_LITELLM).")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="At the end, py-spy protege (model=student) under wrk for SECONDS.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.loadgen:
        loadgen_main(args.loadgen)
        return 0
    if args.passthrough:
        passthrough_main(int(args.passthrough[0]), args.passthrough[1])
        return 0
    if not Path(args.wrk).exists():
        parser.error(f"wrk not found at {args.wrk}")
    if not args.no_litellm and not Path(args.litellm_bin).exists():
        parser.error(f"no LiteLLM proxy at {args.litellm_bin}: make one with\n"
                     "  python3 -m venv /tmp/litellm-proxy && /tmp/litellm-proxy/bin/pip install "
                     "'litellm[proxy]==1.104.0'\nor pass --litellm-bin, or --no-litellm")

    quick = args.quick
    wall0 = time.monotonic()
    report = Report(meta={
        "started": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "mode": "quick" if quick else "full", "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "load_start": loadavg(),
        "wrk": subprocess.run([args.wrk, "-v"], capture_output=True, text=True).stdout.split()[1],
        "command": " ".join(["python -m bench.gateway_overhead", *(sys.argv[1:] if argv is None else argv)]),
        "connections": args.connections or ([32] if quick else [8, 32, 128]),
        "wrk_seconds": args.wrk_seconds or (2 if quick else 3),
        "wrk_rounds": args.wrk_rounds or (1 if quick else 2),
        "rates": args.rates or ([20, 100] if quick else [20, 50, 100, 200]),
        "rate_seconds": args.rate_seconds or (1.0 if quick else 1.5),
        "rate_rounds": args.rate_rounds or (2 if quick else 6),
        "warmup": 5 if quick else 20,
    })
    print(f"load average at start: {report.meta['load_start']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="protege-bench-"))
    try:
        procs, targets = start_servers(args, work, report)
        try:
            measure(args, targets, work, report)
            if args.profile:
                protege = next(t for t in targets if t.name == "protege_student")
                best_c = max((r for r in report.wrk if r["target"] == protege.name), key=lambda r: r["rps"])
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                report.profile = profile_protege(pyspy, protege.server, args.wrk, protege,
                                                 work / f"{protege.name}.lua", best_c["connections"], args.profile,
                                                 args.out)
            report.meta["load_end"] = loadavg()
        finally:
            for proc in reversed(procs):
                proc.stop()
            logs = args.out / "logs"
            logs.mkdir(exist_ok=True)
            for proc in procs:
                shutil.copy(proc.log_path, logs / proc.log_path.name)
        db = work / "home" / "protege.db"
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                report.log_rows = conn.execute("select count(*) from requests").fetchone()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.meta["wall_s"] = time.monotonic() - wall0
    build_summary(report)
    text = render(report)
    print()
    print(text)
    write_outputs(report, text, args.out)
    print(f"wrote {args.out}/gateway_overhead.{{md,csv,json}} and the servers' logs in {args.out}/logs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
