import json

import pytest

from migrate.codec import from_dict, to_dict
from migrate.control.intents import Abort, CapBandwidth, SetDowntimeLimit, Throttle
from migrate.phase import Phase
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Outcome,
    ProbeSummary,
    Sample,
    Status,
    Timeline,
)


def _report() -> MigrationReport:
    sample = Sample.from_query_migrate(
        {
            "status": "active",
            "expected-downtime": 12,
            "ram": {"total": 268435456, "remaining": 1 << 20, "transferred": 5 << 20,
                    "dirty-pages-rate": 300, "dirty-sync-count": 2, "mbps": 812.5,
                    "page-size": 4096, "duplicate": 10, "normal": 20},
        },
        now=1000.5,
        elapsed_ms=500.0,
    )  # fmt: skip
    return MigrationReport(
        status=Status.COMPLETED,
        strategy="native",
        mode="live",
        vm="demo",
        source="a",
        target="b",
        policy="livemig",
        phase=Phase.COMPLETED,
        total_time_ms=812.25,
        ram_bytes=256 << 20,
        timeline=Timeline(
            started_at=1000.0, source_stop_ms=700.0, target_resume_ms=730.5, ended_ms=800.0
        ),
        downtime_ms=4.0,
        guest_downtime_ms=41.5,
        transferred_bytes=100,
        wire_bytes=120,
        precopy_rounds=3,
        integrity=Integrity.OK,
        integrity_detail="same",
        guest_check="ok",
        probe=ProbeSummary(1.0, 800, 20, 41.5, 700.0, 741.5, 1.2, baseline_gap_ms=None),
        samples=(sample,),
        decisions=(
            Decision(1000.1, "start", (SetDowntimeLimit(20), CapBandwidth(1 << 30))),
            Decision(1000.2, "stop", (Abort(),), Outcome.APPLIED),
            Decision(1000.3, "no throttle", (Throttle(10, 5, 50),), Outcome.REJECTED, "why"),
        ),
    )


def test_report_round_trips_through_json() -> None:
    report = _report()
    data = json.loads(json.dumps(report.to_dict()))
    assert MigrationReport.from_dict(data) == report


def test_report_dict_has_the_fields_operators_read() -> None:
    data = _report().to_dict()
    for key in ("status", "strategy", "total_time_ms", "downtime_ms", "guest_downtime_ms",
                "transferred_bytes", "ram_bytes", "precopy_rounds", "integrity", "timeline"):  # fmt: skip
        assert key in data
    assert data["status"] == "completed" and data["integrity"] == "ok"


def test_sample_reads_query_migrate() -> None:
    sample = _report().samples[0]
    assert sample.ram_remaining_bytes == 1 << 20
    assert sample.dirty_rate_bytes_per_s == 300 * 4096
    assert sample.expected_downtime_ms == 12.0


def test_timeline_intervals() -> None:
    tl = Timeline(
        started_at=0.0, source_stop_ms=10.0, target_resume_ms=35.0, first_probe_reply_ms=50.0
    )
    assert tl.stop_to_resume_ms == 25.0
    assert tl.resume_to_first_reply_ms == 15.0
    assert Timeline(started_at=0.0).stop_to_resume_ms is None


def test_from_dict_names_the_bad_field() -> None:
    data = _report().to_dict()
    data["timeline"]["source_stop_ms"] = "soon"
    with pytest.raises(ValueError, match=r"timeline\.source_stop_ms"):
        MigrationReport.from_dict(data)
    del data["status"]
    with pytest.raises(ValueError, match="status"):
        from_dict(MigrationReport, data)


def test_to_dict_handles_plain_values() -> None:
    assert to_dict((Status.FAILED, [1, 2], {"a": None})) == ["failed", [1, 2], {"a": None}]
