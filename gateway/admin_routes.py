"""Admin HTTP routes for adapters. Thin: parse, call one registry method, render.

    GET  /admin/adapters                              -> versions and aliases
    POST /admin/adapters/load     {task, path}        -> registers the next version, loads it
    POST /admin/adapters/promote  {task, version, tenant?}
    POST /admin/adapters/rollback {task, tenant?}
    POST /admin/adapters/calibrate {version, min_confidence}  -> the version's cascade threshold

Errors are the registry's ProtegeErrors; the app's one handler renders them.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real
# types, and the registry dependency is an alias local to the factory.

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters import AdapterRegistry, AdapterStatus, AdapterVersion, AliasChange


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadBody(_Body):
    task: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096, description="Inside the adapters folder.")


class PromoteBody(_Body):
    task: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=80)
    tenant: str | None = Field(None, max_length=64, description="API key id; unset: every caller.")


class RollbackBody(_Body):
    task: str = Field(min_length=1, max_length=64)
    tenant: str | None = Field(None, max_length=64)


class CalibrateBody(_Body):
    version: str = Field(min_length=1, max_length=80)
    min_confidence: float | None = Field(
        description="Escalate this version's answers whose confidence is below it; null: "
        "router.min_confidence applies.")


def render_version(record: AdapterVersion) -> dict[str, Any]:
    return {
        "name": record.name,
        "task": record.task,
        "version": record.version,
        "rank": record.rank,
        "path": str(record.path),
        "created_at": record.created_at,
        "source": record.source,
        "weights_sha256": record.weights_sha256,
        "min_confidence": record.min_confidence,
    }


def render_status(status: AdapterStatus) -> dict[str, Any]:
    return {**render_version(status.version), "loaded": status.loaded, "in_flight": status.in_flight,
            "aliases": status.aliases}


def render_change(change: AliasChange) -> dict[str, Any]:
    return {"task": change.task, "tenant": change.tenant, "version": change.version,
            "previous": change.previous, "changed": change.changed}


def build_admin_router(
    get_registry: Callable[..., AdapterRegistry], require_admin: Callable[..., Any]
) -> APIRouter:
    """``get_registry`` and ``require_admin`` are FastAPI dependencies (they may take the
    ``Request``); ``require_admin`` raises Unauthorized/Forbidden."""
    router = APIRouter(prefix="/admin/adapters", dependencies=[Depends(require_admin)])
    Registry = Annotated[AdapterRegistry, Depends(get_registry)]

    @router.get("")
    async def list_adapters(registry: Registry) -> dict[str, Any]:
        versions, aliases = registry.list()
        return {
            "object": "list",
            "data": [render_status(status) for status in versions],
            "aliases": [{"task": a.task, "tenant": a.tenant, "version": a.version} for a in aliases],
        }

    @router.post("/load")
    async def load_adapter(body: LoadBody, registry: Registry) -> dict[str, Any]:
        return render_version(await registry.register(body.task, body.path))

    @router.post("/promote")
    async def promote_adapter(body: PromoteBody, registry: Registry) -> dict[str, Any]:
        return render_change(await registry.promote(body.task, body.version, body.tenant))

    @router.post("/rollback")
    async def rollback_adapter(body: RollbackBody, registry: Registry) -> dict[str, Any]:
        return render_change(await registry.rollback(body.task, body.tenant))

    @router.post("/calibrate")
    async def calibrate_adapter(body: CalibrateBody, registry: Registry) -> dict[str, Any]:
        return render_version(await registry.calibrate(body.version, body.min_confidence))

    return router
