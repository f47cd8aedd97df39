"""``livemig plan --libvirt``: a libvirt domain's move judged and forecast before it starts.

Everything comes from the two hosts' libvirt daemons: the domain's XML, type and
memory (the source), the libvirt preflight (:mod:`migrate.libvirt.preflight`: CPU
against the target's hypervisor with ``compareHypervisorCPU``, disks shared or
local, blocking devices, the target's free memory, versions), and the guest's dirty
rate measured by QEMU through libvirt (``virDomainStartDirtyRateCalc`` in
page-sampling mode, read back from the ``dirtyrate`` domain statistics; the
dirty-bitmap mode is never asked for: it kills QEMU 7.2 under TCG). The forecast
is :func:`migrate.plan.forecast` on those figures, as for a QEMU VM; when QEMU
cannot measure the rate, the plan has the preflight, no forecast, and says why.
Nothing changes on either host.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from migrate.codec import to_dict
from migrate.errors import ConfigError
from migrate.libvirt.conn import (
    LibvirtError,
    close_quietly,
    open_connection,
    require_libvirt,
    translate,
)
from migrate.libvirt.preflight import DomainFacts, domain_facts, run_preflight
from migrate.plan import BandwidthHint, Measurement, forecast
from migrate.policy import Policy
from migrate.report import Predicted, PreflightCheck, Verdict

MIB = 1 << 20
#: How much longer than its window a dirty-rate measurement may take to report.
DIRTY_RATE_GRACE_S = 10.0


@dataclass(frozen=True)
class LibvirtPlan:
    """What ``plan --libvirt`` found: the preflight and (a running domain) the forecast."""

    domain: str
    source: str
    target: str
    active: bool
    memory_bytes: int
    preflight: tuple[PreflightCheck, ...]
    predicted: Predicted | None
    #: Why there is no forecast for a running domain (the dirty rate was not measured).
    not_measured: str | None = None

    @property
    def refused(self) -> tuple[PreflightCheck, ...]:
        return tuple(c for c in self.preflight if c.verdict is Verdict.REFUSED)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape: the forecast's fields (as ``livemig plan --json``) flattened
        in, plus domain, hosts, mode and preflight."""
        data: dict[str, Any] = to_dict(self.predicted) if self.predicted is not None else {}
        data.update(
            domain=self.domain,
            source=self.source,
            target=self.target,
            mode="live" if self.active else "offline",
            memory_bytes=self.memory_bytes,
            preflight=[to_dict(c) for c in self.preflight],
            refused=bool(self.refused),
            not_measured=self.not_measured,
        )
        return data


def dirty_rate_from_stats(stats: Mapping[str, Any]) -> float | None:
    """Bytes/s from a domain's ``dirtyrate.*`` statistics once measured, else None."""
    lv = require_libvirt()
    if stats.get("dirtyrate.calc_status") != lv.VIR_DOMAIN_DIRTYRATE_MEASURED:
        return None
    rate = stats.get("dirtyrate.megabytes_per_second")
    return float(rate) * MIB if isinstance(rate, int | float) else None


def measure_dirty_rate(conn: Any, domain: Any, seconds: int) -> tuple[float, str]:
    """QEMU's page-sampling dirty rate of ``domain`` through libvirt: (bytes/s, how).

    Blocks for about ``seconds``. Raises :class:`LibvirtError` when libvirt refuses
    or no figure comes within ``seconds`` + :data:`DIRTY_RATE_GRACE_S`.
    """
    lv = require_libvirt()
    try:
        domain.startDirtyRateCalc(seconds, lv.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING)
    except lv.libvirtError as exc:
        raise translate(exc, "startDirtyRateCalc") from exc
    deadline = time.monotonic() + seconds + DIRTY_RATE_GRACE_S
    time.sleep(seconds)
    while True:
        try:
            ((_, stats),) = conn.domainListGetStats([domain], lv.VIR_DOMAIN_STATS_DIRTYRATE)
        except lv.libvirtError as exc:
            raise translate(exc, "domainListGetStats(dirtyrate)") from exc
        rate = dirty_rate_from_stats(stats)
        if rate is not None:
            return rate, f"QEMU calc-dirty-rate through libvirt (page-sampling, {seconds} s)"
        if time.monotonic() > deadline:
            raise LibvirtError(
                f"no dirty rate within {seconds + DIRTY_RATE_GRACE_S:.0f} s "
                f"(calc_status {stats.get('dirtyrate.calc_status')})",
                "dirtyrate",
            )
        time.sleep(0.1)


def plan_domain(
    source: Any,
    target: Any,
    name: str,
    policy: Policy,
    bandwidth: BandwidthHint,
    calc_time_s: int = 1,
    hosts: tuple[str, str] = ("source", "target"),
) -> LibvirtPlan:
    """Judge and forecast moving domain ``name`` from connection ``source`` to
    ``target`` (blocking libvirt calls). Raises :class:`ConfigError` for an unknown
    domain and :class:`LibvirtError` when a daemon fails to answer."""
    lv = require_libvirt()
    try:
        domain = source.lookupByName(name)
    except lv.libvirtError as exc:
        if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            raise ConfigError(f"no domain {name!r} on the source") from exc
        raise translate(exc, "lookup the domain") from exc
    facts = domain_facts(domain)
    checks = run_preflight(facts, source, target).checks
    predicted, not_measured = None, None
    if facts.active:
        try:
            predicted = _forecast(source, domain, facts, policy, bandwidth, calc_time_s)
        except LibvirtError as exc:
            not_measured = f"no forecast: the dirty rate could not be measured ({exc})"
    return LibvirtPlan(
        domain=facts.name,
        source=hosts[0],
        target=hosts[1],
        active=facts.active,
        memory_bytes=facts.memory_bytes,
        preflight=checks,
        predicted=predicted,
        not_measured=not_measured,
    )


def _forecast(
    conn: Any, domain: Any, facts: DomainFacts, policy: Policy, bandwidth: BandwidthHint,
    calc_time_s: int,
) -> Predicted:  # fmt: skip
    started = time.monotonic()
    rate, method = measure_dirty_rate(conn, domain, calc_time_s)
    measurement = Measurement(
        ram_bytes=facts.memory_bytes,
        dirty_rate_bytes_per_s=rate,
        dirty_rate_method=method,
        sample=None,
        measure_time_ms=(time.monotonic() - started) * 1e3,
    )
    return forecast(measurement, bandwidth, policy)


def plan_libvirt(
    source_uri: str,
    domain: str,
    target_uri: str,
    policy: Policy,
    bandwidth: BandwidthHint,
    calc_time_s: int = 1,
) -> LibvirtPlan:
    """:func:`plan_domain` over fresh connections to both daemons (closed after)."""
    conns: list[Any] = []
    try:
        for uri in (source_uri, target_uri):
            conns.append(open_connection(uri))
        return plan_domain(
            conns[0], conns[1], domain, policy, bandwidth, calc_time_s, (source_uri, target_uri)
        )
    finally:
        for conn in conns:
            close_quietly(conn)
