"""Prediction before anything moves: measure the VM, forecast each way of migrating.

:func:`measure` asks the source QEMU for the dirty rate (``calc-dirty-rate`` in
``page-sampling`` mode, the one QEMU 7.2 supports under TCG: the ``dirty-bitmap``
mode kills the VM there) and, when the guest's RAM is in a file this process can
map, samples pages from it: the share of zero pages (sent as flags, not data), how
well the rest compresses with zstd and how fast, and how many bytes xbzrle would
send for the sampled pages that changed during the dirty-rate window.

:func:`forecast` runs :mod:`dirtytrack.model` on that measurement for a set of
settings (downtime limits, compression, throttle, post-copy), marks which of them
the policy allows, and recommends one: the allowed setting that converges with the
least downtime, then the least total time. :func:`plan_migration` does both.
:func:`measured_from` turns a finished report's samples into the same terms
(:class:`~migrate.report.Measured`), so a report can show predicted against
measured.

Bandwidth cannot be measured before the stream exists without owning both hosts;
it comes from a :class:`BandwidthHint` (the operator, the lab's link cap, the
policy's cap, or QEMU's default cap as a stated assumption) and the live
controller replaces it with what the first round shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from dirtytrack.errors import RamMappingError
from dirtytrack.model import (
    PrecopyScenario,
    Prediction,
    predict,
    predict_postcopy,
    required_throttle,
)
from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.control.base import (
    DEFAULT_DEVICE_STATE_BYTES,
    QEMU_DEFAULT_BANDWIDTH,
    UNLIMITED_BANDWIDTH,
)
from migrate.errors import QemuError
from migrate.policy import Policy
from migrate.qmp import QmpSession
from migrate.report import Forecast, Measured, MigrationReport, Predicted, Sample

MIB = 1 << 20
#: TCP/IPv4 payload per 1514-byte Ethernet frame at MTU 1500 (1448 bytes with
#: timestamps): what a link cap leaves for the migration stream.
TCP_PAYLOAD_SHARE = 1448 / 1514
#: Switchover work after QEMU's downtime: RAM verify (~8-13 ms per 128-256 MiB
#: here) and ``cont``.
DEFAULT_RESUME_OVERHEAD_MS = 15.0
#: calc-dirty-rate's largest sample (pages per GiB): 512 pages of a 128 MiB guest.
SAMPLE_PAGES_PER_GIB = 4096
#: QEMU's xbzrle encoding: a page goes plain once the encoding would not be shorter.
XBZRLE_HEADER = 3


@dataclass(frozen=True)
class BandwidthHint:
    """Where the forecast's bandwidth (payload bytes per second) comes from."""

    bytes_per_s: float
    source: str

    @classmethod
    def from_link_mbit(cls, mbit: float, source: str = "link cap") -> BandwidthHint:
        """A link of ``mbit`` Mbit/s, less TCP/IP headers."""
        return cls(mbit * 1e6 / 8 * TCP_PAYLOAD_SHARE, f"{source} {mbit:g} Mbit/s")

    @classmethod
    def for_policy(cls, policy: Policy, link_mbit: float | None = None) -> BandwidthHint:
        """The link cap if known, else the policy's bandwidth cap, else QEMU's default cap."""
        cap = policy.max_bandwidth_bytes_per_s
        capped = cap is not None and cap not in (0, UNLIMITED_BANDWIDTH)
        if link_mbit is not None:
            hint = cls.from_link_mbit(link_mbit)
            if capped and cap is not None and cap < hint.bytes_per_s:
                return cls(float(cap), f"policy cap {cap / MIB:g} MiB/s")
            return hint
        if capped and cap is not None:
            return cls(float(cap), f"policy cap {cap / MIB:g} MiB/s")
        return cls(
            float(QEMU_DEFAULT_BANDWIDTH),
            f"{ASSUMED}: QEMU's default max-bandwidth 128 MiB/s (link speed unknown)",
        )


