"""Fixtures of the security tests: the same harness as the reliability tests."""

from tests.reliability.harness import gateway_factory, gateway_process_factory, upstream_factory  # noqa: F401
