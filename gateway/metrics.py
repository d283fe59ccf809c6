"""Prometheus metrics. One ``Metrics`` per app, each with its own registry (tests run several).

The fallback rate is one PromQL line (README § Metrics):

    sum(rate(protege_fallbacks_total[5m])) / sum(rate(protege_auto_requests_total[5m]))
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

FALLBACK_RATE_PROMQL = (
    "sum(rate(protege_fallbacks_total[5m])) / sum(rate(protege_auto_requests_total[5m]))"
)


class RetrainCollector:
    """Retrain outcomes, read from ``retrain_runs`` at scrape time: the retrain is another process
    (often a CronJob) with nothing to scrape, and the SQLite log is the one place that knows."""

    def __init__(self, db_path: Path | None) -> None:
        self.db_path = db_path

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("protege_retrain_last_status",
                              "1 when the task's latest finished retrain succeeded (promoted, rejected or "
                              "skipped), 0 when it failed.", labels=["task"]),
            GaugeMetricFamily("protege_retrain_last_success_timestamp_seconds",
                              "When the task's latest non-failed retrain finished.", labels=["task"]),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        status, success = self._families()
        for task, last_status, last_success in self._read():
            status.add_metric([task], 0.0 if last_status == "failed" else 1.0)
            if last_success is not None:
                success.add_metric([task], float(last_success))
        yield status
        yield success

    def _read(self) -> list[tuple[str, str, float | None]]:
        if self.db_path is None or not Path(self.db_path).exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=1)
            try:
                return conn.execute(
                    "SELECT task,"
                    " (SELECT status FROM retrain_runs r2 WHERE r2.task = r.task AND r2.finished_at IS NOT NULL"
                    "  AND r2.status != 'running' ORDER BY r2.finished_at DESC LIMIT 1),"
                    " MAX(CASE WHEN status IN ('promoted', 'rejected', 'skipped') THEN finished_at END)"
                    " FROM retrain_runs r GROUP BY task").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return []  # no table yet, or locked for longer than a scrape should wait


class Metrics:
    def __init__(self, db_path: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(RetrainCollector(db_path))
        self.requests = Counter(
            "protege_requests",
            "Chat requests accepted, by requested model kind, route taken, reason, adapter and status.",
            ["requested", "route", "reason", "adapter", "status"],
            registry=r,
        )
        self.auto_requests = Counter(
            "protege_auto_requests", "Requests with model=auto (the fallback rate's denominator).", registry=r
        )
        self.fallbacks = Counter(
            "protege_fallbacks",
            "model=auto requests the teacher served or was wanted for, by reason.",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "protege_rejected_requests",
            "Requests refused before any model was called, by HTTP status and error code.",
            ["status", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "protege_request_latency_seconds",
            "End-to-end latency of chat requests, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "protege_time_to_first_token_seconds",
            "Time to the first streamed token, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "protege_tokens", "Tokens, by route and direction (prompt|completion).", ["route", "direction"], registry=r
        )
        self.cost = Counter("protege_cost_usd", "Estimated spend on model calls, by route.", ["route"], registry=r)
        self.teacher_cost_avoided = Counter(
            "protege_teacher_cost_avoided_usd",
            "Estimated teacher spend avoided by requests the student served.",
            registry=r,
        )
        self.teacher_calls = Counter(
            "protege_teacher_calls", "Teacher calls by outcome (ok|error|timeout|cooldown).", ["outcome"], registry=r
        )
        self.in_flight = Gauge("protege_in_flight_requests", "Chat requests in flight.", registry=r)
        self.log_queue_depth = Gauge("protege_log_queue_depth", "Log rows waiting for the writer.", registry=r)
        self.log_write_failures = Counter(
            "protege_log_write_failures", "Failed log write attempts (rows are kept and retried).", registry=r
        )
        self.log_rows_dropped = Counter(
            "protege_log_rows_dropped", "Log rows dropped because the buffer was full.", registry=r
        )
        self.log_rows_written = Counter("protege_log_rows_written", "Log rows written.", registry=r)
        self.feedback = Counter("protege_feedback", "Feedback received, by rating.", ["rating"], registry=r)
        self.shadow = Counter(
            "protege_shadow_samples", "Shadow teacher calls, by outcome (ok|error|skipped).", ["outcome"], registry=r
        )
        self.student_up = Gauge("protege_student_up", "1 when the student backend answered its last check.", registry=r)
        self.adapter_requests = Counter(
            "protege_adapter_requests",
            "Student requests by adapter alias and version.",
            ["alias", "version", "status"],
            registry=r,
        )
        self.adapter_tokens = Counter(
            "protege_adapter_tokens", "Student completion tokens by adapter alias and version.", ["alias", "version"], registry=r
        )
        self.adapter_latency = Histogram(
            "protege_adapter_latency_seconds",
            "Student call latency by adapter alias and version.",
            ["alias", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_promoted = Gauge(
            "protege_adapter_promoted_info",
            "1 for the version each alias points at.",
            ["alias", "version"],
            registry=r,
        )
        self.adapter_promotions = Counter(
            "protege_adapter_promotions", "Alias moves, by alias and kind (promote|rollback).", ["alias", "kind"], registry=r
        )
        self._written_seen = 0
        self._failures_seen = 0
        self._dropped_seen = 0

    def observe_writer(self, written: int, failures: int, dropped: int, depth: int) -> None:
        """Mirror the writer's cumulative stats into counters (called from the writer's thread)."""
        self.log_rows_written.inc(written - self._written_seen)
        self.log_write_failures.inc(failures - self._failures_seen)
        self.log_rows_dropped.inc(dropped - self._dropped_seen)
        self._written_seen, self._failures_seen, self._dropped_seen = written, failures, dropped
        self.log_queue_depth.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
