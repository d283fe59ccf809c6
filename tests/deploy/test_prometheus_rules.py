"""promtool on deploy/prometheus: the config and rules are valid, and the unit tests in
deploy/prometheus/tests prove that each alert fires on a synthetic series and stays quiet otherwise."""

from __future__ import annotations

import pytest

from gateway.metrics import FALLBACK_RATE_PROMQL
from tests.deploy.conftest import PROM_DIR, RULES_FILE, alert_names, load_yaml, rules, run

RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.test.yml"))

pytestmark = pytest.mark.prometheus


def test_promtool_check_config(promtool: str) -> None:
    result = run([promtool, "check", "config", "prometheus.yml"], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    # The config's relative rule_files glob found the rules (promtool checks them too).
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS, "no deploy/prometheus/tests/*.test.yml"
    result = run([promtool, "test", "rules", *map(str, RULE_TESTS)], cwd=PROM_DIR / "tests", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names())
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_recording_rule_is_the_gateways_fallback_rate_expression() -> None:
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    assert recorded["protege:fallback_rate:ratio_rate5m"] == FALLBACK_RATE_PROMQL


def test_alerts_are_labelled_and_explained() -> None:
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
