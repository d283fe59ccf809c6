"""The FastAPI application: lifespan (all clients are made here, none at import time), routes
(parse, call one function, render) and the one place errors become HTTP responses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from feedback.api import build_feedback_router
from gateway.adapters import AdapterRegistry
from gateway.admin_routes import build_admin_router
from feedback.store import LogWriter
from gateway.auth import Authenticator
from gateway.backends import ChatBackend, Pricing
from gateway.errors import InvalidRequest, NotFound, Overloaded, ProtegeError
from gateway.http import read_json
from gateway.metrics import Metrics
from gateway.schemas import ChatRequest, parse_chat_request
from gateway.service import AdapterResolver, CallContext, ChatService
from gateway.settings import Settings

log = logging.getLogger("protege.gateway")

ROUTE_HEADER = "x-protege-route"
REQUEST_ID_HEADER = "x-protege-request-id"
# uvicorn's httptools parser buffers request headers without any limit; past this total the
# request is refused with 431 before any route runs (a reverse proxy should cap it earlier).
MAX_HEADER_BYTES = 32 * 1024


@dataclass
class Overrides:
    """Components to use instead of the real ones (tests, embedding). None: build from settings."""

    student: ChatBackend | None = None
    teacher: ChatBackend | None = None
    adapters: AdapterResolver | None = None
    pricing: Pricing | None = None


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    writer: LogWriter
    auth: Authenticator
    chat: ChatService
    student: Any
    teacher: Any
    adapters: Any
    in_flight: int = 0
    closers: list[Any] = field(default_factory=list)

    @property
    def db_path(self):  # noqa: ANN201 - used by the feedback routes
        return self.settings.db_path


def create_app(settings: Settings, overrides: Overrides | None = None) -> FastAPI:
    from gateway.lifecycle import build_services, close_services

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await build_services(settings, overrides or Overrides())
        app.state.services = services
        try:
            yield
        finally:
            await close_services(services)

    app = FastAPI(title="protege", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    _install_routes(app, settings)
    app.include_router(build_admin_router(_registry_of, _require_admin))
    app.include_router(build_feedback_router(
        services_of, get_caller=lambda request: services_of(request).auth.caller(request.headers.get("authorization")),
    ))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        # Like every route but the probes and /metrics: a caller key when keys are configured.
        services_of(request).auth.caller(request.headers.get("authorization"))
        return JSONResponse(app.openapi())

    app.add_middleware(HeaderLimit, max_bytes=MAX_HEADER_BYTES)
    return app


class HeaderLimit:
    """Pure ASGI: refuse (431, OpenAI-shaped) requests whose headers total over ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_bytes:
            error = InvalidRequest(f"request headers over {self.max_bytes} bytes", code="headers_too_large")
            error.status_code = 431
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, as OpenAPI wants a self-contained one."""
    schema = dict(schema)
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(schema)


CHAT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline_refs(ChatRequest.model_json_schema())}}}}


# -- errors: the one place they become HTTP ----------------------------------------------------


def error_response(error: ProtegeError, request_id: str | None = None) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    def count(request: Request, error: ProtegeError) -> None:
        services = getattr(request.app.state, "services", None)
        if services is not None:
            services.metrics.rejected.labels(str(error.status_code), error.code or "").inc()

    @app.exception_handler(ProtegeError)
    async def on_protege_error(request: Request, error: ProtegeError) -> JSONResponse:
        count(request, error)
        return error_response(error, error.request_id)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        error = InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                               code="invalid_value")
        count(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: ProtegeError
        if exc.status_code == 404:
            error = NotFound(f"no route {request.url.path}", code="unknown_url")
        else:
            error = ProtegeError(str(exc.detail), code=f"http_{exc.status_code}")
            error.status_code = exc.status_code
            error.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        count(request, error)
        return error_response(error)


# -- routes --------------------------------------------------------------------------------


def services_of(request: Request) -> Services:
    return request.app.state.services


def _registry_of(request: Request) -> AdapterRegistry:
    adapters = services_of(request).adapters
    if not isinstance(adapters, AdapterRegistry):
        raise NotFound("adapter management is off (student.adapter_registry=false)", code="no_adapter_registry")
    return adapters


def _require_admin(request: Request) -> None:
    services_of(request).auth.admin(request.headers.get("authorization"))


def _route_headers(record: Any) -> dict[str, str]:
    return {REQUEST_ID_HEADER: record.id, ROUTE_HEADER: f"{record.route}; reason={record.reason}"}


def _install_routes(app: FastAPI, settings: Settings) -> None:
    server = settings.server

    @app.post("/v1/chat/completions", openapi_extra=CHAT_REQUEST_BODY)
    async def chat_completions(request: Request) -> Response:
        services = services_of(request)
        caller = services.auth.caller(request.headers.get("authorization"))
        body = await read_json(request, server.max_body_bytes)
        chat_request = parse_chat_request(body, server.max_n, server.max_tokens_limit)
        if services.in_flight >= server.max_concurrency:
            raise Overloaded(f"more than {server.max_concurrency} requests in flight; retry shortly")
        ctx = CallContext(caller=caller, route_header=request.headers.get(ROUTE_HEADER))
        services.in_flight += 1
        handed_to_stream = False
        try:
            if chat_request.stream:
                reply = await services.chat.open_stream(chat_request, ctx)
                handed_to_stream = True  # the stream's own finally releases the slot
                return RelayResponse(reply, services, headers=_route_headers(reply.record))
            payload, record = await services.chat.complete(chat_request, ctx)
        finally:
            if not handed_to_stream:
                services.in_flight -= 1
        return Response(orjson.dumps(payload), media_type="application/json", headers=_route_headers(record))

    # The hot path is served by a plain Starlette route placed first: FastAPI's per-request
    # dependency solving (a throw-away sub-response, header copies) was ~10% of the gateway's own
    # CPU per request, for an endpoint with no dependencies. Same function, same error handlers;
    # the APIRoute above stays only to document the endpoint in /openapi.json.
    app.router.routes.insert(0, Route("/v1/chat/completions", chat_completions, methods=["POST"]))

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        services = services_of(request)
        services.auth.caller(request.headers.get("authorization"))
        return Response(orjson.dumps({"object": "list", "data": await model_cards(services)}),
                        media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        checks = await readiness(services_of(request))
        ready = all(checks.values())
        return Response(orjson.dumps({"ready": ready, "checks": checks}), media_type="application/json",
                        status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        services = services_of(request)
        stats = services.writer.stats
        services.metrics.observe_writer(stats.written, stats.failures, stats.dropped, services.writer.depth)
        services.metrics.in_flight.set(services.in_flight)
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class RelayResponse(StreamingResponse):
    """SSE response that always releases its request slot and records the request, even when
    the client leaves before the body was ever iterated."""

    def __init__(self, reply: Any, services: Services, headers: dict[str, str]) -> None:
        super().__init__(reply.chunks, media_type="text/event-stream", headers=headers)
        self._reply = reply
        self._services = services

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._services.in_flight -= 1
            await self._reply.aclose()


async def model_cards(services: Services) -> list[dict[str, Any]]:
    names = ["auto", "student"]
    if services.teacher is not None:
        names.append("teacher")
    list_aliases = getattr(services.adapters, "aliases", None)
    if list_aliases is not None:
        names.extend(f"student:{alias}" for alias in await list_aliases())
    return [{"id": name, "object": "model", "created": 0, "owned_by": "protege"} for name in names]


async def readiness(services: Services) -> dict[str, bool]:
    checks: dict[str, bool] = {"log_writer": services.writer.running}
    student_ready = getattr(services.student, "ready", None)
    if student_ready is not None:
        ok = await student_ready()
        services.metrics.student_up.set(1 if ok else 0)
        checks["student"] = ok
    return checks
