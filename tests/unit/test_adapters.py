"""Adapter registry, admin routes and CLI against a fake vLLM (httpx.MockTransport): no real
vLLM, no torch. Adapters and the base are tiny hand-written safetensors files (headers and zeros)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import struct
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway import adapter_files as files
from gateway.adapters import BASE_VERSION, AdapterRegistry
from gateway.adapters_cli import (
    AdminCallFailed,
    AdminClient,
    format_change,
    format_list,
    run,
)
from gateway.admin_routes import build_admin_router
from gateway.errors import (
    AdapterError,
    BackendError,
    BackendRejected,
    BackendUnavailable,
    Conflict,
    ModelNotFound,
    NotFound,
    ProtegeError,
    Unauthorized,
)

T = TypeVar("T")
HIDDEN, KV, FFN, LAYERS = 8, 4, 16, 2
MODULES = {  # name -> (out_features, in_features), like a tiny Llama
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (FFN, HIDDEN),
    "mlp.up_proj": (FFN, HIDDEN),
    "mlp.down_proj": (HIDDEN, FFN),
}


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- fake files -----------------------------------------------------------------------------


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def make_base(folder: Path, hidden: int = HIDDEN) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32, hidden)}
    for layer in range(LAYERS):
        for module, (out_f, in_f) in MODULES.items():
            out_f = hidden if out_f == HIDDEN else out_f
            in_f = hidden if in_f == HIDDEN else in_f
            shapes[f"model.layers.{layer}.{module}.weight"] = (out_f, in_f)
    write_safetensors(folder / "model.safetensors", shapes)
    return folder


def make_adapter(folder: Path, base_name: str, rank: int = 4, hidden: int = HIDDEN,
                 extra_config: dict[str, Any] | None = None) -> Path:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        for module, (out_f, in_f) in MODULES.items():
            out_f = hidden if out_f == HIDDEN else out_f
            in_f = hidden if in_f == HIDDEN else in_f
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, in_f)
            shapes[f"{prefix}.lora_B.weight"] = (out_f, rank)
    write_safetensors(folder / files.WEIGHTS_FILE, shapes)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "base_model_name_or_path": base_name,
              "target_modules": [m.split(".")[1] for m in MODULES], **(extra_config or {})}
    (folder / files.CONFIG_FILE).write_text(json.dumps(config))
    return folder


# -- fake vLLM ------------------------------------------------------------------------------


class FakeVllm:
    """The LoRA endpoints of vLLM's OpenAI server, with its answers."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.broken: set[str] = set()  # loads fine, fails to generate

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content or b"{}")
        path = request.url.path
        name = body.get("lora_name") or body.get("model")
        self.calls.append((path, name))
        if path == "/v1/load_lora_adapter":
            if name in self.loaded:
                return _error(400, f"The lora adapter '{name}' has already been loaded.")
            if not Path(body["lora_path"], files.CONFIG_FILE).is_file():
                return _error(404, f"Loading lora {name} failed: No adapter found")
            self.loaded[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            if self.loaded.pop(name, None) is None:
                return _error(404, f"The lora adapter '{name}' cannot be found.")
            return httpx.Response(200, text="Success")
        if path == "/v1/completions":
            if name not in self.loaded:
                return _error(404, f"The model `{name}` does not exist.")
            if name in self.broken:
                return _error(500, "shape mismatch")
            return httpx.Response(200, json={"choices": [{"text": "x"}]})
        return _error(404, "no route")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url="http://vllm.test/v1", transport=httpx.MockTransport(self.handler))

    def count(self, path: str, name: str) -> int:
        return self.calls.count((f"/v1/{path}", name))


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "code": status}})


async def fake_identity(base: Path, out: Path, rank: int) -> None:
    make_adapter(out, str(base), rank=rank)
    (out / files.META_FILE).write_text(json.dumps({"kind": "identity", "rank": rank}))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.adapter_promoted = Gauge("promoted", "x", ["alias", "version"], registry=self.registry)
        self.adapter_promotions = Counter("promotions", "x", ["alias", "kind"], registry=self.registry)

    def value(self, name: str, labels: dict[str, str]) -> float | None:
        return self.registry.get_sample_value(name, labels)