@dataclass(frozen=True)
class RamSample:
    """What a sample of guest pages shows (ratios are raw / compressed bytes).

    ``zstd_changed_ratio`` is zstd's ratio on the sampled pages that changed during
    the dirty-rate window: the pages later rounds send again (a guest's hot pages
    may compress much worse than its RAM as a whole).
    """

    pages: int
    zero_fraction: float
    zstd_ratio: float
    zstd_bytes_per_s: float
    xbzrle_ratio: float | None
    changed_fraction: float | None
    zstd_changed_ratio: float | None = None


@dataclass(frozen=True)
class Measurement:
    """The VM before the start: RAM, dirty rate and (if mappable) its pages."""

    ram_bytes: int
    dirty_rate_bytes_per_s: float
    dirty_rate_method: str
    sample: RamSample | None
    measure_time_ms: float
    #: Bytes the guest keeps rewriting (None: no bound seen in the sample).
    working_set_bytes: int | None = None

    @property
    def nonzero_ram_bytes(self) -> int | None:
        if self.sample is None:
            return None
        return int(self.ram_bytes * (1.0 - self.sample.zero_fraction))


async def measure_dirty_rate(
    source: QmpSession, ram_bytes: int, calc_time_s: int = 1, timeout_s: float = 10.0
) -> tuple[float, str]:
    """Dirty rate in bytes/s from ``calc-dirty-rate`` page-sampling, and how it was got.

    Never uses ``dirty-bitmap`` mode (it segfaults QEMU 7.2 under TCG). Raises
    :class:`QemuError` if QEMU refuses or does not finish within ``timeout_s``.
    """
    await source.execute(
        "calc-dirty-rate",
        {"calc-time": calc_time_s, "sample-pages": SAMPLE_PAGES_PER_GIB, "mode": "page-sampling"},
    )
    deadline = time.monotonic() + calc_time_s + timeout_s
    while True:
        result = await source.execute("query-dirty-rate")
        if result.get("status") == "measured":
            break
        if time.monotonic() > deadline:
            raise QemuError("calc-dirty-rate did not finish", command="query-dirty-rate")
        await asyncio.sleep(0.05)
    method = (
        f"calc-dirty-rate page-sampling over {calc_time_s} s "
        f"({qemu_sample_pages(ram_bytes)} pages sampled)"
    )
    return float(result.get("dirty-rate", 0)) * MIB, method


def _pick_pages(page_count: int, count: int, seed: int) -> npt.NDArray[np.intp]:
    rng = np.random.default_rng(seed)
    count = min(count, page_count)
    return np.sort(rng.choice(page_count, size=count, replace=False)).astype(np.intp)


