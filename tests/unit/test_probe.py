import struct

import numpy as np

from lab.probe import ProbeRecord, _checksum, _echo_request


def _record(reply_times_ms: list[float], sent_ms: list[float] | None = None) -> ProbeRecord:
    sent_ms = sent_ms if sent_ms is not None else reply_times_ms
    sent = np.array([int(t * 1e6) for t in sent_ms], dtype=np.int64)
    replies = np.array([int(t * 1e6) for t in reply_times_ms], dtype=np.int64)
    return ProbeRecord(
        interval_ns=1_000_000,
        sent_seq=np.arange(len(sent), dtype=np.int64),
        sent_ns=sent,
        reply_seq=np.arange(len(replies), dtype=np.int64),
        reply_ns=replies,
    )


def test_icmp_checksum_verifies() -> None:
    packet = _echo_request(0x1234, 7, 99)
    assert packet[0] == 8 and struct.unpack("!H", packet[6:8])[0] == 7
    assert _checksum(packet) == 0  # a correct checksum makes the sum all ones


def test_longest_gap_in_window() -> None:
    replies = [float(t) for t in range(100)] + [float(t) for t in range(140, 200)]
    gap = _record(replies).longest_gap(0.0, 0.199)
    assert gap is not None
    assert abs(gap.duration_ms - 41.0) < 1e-6
    assert abs(gap.start - 0.099) < 1e-9


def test_gap_spanning_window_edge_is_measured_whole() -> None:
    replies = [0.0, 1.0, 2.0, 60.0, 61.0]
    gap = _record(replies).longest_gap(0.030, 0.040)
    assert gap is not None and abs(gap.duration_ms - 58.0) < 1e-6


def test_lost_requests_are_counted() -> None:
    sent = [float(t) for t in range(10)]
    record = ProbeRecord(
        interval_ns=1_000_000,
        sent_seq=np.arange(10, dtype=np.int64),
        sent_ns=np.array([int(t * 1e6) for t in sent], dtype=np.int64),
        reply_seq=np.array([0, 1, 2, 8, 9], dtype=np.int64),
        reply_ns=np.array([int(t * 1e6) + 100 for t in (0, 1, 2, 8, 9)], dtype=np.int64),
    )
    assert record.lost(0.0, 0.010) == 5
    gap = record.longest_gap(0.0, 0.010)
    assert gap is not None and gap.lost == 5
    assert record.first_reply_after(0.0025) is not None
    assert abs(record.max_send_gap_ms(0.0, 0.010) - 1.0) < 1e-9


def test_a_guest_that_never_answers_on_the_target_has_no_downtime() -> None:
    from lab.demo import _with_probe
    from migrate.phase import Phase
    from migrate.report import Integrity, MigrationReport, Status, Timeline

    def report(resume_ms: float) -> MigrationReport:
        return MigrationReport(
            status=Status.COMPLETED, strategy="libvirt", mode="live", vm="demo",
            source="a", target="b", policy="nova", phase=Phase.COMPLETED,
            total_time_ms=resume_ms, ram_bytes=1, integrity=Integrity.UNCHECKED,
            timeline=Timeline(started_at=0.0, target_resume_ms=resume_ms, ended_ms=150.0),
        )  # fmt: skip

    # Replies every ms, a 5 ms gap at 50 ms, then silence from 100 ms on (a crash).
    replies = [float(t) for t in range(50)] + [float(t) for t in range(55, 100)]
    record = _record(replies, [float(t) for t in range(200)])
    crashed = _with_probe(report(resume_ms=100.5), record, 0.0)
    assert crashed.guest_downtime_ms is None and crashed.timeline.first_probe_reply_ms is None
    assert crashed.probe is not None and crashed.probe.lost > 0
    # The same record with the resume before the gap: the guest came back.
    alive = _with_probe(report(resume_ms=52.0), record, 0.0)
    assert alive.guest_downtime_ms is not None and alive.guest_downtime_ms > 4
