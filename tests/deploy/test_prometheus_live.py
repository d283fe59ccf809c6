"""A real Prometheus server, configured from deploy/prometheus (1s scrapes), scrapes a running
gateway whose student fails on cue; the fallback rate it computes is the one the requests imply,
and every PromQL expression of the rules and the Grafana dashboard is accepted by it."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from gateway.metrics import FALLBACK_RATE_PROMQL
from tests.deploy.conftest import (
    RULES_FILE,
    PrometheusServer,
    dashboard_exprs,
    grafana_to_promql,
    load_yaml,
    rules,
)

pytestmark = pytest.mark.prometheus

AUTO_PER_PHASE = 10
FALLBACKS_PER_PHASE = 3  # the same share in both phases: rate() extrapolates both counters alike


def ask(stack: dict[str, Any], model: str = "auto", student_fails: bool = False) -> str:
    if student_fails:
        stack["student"].fail_next(500)
    response = stack["client"].post("/v1/chat/completions",
                                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    return response.headers["x-protege-route"]


def send_phase(stack: dict[str, Any]) -> None:
    routes = [ask(stack, student_fails=i < FALLBACKS_PER_PHASE) for i in range(AUTO_PER_PHASE)]
    assert routes.count("teacher; reason=error") == FALLBACKS_PER_PHASE
    assert routes.count("student; reason=student") == AUTO_PER_PHASE - FALLBACKS_PER_PHASE
    # Explicit models are neither fallbacks nor in the denominator.
    assert ask(stack, model="teacher") == "teacher; reason=explicit"
    assert ask(stack, model="student") == "student; reason=explicit"


def counters_form(expr: str) -> str:
    """The fallback-rate expression with rate(X[w]) replaced by X: the same ratio over the
    counters' whole life, exact at any instant (no extrapolation)."""
    return re.sub(r"rate\((\w+)\[\w+\]\)", r"\1", expr)


@pytest.fixture(scope="module")
def scraped(gateway_stack: dict[str, Any], prometheus: PrometheusServer) -> PrometheusServer:
    """Phase 1 is already counted at Prometheus' first scrape of the gateway; phase 2 comes after."""
    send_phase(gateway_stack)
    prometheus.wait_for('sum(protege_auto_requests_total{job="protege-gateway"})',
                        lambda v: v == AUTO_PER_PHASE)
    send_phase(gateway_stack)
    prometheus.wait_for("sum(protege_auto_requests_total)", lambda v: v == 2 * AUTO_PER_PHASE)
    return prometheus


def test_prometheus_scrapes_the_gateway(scraped: PrometheusServer) -> None:
    assert scraped.value('up{job="protege-gateway"}') == 1
    assert scraped.value('protege_fallbacks_total{reason="error"}') == 2 * FALLBACKS_PER_PHASE
    assert scraped.value('sum(protege_requests_total{requested="teacher"})') == 2


def test_fallback_rate_is_what_the_requests_imply(scraped: PrometheusServer) -> None:
    expected = FALLBACKS_PER_PHASE / AUTO_PER_PHASE
    assert scraped.value(counters_form(FALLBACK_RATE_PROMQL)) == pytest.approx(expected, abs=1e-12)
    # The gateway's own expression (rate over 5m: the increase between the first and last scrape).
    assert scraped.value(FALLBACK_RATE_PROMQL) == pytest.approx(expected, rel=1e-9)
    # The recording rule from deploy/prometheus/rules, evaluated every second by the server.
    recorded = scraped.wait_for("protege:fallback_rate:ratio_rate5m",
                                lambda v: v == pytest.approx(expected, rel=1e-9), timeout_s=10)
    assert recorded == pytest.approx(expected, rel=1e-9)


def test_the_server_loaded_every_rule_healthy(scraped: PrometheusServer) -> None:
    answer = scraped.http.get("/api/v1/rules").json()
    assert answer["status"] == "success"
    loaded = {rule["name"]: rule for group in answer["data"]["groups"] for rule in group["rules"]}
    expected = {rule.get("alert") or rule["record"] for rule in rules()}
    assert set(loaded) == expected
    bad = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] == "err"}
    assert bad == {}
    groups = {group["name"] for group in load_yaml(RULES_FILE)["groups"]}
    assert {group["name"] for group in answer["data"]["groups"]} == groups


def test_no_alert_is_even_pending_for_a_healthy_gateway(gateway_stack: dict[str, Any],
                                                        scraped: PrometheusServer) -> None:
    # As the readiness probe would: /readyz sets protege_student_up.
    assert gateway_stack["client"].get("/readyz").status_code == 200
    scraped.wait_for("protege_student_up", lambda v: v == 1)
    scraped.wait_for("protege:fallback_rate:ratio_rate5m", lambda v: True)
    time.sleep(1.5)  # one more evaluation of the alerting group on that data
    answer = scraped.http.get("/api/v1/alerts").json()
    assert answer["status"] == "success"
    assert [(a["labels"]["alertname"], a["state"]) for a in answer["data"]["alerts"]] == []


def all_exprs() -> list[tuple[str, str]]:
    found = [(f"rule {rule.get('alert') or rule['record']}", rule["expr"]) for rule in rules()]
    found += [(where, grafana_to_promql(expr)) for where, expr in dashboard_exprs()]
    found.append(("gateway.metrics.FALLBACK_RATE_PROMQL", FALLBACK_RATE_PROMQL))
    return found


def test_every_promql_expression_is_accepted_by_prometheus(scraped: PrometheusServer) -> None:
    exprs = all_exprs()
    assert len(exprs) > 30
    rejected = {}
    for where, expr in exprs:
        answer = scraped.query(expr)
        if answer["status"] != "success":
            rejected[where] = f"{answer.get('error')}: {expr}"
    assert rejected == {}
