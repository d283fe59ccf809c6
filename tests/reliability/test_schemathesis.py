"""Generated input (schemathesis, from the gateway's own /openapi.json): valid and invalid bodies,
paths and parameters for every operation; the gateway never answers 5xx. The backends are
always-answering doubles, so a 5xx could only be the gateway's own fault."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from gateway.app import Overrides
from tests.reliability.harness import EchoBackend

pytestmark = pytest.mark.reliability

KEY = "sk-fuzz-caller"
EXAMPLES_PER_MODE = 60
# A random model string is almost always refused with 404 before anything interesting runs;
# half of the generated chat bodies get a real model name instead.
MODELS = st.sampled_from([None, "auto", "student", "teacher", "student:support"])


def _with_model(case: Any, model: str | None) -> Any:
    if model is not None and isinstance(case.body, dict) and "messages" in case.body:
        case.body["model"] = model
    return case


def test_generated_requests_never_get_a_5xx(gateway_factory) -> None:  # noqa: ANN001
    gateway = gateway_factory(Overrides(student=EchoBackend("student"), teacher=EchoBackend("teacher")),
                              auth={"api_keys": {"fuzz": KEY}})
    client = gateway.client(KEY)
    raw_schema = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw_schema)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "GET /v1/models", "POST /v1/feedback"} <= labels
    # The chat route declares its body (ChatRequest's schema), so bodies are generated for it.
    chat_op = next(op for op in operations if op.label == "POST /v1/chat/completions")
    assert chat_op.body, "the chat route has no request body in the OpenAPI schema"

    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    with requests.Session() as session:
        session.trust_env = False
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, gateway.url, session, failures, statuses.setdefault(operation.label, set()))
    print({label: sorted(codes) for label, codes in statuses.items()})
    assert not failures, "\n\n".join(failures[:5])
    # The fuzzing got past validation too, not only into 4xx refusals.
    assert 200 in statuses["POST /v1/chat/completions"]
    assert any(code >= 400 for code in statuses["POST /v1/chat/completions"])
    assert gateway.services.in_flight == 0


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, session: requests.Session, failures: list[str],
          statuses: set[int]) -> None:
    @given(drawn=st.tuples(operation.as_strategy(generation_mode=mode), MODELS))
    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def call(drawn: tuple[Any, str | None]) -> None:
        case = _with_model(*drawn)
        response = case.call(base_url=base_url, session=session, headers={"authorization": f"Bearer {KEY}"},
                             timeout=30)
        statuses.add(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{operation.label} ({mode.value}) -> {response.status_code}: "
                            f"{case.as_curl_command()}\n{response.text[:300]}")

    try:
        call()
    except Unsatisfiable:
        # Nothing in this operation can be made invalid (no parameters, no body): fine.
        assert mode is GenerationMode.NEGATIVE and not operation.body, operation.label
