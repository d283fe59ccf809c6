"""The chat-completions request as protege accepts it, and its translation to router features.

Validation happens here, once: anything accepted is something both backends can be asked.
Fields protege does not know are passed through to the student (vLLM has many extensions).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import InvalidRequest, ModelNotFound
from router.types import Message, RequestFeatures

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if isinstance(part, dict))
        return ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


# Passing these on would let a caller steer where the gateway connects (SSRF) or what key it uses.
FORBIDDEN_FIELDS = frozenset({"api_base", "base_url", "api_key", "custom_llm_provider", "extra_headers"})


def parse_chat_request(body: Any, max_n: int, max_tokens_limit: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name in FORBIDDEN_FIELDS.intersection(body):
        raise InvalidRequest(f"the field {name!r} cannot be set per request", param=name,
                             code="forbidden_field")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                             code="invalid_value") from None
    if request.n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}", param="n", code="invalid_value")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, field)
        if value is not None and value > max_tokens_limit:
            raise InvalidRequest(f"{field} must be at most {max_tokens_limit}", param=field,
                                 code="invalid_value")
    if request.n > 1 and request.stream:
        raise InvalidRequest("n > 1 is not supported with stream=true", param="n", code="unsupported")
    return request


def parse_model(model: str) -> tuple[str, str | None]:
    """'auto' | 'teacher' | 'student' | 'student:<adapter>' -> (kind, adapter)."""
    if model in ("auto", "teacher", "student"):
        return model, None
    if model.startswith("student:") and len(model) > len("student:"):
        return "student", model[len("student:"):]
    raise ModelNotFound(
        f"The model {model!r} does not exist; use 'auto', 'teacher', 'student' or 'student:<adapter>'",
        param="model",
    )


def estimate_tokens(messages: list[ChatMessage]) -> int:
    # ~4 characters per token plus per-message overhead: good enough for a context-length rule.
    return sum(len(m.text()) // 4 + 4 for m in messages)


def _inner_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None or response_format.type != "json_schema" or not response_format.json_schema:
        return None
    schema = response_format.json_schema.get("schema")
    return schema if isinstance(schema, dict) else None


def to_features(
    request: ChatRequest,
    caller: str,
    route_header: str | None,
    teacher_available: bool,
    student_calibrated: bool | None = None,
) -> RequestFeatures:
    kind, adapter = parse_model(request.model)
    return RequestFeatures(
        requested_model=kind,
        adapter=adapter,
        messages=tuple(Message(m.role, m.text()) for m in request.messages),
        estimated_tokens=estimate_tokens(request.messages),
        has_tools=bool(request.tools),
        response_format=request.response_format.type if request.response_format else None,
        json_schema=_inner_schema(request.response_format),
        caller=caller,
        route_header=route_header,
        teacher_available=teacher_available,
        stream=request.stream,
        student_calibrated=student_calibrated,
    )