def read_pages(ram: RamMapping, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """A copy of the chosen pages (rows of 512 words)."""
    return np.array(ram.pages()[pages])


def xbzrle_size(old: npt.NDArray[np.uint64], new: npt.NDArray[np.uint64]) -> int:
    """Bytes QEMU's xbzrle would send for ``new`` encoded against ``old`` (one page).

    The encoding alternates unchanged-run and changed-run lengths (ULEB128) with the
    changed bytes; this counts runs of differing bytes, a close upper bound.
    Returns a page's size plus header when the encoding would not be shorter.
    """
    diff = old.view(np.uint8) != new.view(np.uint8)
    changed = int(diff.sum())
    if changed == 0:
        return 0
    # Run boundaries; every run's length is a ULEB128 (1 byte below 128, else 2).
    bounds = np.flatnonzero(np.diff(diff.astype(np.int8))) + 1
    lengths = np.diff(np.concatenate(([0], bounds, [len(diff)])))
    size = changed + int(np.where(lengths < 128, 1, 2).sum())
    return size if size < PAGE_SIZE else PAGE_SIZE + XBZRLE_HEADER


def read_sample(path: Path, pages: int = 2048, seed: int = 1) -> npt.NDArray[np.uint64]:
    """A copy of ``pages`` pages of a RAM file, the same pages for the same arguments.

    Blocking: call it in a thread. Raises :class:`RamMappingError`.
    """
    with RamMapping(path) as ram:
        return read_pages(ram, _pick_pages(ram.page_count, pages, seed))


def sample_from(
    copy: npt.NDArray[np.uint64], before: npt.NDArray[np.uint64] | None = None
) -> RamSample:
    """What the sampled pages ``copy`` show (``before``: an earlier copy of them).

    With ``before`` the xbzrle ratio of the changed pages is estimated too.
    """
    nonzero = copy[np.any(copy != 0, axis=1)]
    zero_fraction = 1.0 - len(nonzero) / max(1, len(copy))
    raw = nonzero.tobytes()
    start = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=1).compress(raw) if raw else b""
    spent = time.perf_counter() - start
    zstd_ratio = len(raw) / len(packed) if packed else 1.0
    speed = len(raw) / spent if raw and spent > 0 else 0.0
    xbzrle_ratio = changed_fraction = changed_ratio = None
    if before is not None and before.shape == copy.shape:
        changed = np.flatnonzero(np.any(before != copy, axis=1))
        changed_fraction = len(changed) / max(1, len(copy))
        if len(changed):
            encoded = sum(xbzrle_size(before[i], copy[i]) for i in changed)
            xbzrle_ratio = len(changed) * PAGE_SIZE / max(1, encoded)
            hot = copy[changed].tobytes()
            changed_ratio = max(
                1.0, len(hot) / len(zstandard.ZstdCompressor(level=1).compress(hot))
            )
    return RamSample(
        pages=len(copy),
        zero_fraction=zero_fraction,
        zstd_ratio=max(1.0, zstd_ratio),
        zstd_bytes_per_s=speed,
        xbzrle_ratio=xbzrle_ratio,
        changed_fraction=changed_fraction,
        zstd_changed_ratio=changed_ratio,
    )


async def measure(
    source: QmpSession, ram_path: Path | None, calc_time_s: int = 1,
    sample_pages: int | None = None,
) -> Measurement:  # fmt: skip
    """Measure the running source VM (takes ``calc_time_s`` seconds).

    QEMU's ``calc-dirty-rate`` runs for ``calc_time_s``. When ``ram_path`` is
    mappable, a sample of its pages (``sample_pages``, by default at least as many
    as QEMU samples) is read at the start, the middle and the end of that window:
    zero pages and compression come from it, xbzrle is judged on the pages that
    changed, and the dirty rate and writable working set come from the two halves
    (:func:`dirty_rate_and_working_set`) instead of QEMU's rounded figure. Raises
    :class:`QemuError` if the dirty-rate measurement fails.
    """
    started = time.monotonic()
    size = await source.execute("query-memory-size-summary")
    ram_bytes = int(size["base-memory"])
    pages = sample_pages or max(2048, qemu_sample_pages(ram_bytes))
    copies: list[tuple[float, npt.NDArray[np.uint64]]] = []

    async def read() -> None:
        # A copy of the sample; once the file fails, no sample at all.
        nonlocal ram_path
        if ram_path is None:
            return
        try:
            copy = await asyncio.to_thread(read_sample, ram_path, pages)
        except RamMappingError:
            ram_path = None
            copies.clear()
            return
        copies.append((time.monotonic(), copy))

    await read()
    status = await source.status()
    working_set = None
    if status == "running":
        qemu = asyncio.create_task(measure_dirty_rate(source, ram_bytes, calc_time_s))
        if ram_path is not None:
            await asyncio.sleep(calc_time_s / 2)
            await read()
        rate, method = await qemu
    else:
        rate, method = 0.0, f"VM {status}: nothing dirties its memory"
    await read()
    sample = None
    if len(copies) >= 2:
        sample = await asyncio.to_thread(sample_from, copies[-1][1], copies[0][1])
    if len(copies) == 3:
        (t0, c0), (_, c1), (t2, c2) = copies
        own, working_set = dirty_rate_and_working_set(c0, c1, c2, t2 - t0, ram_bytes)
        method = (
            f"RAM sample ({pages} pages, two {(t2 - t0) / 2:.1f} s windows); "
            f"{method} said {rate / MIB:g} MiB/s"
        )
        rate = own
    return Measurement(
        ram_bytes=ram_bytes,
        dirty_rate_bytes_per_s=rate,
        dirty_rate_method=method,
        sample=sample,
        measure_time_ms=(time.monotonic() - started) * 1e3,
        working_set_bytes=working_set,
    )


