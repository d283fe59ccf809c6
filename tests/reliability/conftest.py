"""Fixtures of the reliability tests (short forms of the issue's drills; see docs/reliability.md)."""

from tests.reliability.harness import gateway_factory, gateway_process_factory, upstream_factory  # noqa: F401
