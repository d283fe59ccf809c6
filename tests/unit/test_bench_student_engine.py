"""bench/student_engine.py's ratios: gateway against vLLM for the same version, adapter against
the first adapter asked, each at one concurrency."""

from __future__ import annotations

import pytest

from bench.student_engine import Result, main, ratios, report


def result(target: str, version: str, concurrency: int, tokens_per_s: float) -> Result:
    model = f"student:{version.split('@')[0]}" if target == "gateway" else version
    return Result(target=target, model=model, version=version, concurrency=concurrency, requests=16, failed=0,
                  completion_tokens=100, wall_s=1.0, tokens_per_s=tokens_per_s, latency_p50_s=0.1,
                  latency_p95_s=0.2)


def test_ratios_pair_the_same_version_and_concurrency() -> None:
    results = [result("gateway", "base@v0", 1, 9.0), result("vllm", "base@v0", 1, 10.0),
               result("gateway", "banking77@v3", 1, 6.0), result("vllm", "banking77@v3", 1, 8.0),
               result("gateway", "base@v0", 8, 30.0), result("vllm", "base@v0", 8, 40.0)]
    lines = ratios(results)
    assert "concurrency 1, base@v0: gateway reaches 90.0% of vLLM's tokens/s" in lines
    assert "concurrency 1, banking77@v3: gateway reaches 75.0% of vLLM's tokens/s" in lines
    assert "concurrency 8, base@v0: gateway reaches 75.0% of vLLM's tokens/s" in lines
    assert "concurrency 1, gateway: banking77@v3 reaches 66.7% of base@v0's tokens/s" in lines
    assert "concurrency 1, vllm: banking77@v3 reaches 80.0% of base@v0's tokens/s" in lines
    assert len(lines) == 5  # nothing at concurrency 8 for the adapter: it was not measured there
    assert "banking77@v3" in report(results).splitlines()[3]


def test_a_vllm_model_names_one_adapter_only() -> None:
    with pytest.raises(SystemExit):
        main(["--vllm-url", "http://127.0.0.1:9/v1", "--vllm-model", "x@v1", "--adapter", "base", "task"])