def dirty_rate_and_working_set(
    first: npt.NDArray[np.uint64], middle: npt.NDArray[np.uint64], last: npt.NDArray[np.uint64],
    window_s: float, ram_bytes: int,
) -> tuple[float, int | None]:  # fmt: skip
    """Dirty rate (bytes/s) and writable working set (bytes) from three reads of a sample.

    ``first``, ``middle`` and ``last`` are the same sampled pages at the start, the
    middle and the end of ``window_s``. The rate is the pages changed per half-window
    (QEMU's page-sampling method without its rounding to whole MB/s, which reads a
    128 MiB guest's few dirty samples as 0, 1, 2 or 3 MiB/s). The working set is the
    capture-recapture (Chapman) estimate from the pages changed in both halves: a
    guest that rewrites the same hot pages dirties far fewer distinct pages in a
    10 s round than ten times its 1 s rate. ``None`` when no page changed in both
    halves (no sign of a bound).
    """
    a = np.any(first != middle, axis=1)
    b = np.any(middle != last, axis=1)
    n_a, n_b, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    page_bytes = ram_bytes / max(1, len(first))
    rate = (n_a + n_b) * page_bytes / window_s if window_s > 0 else 0.0
    if both == 0:
        return rate, None
    estimate = (n_a + 1) * (n_b + 1) / (both + 1) - 1
    pages = min(len(first), max(estimate, n_a, n_b))
    return rate, int(pages * page_bytes)


