"""deploy/k8s: the manifests parse, build with kustomize, and encode the constraints: one gateway
replica with Recreate (SQLite has one writer), probes on /readyz and /healthz, a Forbid CronJob on
the same volume and node, vLLM flags that agree with the settings in the ConfigMap."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.settings import Settings
from tests.deploy.conftest import DEPLOY, load_yaml, load_yaml_all, read_env_file, run, settings_from

K8S = DEPLOY / "k8s"
BASE = K8S / "base"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for name in load_yaml(BASE / "kustomization.yaml")["resources"]:
        for doc in load_yaml_all(BASE / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(obj)
    [found] = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def claims(obj: dict[str, Any]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(obj)["volumes"] if "persistentVolumeClaim" in v}


def affinity_target(obj: dict[str, Any]) -> dict[str, str]:
    [term] = pod_spec(obj)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    return term["labelSelector"]["matchLabels"]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def configmap_settings(env: list[dict[str, str]]) -> Settings:
    """The settings the pod builds: the ConfigMap's protege.yaml, the container's env and the
    Secret (as in secret.example.yaml)."""
    [secret] = load_yaml_all(K8S / "secret.example.yaml")
    environ = {**secret["stringData"], **{e["name"]: e["value"] for e in env}}
    return settings_from(BASE / "protege.yaml", environ)


def test_expected_objects(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(objects) == {
        ("Namespace", "protege"), ("PersistentVolumeClaim", "protege-data"),
        ("Deployment", "protege-gateway"), ("Service", "protege-gateway"),
        ("Deployment", "protege-vllm"), ("Service", "vllm"), ("CronJob", "protege-retrain"),
    }
    assert load_yaml(BASE / "kustomization.yaml")["configMapGenerator"][0]["files"] == ["protege.yaml"]


def test_gateway_is_a_single_writer_with_probes(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    gateway = objects[("Deployment", "protege-gateway")]
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["strategy"] == {"type": "Recreate"}
    main = container(gateway, "gateway")
    assert main["args"] == ["serve"]
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    settings = configmap_settings(main["env"])
    assert main["ports"][0]["containerPort"] == settings.server.port
    assert settings.server.host == "0.0.0.0"
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts[str(settings.home)] == "data"
    env = {e["name"]: e["value"] for e in main["env"]}
    assert mounts[str(Path(env["PROTEGE_CONFIG"]).parent)] == "config"
    assert main["envFrom"] == [{"secretRef": {"name": "protege-secrets"}}]
    service = objects[("Service", "protege-gateway")]
    assert service["spec"]["selector"].items() <= pod_labels(gateway).items()
    security = pod_spec(gateway)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001


def test_secret_name_matches_the_example() -> None:
    [secret] = load_yaml_all(K8S / "secret.example.yaml")
    assert secret["metadata"]["name"] == "protege-secrets"
    assert set(secret["stringData"]) == set(read_env_file(DEPLOY / "protege.env.example"))


def test_retrain_cronjob_shares_the_volume_on_the_gateways_node(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    cron = objects[("CronJob", "protege-retrain")]
    gateway = objects[("Deployment", "protege-gateway")]
    vllm = objects[("Deployment", "protege-vllm")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    args = container(cron, "retrain")["args"]
    assert args[0] == "retrain"
    # The retrain reaches the gateway through its Service.
    service = objects[("Service", "protege-gateway")]
    assert flag(args, "--url") == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert claims(cron) == claims(gateway) == claims(vllm) == {"protege-data"}
    pvc = objects[("PersistentVolumeClaim", "protege-data")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # RWO: one node. vLLM is the anchor, the gateway follows it, the retrain follows the gateway.
    assert affinity_target(gateway).items() <= pod_labels(vllm).items()
    assert affinity_target(cron).items() <= pod_labels(gateway).items()
    assert "affinity" not in pod_spec(vllm)
    # Same settings as the gateway.
    assert container(cron, "retrain")["env"] == container(gateway, "gateway")["env"]
    assert container(cron, "retrain")["envFrom"] == container(gateway, "gateway")["envFrom"]


def test_vllm_flags_agree_with_the_configmap(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    vllm = objects[("Deployment", "protege-vllm")]
    gateway = objects[("Deployment", "protege-gateway")]
    settings = configmap_settings(container(gateway, "gateway")["env"])
    server = container(vllm, "vllm")
    argv = server["args"]
    assert server["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--served-model-name") == settings.student.served_model_name
    assert flag(argv, "--model") == str(settings.student_model_dir)
    assert int(flag(argv, "--max-loras")) == settings.student.vllm_max_loras
    assert int(flag(argv, "--max-lora-rank")) == settings.student.vllm_max_lora_rank
    assert int(flag(argv, "--max-model-len")) == settings.student.vllm_max_model_len
    url = urlsplit(settings.student.url)
    service = objects[("Service", "vllm")]
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == int(flag(argv, "--port"))
    assert service["spec"]["selector"].items() <= pod_labels(vllm).items()
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in server["env"]
    # vLLM reads adapters and the model by the gateway's paths.
    [data_mount] = [m for m in server["volumeMounts"] if m["name"] == "data"]
    assert data_mount["mountPath"] == str(settings.home)
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container(vllm, "model-prepare")["args"] == ["model", "prepare"]


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the structural tests above still ran")
    result = run([kubectl, "kustomize", str(path)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_kustomize_builds(overlay: str) -> None:
    built = kustomize(K8S if overlay == "gpu" else K8S / "cpu")
    def key(obj: dict[str, Any]) -> tuple[str, str]:
        name = obj["metadata"]["name"]
        return obj["kind"], name.rsplit("-", 1)[0] if obj["kind"] == "ConfigMap" else name  # hash suffix

    by_kind = {key(d): d for d in built}
    configmap = by_kind[("ConfigMap", "protege-config")]
    assert yaml.safe_load(configmap["data"]["protege.yaml"]) == load_yaml(BASE / "protege.yaml")
    for obj in built:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "protege", obj["metadata"]["name"]
    for key in (("Deployment", "protege-gateway"), ("Deployment", "protege-vllm"), ("CronJob", "protege-retrain")):
        volumes = pod_spec(by_kind[key])["volumes"]
        [config] = [v for v in volumes if v["name"] == "config"]
        assert config["configMap"]["name"] == configmap["metadata"]["name"]  # the hashed name
    vllm = container(by_kind[("Deployment", "protege-vllm")], "vllm")
    images = {c["image"] for o in built if o["kind"] in ("Deployment", "CronJob")
              for c in pod_spec(o).get("initContainers", []) + pod_spec(o)["containers"]}
    if overlay == "gpu":
        assert vllm["image"].startswith("vllm/vllm-openai:")
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert flag(vllm["args"], "--dtype") == "auto"
    else:
        assert vllm["image"] == "protege:0.1.0"
        assert vllm["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
        assert flag(vllm["args"], "--dtype") == "float32"
        assert "nvidia.com/gpu" not in str(vllm["resources"])
        assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "2"} in vllm["env"]
    assert "protege" not in images  # every protege image got its tag from the images transformer
