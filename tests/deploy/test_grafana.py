"""deploy/grafana: the dashboard is well-formed, uses the provisioned datasource, shows the
gateway's fallback-rate expression, and its fallback reasons are the router's."""

from __future__ import annotations

import re

from gateway.metrics import FALLBACK_RATE_PROMQL
from router.types import FALLBACK_REASONS
from tests.deploy.conftest import DEPLOY, dashboard, dashboard_exprs, load_yaml


def test_panels_are_unique_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells.get((x, y))!r}"
                cells[(x, y)] = panel["title"]


def test_every_query_uses_the_datasource_variable() -> None:
    board = dashboard()
    [variable] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}, panel["title"]
    [provisioned] = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert provisioned["type"] == variable["query"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = [expr for _, expr in dashboard_exprs()]
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    assert FALLBACK_RATE_PROMQL in exprs
    for topic in ("fallback rate by reason", "fallback rate by adapter version", "requests by route",
                  "latency p50 / p95", "teacher spend avoided", "feedback", "adapter versions over time"):
        assert topic in titles, topic
    assert any("histogram_quantile(0.95" in e and "protege_request_latency_seconds_bucket" in e for e in exprs)
    assert any("protege_adapter_promoted_info" in e for _, e in dashboard_exprs() if _.startswith("annotation"))


def test_fallback_reason_regexes_are_the_routers_reasons() -> None:
    regexes = [m for _, expr in dashboard_exprs() for m in re.findall(r'reason=~"([^"]+)"', expr)]
    assert regexes
    for regex in regexes:
        assert set(regex.split("|")) == set(FALLBACK_REASONS)