def qemu_sample_pages(ram_bytes: int) -> int:
    """How many pages ``calc-dirty-rate`` samples of ``ram_bytes`` of guest RAM."""
    return min(max(1, ram_bytes * SAMPLE_PAGES_PER_GIB // (1 << 30)), ram_bytes // PAGE_SIZE)


@dataclass(frozen=True)
class _Setting:
    name: str
    downtime_limit_ms: float
    compression: str = "none"
    throttle_pct: int = 0
    postcopy: bool = False


def _scenario(m: Measurement, bandwidth: BandwidthHint, setting: _Setting) -> PrecopyScenario:
    ratio, resend, throughput = 1.0, 1.0, None
    if setting.compression == "zstd" and m.sample is not None:
        ratio = m.sample.zstd_ratio
        throughput = m.sample.zstd_bytes_per_s or None
        if m.sample.zstd_changed_ratio is not None:
            resend = m.sample.zstd_changed_ratio / ratio
    elif setting.compression == "xbzrle" and m.sample is not None:
        resend = m.sample.xbzrle_ratio or 1.0
    rate = m.dirty_rate_bytes_per_s * (1 - setting.throttle_pct / 100)
    nonzero = m.nonzero_ram_bytes
    return PrecopyScenario(
        ram_bytes=m.ram_bytes,
        dirty_rate_bytes_per_s=rate,
        bandwidth_bytes_per_s=bandwidth.bytes_per_s,
        downtime_limit_s=setting.downtime_limit_ms / 1e3,
        # QEMU switches over when the RAM left fits the limit at its measured
        # bandwidth; device state and our RAM check come on top (see _as_forecast).
        nonzero_ram_bytes=nonzero,
        # Zero pages are rarely dirtied: the non-zero RAM caps a round's dirty set,
        # and a guest rewriting a hot set dirties no more than that set per round.
        working_set_bytes=_working_set(m),
        compression_ratio=ratio,
        resend_compression_ratio=resend,
        compression_throughput_bytes_per_s=throughput,
    )


def _working_set(m: Measurement) -> int | None:
    bounds = [b for b in (m.nonzero_ram_bytes, m.working_set_bytes) if b is not None]
    return min(bounds) if bounds else None


def _as_forecast(setting: _Setting, prediction: Prediction, fixed_ms: float,
                 device_state_bytes: int) -> Forecast:  # fmt: skip
    return Forecast(
        setting=setting.name,
        converges=prediction.converges,
        rounds=prediction.rounds,
        total_time_ms=prediction.total_time_s * 1e3 + fixed_ms,
        downtime_ms=prediction.downtime_s * 1e3 + fixed_ms,
        transferred_bytes=prediction.bytes_transferred + device_state_bytes,
        reason=prediction.reason,
        strategy="native",
        downtime_limit_ms=setting.downtime_limit_ms,
        compression=setting.compression,
        throttle_pct=setting.throttle_pct,
        postcopy=setting.postcopy,
    )


def _settings(m: Measurement, limits: Sequence[float]) -> list[_Setting]:
    methods = ["none"]
    if m.sample is not None:
        methods.append("zstd")
        if m.sample.xbzrle_ratio is not None:
            methods.append("xbzrle")
    label = {"none": "native", "zstd": "native + multifd zstd", "xbzrle": "native + xbzrle"}
    settings = [
        _Setting(f"{label[method]}, downtime-limit {limit:g} ms", limit, method)
        for method in methods
        for limit in limits
    ]
    top = max(limits)
    settings.append(_Setting(f"post-copy after the bulk round, {top:g} ms", top, postcopy=True))
    return settings


#: How :class:`BandwidthHint` marks a bandwidth nobody measured or configured.
ASSUMED = "assumed"


def bandwidth_known(predicted: Predicted) -> bool:
    """Whether the forecast's bandwidth is a known link or cap (not an assumption)."""
    return not predicted.bandwidth_source.startswith(ASSUMED)


def allowed(forecast: Forecast, policy: Policy) -> bool:
    """Whether ``policy`` lets a controller migrate as ``forecast`` assumes."""
    if forecast.downtime_limit_ms > policy.max_downtime_ms:
        return False
    if forecast.throttle_pct > policy.max_throttle_pct:
        return False
    if forecast.postcopy and not policy.postcopy_allowed:
        return False
    return forecast.compression == "none" or policy.compression_allowed


def forecast(
    m: Measurement,
    bandwidth: BandwidthHint,
    policy: Policy,
    device_state_bytes: int = DEFAULT_DEVICE_STATE_BYTES,
    resume_overhead_ms: float = DEFAULT_RESUME_OVERHEAD_MS,
) -> Predicted:
    """Forecast each setting for ``m`` at ``bandwidth``; recommend one ``policy`` allows."""
    start_ms = min(policy.downtime_limit_ms, policy.max_downtime_ms)
    limits = sorted({start_ms, min(policy.max_downtime_ms, 300.0), policy.max_downtime_ms})
    fixed_ms = device_state_bytes / bandwidth.bytes_per_s * 1e3 + resume_overhead_ms
    results: list[Forecast] = []
    for setting in _settings(m, limits):
        scenario = _scenario(m, bandwidth, setting)
        prediction = predict_postcopy(scenario) if setting.postcopy else predict(scenario)
        results.append(_as_forecast(setting, prediction, fixed_ms, device_state_bytes))
    # The throttle pre-copy would need at the policy's maximum downtime.
    needed = required_throttle(_scenario(m, bandwidth, _Setting("", policy.max_downtime_ms)))
    if needed is not None and 0 < needed < 0.995:
        pct = min(99, math.ceil(needed * 100))
        setting = _Setting(
            f"native + throttle {pct}%, {policy.max_downtime_ms:g} ms", policy.max_downtime_ms,
            throttle_pct=pct,
        )  # fmt: skip
        prediction = predict(_scenario(m, bandwidth, setting))
        results.append(_as_forecast(setting, prediction, fixed_ms, device_state_bytes))
    known = not bandwidth.source.startswith(ASSUMED)
    recommendation, why = _recommend(results, policy, known)
    return Predicted(
        ram_bytes=m.ram_bytes,
        dirty_rate_bytes_per_s=m.dirty_rate_bytes_per_s,
        dirty_rate_method=m.dirty_rate_method,
        bandwidth_bytes_per_s=bandwidth.bytes_per_s,
        bandwidth_source=bandwidth.source,
        device_state_bytes=device_state_bytes,
        resume_overhead_ms=resume_overhead_ms,
        forecasts=tuple(results),
        recommendation=recommendation,
        recommendation_reason=why,
        nonzero_ram_bytes=m.nonzero_ram_bytes,
        working_set_bytes=m.working_set_bytes,
        compression_ratios=_ratios(m),
        compression_speed_bytes_per_s=m.sample.zstd_bytes_per_s if m.sample else None,
        policy_forecast=policy_forecast(results, policy, known),
        measure_time_ms=m.measure_time_ms,
    )


def _ratios(m: Measurement) -> dict[str, float]:
    if m.sample is None:
        return {}
    ratios = {"zstd": m.sample.zstd_ratio}
    if m.sample.xbzrle_ratio is not None:
        ratios["xbzrle"] = m.sample.xbzrle_ratio
    return ratios


def _rank(f: Forecast) -> tuple[bool, float, float]:
    return (not f.converges, round(f.downtime_ms, 1), f.total_time_ms)


#: Downtimes this close count as equal when choosing: then the quicker one wins.
DOWNTIME_TOLERANCE_MS = 50.0


def _pick(forecasts: Sequence[Forecast]) -> Forecast:
    """The least downtime (within :data:`DOWNTIME_TOLERANCE_MS`), then the least time."""
    least = min(f.downtime_ms for f in forecasts)
    close = [f for f in forecasts if f.downtime_ms <= least + DOWNTIME_TOLERANCE_MS]
    return min(close, key=lambda f: (f.total_time_ms, f.downtime_ms))


def _candidates(results: Sequence[Forecast], policy: Policy, known: bool) -> list[Forecast]:
    # Compression trades CPU for link time: only a known, slower link makes that a
    # bet worth taking (on the uncapped lab link zstd was no faster: 0.73-1.4 s
    # against 0.72-0.77 s plain, 2 cores shared with the guest). And even there it
    # is a convergence aid, not a speed-up: its switchover cost is not in the model
    # and was large when measured (400 Mbit/s link, 128 MiB guest writing 16 MiB/s:
    # multifd zstd STOP->RESUME 143-191 ms against ~70 ms for plain streams), so a
    # plain setting that converges is preferred.
    permitted = [f for f in results if allowed(f, policy) and (known or f.compression == "none")]
    plain = [f for f in permitted if f.compression == "none" and f.converges]
    return plain or permitted


def _recommend(results: Sequence[Forecast], policy: Policy, known: bool = True) -> tuple[str, str]:
    permitted = _candidates(results, policy, known)
    converging = [f for f in permitted if f.converges]
    if converging:
        best = _pick(converging)
        return best.setting, (
            f"converges in {best.total_time_ms / 1e3:.1f} s with {best.downtime_ms:.0f} ms "
            f"downtime, within policy {policy.name}"
        )
    others = [f for f in results if f.converges and not allowed(f, policy)]
    hint = f"; {min(others, key=_rank).setting} would (not allowed by the policy)" if others else ""
    return "do not migrate now", (
        f"no setting policy {policy.name} allows converges within "
        f"{policy.max_downtime_ms:g} ms{hint}"
    )


def policy_forecast(
    results: Sequence[Forecast], policy: Policy, known: bool = True
) -> Forecast | None:
    """The forecast for how ``policy`` would run: its controller's best allowed setting
    (livemig), else its start settings (fixed schedules)."""
    if policy.controller == "livemig":
        permitted = _candidates(results, policy, known)
        converging = [f for f in permitted if f.converges]
        if converging:
            return _pick(converging)
        pool = [f for f in permitted if not f.postcopy and f.throttle_pct == 0]
        return min(pool, key=_rank) if pool else None
    start = min(policy.downtime_limit_ms, policy.max_downtime_ms)
    plain = [
        f for f in results if f.compression == "none" and not f.postcopy and not f.throttle_pct
    ]
    return min(plain, key=lambda f: abs(f.downtime_limit_ms - start)) if plain else None


async def plan_migration(
    source: QmpSession,
    policy: Policy,
    bandwidth: BandwidthHint,
    ram_path: Path | None = None,
    calc_time_s: int = 1,
) -> Predicted:
    """:func:`measure` then :func:`forecast`."""
    m = await measure(source, ram_path, calc_time_s)
    return forecast(m, bandwidth, policy)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_from(report: MigrationReport, predicted: Predicted | None) -> Measured:
    """The report's outcome in the prediction's terms (see :class:`Measured`)."""
    samples = [s for s in report.samples if s.status == "active"]
    rates = _payload_rates(samples)
    dirty = [s.dirty_rate_bytes_per_s for s in samples if s.dirty_sync_count >= 2]
    limits = [
        float(d.arguments["downtime-limit"])
        for d in report.decisions
        if d.command == "migrate-set-parameters" and "downtime-limit" in d.arguments
    ]
    throttles = [s.cpu_throttle_pct for s in report.samples]
    forecast_ = predicted.policy_forecast if predicted is not None else None
    total_error = downtime_error = None
    if forecast_ is not None and forecast_.total_time_ms > 0:
        total_error = (report.total_time_ms - forecast_.total_time_ms) / forecast_.total_time_ms
        total_error *= 100
    if forecast_ is not None and report.downtime_ms is not None and forecast_.downtime_ms > 0:
        downtime_error = (report.downtime_ms - forecast_.downtime_ms) / forecast_.downtime_ms * 100
    return Measured(
        rounds=report.precopy_rounds,
        total_time_ms=report.total_time_ms,
        bandwidth_bytes_per_s=_median(rates),
        dirty_rate_bytes_per_s=_median(dirty),
        downtime_ms=report.downtime_ms,
        final_downtime_limit_ms=limits[-1] if limits else None,
        max_throttle_pct=max(throttles, default=0),
        postcopy=any(s.status.startswith("postcopy") for s in report.samples),
        total_time_error_pct=total_error,
        downtime_error_pct=downtime_error,
    )


def _payload_rates(samples: Sequence[Sample]) -> list[float]:
    rates = []
    for a, b in itertools.pairwise(samples):
        span = (b.elapsed_ms - a.elapsed_ms) / 1e3
        sent = b.ram_transferred_bytes - a.ram_transferred_bytes
        if span >= 0.05 and sent > 0:
            rates.append(sent / span)
    return rates


def with_policy(predicted: Predicted, policy: Policy) -> Predicted:
    """The same forecasts judged for another policy (recommendation, policy forecast)."""
    known = bandwidth_known(predicted)
    recommendation, why = _recommend(predicted.forecasts, policy, known)
    return dataclasses.replace(
        predicted,
        recommendation=recommendation,
        recommendation_reason=why,
        policy_forecast=policy_forecast(predicted.forecasts, policy, known),
    )
