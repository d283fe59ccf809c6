"""Fixtures for the deploy/ tests: paths, the prometheus binaries (skip with the reason when absent),
a running gateway on loopback (student and teacher are real mock OpenAI servers), and a real
Prometheus server scraping it."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.mock_openai import MockOpenAI, ServerThread, free_port
from gateway.cli import build_parser
from gateway.settings import Settings, load_settings
from tests.conftest import REPO_ROOT, make_settings

DEPLOY = REPO_ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULES_FILE = PROM_DIR / "rules" / "protege.rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "protege.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m"}


# -- binaries ----------------------------------------------------------------------------------


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian package `{package}`; .ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return binary("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return binary("prometheus", "prometheus")


def run(argv: list[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# -- reading the deploy files ------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"]]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every query of the dashboard: panel targets and annotations."""
    board = dashboard()
    found = [(f"panel {panel['title']!r} {target['refId']}", target["expr"])
             for panel in board["panels"] for target in panel.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"] if a.get("expr")]
    return found


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any, environ: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR} / ${VAR:-default} interpolation, with the defaults (or ``environ``)."""
    environ = environ or {}
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: environ.get(m["name"], m["default"] or ""), value)
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, '#' comments, values in single quotes taken literally (compose and
    systemd agree on this subset)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {raw!r}"
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


# -- what the files may reference -----------------------------------------------------------


def setting_for_env(name: str) -> str | None:
    """The dotted Settings field a PROTEGE_* variable sets, or None when there is none."""
    if name == "PROTEGE_CONFIG":
        return "(config file)"
    if not name.startswith("PROTEGE_"):
        return None
    model: Any = Settings
    path = name[len("PROTEGE_"):].lower().split("__")
    for i, part in enumerate(path):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
        if i < len(path) - 1 and not hasattr(model, "model_fields"):
            return None
    return ".".join(path)


def cli_error(argv: list[str]) -> str | None:
    """None when `protege argv...` parses with the real CLI parser; argparse's message otherwise."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else f"exit {exc.code}"
    return None


def settings_from(config_file: Path | None, environ: dict[str, str]) -> Settings:
    env = {k: v for k, v in environ.items() if k.startswith("PROTEGE_") and k != "PROTEGE_CONFIG"}
    return load_settings(config_file=config_file, environ=env)


# -- a running gateway and a Prometheus server scraping it ---------------------------------


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    student = MockOpenAI(answer_fn=lambda msgs: "student answer")
    teacher = MockOpenAI(answer_fn=lambda msgs: "teacher answer", model="big-model")
    student_srv = ServerThread(student.app).start()
    teacher_srv = ServerThread(teacher.app).start()
    gateway_srv = None
    try:
        settings = make_settings(
            tmp_path_factory.mktemp("gateway") / "home",
            student={"url": f"{student_srv.url}/v1"},
            teacher={"model": "openai/big-model", "api_base": f"{teacher_srv.url}/v1", "api_key": "sk-teacher",
                     "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
        )
        from gateway.app import create_app

        gateway_srv = ServerThread(create_app(settings)).start()
        with httpx.Client(base_url=gateway_srv.url, timeout=30) as client:
            yield {"student": student, "teacher": teacher, "gateway": gateway_srv, "client": client}
    finally:
        if gateway_srv is not None:
            gateway_srv.stop()
        student_srv.stop()
        teacher_srv.stop()


class PrometheusServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path
        self.http = httpx.Client(base_url=url, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> dict[str, Any]:
        """The API's whole answer to an instant query (status, data or error)."""
        return self.http.get("/api/v1/query", params={"query": expr}).json()

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; None while it is empty."""
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate: Any, timeout_s: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(expr)
            if value is not None and predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} is {value} after {timeout_s}s\nprometheus log:\n{self.log()}")
            time.sleep(0.2)


def prometheus_test_config(target: str, port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, pointed at the test gateway and sped up: 1s scrapes and
    rule evaluations, the repo's rule files by absolute path."""
    config = load_yaml(PROM_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / pattern) for pattern in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway_job = jobs["protege-gateway"]
    gateway_job["static_configs"] = [{"targets": [target]}]
    prometheus_job = jobs.get("prometheus", {"job_name": "prometheus"})
    prometheus_job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    # No vLLM here: its job would only report up == 0.
    config["scrape_configs"] = [gateway_job, prometheus_job]
    return config



@pytest.fixture(scope="module")
def prometheus(prometheus_binary: str, gateway_stack: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    target = gateway_stack["gateway"].url.removeprefix("http://")
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_test_config(target, port)))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [prometheus_binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if server.http.get("/-/ready").status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        server.http.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
