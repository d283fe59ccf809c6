"""Built-in policy kinds: explicit, rules, uncalibrated, fallback; importing this registers all kinds.

Scores: a decision that is certain by construction (explicit, a rule, a failure) scores 1.0,
except the context-length rule, which records the estimated token count.
"""

from __future__ import annotations

import re

from gateway.settings import RouterSettings
from router.base import register
from router.types import RequestFeatures, RouteDecision, StudentOutcome

CERTAIN = 1.0


@register("explicit")
class ExplicitPolicy:
    """model=teacher / student[:adapter], or the x-protege-route header, wins."""

    name = "explicit"

    def __init__(self, settings: RouterSettings) -> None:
        pass

    def decide(self, features: RequestFeatures) -> RouteDecision | None:
        if features.route_header in ("student", "teacher"):
            return RouteDecision(features.route_header, features.adapter, "explicit", CERTAIN)
        if features.requested_model == "teacher":
            return RouteDecision("teacher", None, "explicit", CERTAIN)
        if features.requested_model == "student":
            return RouteDecision("student", features.adapter, "explicit", CERTAIN)
        return None


@register("rules")
class RulesPolicy:
    """What the student cannot do: too long, tools, unsupported formats, patterns, tenants."""

    name = "rules"

    def __init__(self, settings: RouterSettings) -> None:
        self.max_tokens = settings.student_context_tokens
        self.patterns = [re.compile(p) for p in settings.teacher_patterns]
        self.tenants = frozenset(settings.teacher_tenants)

    def decide(self, features: RequestFeatures) -> RouteDecision | None:
        if features.estimated_tokens > self.max_tokens:
            return RouteDecision("teacher", None, "rule", float(features.estimated_tokens))
        if features.has_tools:
            return RouteDecision("teacher", None, "rule", CERTAIN)
        if features.caller in self.tenants:
            return RouteDecision("teacher", None, "rule", CERTAIN)
        last_user = next(
            (m.content for m in reversed(features.messages) if m.role == "user"), ""
        )
        if any(p.search(last_user) for p in self.patterns):
            return RouteDecision("teacher", None, "rule", CERTAIN)
        return None


@register("uncalibrated")
class UncalibratedPolicy:
    """`auto` goes straight to the teacher while the student version that would answer has no
    calibrated cascade threshold (base@v0, a manually promoted adapter): nobody knows yet when its
    answers can be trusted, so calling it would only add its latency to a teacher call. Once a
    retrain promotes and calibrates a version, the cascade takes over."""

    name = "uncalibrated"

    def __init__(self, settings: RouterSettings) -> None:
        pass

    def decide(self, features: RequestFeatures) -> RouteDecision | None:
        if features.requested_model == "auto" and features.student_calibrated is False:
            return RouteDecision("teacher", None, "uncalibrated", CERTAIN)
        return None


@register("fallback")
class FailureFallbackPolicy:
    """Post-call: a student error or time-out goes to the teacher."""

    name = "fallback"

    def __init__(self, settings: RouterSettings) -> None:
        pass

    def review(self, features: RequestFeatures, outcome: StudentOutcome) -> RouteDecision | None:
        if outcome.error is not None:
            return RouteDecision("teacher", features.adapter, outcome.error, CERTAIN)
        return None


# The other kinds live in their own modules; importing them registers them.
from router import cascade, difficulty  # noqa: E402, F401
