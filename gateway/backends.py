"""Model backends: the student (OpenAI-compatible HTTP, i.e. vLLM) and the teacher (litellm).

Both implement ``ChatBackend``: ``complete(payload) -> dict`` and ``stream(payload)`` yielding
chunk dicts, OpenAI-shaped. Each translates its library's exceptions into ``gateway.errors`` at
this boundary, so nothing above it knows about httpx or litellm.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.settings import StudentSettings, TeacherSettings

log = logging.getLogger("protege.backends")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503})

# What the teacher gets as litellm arguments. Anything else a request carries goes in
# ``extra_body`` (the teacher's HTTP body), never as a litellm keyword: litellm reads many of
# its keywords as instructions (``mock_response`` answers without calling the teacher,
# ``api_base``/``base_url``/``headers``/``api_version`` steer where and how it connects).
TEACHER_PARAMS = frozenset({
    "messages", "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens",
    "presence_penalty", "frequency_penalty", "logit_bias", "user", "response_format", "seed",
    "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "stream_options",
    "reasoning_effort", "modalities", "audio", "prediction", "service_tier", "functions", "function_call",
})


class ChatBackend(Protocol):
    name: str

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


def error_for_status(backend: str, status: int, message: str) -> BackendError:
    """One mapping from an upstream HTTP status to our error kinds."""
    if status == 429:
        return BackendRateLimited(message, backend=backend, upstream_status=status)
    if status in (401, 403):
        # The upstream refused the gateway's own credentials: not the caller's fault (no 400).
        return BackendError(message, backend=backend, upstream_status=status, code="upstream_auth_failed")
    if status in (408, 504):
        return BackendTimeout(message, backend=backend, upstream_status=status)
    if status == 503:
        return BackendUnavailable(message, backend=backend, upstream_status=status)
    if 400 <= status < 500:
        return BackendRejected(message, backend=backend, upstream_status=status)
    return BackendError(message, backend=backend, upstream_status=status)


def redact(text: str, secret: Any) -> str:
    """``text`` without the value of ``secret`` (a SecretStr or None): upstream error messages
    may echo the key they were sent, and they end up in answers, logs and the SQLite log."""
    value = secret.get_secret_value() if secret is not None else ""
    return text.replace(value, "[redacted]") if len(value) >= 4 else text


def _upstream_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace")


# -- student ---------------------------------------------------------------------------------


class StudentBackend:
    """vLLM (or any OpenAI-compatible server) over one pooled aiohttp session.

    Not httpx: measured here, httpx's connection pool re-checks every idle connection on each
    request and took 70% of the gateway's CPU at 250 RPS; aiohttp's pool does not.
    """

    name = "student"

    def __init__(self, settings: StudentSettings, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = settings.timeout_s
        self._headers = {"content-type": "application/json"}
        self._api_key = settings.api_key
        if settings.api_key is not None:
            self._headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._session: aiohttp.ClientSession | None = None
        self._complete_timeout = aiohttp.ClientTimeout(total=settings.timeout_s, connect=min(5.0, settings.timeout_s))
        # A stream may last long; what must not last is silence between two chunks.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=min(5.0, settings.timeout_s),
                                                     sock_read=settings.timeout_s)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made lazily, inside the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=512, keepalive_timeout=30),
                headers=self._headers,
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"student unreachable: {exc.__class__.__name__}", backend="student")

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(f"{self.base_url}/chat/completions", data=orjson.dumps(payload),
                                         timeout=self._complete_timeout) as response:
                body = await response.read()
                status = response.status
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"student timed out after {self.timeout_s}s", backend="student") from exc
        except aiohttp.ClientError as exc:
            raise self._unavailable(exc) from exc
        if status != 200:
            raise error_for_status("student", status, redact(_upstream_message(body), self._api_key))
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BackendError("student returned invalid JSON", backend="student") from exc

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self.session.post(f"{self.base_url}/chat/completions", data=orjson.dumps(payload),
                                         timeout=self._stream_timeout) as response:
                if response.status != 200:
                    message = redact(_upstream_message(await response.read()), self._api_key)
                    raise error_for_status("student", response.status, message)
                async for raw in response.content:
                    chunk = _sse_chunk(raw)
                    if chunk is _DONE:
                        return
                    if chunk is not None:
                        yield chunk
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"student went silent for {self.timeout_s}s", backend="student") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"student connection failed: {exc.__class__.__name__}",
                                     backend="student") from exc

    async def ready(self) -> bool:
        try:
            async with self.session.get(f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


_DONE: Any = object()


def _sse_chunk(raw: bytes) -> dict[str, Any] | None:
    """One SSE line -> a chunk dict, ``_DONE``, or None (blank lines, comments)."""
    line = raw.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BackendError("student sent an invalid stream chunk", backend="student") from exc
    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
        raise BackendError(_upstream_message(data), backend="student")
    return chunk


# -- teacher ---------------------------------------------------------------------------------


class CooldownBreaker:
    """litellm-style cool-down: more than ``ratio`` failures in the last ``window`` calls -> skip
    the teacher for ``cooldown_s``, then let calls through again."""

    def __init__(self, ratio: float, window: int, cooldown_s: float, clock: Any = time.monotonic) -> None:
        self.ratio = ratio
        self.window = window
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.outcomes: collections.deque[bool] = collections.deque(maxlen=window)
        self.open_until = 0.0

    def allow(self) -> bool:
        return self.clock() >= self.open_until

    def record(self, ok: bool) -> None:
        self.outcomes.append(ok)
        failures = self.outcomes.count(False)
        if len(self.outcomes) >= min(self.window, 4) and failures / len(self.outcomes) > self.ratio:
            self.open_until = self.clock() + self.cooldown_s
            self.outcomes.clear()
            log.warning("teacher cooled down for %.0fs after repeated failures", self.cooldown_s)


@dataclass(frozen=True)
class Pricing:
    input_per_token: float
    output_per_token: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token


def teacher_pricing(settings: TeacherSettings) -> Pricing:
    """Overrides from settings, else litellm's bundled (offline) price table, else zero."""
    if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
        return Pricing(settings.input_cost_per_token or 0.0, settings.output_cost_per_token or 0.0)
    import litellm

    info = litellm.model_cost.get(settings.model or "") or litellm.model_cost.get(
        (settings.model or "").split("/", 1)[-1]
    ) or {}
    return Pricing(float(info.get("input_cost_per_token") or 0.0), float(info.get("output_cost_per_token") or 0.0))


