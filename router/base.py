"""Router composition and the registry of policy kinds.

A ``Router`` holds pre-call policies (asked in order; the first that returns a decision wins)
and post-call policies (asked after the student answered; one may escalate to the teacher).
Policy kinds register themselves by name; ``RouterSettings.policies`` lists the names to use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.settings import RouterSettings
from router.types import RequestFeatures, RouteDecision, StudentOutcome


class PreCallPolicy(Protocol):
    name: str

    def decide(self, features: RequestFeatures) -> RouteDecision | None: ...


class PostCallPolicy(Protocol):
    name: str

    def review(self, features: RequestFeatures, outcome: StudentOutcome) -> RouteDecision | None: ...


PolicyFactory = Callable[[RouterSettings], "PreCallPolicy | PostCallPolicy"]
POLICY_KINDS: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def add(factory: PolicyFactory) -> PolicyFactory:
        POLICY_KINDS[name] = factory
        return factory

    return add


class Router:
    def __init__(
        self,
        pre_call: list[PreCallPolicy],
        post_call: list[PostCallPolicy],
        default_adapter: str,
    ) -> None:
        self.pre_call = pre_call
        self.post_call = post_call
        self.default_adapter = default_adapter

    def route(self, features: RequestFeatures) -> RouteDecision:
        for policy in self.pre_call:
            decision = policy.decide(features)
            if decision is not None:
                return self._finish(features, decision)
        return self._finish(
            features, RouteDecision("student", features.adapter, "student", None)
        )

    def after_student(
        self, features: RequestFeatures, outcome: StudentOutcome
    ) -> RouteDecision | None:
        """Post-call: a decision to escalate to the teacher, or None to keep the student's answer."""
        if features.requested_model != "auto":
            return None
        for policy in self.post_call:
            decision = policy.review(features, outcome)
            if decision is not None:
                return self._finish(features, decision)
        return None

    def _finish(self, features: RequestFeatures, decision: RouteDecision) -> RouteDecision:
        adapter = decision.adapter or features.adapter or self.default_adapter
        if decision.target == "teacher" and not features.teacher_available:
            if features.requested_model == "teacher" or features.route_header == "teacher":
                # Explicitly asked for: the gateway answers 503, it must not silently downgrade.
                return RouteDecision("teacher", adapter, decision.reason, decision.score)
            return RouteDecision("student", adapter, "teacher_unavailable", decision.score)
        return RouteDecision(decision.target, adapter, decision.reason, decision.score)


def build_router(settings: RouterSettings, default_adapter: str) -> Router:
    """Instantiate the configured policy kinds, in order."""
    import router.policies  # noqa: F401  (registers the built-in kinds)

    pre_call: list[PreCallPolicy] = []
    post_call: list[PostCallPolicy] = []
    for name in settings.policies:
        if name not in POLICY_KINDS:
            raise ValueError(
                f"unknown router policy {name!r}; known: {', '.join(sorted(POLICY_KINDS))}"
            )
        policy = POLICY_KINDS[name](settings)
        if hasattr(policy, "decide"):
            pre_call.append(policy)  # type: ignore[arg-type]
        if hasattr(policy, "review"):
            post_call.append(policy)  # type: ignore[arg-type]
    return Router(pre_call, post_call, default_adapter)