# -- fixtures -------------------------------------------------------------------------------


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.adapters_dir = root / "adapters"
        self.base_dir = make_base(root / "models" / "SmolLM2-135M-Instruct")
        self.db_path = root / "protege.db"
        self.vllm = FakeVllm()
        self.metrics = Metrics()

    def registry(self, **options: Any) -> AdapterRegistry:
        return AdapterRegistry(self.db_path, self.adapters_dir, self.base_dir, self.vllm.client(),
                               max_lora_rank=8, base_adapter_rank=2, drain_timeout_s=5.0,
                               metrics=self.metrics, make_identity=fake_identity, **options)

    def adapter(self, name: str, **options: Any) -> Path:
        return make_adapter(self.adapters_dir / "incoming" / name, str(self.base_dir), **options)

    async def ready(self, **options: Any) -> AdapterRegistry:
        registry = self.registry(**options)
        await registry.reload_all()
        return registry


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def _registered(env: Env, task: str = "support", count: int = 2) -> AdapterRegistry:
    registry = await env.ready()
    for i in range(count):
        await registry.register(task, env.adapter(f"{task}-{i}"))
    return registry


# -- base@v0 --------------------------------------------------------------------------------


def test_reload_all_builds_registers_promotes_and_loads_base(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        versions, _ = registry.list()
        assert [s.version.name for s in versions] == [BASE_VERSION]
        assert versions[0].loaded and versions[0].aliases == ["base"]
        assert env.vllm.loaded[BASE_VERSION] == str(env.adapters_dir.resolve() / "versions" / "base" / "v0")
        async with registry.lease("base", "anyone") as lease:
            assert (lease.alias, lease.version, lease.model_name) == ("base", BASE_VERSION, BASE_VERSION)
        assert await registry.aliases() == ["base"]
        await registry.close()

    arun(scenario())
    assert env.metrics.value("promoted", {"alias": "base", "version": BASE_VERSION}) == 1


def test_reload_after_restart_reloads_and_rebuilds_a_vanished_base(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        await registry.close()
        env.vllm.loaded.clear()  # vLLM restarted
        files_dir = env.adapters_dir / "versions" / "base" / "v0"
        for path in files_dir.iterdir():
            path.unlink()
        files_dir.rmdir()
        registry = await env.ready()
        assert BASE_VERSION in env.vllm.loaded and (files_dir / files.WEIGHTS_FILE).is_file()
        assert registry.list()[0][0].aliases == ["base"]
        await registry.close()

    arun(scenario())


def test_base_model_replaced_refuses_to_start(env: Env) -> None:
    async def scenario() -> None:
        await (await env.ready()).close()
        (env.base_dir / "config.json").write_text(json.dumps({"model_type": "llama", "other": 1}))
        os.utime(env.base_dir / "config.json", ns=(1, 1))
        registry = env.registry()
        with pytest.raises(AdapterError) as info:
            await registry.reload_all()
        assert info.value.code == "base_model_mismatch"
        await registry.close()

    arun(scenario())


# -- register ------------------------------------------------------------------------------


def test_register_copies_read_only_and_numbers_versions(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        first = await registry.register("support", env.adapter("a"))
        second = await registry.register("support", "incoming/b" if env.adapter("b") else "")
        other = await registry.register("billing", env.adapter("c"))
        assert [first.name, second.name, other.name] == ["support@v1", "support@v2", "billing@v1"]
        assert first.path == env.adapters_dir.resolve() / "versions" / "support" / "v1"
        assert oct((first.path / files.WEIGHTS_FILE).stat().st_mode & 0o777) == "0o444"
        meta = json.loads((first.path / files.META_FILE).read_text())
        assert meta["version"] == "support@v1" and meta["base_fingerprint"] == first.base_fingerprint
        assert {"support@v1", "support@v2", "billing@v1"} <= set(env.vllm.loaded)
        assert not list((env.adapters_dir / "versions" / "support").glob(".incoming-*"))
        await registry.close()

    arun(scenario())


def test_registry_state_survives_a_restart(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.promote("support", "support@v1")
        await registry.promote("support", "support@v2", tenant="acme")
        await registry.close()
        again = env.registry()
        assert again.resolve("support", "acme") == ("support", "support@v2")
        assert again.resolve("support", "other") == ("support", "support@v1")
        assert [s.version.name for s in again.list()[0]] == [BASE_VERSION, "support@v1", "support@v2"]
        await again.close()

    arun(scenario())


@pytest.mark.parametrize("bad", ["outside", "dotdot", "symlink_dir", "symlink_file", "root"])
def test_paths_are_confined_to_the_adapters_dir(env: Env, bad: str) -> None:
    outside = make_adapter(env.root / "elsewhere", str(env.base_dir))
    if bad == "outside":
        path: str | Path = outside
    elif bad == "dotdot":
        path = "../elsewhere"
    elif bad == "symlink_dir":
        env.adapters_dir.mkdir(parents=True, exist_ok=True)
        (env.adapters_dir / "link").symlink_to(outside, target_is_directory=True)
        path = "link"
    elif bad == "symlink_file":
        inside = env.adapter("half")
        (inside / files.WEIGHTS_FILE).unlink()
        (inside / files.WEIGHTS_FILE).symlink_to(outside / files.WEIGHTS_FILE)
        path = inside
    else:
        path = env.adapters_dir

    async def scenario() -> None:
        registry = await env.ready()
        with pytest.raises(AdapterError) as info:
            await registry.register("support", path)
        assert info.value.code == "path_not_allowed"
        assert [s.version.name for s in registry.list()[0]] == [BASE_VERSION]
        await registry.close()

    arun(scenario())


def test_missing_adapter_folder_is_not_found(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        with pytest.raises(NotFound):
            await registry.register("support", "incoming/nothing-here")
        await registry.close()

    arun(scenario())


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("other_base_name", "base_model_mismatch"),
        ("other_shapes", "base_model_mismatch"),
        ("other_fingerprint", "base_model_mismatch"),
        ("rank_too_high", "adapter_rank"),
        ("pickle", "adapter_format"),
        ("dora", "adapter_format"),
        ("no_base_name", "base_model_mismatch"),
    ],
)
def test_adapters_that_do_not_fit_the_base_are_refused(env: Env, case: str, code: str) -> None:
    folder = env.adapters_dir / "incoming" / case
    if case == "other_base_name":
        make_adapter(folder, "HuggingFaceTB/SmolLM2-360M-Instruct")
    elif case == "other_shapes":
        make_adapter(folder, str(env.base_dir), hidden=12)
    elif case == "other_fingerprint":
        make_adapter(folder, str(env.base_dir))
        (folder / files.META_FILE).write_text(json.dumps({"base_fingerprint": "0" * 64}))
    elif case == "rank_too_high":
        make_adapter(folder, str(env.base_dir), rank=16)
    elif case == "pickle":
        make_adapter(folder, str(env.base_dir))
        (folder / files.WEIGHTS_FILE).rename(folder / "adapter_model.bin")
    elif case == "dora":
        make_adapter(folder, str(env.base_dir), extra_config={"use_dora": True})
    else:
        make_adapter(folder, str(env.base_dir), extra_config={"base_model_name_or_path": None})

    async def scenario() -> None:
        registry = await env.ready()
        with pytest.raises(AdapterError) as info:
            await registry.register("support", folder)
        assert info.value.code in (code, "adapter_incomplete") if case == "pickle" else info.value.code == code
        assert not list((env.adapters_dir / "versions").glob("support/*"))
        await registry.close()

    arun(scenario())


def test_a_hub_name_or_matching_fingerprint_is_accepted(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        by_name = make_adapter(env.adapters_dir / "in" / "a", "HuggingFaceTB/SmolLM2-135M-Instruct")
        assert (await registry.register("support", by_name)).name == "support@v1"
        by_print = make_adapter(env.adapters_dir / "in" / "b", "/some/other/machine/model")
        fingerprint = registry.list()[0][0].version.base_fingerprint
        (by_print / files.META_FILE).write_text(json.dumps({"base_fingerprint": fingerprint}))
        assert (await registry.register("support", by_print)).name == "support@v2"
        await registry.close()

    arun(scenario())


def test_invalid_and_reserved_task_names(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        for task in ("base", "Bad Name", "x@v1", "../x", ""):
            with pytest.raises(AdapterError):
                await registry.register(task, env.adapter("a"))
        await registry.close()

    arun(scenario())


# -- promote, drain, rollback ---------------------------------------------------------------


def test_promote_flips_at_once_and_unloads_the_old_version_after_its_requests(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.promote("support", "support@v1")
        async with registry.lease("support", "c") as old_lease:
            assert old_lease.version == "support@v1"
            change = await registry.promote("support", "support@v2")
            assert (change.version, change.previous) == ("support@v2", "support@v1")
            async with registry.lease("support", "c") as new_lease:
                assert new_lease.version == "support@v2"
            await asyncio.sleep(0.05)
            assert "support@v1" in env.vllm.loaded  # still serving the old request
            assert registry.in_flight("support@v1") == 1
        await registry.wait_drained()
        assert "support@v1" not in env.vllm.loaded and "support@v2" in env.vllm.loaded
        assert env.vllm.count("completions", "support@v2") == 1  # the probe
        await registry.close()

    arun(scenario())
    assert env.metrics.value("promoted", {"alias": "support", "version": "support@v2"}) == 1
    assert env.metrics.value("promoted", {"alias": "support", "version": "support@v1"}) == 0
    assert env.metrics.value("promotions_total", {"alias": "support", "kind": "promote"}) == 2


def test_drain_gives_up_after_the_timeout(env: Env) -> None:
    async def scenario() -> None:
        registry = env.registry()
        registry._drain_timeout_s = 0.1
        await registry.reload_all()
        for i in range(2):
            await registry.register("support", env.adapter(f"s{i}"))
        await registry.promote("support", "support@v1")
        async with registry.lease("support", "c"):
            await registry.promote("support", "support@v2")
            await registry.wait_drained()
            assert "support@v1" not in env.vllm.loaded
        await registry.close()

    arun(scenario())


def test_promote_same_version_is_a_no_op_and_wrong_task_conflicts(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.register("billing", env.adapter("billing"))
        await registry.promote("support", "support@v1")
        change = await registry.promote("support", "support@v1")
        assert not change.changed
        with pytest.raises(Conflict):
            await registry.promote("support", "billing@v1")
        with pytest.raises(NotFound):
            await registry.promote("support", "support@v9")
        await registry.close()

    arun(scenario())


def test_a_version_that_cannot_generate_is_never_promoted(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.promote("support", "support@v1")
        env.vllm.broken.add("support@v2")
        with pytest.raises(AdapterError) as info:
            await registry.promote("support", "support@v2")
        assert info.value.code == "adapter_probe_failed"
        assert registry.resolve("support") == ("support", "support@v1")
        await registry.close()

    arun(scenario())


def test_rollback_walks_back_the_promotion_history(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env, count=3)
        for version in ("support@v1", "support@v2", "support@v3"):
            await registry.promote("support", version)
        await registry.wait_drained()
        assert (await registry.rollback("support")).version == "support@v2"
        assert registry.resolve("support") == ("support", "support@v2")
        assert (await registry.rollback("support")).version == "support@v1"
        with pytest.raises(Conflict):
            await registry.rollback("support")
        await registry.wait_drained()
        assert "support@v1" in env.vllm.loaded
        assert "support@v2" not in env.vllm.loaded and "support@v3" not in env.vllm.loaded
        with pytest.raises(NotFound):
            await registry.rollback("never-promoted")
        await registry.close()

    arun(scenario())
    assert env.metrics.value("promotions_total", {"alias": "support", "kind": "rollback"}) == 2


def test_tenant_alias_overrides_the_task_alias_and_rolls_back_to_it(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.promote("support", "support@v1")
        await registry.promote("support", "support@v2", tenant="acme")
        async with registry.lease("support", "acme") as lease:
            assert lease.version == "support@v2"
        async with registry.lease("support", "globex") as lease:
            assert lease.version == "support@v1"
        change = await registry.rollback("support", tenant="acme")
        assert (change.version, change.previous) == (None, "support@v2")
        assert registry.resolve("support", "acme") == ("support", "support@v1")
        with pytest.raises(AdapterError):
            await registry.promote("support", "support@v1", tenant="bad tenant!")
        await registry.close()

    arun(scenario())


# -- the request path ------------------------------------------------------------------------


def test_unknown_alias_and_version_are_model_not_found(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        for name in ("nope", "nope@v1"):
            with pytest.raises(ModelNotFound):
                async with registry.lease(name, "c"):
                    pass
        await registry.close()

    arun(scenario())


def test_pinned_version_is_loaded_on_demand(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.promote("support", "support@v1")
        await registry.promote("support", "support@v2")
        await registry.wait_drained()
        assert "support@v1" not in env.vllm.loaded
        async with registry.lease("support@v1", "c") as lease:
            assert (lease.alias, lease.model_name) == ("support", "support@v1")
            assert "support@v1" in env.vllm.loaded
        await registry.close()

    arun(scenario())


def test_upstream_404_makes_the_next_lease_load_again(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        env.vllm.loaded.clear()  # an external vLLM restarted behind our back
        with pytest.raises(BackendRejected):
            async with registry.lease("base", "c"):
                raise BackendRejected("The model `base@v0` does not exist.", backend="student", upstream_status=404)
        async with registry.lease("base", "c"):
            assert BASE_VERSION in env.vllm.loaded
        assert registry.in_flight(BASE_VERSION) == 0
        await registry.close()

    arun(scenario())


def test_student_down_during_on_demand_load_is_a_backend_error(env: Env) -> None:
    async def scenario() -> None:
        registry = await env.ready()
        record = await registry.register("support", env.adapter("a"), load=False)
        env.vllm.down = True
        with pytest.raises(BackendUnavailable):
            async with registry.lease("support@v1", "c"):
                pass
        env.vllm.down = False
        (record.path / files.CONFIG_FILE).unlink()  # now vLLM answers 404
        with pytest.raises(BackendError) as info:
            async with registry.lease("support@v1", "c"):
                pass
        assert info.value.code == "adapter_load_failed"
        assert registry.in_flight("support@v1") == 0
        await registry.close()

    arun(scenario())


# -- admin routes and CLI ------------------------------------------------------------------


ADMIN_KEY = "admin-secret"


def admin_app(env: Env) -> FastAPI:
    """The admin router in an app whose lifespan owns the registry (one event loop for both)."""

    def require_admin(authorization: str | None = Header(None)) -> None:
        if authorization != f"Bearer {ADMIN_KEY}":
            raise Unauthorized("admin key required")

    def get_registry(request: Request) -> AdapterRegistry:
        return request.app.state.registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry = await env.ready()
        yield
        await app.state.registry.wait_drained()
        await app.state.registry.close()

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(ProtegeError)
    async def on_error(request: Request, error: ProtegeError) -> JSONResponse:
        return JSONResponse(error.to_body(), status_code=error.status_code)

    app.include_router(build_admin_router(get_registry, require_admin))
    return app


def through(http: TestClient) -> httpx.MockTransport:
    """A transport for the CLI's (sync) client that hands each request to the test app."""

    def forward(request: httpx.Request) -> httpx.Response:
        answer = http.request(request.method, request.url.path, content=request.content,
                              headers=dict(request.headers))
        return httpx.Response(answer.status_code, content=answer.content,
                              headers={"content-type": answer.headers.get("content-type", "")})

    return httpx.MockTransport(forward)


def test_calibrated_threshold_travels_with_its_version_through_rollback_and_restart(env: Env) -> None:
    async def scenario() -> None:
        registry = await _registered(env)
        await registry.calibrate("support@v1", -0.8)
        await registry.promote("support", "support@v1")
        await registry.calibrate("support@v2", -0.3)
        await registry.promote("support", "support@v2")
        async with registry.lease("support", "c") as lease:
            assert (lease.version, lease.min_confidence) == ("support@v2", -0.3)
        assert registry.calibrated("support", "c") is True
        assert registry.calibrated("base", "c") is False
        assert registry.calibrated("nobody-promoted-this", "c") is None
        await registry.rollback("support")
        async with registry.lease("support", "c") as lease:
            assert (lease.version, lease.min_confidence) == ("support@v1", -0.8)
        async with registry.lease("base", "c") as lease:
            assert lease.min_confidence is None  # never calibrated: router.min_confidence applies
        with pytest.raises(AdapterError):
            await registry.calibrate("support@v1", float("nan"))
        with pytest.raises(NotFound):
            await registry.calibrate("support@v9", -1.0)
        await registry.calibrate("support@v2", None)
        await registry.close()
        reopened = env.registry()
        await reopened.reload_all()
        stored = {status.version.name: status.version.min_confidence for status in reopened.list()[0]}
        assert (stored["support@v1"], stored["support@v2"]) == (-0.8, None)
        await reopened.close()

    arun(scenario())


def test_admin_routes_and_cli_round_trip(env: Env) -> None:
    env.adapter("v1")
    env.adapter("v2")
    with TestClient(admin_app(env)) as http:
        assert http.get("/admin/adapters").status_code == 401
        client = AdminClient("http://testserver", ADMIN_KEY, transport=through(http))
        assert client.load("support", "incoming/v1")["name"] == "support@v1"
        assert client.load("support", str(env.adapters_dir / "incoming" / "v2"))["name"] == "support@v2"
        change = client.promote("support", "support@v1")
        assert (change["version"], change["previous"]) == ("support@v1", None)
        assert format_change(client.promote("support", "support@v2")) == "support: support@v1 -> support@v2"
        assert client.rollback("support")["version"] == "support@v1"
        assert client.calibrate("support@v1", -0.5)["min_confidence"] == -0.5
        out = io.StringIO()
        run(argparse.Namespace(adapters_command="calibrate", version="support@v1", min_confidence=None,
                               clear=True, json=False), client, out)
        assert out.getvalue() == "support@v1: cascade threshold None\n"
        listing = client.list()
        assert next(v for v in listing["data"] if v["name"] == "support@v1")["min_confidence"] is None
        assert listing["aliases"] == [{"task": "base", "tenant": None, "version": BASE_VERSION},
                                      {"task": "support", "tenant": None, "version": "support@v1"}]
        table = format_list(listing).splitlines()
        assert table[0].split() == ["VERSION", "RANK", "LOADED", "IN", "FLIGHT", "ALIASES"]
        assert table[2].split() == ["support@v1", "4", "yes", "0", "support"]
        with pytest.raises(AdminCallFailed, match="inside the adapters folder"):
            client.load("support", str(env.root))
        with pytest.raises(AdminCallFailed, match="422"):
            client.promote("support", "")
        out = io.StringIO()
        run(argparse.Namespace(adapters_command="list", json=False), client, out)
        assert "support@v2" in out.getvalue()
        with pytest.raises(AdminCallFailed, match="409"):
            run(argparse.Namespace(adapters_command="rollback", task="support", tenant=None, json=False),
                client, out)


def test_admin_client_reports_an_unreachable_gateway() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = AdminClient("http://127.0.0.1:9", "k", transport=httpx.MockTransport(refuse))
    with pytest.raises(AdminCallFailed, match="cannot reach"):
        client.list()


# -- files -----------------------------------------------------------------------------------


def test_truncated_or_non_safetensors_files_are_refused(tmp_path: Path) -> None:
    def bad(data: bytes) -> Path:
        path = tmp_path / "x.safetensors"
        path.write_bytes(data)
        return path

    for data in (b"", b"abc", struct.pack("<Q", 1 << 40), struct.pack("<Q", 2) + b"[]"):
        with pytest.raises(AdapterError):
            files.read_safetensors_header(bad(data))
    write_safetensors(tmp_path / "ok.safetensors", {"a": (2, 2)})
    data = (tmp_path / "ok.safetensors").read_bytes()
    with pytest.raises(AdapterError, match="truncated"):
        files.read_safetensors_header(bad(data[:-1]))


def test_base_fingerprint_is_cached_and_tracks_changes(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    cache = tmp_path / "cache.json"
    first = files.describe_base(base, cache)
    assert files.describe_base(base, cache).fingerprint == first.fingerprint
    assert json.loads(cache.read_text())["fingerprint"] == first.fingerprint
    (base / "config.json").write_text("{}")
    os.utime(base / "config.json", ns=(5, 5))
    assert files.describe_base(base, cache).fingerprint != first.fingerprint
