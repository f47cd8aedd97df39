"""Benchmark data: suites, statistics, results round trip, OpenSSL and CPU measurement."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from bench.backend import run_integrity
from bench.errors import ResultsError, SuiteError
from bench.measure import CpuMeter, count_nonzero_bytes, guest_throughput, openssl_points
from bench.policies import availability
from bench.report import render_report
from bench.results import (
    FORMAT_VERSION,
    BenchEnvironment,
    BenchResults,
    CpuUsage,
    GuestThroughput,
    LinkMeasurement,
    OpensslPoint,
    RunResult,
    RunStatus,
)
from bench.runner import PlannedRun, schedule
from bench.scenario import (
    BASELINE_SCENARIO,
    PEER_POLICIES,
    SUITES,
    Availability,
    Comparison,
    Omitted,
    Scenario,
    Suite,
    runnable,
    suite_named,
)
from bench.stats import distribution, percentile, representative, summarize
from lab.qemu import ConsoleLine
from migrate.control.intents import SetDowntimeLimit
from migrate.phase import Phase
from migrate.report import Decision, Integrity, MigrationReport, Sample, Status, Timeline

MIB = 1 << 20

# -- fakes shared with test_bench_runner -------------------------------------------------

NATIVE = Scenario("livemig-native")
PAGESTREAM = Scenario("livemig-pagestream", strategy="pagestream")
QEMU_DEFAULT = Scenario("qemu-default", policy="qemu-default")
PROXMOX = Scenario("proxmox", policy="proxmox")
RAW_QEMU = Scenario("raw-qemu-default", policy="qemu-default", runner="raw")
RAW_PROXMOX = Scenario("raw-proxmox", policy="proxmox", runner="raw")


def tiny_suite(repetitions: int = 2) -> Suite:
    return Suite(
        name="tiny",
        description="two comparisons for tests",
        comparisons=(
            Comparison("openssl", "openssl guest", (NATIVE, QEMU_DEFAULT, PROXMOX), repetitions),
            Comparison(
                "capped",
                "capped link",
                (
                    replace(NATIVE, bandwidth_mbit=400.0),
                    replace(QEMU_DEFAULT, bandwidth_mbit=400.0),
                ),
                1,
            ),
        ),
        budget_s=60.0,
    )


def environment() -> BenchEnvironment:
    return BenchEnvironment(
        cpu_count=2,
        memory_gib=24.0,
        host_kernel="6.1",
        qemu_version="QEMU emulator version 7.2",
        accelerator="tcg",
        cpu_model="qemu64",
        guest_kernel="6.1.0-cloud",
        python="3.11",
        load_before=(0.1, 0.2, 0.3),
    )


def completed_run(
    comparison: str,
    scenario: Scenario,
    repetition: int = 0,
    index: int = 0,
    guest_downtime_ms: float = 50.0,
    total_time_ms: float = 800.0,
) -> RunResult:
    """A completed run with every measurement filled in."""
    samples = tuple(
        Sample(
            time=1000.0 + i / 10,
            elapsed_ms=i * 100.0,
            status="active",
            ram_total_bytes=256 * MIB,
            ram_remaining_bytes=(200 - 60 * i) * MIB,
            ram_transferred_bytes=60 * i * MIB,
            dirty_pages_rate=1000 * i,
            dirty_sync_count=i + 1,
        )
        for i in range(4)
    )
    points = (
        OpensslPoint(-1500.0, 90000.0, "source"),
        OpensslPoint(-400.0, 88000.0, "source"),
        OpensslPoint(400.0, 80000.0, "source"),
        OpensslPoint(1500.0, 85000.0, "target"),
    )
    return RunResult(
        config=f"{comparison}/{scenario.name}",
        comparison=comparison,
        scenario=scenario,
        repetition=repetition,
        index=index,
        status=RunStatus.COMPLETED,
        started_at=1000.0,
        wall_s=9.5,
        guest_downtime_ms=guest_downtime_ms,
        probe_sent=900,
        probe_lost=40,
        downtime_ms=3.0,
        total_time_ms=total_time_ms,
        qemu_total_time_ms=total_time_ms - 10,
        stop_to_resume_ms=20.0,
        transferred_bytes=110 * MIB,
        wire_bytes=111 * MIB,
        ram_bytes=256 * MIB,
        nonzero_ram_bytes=100 * MIB,
        precopy_rounds=4,
        integrity="ok",
        repaired_pages=31 if scenario.strategy == "native" else 0,
        guest_check="ok: openssl running on target",
        throughput=GuestThroughput(89000.0, 80000.0, 85000.0, points),
        cpu=CpuUsage(window_s=1.0, source_s=0.9, target_s=0.1, engine_s=0.5),
        timeline=Timeline(
            started_at=1000.0, source_stop_ms=350.0, target_resume_ms=370.0, ended_ms=380.0
        ),
        samples=samples,
        decisions=(Decision(1000.0, "start", (SetDowntimeLimit(1),)),),
    )


def bench_results(runs: tuple[RunResult, ...], suite: Suite | None = None) -> BenchResults:
    return BenchResults(
        format_version=FORMAT_VERSION,
        suite=suite or tiny_suite(),
        command="livemig bench run --suite tiny --out x",
        started_at=1000.0,
        environment=environment(),
        links=(
            LinkMeasurement(None, 2e9, 1.5),
            LinkMeasurement(400.0, 48e6, 1.5),
        ),
        omitted=(Omitted("openssl/livemig-pagestream", "strategy 'pagestream' is not registered"),),
        runs=runs,
        finished_at=1600.0,
    )


# -- statistics ----------------------------------------------------------------------


def test_percentile_interpolates_linearly() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_ignores_missing_values() -> None:
    d = distribution([40.0, None, 60.0, 50.0, 100.0])
    assert d is not None
    assert (d.count, d.median, d.minimum, d.maximum) == (4, 55.0, 40.0, 100.0)
    assert d.p90 == pytest.approx(88.0)
    assert distribution([None, None]) is None
    assert distribution([]) is None


def test_summary_ratios_to_baseline_and_best_peer_and_floor() -> None:
    runs = []
    index = 0
    for rep, (native, qemu, proxmox) in enumerate([(40, 100, 80), (50, 120, 60), (60, 110, 70)]):
        for scenario, downtime in ((NATIVE, native), (QEMU_DEFAULT, qemu), (PROXMOX, proxmox)):
            runs.append(completed_run("openssl", scenario, rep, index, float(downtime)))
            index += 1
    failed = replace(
        completed_run("openssl", NATIVE, 3, index, 1.0),
        status=RunStatus.FAILED,
        integrity="unchecked",
        error="boom",
    )
    results = bench_results((*runs, failed))
    summaries = summarize(results)
    assert [s.comparison.name for s in summaries] == ["openssl", "capped"]
    openssl = summaries[0]
    assert openssl.baseline == "openssl/qemu-default"
    assert openssl.best_peer == "openssl/proxmox"  # median 70 < qemu-default's 110
    native = next(c for c in openssl.configs if c.config == "openssl/livemig-native")
    # The failed run counts as a run, not in the distributions.
    assert (native.runs, native.completed, native.integrity_ok) == (4, 3, 3)
    assert native.guest_downtime_ms is not None and native.guest_downtime_ms.median == 50.0
    ratios = openssl.ratios["openssl/livemig-native"]
    assert ratios.guest_downtime_vs_baseline == pytest.approx(50 / 110)
    assert ratios.guest_downtime_vs_best_peer == pytest.approx(50 / 70)
    assert ratios.total_time_vs_baseline == pytest.approx(1.0)
    # Physical limit: 100 MiB of non-zero RAM over a 2 GB/s link.
    assert native.floor_total_ms == pytest.approx(100 * MIB / 2e9 * 1e3)
    assert native.total_over_floor is not None
    assert native.total_over_floor.median == pytest.approx(800 / native.floor_total_ms)
    assert native.repaired_pages == 4 * 31 and native.runs_repaired == 4
    assert native.source_cpu_pct is not None and native.source_cpu_pct.median == pytest.approx(90)
    # A comparison without runs summarises to empty distributions, not errors.
    capped = summaries[1]
    assert all(c.runs == 0 and c.guest_downtime_ms is None for c in capped.configs)
    assert capped.baseline is None and capped.best_peer is None


def test_link_limit_is_the_cap_or_the_measurement() -> None:
    assert LinkMeasurement(None, 2e9, 1.0).limit_bytes_per_s == 2e9
    assert LinkMeasurement(400.0, 48e6, 1.0).limit_bytes_per_s == 48e6
    assert LinkMeasurement(400.0, 60e6, 1.0).limit_bytes_per_s == 50e6


def test_representative_is_the_median_run() -> None:
    runs = [completed_run("c", NATIVE, i, i, d) for i, d in enumerate([90.0, 30.0, 60.0, 40.0])]
    chosen = representative(runs)
    assert chosen is not None and chosen.guest_downtime_ms == 40.0
    failed = replace(runs[0], status=RunStatus.ERROR, guest_downtime_ms=None)
    assert representative([failed]) is failed
    assert representative([]) is None


# -- results round trip ---------------------------------------------------------------


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    failed = RunResult(
        config="capped/qemu-default",
        comparison="capped",
        scenario=replace(QEMU_DEFAULT, bandwidth_mbit=400.0),
        repetition=0,
        index=4,
        status=RunStatus.TIMEOUT,
        started_at=1200.0,
        wall_s=120.0,
        error="run exceeded 120 s and was ended",
    )
    results = bench_results((completed_run("openssl", NATIVE), failed))
    path = results.save(tmp_path)
    assert path == tmp_path / "results.json"
    assert BenchResults.load(tmp_path) == results
    assert BenchResults.load(path) == results
    entries = json.loads(path.read_text())["runs"]
    for key in ("config", "repetition", "status", "guest_downtime_ms", "downtime_ms",
                "total_time_ms", "transferred_bytes", "integrity"):  # fmt: skip
        assert all(key in entry for entry in entries), key
    assert entries[0]["status"] == "completed" and entries[1]["status"] == "timeout"
    assert entries[0]["scenario"]["policy"] == "livemig"


def test_loading_bad_results_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="cannot read"):
        BenchResults.load(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not JSON"):
        BenchResults.load(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ResultsError, match="format 99"):
        BenchResults.load(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(ResultsError, match="missing field") as info:
        BenchResults.load(tmp_path)
    assert info.value.path == tmp_path / "results.json"


# -- suites ----------------------------------------------------------------------------


def test_declared_suites_are_valid_and_fit_their_budgets() -> None:
    for suite in SUITES.values():
        suite.validate()
        # One run takes ~9-11 s here: 12 s a run must fit the budget.
        assert suite.run_count * 12 <= suite.budget_s, suite.name
    smoke = suite_named("smoke")
    (comparison,) = smoke.comparisons
    assert comparison.repetitions == 1
    assert {s.label for s in comparison.scenarios} == {
        "livemig native", "livemig pagestream", "raw:qemu-default"
    }  # fmt: skip
    assert all(s.workload == "openssl" for s in comparison.scenarios)
    assert comparison.baseline == BASELINE_SCENARIO == "raw-qemu-default"
    default = suite_named("default")
    *qemu_comparisons, libvirt = default.comparisons
    for comparison in qemu_comparisons:
        policies = {s.policy for s in comparison.scenarios}
        assert policies == {"livemig", "qemu-default", "proxmox", "nova", "ovirt-minimal-downtime"}
        assert {s.strategy for s in comparison.scenarios} == {"native", "pagestream"}
        # Every peer twice: emulated in livemig's engine, and raw as its users get it.
        raw = {s.policy for s in comparison.scenarios if s.is_raw}
        emulated = {s.policy for s in comparison.scenarios if s.is_peer and not s.is_raw}
        assert raw == emulated == set(PEER_POLICIES)
        assert comparison.baseline == BASELINE_SCENARIO
        assert "raw:proxmox" in {s.label for s in comparison.scenarios}
        assert "proxmox (emulated)" in {s.label for s in comparison.scenarios}
    # libvirt's job three ways: steered by livemig, at libvirt's defaults, Nova's driver.
    assert [s.label for s in libvirt.scenarios] == [
        "livemig libvirt", "libvirt-default", "libvirt:nova"
    ]  # fmt: skip
    assert all(s.is_libvirt and s.strategy == "libvirt" for s in libvirt.scenarios)
    assert [s.as_users_run_it for s in libvirt.scenarios] == [False, True, True]
    assert libvirt.baseline == "libvirt-default"
    for name in ("libvirt", "libvirt-ci"):
        (comparison,) = suite_named(name).comparisons
        assert {s.name for s in comparison.scenarios} == {s.name for s in libvirt.scenarios}
    assert any("dirty:" in s.workload for c in default.comparisons for s in c.scenarios)
    assert default.bandwidths() == (None, 400.0)
    # The raw peers run in the same interleaved order as livemig's configurations.
    first_round = [p.scenario.label for p in schedule(default)[:10]]
    assert first_round[0] == "livemig native" and first_round[-1] == "raw:ovirt-minimal-downtime"
    ci = suite_named("ci")
    (comparison,) = ci.comparisons
    assert [s.label for s in comparison.scenarios] == [
        "livemig native", "raw:qemu-default", "raw:proxmox"
    ]  # fmt: skip
    assert all(s.memory_mib == 128 for s in comparison.scenarios)
    assert ci.run_count == 3 and ci.budget_s <= 60
    with pytest.raises(SuiteError, match="unknown suite") as info:
        suite_named("huge")
    assert "default" in info.value.known


def test_raw_scenarios_are_peers_with_qemus_stream() -> None:
    assert RAW_PROXMOX.is_raw and RAW_PROXMOX.is_peer and not PROXMOX.is_raw
    assert RAW_PROXMOX.label == "raw:proxmox" and NATIVE.label == "livemig native"
    RAW_PROXMOX.validate()
    for bad, why in (
        (replace(RAW_PROXMOX, policy="livemig"), "peer preset"),
        (replace(RAW_PROXMOX, strategy="pagestream"), "strategy native"),
        (replace(RAW_PROXMOX, runner="ssh"), "unknown runner"),
        (replace(NATIVE, runner="libvirt"), "a libvirt run is strategy libvirt"),
        (replace(NATIVE, runner="libvirt", strategy="libvirt", policy="proxmox"), "a libvirt run"),
        (replace(NATIVE, strategy="libvirt"), "needs runner libvirt"),
    ):
        with pytest.raises(SuiteError, match=why):
            bad.validate()


def test_invalid_suites_are_refused() -> None:
    duplicate = Suite("x", "d", (Comparison("c", "d", (NATIVE, NATIVE), 1),), 10.0)
    with pytest.raises(SuiteError, match="unique"):
        duplicate.validate()
    bad_workload = Suite("x", "d", (Comparison("c", "d", (replace(NATIVE, workload="x"),), 1),), 1)
    with pytest.raises(SuiteError, match="unknown workload"):
        bad_workload.validate()
    with pytest.raises(SuiteError, match="repetitions"):
        Suite("x", "d", (Comparison("c", "d", (NATIVE,), 0),), 1).validate()


def test_runnable_leaves_out_what_this_build_lacks() -> None:
    available = Availability(frozenset({"native"}), frozenset({"livemig", "qemu-default"}))
    suite, omitted = runnable(tiny_suite(), available)
    assert [s.name for s in suite.comparisons[0].scenarios] == ["livemig-native", "qemu-default"]
    assert omitted == (Omitted("openssl/proxmox", "policy preset 'proxmox' is not available"),)
    nothing = Availability(frozenset(), frozenset())
    with pytest.raises(SuiteError, match="nothing can run"):
        runnable(tiny_suite(), nothing)
    assert PAGESTREAM.label == "livemig pagestream" and PROXMOX.label == "proxmox (emulated)"
    # Raw peers need their driver, not the engine's strategies.
    raw_suite = Suite("r", "d", (Comparison("c", "d", (NATIVE, RAW_PROXMOX, RAW_QEMU), 1),), 60)
    suite, omitted = runnable(raw_suite, available)
    assert [s.name for s in suite.comparisons[0].scenarios] == ["livemig-native"]
    assert omitted[0] == Omitted("c/raw-proxmox", "raw peer 'proxmox' is not available")
    with_raw = replace(available, raw_peers=frozenset({"proxmox"}))
    suite, omitted = runnable(raw_suite, with_raw)
    assert [s.name for s in suite.comparisons[0].scenarios] == ["livemig-native", "raw-proxmox"]
    assert availability().raw_peers == frozenset(PEER_POLICIES)
    # libvirt runs need the daemon and libvirt-python, and say so when missing.
    libvirt_suite = suite_named("libvirt-ci")
    suite, omitted = runnable(
        Suite(
            "l",
            "d",
            (Comparison("c", "d", (NATIVE, *libvirt_suite.comparisons[0].scenarios), 1),),
            60,
        ),
        replace(available, libvirt_missing="missing libvirtd"),
    )
    assert [s.name for s in suite.comparisons[0].scenarios] == ["livemig-native"]
    assert [o.reason for o in omitted] == ["libvirt: missing libvirtd"] * 3
    suite, omitted = runnable(libvirt_suite, replace(available, libvirt_missing=None))
    assert omitted == ()


# -- measurements ----------------------------------------------------------------------


def _line(t: float, text: str) -> ConsoleLine:
    return ConsoleLine(timestamp=t, text=text)


def test_openssl_throughput_before_during_after() -> None:
    origin = 1000.0
    source = openssl_points(
        [
            _line(997.0, "OPENSSL sha256 bytes=16384 kbps=70000.00"),  # before the warm-up
            _line(998.5, "OPENSSL sha256 bytes=16384 kbps=90000.00"),
            _line(999.5, "OPENSSL sha256 bytes=16384 kbps=88000.00"),
            _line(999.6, "MEMDIRTY pass=3 pages=8192 bad=0"),
            _line(1000.5, "OPENSSL sha256 bytes=16384 kbps=80000"),
        ],
        "source",
        origin,
    )
    target = openssl_points(
        [_line(1001.9, "OPENSSL sha256 bytes=16384 kbps=84000"),
         _line(1003.0, "OPENSSL sha256 bytes=16384 kbps=86000")],
        "target",
        origin,
    )  # fmt: skip
    assert [p.t_ms for p in source] == pytest.approx([-3000.0, -1500.0, -500.0, 500.0])
    got = guest_throughput(source, target, resume_ms=900.0, warmup_ms=2000.0)
    assert got.before_kbps == pytest.approx(89000.0)
    assert got.during_kbps == pytest.approx(80000.0)
    assert got.after_kbps == pytest.approx(85000.0)
    assert [p.side for p in got.points] == ["source"] * 4 + ["target"] * 2
    # A run that never resumed on the target has no "after".
    failed = guest_throughput(source, (), resume_ms=None, warmup_ms=2000.0)
    assert failed.after_kbps is None and failed.during_kbps == pytest.approx(80000.0)


def test_count_nonzero_bytes(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    pages = 8192 + 64  # the scan works in 8192-page chunks: cross a border
    with ram.open("wb") as f:
        f.truncate(pages * 4096)
        for page in (0, 5, 8191, 8192, pages - 1):
            f.seek(page * 4096 + 4095)
            f.write(b"\x01")
    assert count_nonzero_bytes(ram) == 5 * 4096


def test_cpu_meter_reads_this_process_and_survives_an_exited_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    meter = CpuMeter({"source": child.pid, "target": None})
    meter.start()
    sum(i * i for i in range(200_000))  # some CPU for the engine (this process)
    meter.read()
    meter.finish()
    usage = meter.usage()
    assert usage is not None and usage.window_s > 0
    assert usage.engine_s is not None and usage.engine_s >= 0
    assert usage.source_s is None and usage.target_s is None
    assert usage.percent(usage.window_s) == pytest.approx(100.0)
    assert CpuMeter({"source": os.getpid()}).usage() is None  # never started


_BURN = "import sys\nx = 0\nfor i in range(3_000_000): x += i\nprint('done', flush=True)\nsys.stdin.read()"


def test_cpu_meter_counts_helpers_as_engine_but_not_the_probe_or_the_qemus() -> None:
    qemu = subprocess.Popen(
        [sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    meter = CpuMeter({"source": qemu.pid})
    meter.start()
    helper = subprocess.Popen(
        [sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    probe = subprocess.Popen(
        [sys.executable, "-c", _BURN, "lab.probe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    children = (qemu, helper, probe)
    try:
        for proc in children:
            assert proc.stdout is not None and proc.stdout.readline() == b"done\n"
        meter.read()
        spent = {p.pid: sum(psutil.Process(p.pid).cpu_times()[:2]) for p in children}
    finally:
        for proc in children:
            proc.communicate(b"")
    meter.finish()  # the helper has exited: its last reading stands
    usage = meter.usage()
    assert usage is not None and usage.engine_s is not None and usage.source_s is not None
    # The helper started inside the window: all of its CPU time is the engine's.
    assert usage.engine_s >= spent[helper.pid] * 0.99
    # The probe burnt as much again and is not in it; the "QEMU" is the source's.
    assert usage.engine_s < spent[helper.pid] + spent[probe.pid] * 0.5
    assert usage.source_s <= spent[qemu.pid]


# -- raw peers beside the emulated presets ----------------------------------------------


def _raw_suite() -> Suite:
    return Suite(
        name="raw",
        description="livemig against raw and emulated peers",
        comparisons=(
            Comparison(
                "openssl",
                "openssl guest",
                (NATIVE, QEMU_DEFAULT, PROXMOX, RAW_QEMU, RAW_PROXMOX),
                3,
                baseline=BASELINE_SCENARIO,
            ),
        ),
        budget_s=200.0,
    )


def _raw_results() -> BenchResults:
    downtimes = {
        NATIVE: 50.0,
        QEMU_DEFAULT: 70.0,
        PROXMOX: 40.0,
        RAW_QEMU: 60.0,
        RAW_PROXMOX: 900.0,
    }
    runs = []
    for rep in range(3):
        for scenario, downtime in downtimes.items():
            run = completed_run("openssl", scenario, rep, len(runs), downtime + rep)
            if scenario.is_raw:
                run = replace(run, integrity="unchecked", repaired_pages=0)
            runs.append(run)
    # One raw run lost pages: the guest noticed, the run counts as corrupted.
    runs[3] = replace(
        runs[3], integrity="corrupted", guest_check="failed: MEMDIRTY pass=4 pages=8192 bad=3"
    )
    return bench_results(tuple(runs), _raw_suite())


def test_ratios_are_to_plain_qemu_and_to_the_best_raw_peer() -> None:
    (summary,) = summarize(_raw_results())
    # The emulated proxmox preset (40 ms) is faster, but the best *raw* peer counts.
    assert summary.best_peer == "openssl/raw-qemu-default" and summary.best_peer_is_raw
    assert summary.baseline == "openssl/raw-qemu-default"
    ratios = summary.ratios["openssl/livemig-native"]
    assert ratios.guest_downtime_vs_best_peer == pytest.approx(51 / 61)
    assert ratios.guest_downtime_vs_baseline == pytest.approx(51 / 61)
    raw_qemu = next(c for c in summary.configs if c.config == "openssl/raw-qemu-default")
    assert (raw_qemu.integrity_ok, raw_qemu.guest_check_ok, raw_qemu.corrupted) == (0, 2, 1)
    native = next(c for c in summary.configs if c.config == "openssl/livemig-native")
    assert (native.integrity_ok, native.guest_check_ok, native.corrupted) == (3, 3, 0)


def test_without_raw_peers_the_best_emulated_preset_counts() -> None:
    # Results recorded before raw peers existed: baseline named by its policy.
    (summary, _capped) = summarize(
        bench_results(
            tuple(
                completed_run("openssl", s, 0, i, d)
                for i, (s, d) in enumerate(((NATIVE, 50.0), (QEMU_DEFAULT, 70.0), (PROXMOX, 40.0)))
            )
        )
    )
    assert summary.best_peer == "openssl/proxmox" and not summary.best_peer_is_raw
    assert summary.baseline == "openssl/qemu-default"


def test_report_names_raw_and_emulated_peers_and_lists_corrupted_runs() -> None:
    text = render_report(_raw_results())
    assert "`raw:qemu-default` (1 of its runs corrupted the guest) (x best peer: the raw peer" in (
        text
    )
    assert "| raw:proxmox | 3/3 |" in text and "| proxmox (emulated) | 3/3 |" in text
    assert "emulated in livemig's engine" in text
    row = next(line for line in text.splitlines() if line.startswith("| raw:qemu-default | 110"))
    assert "| 0 / 2 / 1 of 3 |" in row
    corrupted = text.split("## Runs that corrupted the guest")[1].split("##")[0]
    assert "`openssl/raw-qemu-default` #0: failed: MEMDIRTY pass=4 pages=8192 bad=3" in corrupted
    assert "livemig-native" not in corrupted


def test_results_from_before_raw_peers_still_load(tmp_path: Path) -> None:
    results = bench_results((completed_run("openssl", NATIVE),))
    data = results.to_dict()
    for comparison in data["suite"]["comparisons"]:
        for scenario in comparison["scenarios"]:
            del scenario["runner"]
    for run in data["runs"]:
        del run["scenario"]["runner"]
    assert BenchResults.from_dict(data) == results
    raw = bench_results((replace(completed_run("openssl", RAW_PROXMOX), integrity="corrupted"),))
    raw.save(tmp_path)
    loaded = BenchResults.load(tmp_path)
    assert loaded == raw and loaded.runs[0].scenario.is_raw


def _report(status: Status, guest_check: str | None, integrity: Integrity) -> MigrationReport:
    return MigrationReport(
        status=status,
        strategy="raw",
        mode="live",
        vm="demo",
        source="a",
        target="b",
        policy="raw:proxmox",
        phase=Phase.COMPLETED,
        total_time_ms=900.0,
        ram_bytes=128 * MIB,
        timeline=Timeline(started_at=1000.0, source_stop_ms=150.0, target_resume_ms=900.0),
        guest_downtime_ms=790.0,
        integrity=integrity,
        guest_check=guest_check,
    )


def test_a_failed_guest_check_makes_a_run_corrupted_whoever_migrated() -> None:
    ok, unchecked = Integrity.OK, Integrity.UNCHECKED
    assert run_integrity(_report(Status.COMPLETED, "ok: openssl running", unchecked)) == "unchecked"
    assert run_integrity(_report(Status.COMPLETED, "ok: memdirty verified", ok)) == "ok"
    failed = "failed: MEMDIRTY pass=3 pages=8192 bad=2"
    assert run_integrity(_report(Status.COMPLETED, failed, unchecked)) == "corrupted"
    assert run_integrity(_report(Status.COMPLETED, failed, ok)) == "corrupted"
    assert run_integrity(_report(Status.ABORTED, None, Integrity.FAILED)) == "failed"


def test_the_lab_backend_hands_raw_scenarios_to_the_raw_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.backend
    from lab.demo import DemoConfig, DemoEnvironment, DemoHooks, DemoResult
    from lab.raw import RawPeer

    env = DemoEnvironment("tcg", "probe", "qemu64", "6.1", "key", "openssl", None)
    calls: list[tuple[str, str]] = []

    async def fake_raw(
        config: DemoConfig, peer: RawPeer, events: object, hooks: DemoHooks
    ) -> DemoResult:
        calls.append(("raw", peer.name))
        check = "failed: guest kernel: BUG: unable to handle page fault"
        return DemoResult(_report(Status.COMPLETED, check, Integrity.UNCHECKED), env)

    async def fake_engine(config: DemoConfig, events: object, hooks: DemoHooks) -> DemoResult:
        calls.append(("engine", config.policy.name))
        return DemoResult(_report(Status.COMPLETED, "ok: openssl", Integrity.OK), env)

    monkeypatch.setattr(bench.backend, "run_raw_demo", fake_raw)
    monkeypatch.setattr(bench.backend, "run_demo", fake_engine)
    backend = bench.backend.LabBackend()
    raw = asyncio.run(backend.run(PlannedRun(0, "c", RAW_PROXMOX, 0), tmp_path))
    emulated = asyncio.run(backend.run(PlannedRun(1, "c", PROXMOX, 0), tmp_path))
    assert calls == [("raw", "raw:proxmox"), ("engine", "proxmox")]
    assert raw.integrity == "corrupted" and raw.scenario is RAW_PROXMOX
    assert raw.guest_downtime_ms == 790.0 and raw.stop_to_resume_ms == 750.0
    assert emulated.integrity == "ok"