class TeacherBackend:
    """Any litellm model string. We do retries and cool-down ourselves (litellm's are turned
    off) so that they are visible, bounded and tested."""

    name = "teacher"

    def __init__(self, settings: TeacherSettings, breaker: CooldownBreaker | None = None) -> None:
        import litellm  # only when a teacher is configured; LITELLM_LOCAL_MODEL_COST_MAP set by the CLI

        litellm.suppress_debug_info = True  # it prints help banners to stdout on every error
        # At INFO it logs two lines per completion (its own handler and ours): per-request noise
        # in the hot path, and our own request log already says what was called.
        litellm_log = logging.getLogger("LiteLLM")
        litellm_log.setLevel(max(logging.WARNING, litellm_log.level))
        self._litellm = litellm
        self.settings = settings
        self.model = settings.model or ""
        self.breaker = breaker or CooldownBreaker(
            settings.cooldown_failure_ratio, settings.cooldown_window, settings.cooldown_s
        )

    async def aclose(self) -> None:
        """litellm caches its HTTP clients process-wide; close them with the loop that made them."""
        from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

        await close_litellm_async_clients()
        cache = getattr(self._litellm.in_memory_llm_clients_cache, "cache_dict", None)
        if isinstance(cache, dict):
            cache.clear()

    def _call_args(self, payload: dict[str, Any], stream: bool) -> dict[str, Any]:
        args = {key: value for key, value in payload.items() if key in TEACHER_PARAMS}
        extra = {key: value for key, value in payload.items()
                 if key not in TEACHER_PARAMS and key not in ("model", "stream")}
        if extra:
            args["extra_body"] = extra
        args.update(model=self.model, stream=stream, timeout=self.settings.timeout_s, num_retries=0, max_retries=0)
        if self.settings.api_base:
            args["api_base"] = self.settings.api_base
        if self.settings.api_key is not None:
            args["api_key"] = self.settings.api_key.get_secret_value()
        return args

    def _translate(self, exc: Exception) -> BackendError:
        status = getattr(exc, "status_code", None)
        message = redact(f"teacher failed: {exc.__class__.__name__}: {_first_line(str(exc))}",
                         self.settings.api_key)
        if isinstance(exc, (asyncio.TimeoutError, self._litellm.exceptions.Timeout)):
            return BackendTimeout(f"teacher timed out after {self.settings.timeout_s}s", backend="teacher",
                                  upstream_status=408)
        if isinstance(exc, self._litellm.exceptions.APIConnectionError) and status in (None, 500):
            return BackendUnavailable(message, backend="teacher")
        if isinstance(status, int):
            return error_for_status("teacher", status, message)
        return BackendError(message, backend="teacher")

    async def _with_retries(self, attempt_call: Any) -> Any:
        if not self.breaker.allow():
            raise BackendUnavailable("teacher is cooling down after repeated failures", backend="teacher",
                                     code="teacher_cooldown")
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.max_retries + 1):
            try:
                result = await attempt_call()
            except Exception as exc:  # noqa: BLE001 - translated right here
                error = self._translate(exc)
                retryable = error.upstream_status in RETRYABLE_STATUS or isinstance(error, BackendUnavailable)
                if not retryable or attempt == self.settings.max_retries:
                    self.breaker.record(False)
                    raise error from exc
                await asyncio.sleep(delay)
                delay *= 2
                continue
            self.breaker.record(True)
            return result
        raise AssertionError("unreachable")

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        async def call() -> Any:
            return await self._litellm.acompletion(**self._call_args(payload, stream=False))

        response = await self._with_retries(call)
        return response.model_dump(exclude_none=True)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async def call() -> Any:
            args = self._call_args(payload, stream=True)
            args["stream_options"] = {"include_usage": True}
            return await self._litellm.acompletion(**args)

        stream = await self._with_retries(call)
        try:
            async for chunk in stream:
                yield chunk.model_dump(exclude_none=True)
        except Exception as exc:  # noqa: BLE001 - translated right here
            raise self._translate(exc) from exc


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""
