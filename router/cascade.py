"""Confidence cascade: a post-call policy that escalates a finished student answer.

After the student answered an `auto` request, escalate to the teacher when
- the answer fails a validator (``invalid_output``): JSON when the request asked for
  ``json_object`` / ``json_schema`` (and the schema itself when the gateway passed it), the
  request's label set, the configured output regex; or
- the student's confidence (mean or min token log-probability, ``RouterSettings``) is under
  the threshold calibrated for the adapter version that answered (``StudentOutcome``), else
  ``RouterSettings.min_confidence`` (``low_confidence``).

Streaming requests are never reviewed: by the time the answer is complete the caller has it.
They get the pre-call decision only (see docs/router.md). Student errors and time-outs are the
``fallback`` policy's business.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from gateway.settings import RouterSettings
from router.base import register
from router.types import RequestFeatures, RouteDecision, StudentOutcome

# Score of an invalid_output decision: the validator is certain, unlike a confidence threshold.
CERTAIN = 1.0


def output_problem(
    features: RequestFeatures, output_text: str, output_pattern: re.Pattern[str] | None
) -> str | None:
    """Why the student's output is unusable for this request, or None when it passes."""
    if features.response_format in ("json_object", "json_schema"):
        problem = _json_problem(output_text, features.response_format, features.json_schema)
        if problem is not None:
            return problem
    if features.label_set is not None and output_text.strip() not in features.label_set:
        return "the answer is not one of the request's labels"
    if output_pattern is not None and output_pattern.fullmatch(output_text.strip()) is None:
        return "the answer does not match router.output_regex"
    return None


def _json_problem(output_text: str, response_format: str, schema: Mapping[str, Any] | None) -> str | None:
    try:
        value = json.loads(output_text)
    except ValueError:
        return "the answer is not valid JSON"
    if response_format == "json_object" and not isinstance(value, dict):
        return "the answer is not a JSON object"
    validator = _schema_validator(json.dumps(schema, sort_keys=True)) if schema is not None else None
    if validator is not None:
        error = next(iter(validator.iter_errors(value)), None)
        if error is not None:
            return f"the answer does not match the JSON schema: {error.message}"
    return None


@lru_cache(maxsize=256)
def _schema_validator(schema_json: str) -> Any | None:
    """A validator for the schema, or None when the schema itself is invalid (nothing to hold to)."""
    # Callers reuse a handful of schemas; building a validator costs far more than using one.
    from jsonschema import exceptions, validators

    schema = json.loads(schema_json)
    validator_class = validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except exceptions.SchemaError:
        return None
    return validator_class(schema)


def logprob_stats(body: dict[str, Any]) -> tuple[float | None, float | None]:
    """(mean, min) token log-probability of the first choice, when the backend returned logprobs."""
    choices = body.get("choices") or []
    if not choices:
        return None, None
    content = ((choices[0].get("logprobs") or {}).get("content")) or []
    values = [t["logprob"] for t in content if isinstance(t, dict) and isinstance(t.get("logprob"), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None, None
    return sum(values) / len(values), min(values)


def confidence_of(outcome: StudentOutcome, statistic: str) -> float | None:
    return outcome.min_logprob if statistic == "min" else outcome.mean_logprob


@register("cascade")
class CascadePolicy:
    name = "cascade"

    def __init__(self, settings: RouterSettings) -> None:
        self.min_confidence = settings.min_confidence
        self.statistic = settings.cascade_statistic
        self.output_pattern = re.compile(settings.output_regex) if settings.output_regex else None

    def review(self, features: RequestFeatures, outcome: StudentOutcome) -> RouteDecision | None:
        if features.stream or outcome.error is not None or outcome.output_text is None:
            return None
        confidence = confidence_of(outcome, self.statistic)
        if output_problem(features, outcome.output_text, self.output_pattern) is not None:
            return RouteDecision("teacher", features.adapter, "invalid_output", CERTAIN)
        threshold = outcome.min_confidence if outcome.min_confidence is not None else self.min_confidence
        if threshold is not None and confidence is not None and confidence < threshold:
            return RouteDecision("teacher", features.adapter, "low_confidence", confidence)
        return None

