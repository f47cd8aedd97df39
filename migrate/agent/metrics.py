"""The agent's Prometheus metrics (``GET /metrics``), through ``prometheus-client``.

Each agent has its own registry (no process-global state, so tests and embedders
can hold several). Migrations are recorded from their finished
:class:`~migrate.report.MigrationReport` by :meth:`AgentMetrics.record_report`;
requests and refusals by the agent's middleware.

Names (all prefixed ``livemig_``): ``migrations_total{status,strategy}``,
``migration_guest_downtime_seconds``, ``migration_qemu_downtime_seconds``,
``migration_total_time_seconds`` (histograms, by strategy),
``migration_bytes_total{strategy,kind}`` (kind: ``transferred`` — what QEMU or
pagestream counted — and ``wire`` — bytes on the link, when known),
``agent_requests_total{method,route,code}``, ``agent_refusals_total{reason}``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from migrate.report import MigrationReport

__all__ = ["CONTENT_TYPE_LATEST", "AgentMetrics"]

#: Seconds: downtime buckets from 1 ms to 10 s, total-time buckets from 100 ms to 1 h.
_DOWNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TOTAL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class AgentMetrics:
    """One agent's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter(
            "livemig_migrations", "Migrations finished, by outcome",
            ["status", "strategy"], registry=r,
        )  # fmt: skip
        self.guest_downtime = Histogram(
            "livemig_migration_guest_downtime_seconds",
            "Longest gap the guest's probe saw during a migration",
            ["strategy"], buckets=_DOWNTIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.qemu_downtime = Histogram(
            "livemig_migration_qemu_downtime_seconds",
            "Downtime QEMU reported for a migration",
            ["strategy"], buckets=_DOWNTIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.total_time = Histogram(
            "livemig_migration_total_time_seconds",
            "Migration total time (migrate issued to VM running on the target)",
            ["strategy"], buckets=_TOTAL_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "livemig_migration_bytes", "Bytes moved by migrations",
            ["strategy", "kind"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "livemig_agent_requests", "API requests answered", ["method", "route", "code"],
            registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "livemig_agent_refusals", "Requests and TLS handshakes refused", ["reason"],
            registry=r,
        )  # fmt: skip

    def record_report(self, report: MigrationReport) -> None:
        """Count one finished migration (any status) and observe its times and bytes."""
        strategy = report.strategy
        self.migrations.labels(status=report.status.value, strategy=strategy).inc()
        self.total_time.labels(strategy=strategy).observe(report.total_time_ms / 1000.0)
        if report.guest_downtime_ms is not None:
            self.guest_downtime.labels(strategy=strategy).observe(report.guest_downtime_ms / 1000.0)
        if report.downtime_ms is not None:
            self.qemu_downtime.labels(strategy=strategy).observe(report.downtime_ms / 1000.0)
        self.bytes.labels(strategy=strategy, kind="transferred").inc(
            max(0, report.transferred_bytes)
        )
        if report.wire_bytes is not None:
            self.bytes.labels(strategy=strategy, kind="wire").inc(max(0, report.wire_bytes))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (content type :data:`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)
