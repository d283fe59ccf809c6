"""Load, short form: ``bench.load`` for 20 s (the long form is ``python -m bench.load --minutes 10``;
CI time is precious). A real gateway process, a fast mock student/teacher process, loopback only."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from bench import load
from bench.mock_openai import MockOpenAI
from tests.reliability.harness import chat

pytestmark = pytest.mark.reliability


def test_steady_load_short_form(tmp_path) -> None:  # noqa: ANN001
    report = load.run(20, 40, max_concurrency=64, burst_size=256, mock_latency_ms=5, home=tmp_path / "home",
                      rss_limit_mib=64)
    print(report)
    assert report.sent == 800
    assert report.error_rate < 0.001, report.error_samples
    # Exactly one row per accepted request: all answered ids present, once, and nothing else.
    assert (report.missing_rows, report.extra_rows, report.duplicate_rows) == (0, 0, 0)
    assert report.rows == report.accepted
    # Leak check, not a speed threshold: 800 requests must not grow the process by 64 MiB.
    assert report.rss_growth_mib < 64
    # Overload: the excess of a 256-request burst over max_concurrency=64 is refused, never queued.
    assert report.burst_429 > 0 and report.burst_other == 0
    assert report.burst_ok + report.burst_429 == 256


def test_overload_is_answered_429_at_once_and_not_logged(upstream_factory, gateway_factory) -> None:  # noqa: ANN001
    student = upstream_factory(MockOpenAI(latency_s=1.0))
    gateway = gateway_factory(student={"url": f"{student.url}/v1"}, server={"max_concurrency": 3})

    async def fire(n: int) -> list[tuple[int, float, str]]:
        async with aiohttp.ClientSession() as session:
            async def one() -> tuple[int, float, str]:
                started = time.monotonic()
                async with session.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
                    body = await response.json()
                    code = body["error"]["code"] if response.status != 200 else ""
                    return response.status, time.monotonic() - started, code
            return list(await asyncio.gather(*[one() for _ in range(n)]))

    results = asyncio.run(fire(12))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) == 3 and len(refused) == 9
    assert {code for _, _, code in refused} == {"overloaded"}
    assert max(elapsed for _, elapsed, _ in refused) < 0.9  # answered before the 1 s student did
    assert gateway.services.in_flight == 0
    assert len(gateway.rows()) == 3  # refused requests were never accepted: no rows
