"""Human-readable migration reports."""

from __future__ import annotations

from collections.abc import Mapping

from migrate.report import MigrationReport


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f} MiB"


def _forecast_lines(report: MigrationReport) -> list[str]:
    """Predicted against measured, when a forecast was made before the start."""
    p, m = report.predicted, report.measured
    if p is None or p.policy_forecast is None:
        return []
    f = p.policy_forecast
    band = ""
    if f.downtime_low_ms is not None and f.downtime_high_ms is not None:
        band = f" (STOP->RESUME {f.downtime_low_ms:.0f}-{f.downtime_high_ms:.0f} ms)"
    lines = [
        f"  forecast:           {f.setting}: {_ms(f.total_time_ms)}, downtime "
        f"{_ms(f.downtime_ms)}{band}{'' if f.converges else ' (does not converge)'}",
        f"    from:             dirty {p.dirty_rate_bytes_per_s / (1 << 20):.1f} MiB/s"
        + (
            f" (~{p.working_set_bytes / (1 << 20):.1f} MiB rewritten)"
            if p.working_set_bytes
            else ""
        )
        + ", "
        f"bandwidth {p.bandwidth_bytes_per_s / (1 << 20):.1f} MiB/s ({p.bandwidth_source})",
    ]
    if p.disk_copy_bytes or p.disk_write_bytes_per_s:
        lines.append(
            f"    disks:            {p.disk_copy_bytes / (1 << 20):.0f} MiB first copy, guest "
            f"writes {p.disk_write_bytes_per_s / (1 << 20):.1f} MiB/s to them"
        )
    if m is not None:
        error = "" if m.total_time_error_pct is None else f" ({m.total_time_error_pct:+.0f}%)"
        bandwidth = m.bandwidth_bytes_per_s
        rate = "-" if bandwidth is None else f"{bandwidth / (1 << 20):.1f} MiB/s"
        lines.append(
            f"  measured:           {_ms(m.total_time_ms)}{error}, {m.rounds} rounds, "
            f"bandwidth {rate}"
            + (f", throttle up to {m.max_throttle_pct}%" if m.max_throttle_pct else "")
            + (", post-copy" if m.postcopy else "")
            + (
                f", STOP->RESUME {m.switchover_ms:.1f} ms"
                + {True: " (in band)", False: " (outside the band)", None: ""}[m.switchover_in_band]
                if m.switchover_ms is not None
                else ""
            )
        )
    return lines


def _stream_lines(report: MigrationReport) -> list[str]:
    """pagestream's own figures: tracker, compression, final round, its switchover marks."""
    st = report.stream
    if st is None:
        return []
    marks = ", ".join(f"{name} {value:.1f}" for name, value in st.switchover_ms.items())
    return [
        f"  page stream:        {st.rounds} rounds, {st.pages_sent} pages "
        f"({_mib(st.raw_bytes)} -> {_mib(st.payload_bytes)}, zstd x{st.compression_ratio:.2f}, "
        f"final level {st.final_level}), {st.zero_pages_skipped} zero pages never sent, "
        f"QEMU device state {st.device_state_bytes / 1024:.0f} KiB",
        f"  tracker:            {st.tracker} ({st.tracker_reason})",
        f"  final round:        {st.final_round_pages} pages, scan {_ms(st.final_scan_ms)}, "
        f"round {_ms(st.final_round_ms)}; stream digest {st.digest}",
        *([f"  stream marks (ms):  {marks}"] if marks else []),
    ]


def render_report(report: MigrationReport, environment: Mapping[str, object] | None = None) -> str:
    """A compact text report: outcome, figures, switchover timeline, integrity."""
    tl = report.timeline
    lines = [
        f"migration {report.status}: {report.vm} {report.source} -> {report.target} "
        f"({report.strategy}, {report.mode}, policy {report.policy})",
    ]
    if report.error:
        lines.append(f"  error:              {report.error}")
    lines += [
        f"  total time:         {_ms(report.total_time_ms)}   (QEMU: {_ms(report.qemu_total_time_ms)})",
        f"  guest downtime:     {_ms(report.guest_downtime_ms)}   (longest probe reply gap)",
        f"  QEMU downtime:      {_ms(report.downtime_ms)}",
        f"  RAM / transferred:  {_mib(report.ram_bytes)} / {_mib(report.transferred_bytes)}"
        f"   (on the wire: {_mib(report.wire_bytes)})",
        f"  pre-copy rounds:    {report.precopy_rounds}",
        f"  integrity:          {report.integrity} — {report.integrity_detail}",
        *(
            [
                f"  repaired pages:     {report.repaired_pages} (stale in QEMU's stream, copied from the stopped source)"
            ]
            if report.repaired_pages
            else []
        ),
    ]
    if report.guest_check:
        lines.append(f"  guest check:        {report.guest_check}")
    lines += _stream_lines(report)
    lines += _forecast_lines(report)
    lines.append("  switchover timeline (ms after migrate was issued):")
    for label, value in (
        ("source STOP", tl.source_stop_ms),
        ("source completed", tl.source_completed_ms),
        ("target completed", tl.target_completed_ms),
        ("RAM verified", tl.verified_ms),
        ("target RESUME", tl.target_resume_ms),
        ("first probe reply", tl.first_probe_reply_ms),
    ):
        lines.append(f"    {label:<18}  {_ms(value)}")
    lines.append(
        f"    STOP -> RESUME {_ms(tl.stop_to_resume_ms)}, "
        f"RESUME -> first reply {_ms(tl.resume_to_first_reply_ms)}"
    )
    if report.probe is not None:
        p = report.probe
        baseline = f", before migration {_ms(p.baseline_gap_ms)}" if p.baseline_gap_ms else ""
        lines.append(
            f"  probe: every {p.interval_ms:g} ms, {p.sent} sent, {p.lost} lost, "
            f"gap {_ms(p.gap_start_ms)} -> {_ms(p.gap_end_ms)}{baseline}, "
            f"probe's own worst send gap {_ms(p.max_send_gap_ms)}"
        )
    for check in report.preflight:
        if check.verdict != "ok":
            lines.append(f"  preflight {check.name}: {check.verdict} — {check.detail}")
    for d in report.decisions:
        outcome = "" if d.outcome == "applied" else f" [{d.outcome}: {d.outcome_detail}]"
        lines.append(
            f"  decision @{(d.time - tl.started_at) * 1e3:8.1f} ms: {d.action} — {d.reason}"
            + outcome
        )
    if environment:
        lines.append(
            "  environment: "
            + ", ".join(f"{k}={v}" for k, v in environment.items() if k != "accelerator_reason")
        )
    return "\n".join(lines)
