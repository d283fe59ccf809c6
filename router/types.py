"""The router's vocabulary: what it is told about a request, and what it decides.

The router is pure: ``RequestFeatures`` in, ``RouteDecision`` out, no I/O, no clock, no globals.
The gateway builds the features, asks, and acts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Target = Literal["student", "teacher"]

# Why a request went where it went. The fallback reasons are the ones that count toward the
# fallback rate (an `auto` request the teacher ended up serving, or wanted to).
REASONS = (
    "student",  # auto: the router kept it on the student
    "explicit",  # model=teacher / student:..., or the x-protege-route header
    "rule",  # context too long, tools, unsupported response format, pattern, tenant
    "difficulty",  # learned difficulty predicted a bad student answer
    "uncalibrated",  # the student version has no calibrated threshold yet: its confidence means nothing
    "low_confidence",  # post-call: the student's confidence was under the threshold
    "invalid_output",  # post-call: the student's output failed a validator
    "error",  # post-call: the student failed
    "timeout",  # post-call: the student timed out
    "teacher_unavailable",  # the teacher was wanted but is not configured or cooling down
)
FALLBACK_REASONS = frozenset(
    {"rule", "difficulty", "uncalibrated", "low_confidence", "invalid_output", "error", "timeout", "teacher_unavailable"}
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class RequestFeatures:
    """What the router may look at. Built by the gateway from the parsed request."""

    requested_model: str  # "auto" | "teacher" | "student"
    adapter: str | None  # alias named by `student:<adapter>`, else None
    messages: tuple[Message, ...]
    estimated_tokens: int
    has_tools: bool = False
    response_format: str | None = None  # None | "text" | "json_object" | "json_schema"
    caller: str = "anonymous"
    route_header: str | None = None  # x-protege-route: "student" | "teacher"
    teacher_available: bool = True
    stream: bool = False
    # For the cascade's validators. json_schema: the `schema` inside response_format.json_schema;
    # label_set: the only acceptable answers (stripped), when the caller's task has a closed set.
    json_schema: Mapping[str, Any] | None = None
    label_set: frozenset[str] | None = None
    # Whether the adapter version that would answer has its own calibrated cascade threshold
    # (set by a retrain at promotion). None: not known (no adapter registry).
    student_calibrated: bool | None = None


@dataclass(frozen=True)
class RouteDecision:
    target: Target
    adapter: str | None
    reason: str
    score: float | None = None


@dataclass(frozen=True)
class StudentOutcome:
    """What the gateway observed of a student call, for the post-call (cascade) decision."""

    error: Literal["error", "timeout"] | None = None
    mean_logprob: float | None = None
    min_logprob: float | None = None
    output_text: str | None = None
    tokens: tuple[str, ...] = field(default_factory=tuple)
    # The cascade threshold calibrated for the adapter version that answered (set by the
    # retrain at promotion); None: RouterSettings.min_confidence applies.
    min_confidence: float | None = None
