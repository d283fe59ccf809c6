"""Student engine throughput: completion tokens/s through the gateway vs straight to vLLM, one
request at a time and 8 at once (the gateway's overhead on the student path), and a trained
adapter against ``base@v0`` (what serving LoRA costs).

    python bench/student_engine.py --gateway-url http://127.0.0.1:8000/v1 \\
        --vllm-url http://127.0.0.1:8001/v1 --adapter base banking77
    python bench/student_engine.py --vllm-url http://127.0.0.1:8001/v1 --vllm-model support@v2

The gateway is asked for ``student:<adapter>`` for each ``--adapter``; vLLM for the version the
gateway says served it (its answer's ``model`` is ``student:<task>@v<N>``), or ``--vllm-model``
(one adapter only). Greedy decoding, same prompts, same ``max_tokens`` on every target; the
targets take turns at each concurrency so that drifting machine load hits all alike; a warm-up
round is not counted. The gateway key is read from the environment variable named by
``--api-key-env`` (never from the command line). Results: a table and the ratios on stdout, JSON
in ``--out`` (default bench/out/student_engine.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Explain what a LoRA adapter is in two sentences.",
    "Write a short note thanking a colleague for their help.",
    "List three uses of a small language model.",
    "What is the capital of France, and why is it famous?",
    "Summarise the plot of Hamlet briefly.",
    "Give two tips for writing clear emails.",
    "Describe the water cycle simply.",
    "Why is the sky blue?",
]


@dataclass
class Result:
    target: str
    model: str
    version: str  # the adapter version that answered: the same on both targets of one adapter
    concurrency: int
    requests: int
    failed: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    version: str = ""


async def one_call(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    response = await client.post(f"{target.url}/chat/completions", headers=target.headers, json={
        "model": target.model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"]), time.perf_counter() - started


async def run_round(client: httpx.AsyncClient, target: Target, concurrency: int, requests: int,
                    max_tokens: int) -> Result:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    tokens: list[int] = []
    latencies: list[float] = []
    failures: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                count, latency = await one_call(client, target, prompt, max_tokens)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            tokens.append(count)
            latencies.append(latency)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return Result(
        target=target.name, model=target.model, version=target.version or target.model,
        concurrency=concurrency, requests=requests,
        failed=len(failures), completion_tokens=sum(tokens), wall_s=round(wall, 3),
        tokens_per_s=round(sum(tokens) / wall, 2) if wall > 0 else 0.0,
        latency_p50_s=round(statistics.median(ordered), 3),
        latency_p95_s=round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
    )


async def served_version(client: httpx.AsyncClient, gateway: Target, max_tokens: int) -> str:
    """Warm the gateway path up and learn which version it serves (``student:<task>@vN``)."""
    response = await client.post(f"{gateway.url}/chat/completions", headers=gateway.headers, json={
        "model": gateway.model, "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    model = str(response.json().get("model", ""))
    return model.split(":", 1)[1] if model.startswith("student:") else model


def gateway_target(args: argparse.Namespace, adapter: str) -> Target:
    key = os.environ.get(args.api_key_env)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return Target("gateway", args.gateway_url.rstrip("/"), f"student:{adapter}", headers)


async def targets(client: httpx.AsyncClient, args: argparse.Namespace) -> list[Target]:
    """Per adapter: the gateway's ``student:<adapter>``, then vLLM asked for the version it served."""
    chosen = []
    for adapter in args.adapter:
        vllm_model = args.vllm_model
        if args.gateway_url:
            gateway = gateway_target(args, adapter)
            version = await served_version(client, gateway, args.max_tokens)
            chosen.append(replace(gateway, version=version))
            vllm_model = vllm_model or version
        if args.vllm_url:
            if not vllm_model:
                raise SystemExit("--vllm-model is needed without --gateway-url (e.g. base@v0)")
            chosen.append(Target("vllm", args.vllm_url.rstrip("/"), vllm_model, {}, vllm_model))
    return chosen


async def bench(args: argparse.Namespace) -> list[Result]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:
        chosen = await targets(client, args)
        for target in chosen:  # warm-up: first calls pay for connections and prefix caches
            await run_round(client, target, 2, 2, args.max_tokens)
        results = []
        for concurrency in args.concurrency:
            requests = max(args.requests, 2 * concurrency)
            for target in chosen:  # interleaved, so drifting machine load hits all alike
                results.append(await run_round(client, target, concurrency, requests, args.max_tokens))
        return results


def report(results: list[Result]) -> str:
    header = (f"{'target':8} {'model':22} {'version':18} {'conc':>4} {'reqs':>4} {'fail':>4} {'tok/s':>8} "
              f"{'p50 s':>7} {'p95 s':>7}")
    lines = [header]
    for r in results:
        lines.append(f"{r.target:8} {r.model[:22]:22} {r.version[:18]:18} {r.concurrency:>4} {r.requests:>4} "
                     f"{r.failed:>4} "
                     f"{r.tokens_per_s:>8.1f} {r.latency_p50_s:>7.2f} {r.latency_p95_s:>7.2f}")
    return "\n".join(lines + ratios(results))


def ratios(results: list[Result]) -> list[str]:
    """Gateway against vLLM for the same version, and each adapter against the first one asked
    (``base@v0`` when ``--adapter base`` comes first), both at the same concurrency."""
    lines = []
    vllm = {(r.version, r.concurrency): r for r in results if r.target == "vllm"}
    for r in results:
        direct = vllm.get((r.version, r.concurrency)) if r.target == "gateway" else None
        if direct and direct.tokens_per_s:
            lines.append(f"concurrency {r.concurrency}, {r.version}: gateway reaches "
                         f"{100 * r.tokens_per_s / direct.tokens_per_s:.1f}% of vLLM's tokens/s")
    for target in ("gateway", "vllm"):
        rows = [r for r in results if r.target == target]
        for concurrency in sorted({r.concurrency for r in rows}):
            same = [r for r in rows if r.concurrency == concurrency]
            first = same[0]
            for other in same[1:]:
                if first.tokens_per_s:
                    lines.append(f"concurrency {concurrency}, {target}: {other.version} reaches "
                                 f"{100 * other.tokens_per_s / first.tokens_per_s:.1f}% of "
                                 f"{first.version}'s tokens/s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-url", default=None, help="Gateway OpenAI base, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--vllm-url", default=None, help="vLLM OpenAI base, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--adapter", nargs="+", default=["base"],
                        help="Adapter aliases asked of the gateway (student:<alias>), in turn; the "
                        "first is the reference of the adapter ratios (e.g. base banking77).")
    parser.add_argument("--vllm-model", default=None, help="Model name for vLLM; default: what the gateway served.")
    parser.add_argument("--api-key-env", default="PROTEGE_API_KEY", help="Env var holding the gateway key.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16, help="Requests per round (at least 2x concurrency).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/student_engine.json"))
    args = parser.parse_args(argv)
    if not args.gateway_url and not args.vllm_url:
        parser.error("give --gateway-url, --vllm-url or both")
    if args.vllm_model and len(args.adapter) > 1:
        parser.error("--vllm-model names one version: give one --adapter with it")
    results = asyncio.run(bench(args))
    print(report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"max_tokens": args.max_tokens, "results": [asdict(r) for r in results]}
    args.out.write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
