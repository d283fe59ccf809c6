"""deploy/compose.yaml: valid against the Compose Specification's schema (no Docker engine needed),
internally consistent, and in agreement with the gateway's settings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.settings import Settings
from tests.deploy.conftest import DEPLOY, interpolate, load_yaml, read_env_file, run, settings_from

COMPOSE_FILE = DEPLOY / "compose.yaml"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(load_yaml(COMPOSE_FILE))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def effective_settings(compose: dict[str, Any], service: str) -> Settings:
    """The settings a service's container would build: its environment, the secrets template as
    protege.env, and the YAML file mounted where PROTEGE_CONFIG points."""
    svc = compose["services"][service]
    env = {**read_env_file(DEPLOY / "protege.env.example"), **{k: str(v) for k, v in svc["environment"].items()}}
    mounts = dict(reversed(volume.split(":")[:2]) for volume in svc["volumes"])
    config = DEPLOY / mounts[env["PROTEGE_CONFIG"]]
    return settings_from(config, env)


def test_compose_file_is_valid_against_the_compose_spec(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The validator does reject what compose would.
    broken = {**compose, "services": {**compose["services"], "gateway": {**compose["services"]["gateway"],
                                                                           "restart": 5, "bogus": 1}}}
    assert len(list(validator.iter_errors(broken))) == 2


def test_exactly_one_vllm_per_profile_both_named_vllm(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["profiles"] == ["cpu"]
    assert services["vllm-cpu"]["networks"]["default"]["aliases"] == ["vllm"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai")
    assert services["vllm-cpu"]["entrypoint"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    default_profiles = read_env_file(DEPLOY / ".env")["COMPOSE_PROFILES"]
    assert default_profiles == "gpu"
    # Everything else runs whatever the profile.
    profiled = {name for name, svc in services.items() if svc.get("profiles")}
    assert profiled == {"vllm", "vllm-cpu"}
    gateway_deps = services["gateway"]["depends_on"]
    assert {name: dep["required"] for name, dep in gateway_deps.items()} == {"vllm": False, "vllm-cpu": False}


@pytest.mark.parametrize("vllm_service", ["vllm", "vllm-cpu"])
def test_vllm_flags_agree_with_the_gateways_settings(compose: dict[str, Any], vllm_service: str) -> None:
    settings = effective_settings(compose, "gateway")
    student = settings.student
    argv = [str(a) for a in compose["services"][vllm_service]["command"]]
    assert flag(argv, "--served-model-name") == student.served_model_name
    assert flag(argv, "--model") == str(settings.student_model_dir)
    assert int(flag(argv, "--max-loras")) == student.vllm_max_loras
    assert int(flag(argv, "--max-lora-rank")) == student.vllm_max_lora_rank
    assert int(flag(argv, "--max-model-len")) == student.vllm_max_model_len
    assert "--enable-lora" in argv
    url = urlsplit(student.url)
    assert (url.hostname, url.port, url.path) == ("vllm", int(flag(argv, "--port")), "/v1")
    env = compose["services"][vllm_service]["environment"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # vLLM sees the model and the adapters where the gateway does (it loads adapters by path).
    gateway_targets = {v.split(":")[1] for v in compose["services"]["gateway"]["volumes"]}
    for volume in compose["services"][vllm_service]["volumes"]:
        source, target = volume.split(":")[:2]
        assert target in gateway_targets
        assert f"{source}:{target}" in compose["services"]["gateway"]["volumes"]
    assert str(settings.adapters_dir) in {v.split(":")[1] for v in compose["services"][vllm_service]["volumes"]}


def test_gateway_service(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    settings = effective_settings(compose, "gateway")
    assert gateway["command"] == ["serve"]
    assert settings.server.host == "0.0.0.0"
    assert gateway["ports"] == [f"8000:{settings.server.port}"]
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["deploy"]["replicas"] == 1
    assert str(settings.home) == "/var/lib/protege"
    # The SQLite file, the adapters and the model cache are on named volumes.
    targets = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    for path in (settings.db_path.parent, settings.adapters_dir, settings.model_cache_dir):
        assert targets[str(path)] in compose["volumes"], path


def test_retrain_and_model_prepare_share_the_gateways_state(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("retrain", "model-prepare"):
        assert services[name]["volumes"] == services["gateway"]["volumes"]
        settings = effective_settings(compose, name)
        assert settings.db_path == effective_settings(compose, "gateway").db_path
    assert services["retrain"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    # The retrain reaches the gateway by its service name and port.
    gateway = effective_settings(compose, "gateway")
    assert flag(services["retrain"]["command"], "--url") == f"http://gateway:{gateway.server.port}"
    for name in ("vllm", "vllm-cpu"):
        assert services[name]["depends_on"]["model-prepare"]["condition"] == "service_completed_successfully"


def test_references_inside_the_compose_file_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    assert services["prometheus"]["command"][0] == "--config.file=/etc/prometheus/prometheus.yml"
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_grafana_provisioning_matches_the_mounts(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    [provider] = load_yaml(provisioning / "dashboards" / "protege.yaml")["providers"]
    dashboards_dir = DEPLOY / mounts[provider["options"]["path"]]
    assert (dashboards_dir / "protege.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"])
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"] and url.port == 9090
    assert datasource["type"] == "prometheus"


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("no `docker compose` plugin here; the schema test above validates the file")
    for profile in ("gpu", "cpu"):
        result = subprocess.run([docker, "compose", "--profile", profile, "-f", str(COMPOSE_FILE), "config", "-q"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
