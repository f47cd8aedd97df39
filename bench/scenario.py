"""What a benchmark runs, as data: scenarios, comparisons, suites.

A :class:`Scenario` is one configuration to migrate: the guest (RAM, workload), the
migration link (an optional tbf cap) and how to migrate: livemig's engine with a
strategy and a policy (livemig's own, or a peer's preset *emulated* in the engine:
its settings and schedule, with livemig's RAM check and ``-S`` target), or a peer
run *raw*, as its users get it (``runner="raw"``, :mod:`lab.raw`: QEMU's own
switchover driven over plain QMP, no RAM check). A
:class:`Comparison` puts scenarios side by side that differ only in how they migrate,
repeated; a :class:`Suite` is a list of comparisons with a wall-time budget. The
suites live in :data:`SUITES`, a declarative table in the spirit of QEMU's guestperf
``COMPARISONS``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.errors import SuiteError
from migrate.errors import ConfigError

# The peer presets of the convergence issue, by their names in migrate.presets.
PEER_POLICIES = ("qemu-default", "proxmox", "nova", "ovirt-minimal-downtime")
BASELINE_POLICY = "qemu-default"
LIVEMIG_POLICY = "livemig"
#: How a scenario migrates: through livemig's engine, or as the peer's users do.
ENGINE_RUNNER = "engine"
RAW_RUNNER = "raw"
#: libvirt's migration job (a libvirtd per lab host), run one of lab.libvirt_demo's ways.
LIBVIRT_RUNNER = "libvirt"
RUNNERS = (ENGINE_RUNNER, RAW_RUNNER, LIBVIRT_RUNNER)
#: The ways a libvirt run can go (``lab.libvirt_demo.LIBVIRT_WAYS``, named here so
#: that the CLI's parser loads no lab module): livemig steering libvirt's job,
#: libvirt at its defaults, Nova's libvirt driver.
LIBVIRT_POLICIES = (LIVEMIG_POLICY, "libvirt-default", "nova")
RAW_PREFIX = "raw-"
#: What the suites compare against: QEMU as a plain QEMU user gets it.
BASELINE_SCENARIO = RAW_PREFIX + BASELINE_POLICY


@dataclass(frozen=True)
class Scenario:
    """One configuration: guest, link and migration method.

    Sizes in MiB, ``bandwidth_mbit`` the tbf cap on the A↔B migration link (None:
    uncapped veth), ``warmup_s`` the time the workload runs before the migration
    (after it first reported), ``settle_s`` the time observed on the target after it.
    ``runner`` is ``engine`` (livemig's engine migrates with ``strategy`` and
    ``policy``) or ``raw`` (the peer preset ``policy`` as its users run it; strategy
    ``native``, QEMU's stream) or ``libvirt`` (libvirt's own migration job between
    two libvirt daemons, run the way ``policy`` names: ``livemig`` steering it,
    ``libvirt-default`` or ``nova``; strategy ``libvirt``).
    """

    name: str
    strategy: str = "native"
    policy: str = LIVEMIG_POLICY
    workload: str = "openssl"
    memory_mib: int = 256
    dirty_mib: int = 64
    bandwidth_mbit: float | None = None
    warmup_s: float = 2.0
    settle_s: float = 2.5
    runner: str = ENGINE_RUNNER

    @property
    def label(self) -> str:
        """How tables name it: ``livemig native``, ``raw:proxmox``, ``proxmox
        (emulated)`` (a peer preset run inside livemig's engine)."""
        if self.is_raw:
            return f"raw:{self.policy}"
        if self.is_libvirt:
            if self.policy == LIVEMIG_POLICY:
                return f"{self.policy} libvirt"
            return self.policy if self.policy.startswith("libvirt") else f"libvirt:{self.policy}"
        if self.policy == LIVEMIG_POLICY:
            return f"{self.policy} {self.strategy}"
        name = self.policy if self.strategy == "native" else f"{self.policy} {self.strategy}"
        return f"{name} (emulated)" if self.is_peer else name

    @property
    def is_peer(self) -> bool:
        """A peer preset (someone else's defaults), not livemig's own policy."""
        return self.policy in PEER_POLICIES or (self.is_libvirt and self.policy != LIVEMIG_POLICY)

    @property
    def is_raw(self) -> bool:
        """A peer run as its users get it (not through livemig's engine)."""
        return self.runner == RAW_RUNNER

    @property
    def is_libvirt(self) -> bool:
        """Migrated by libvirt's own job (the lab's two libvirt daemons)."""
        return self.runner == LIBVIRT_RUNNER

    @property
    def as_users_run_it(self) -> bool:
        """A peer exactly as its users get it: raw over QMP, or libvirt not steered by
        livemig (libvirt's defaults, Nova)."""
        return self.is_raw or (self.is_libvirt and self.is_peer)

    def validate(self) -> None:
        """Raises :class:`SuiteError` for impossible values."""
        # Imported here: the CLI reads SUITES to build its parser, which must not
        # load the lab.
        from lab.demo import Workload

        try:
            Workload.parse(self.workload)
        except ConfigError as exc:
            raise SuiteError(f"scenario {self.name}: {exc}") from exc
        if self.memory_mib <= 0 or self.dirty_mib <= 0:
            raise SuiteError(f"scenario {self.name}: sizes must be positive")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise SuiteError(f"scenario {self.name}: bandwidth must be positive")
        if self.runner not in RUNNERS:
            raise SuiteError(f"scenario {self.name}: unknown runner {self.runner!r}")
        if self.is_raw and (not self.is_peer or self.strategy != "native"):
            raise SuiteError(
                f"scenario {self.name}: a raw run is a peer preset ({', '.join(PEER_POLICIES)}) "
                "with QEMU's own stream (strategy native)"
            )
        if self.is_libvirt and (
            self.policy not in LIBVIRT_POLICIES or self.strategy != LIBVIRT_RUNNER
        ):
            raise SuiteError(
                f"scenario {self.name}: a libvirt run is strategy libvirt with one of "
                f"{', '.join(LIBVIRT_POLICIES)}"
            )
        if self.strategy == LIBVIRT_RUNNER and not self.is_libvirt:
            raise SuiteError(f"scenario {self.name}: strategy libvirt needs runner libvirt")


@dataclass(frozen=True)
class Comparison:
    """Scenarios compared side by side, each run ``repetitions`` times.

    ``baseline`` names the scenario every "x baseline" ratio is taken against (in
    results written before raw peers existed: the policy; scenario and policy
    names of the peer presets were the same).
    """

    name: str
    description: str
    scenarios: tuple[Scenario, ...]
    repetitions: int
    baseline: str = BASELINE_POLICY

    def config(self, scenario: Scenario) -> str:
        """The id a run of ``scenario`` carries in results: ``comparison/scenario``."""
        return f"{self.name}/{scenario.name}"


@dataclass(frozen=True)
class Suite:
    """Comparisons run together; ``budget_s`` is the wall time it is meant to fit in
    on a 2-core machine; ``run_timeout_s`` ends (and records) a run that hangs."""

    name: str
    description: str
    comparisons: tuple[Comparison, ...]
    budget_s: float
    run_timeout_s: float = 120.0

    def validate(self) -> None:
        """Raises :class:`SuiteError` for duplicates, empty comparisons, bad scenarios."""
        names = [c.name for c in self.comparisons]
        if not names or len(set(names)) != len(names):
            raise SuiteError(f"suite {self.name}: comparison names must be present and unique")
        for comparison in self.comparisons:
            scenarios = [s.name for s in comparison.scenarios]
            if not scenarios or len(set(scenarios)) != len(scenarios):
                raise SuiteError(
                    f"suite {self.name}/{comparison.name}: scenario names must be present and unique"
                )
            if comparison.repetitions < 1:
                raise SuiteError(f"suite {self.name}/{comparison.name}: repetitions must be >= 1")
            for scenario in comparison.scenarios:
                scenario.validate()

    @property
    def run_count(self) -> int:
        return sum(c.repetitions * len(c.scenarios) for c in self.comparisons)

    def bandwidths(self) -> tuple[float | None, ...]:
        """Every distinct link setting, in order of first use."""
        seen: dict[float | None, None] = {}
        for comparison in self.comparisons:
            for scenario in comparison.scenarios:
                seen.setdefault(scenario.bandwidth_mbit, None)
        return tuple(seen)

    def with_repetitions(self, repetitions: int) -> Suite:
        """The same suite with every comparison repeated ``repetitions`` times."""
        comparisons = tuple(replace(c, repetitions=repetitions) for c in self.comparisons)
        return replace(self, comparisons=comparisons)


@dataclass(frozen=True)
class Omitted:
    """A configuration a suite names but this build cannot run, and why."""

    config: str
    reason: str


@dataclass(frozen=True)
class Availability:
    """The strategies, policies and raw peers this build can run."""

    strategies: frozenset[str]
    policies: frozenset[str]
    raw_peers: frozenset[str] = frozenset()
    #: Why libvirt runs cannot happen here (None: they can).
    libvirt_missing: str | None = "not checked"

    def reason_missing(self, scenario: Scenario) -> str | None:
        if scenario.is_libvirt:
            return None if self.libvirt_missing is None else f"libvirt: {self.libvirt_missing}"
        if scenario.is_raw:
            if scenario.policy not in self.raw_peers:
                return f"raw peer {scenario.policy!r} is not available"
            return None
        if scenario.strategy not in self.strategies:
            return f"strategy {scenario.strategy!r} is not registered"
        if scenario.policy not in self.policies:
            return f"policy preset {scenario.policy!r} is not available"
        return None


def runnable(suite: Suite, available: Availability) -> tuple[Suite, tuple[Omitted, ...]]:
    """``suite`` without the scenarios this build cannot run, and those left out.

    A comparison left without scenarios is dropped. Raises :class:`SuiteError` if
    nothing at all can run.
    """
    omitted: list[Omitted] = []
    comparisons: list[Comparison] = []
    for comparison in suite.comparisons:
        kept = []
        for scenario in comparison.scenarios:
            reason = available.reason_missing(scenario)
            if reason is None:
                kept.append(scenario)
            else:
                omitted.append(Omitted(comparison.config(scenario), reason))
        if kept:
            comparisons.append(replace(comparison, scenarios=tuple(kept)))
    if not comparisons:
        raise SuiteError(
            f"suite {suite.name}: nothing can run here ({'; '.join(o.reason for o in omitted)})"
        )
    return replace(suite, comparisons=tuple(comparisons)), tuple(omitted)


def _side_by_side(
    workload: str,
    memory_mib: int = 256,
    dirty_mib: int = 64,
    bandwidth_mbit: float | None = None,
    warmup_s: float = 2.0,
    settle_s: float = 2.5,
) -> tuple[Scenario, ...]:
    """livemig's strategies, every peer preset emulated in livemig's engine, and every
    peer raw (as its users get it), on the same guest and link."""
    methods = [
        ("livemig-native", "native", LIVEMIG_POLICY, ENGINE_RUNNER),
        ("livemig-pagestream", "pagestream", LIVEMIG_POLICY, ENGINE_RUNNER),
        *((policy, "native", policy, ENGINE_RUNNER) for policy in PEER_POLICIES),
        *((RAW_PREFIX + policy, "native", policy, RAW_RUNNER) for policy in PEER_POLICIES),
    ]
    return tuple(
        Scenario(
            name=name,
            strategy=strategy,
            policy=policy,
            workload=workload,
            memory_mib=memory_mib,
            dirty_mib=dirty_mib,
            bandwidth_mbit=bandwidth_mbit,
            warmup_s=warmup_s,
            settle_s=settle_s,
            runner=runner,
        )
        for name, strategy, policy, runner in methods
    )


_LIBVIRT_SCENARIO_NAMES = {
    LIVEMIG_POLICY: "livemig-libvirt",
    "libvirt-default": "libvirt-default",
    "nova": "libvirt-nova",
}


def _libvirt_ways(
    workload: str, memory_mib: int = 256, warmup_s: float = 2.0, settle_s: float = 2.5
) -> tuple[Scenario, ...]:
    """livemig steering libvirt's job, libvirt at its defaults and Nova, same guest."""
    return tuple(
        Scenario(
            name=_LIBVIRT_SCENARIO_NAMES[policy],
            strategy=LIBVIRT_RUNNER,
            policy=policy,
            workload=workload,
            memory_mib=memory_mib,
            warmup_s=warmup_s,
            settle_s=settle_s,
            runner=LIBVIRT_RUNNER,
        )
        for policy in LIBVIRT_POLICIES
    )


def _libvirt_comparison(repetitions: int, memory_mib: int = 256, **kwargs: float) -> Comparison:
    return Comparison(
        name="libvirt-openssl",
        description=(
            f"{memory_mib} MiB guest running openssl speed in a loop as a libvirt domain "
            "(shared file-backed RAM), a libvirtd per lab host, uncapped veth: livemig "
            "steering libvirt's job vs libvirt at its defaults vs Nova's libvirt driver"
        ),
        scenarios=_libvirt_ways("openssl", memory_mib, **kwargs),
        repetitions=repetitions,
        baseline="libvirt-default",
    )


def _picked(names: tuple[str, ...], scenarios: tuple[Scenario, ...]) -> tuple[Scenario, ...]:
    """``scenarios`` named in ``names``, in the order of ``names``."""
    by_name = {s.name: s for s in scenarios}
    return tuple(by_name[name] for name in names)


_SMOKE_NAMES = ("livemig-native", "livemig-pagestream", BASELINE_SCENARIO)
_OVERLOAD_NAMES = ("livemig-native", *(RAW_PREFIX + policy for policy in PEER_POLICIES))
_CI_NAMES = ("livemig-native", BASELINE_SCENARIO, RAW_PREFIX + "proxmox")

# One run (boot, warm-up, migration, settle, guest check) of a 256 MiB guest takes
# ~9-11 s of wall time on 2 TCG cores; the budgets below count 12 s a run.
SUITES: dict[str, Suite] = {
    "ci": Suite(
        name="ci",
        description=(
            "short, for CI: a 128 MiB openssl guest, uncapped link: livemig native, "
            "raw:qemu-default and raw:proxmox; once"
        ),
        comparisons=(
            Comparison(
                name="openssl",
                description="128 MiB guest running openssl speed in a loop, uncapped veth",
                scenarios=_picked(
                    _CI_NAMES,
                    _side_by_side(workload="openssl", memory_mib=128, warmup_s=1.5, settle_s=1.5),
                ),
                repetitions=1,
                baseline=BASELINE_SCENARIO,
            ),
        ),
        budget_s=60.0,
    ),
    "smoke": Suite(
        name="smoke",
        description=(
            "openssl guest, uncapped link: livemig native, pagestream, raw:qemu-default; once"
        ),
        comparisons=(
            Comparison(
                name="openssl",
                description="256 MiB guest running openssl speed in a loop, uncapped veth",
                scenarios=_picked(_SMOKE_NAMES, _side_by_side(workload="openssl")),
                repetitions=1,
                baseline=BASELINE_SCENARIO,
            ),
        ),
        budget_s=180.0,
    ),
    "default": Suite(
        name="default",
        description=(
            "every strategy, every peer preset emulated in livemig's engine and every peer "
            "raw (as its users get it): an openssl guest on the uncapped link, and an "
            "openssl guest that also dirties memory on a 400 Mbit/s link"
        ),
        comparisons=(
            Comparison(
                name="openssl",
                description="256 MiB guest running openssl speed in a loop, uncapped veth",
                scenarios=_side_by_side(workload="openssl"),
                repetitions=5,
                baseline=BASELINE_SCENARIO,
            ),
            Comparison(
                name="openssl-dirty-400mbit",
                description=(
                    "128 MiB guest running openssl and writing 16 MiB/s over a 32 MiB working "
                    "set, migration link capped at 400 Mbit/s (tbf)"
                ),
                scenarios=_side_by_side(
                    workload="openssl+dirty:16", memory_mib=128, dirty_mib=32, bandwidth_mbit=400.0
                ),
                repetitions=3,
                baseline=BASELINE_SCENARIO,
            ),
            _libvirt_comparison(repetitions=3),
        ),
        budget_s=1260.0,
    ),
    "libvirt": Suite(
        name="libvirt",
        description=(
            "libvirt's migration job: livemig steering it, libvirt's defaults, Nova's "
            "driver; a 256 MiB openssl guest on the uncapped link, 5 times each"
        ),
        comparisons=(_libvirt_comparison(repetitions=5),),
        budget_s=300.0,
    ),
    "libvirt-ci": Suite(
        name="libvirt-ci",
        description=(
            "short, for CI: livemig steering libvirt's job, libvirt's defaults and Nova, "
            "a 128 MiB openssl guest, once each"
        ),
        comparisons=(
            _libvirt_comparison(repetitions=1, memory_mib=128, warmup_s=1.0, settle_s=1.0),
        ),
        budget_s=60.0,
    ),
    "overload": Suite(
        name="overload",
        description=(
            "a guest dirtying ~2x what the link carries (16 MiB/s over a 32 MiB working set, "
            "migration link capped at 64 Mbit/s), 256 and 512 MiB: livemig native against "
            "every raw peer; a run still going after run_timeout_s counts as not completed"
        ),
        comparisons=tuple(
            Comparison(
                name=f"dirty16-64mbit-{memory}m",
                description=(
                    f"{memory} MiB guest writing 16 MiB/s over a 32 MiB working set, migration "
                    "link capped at 64 Mbit/s (tbf)"
                ),
                scenarios=_picked(
                    _OVERLOAD_NAMES,
                    _side_by_side(
                        workload="dirty:16", memory_mib=memory, dirty_mib=32, bandwidth_mbit=64.0
                    ),
                ),
                repetitions=2,
                baseline=BASELINE_SCENARIO,
            )
            for memory in (256, 512)
        ),
        budget_s=1500.0,
        run_timeout_s=150.0,
    ),
}


def suite_named(name: str) -> Suite:
    """The suite called ``name``. Raises :class:`SuiteError` for unknown names."""
    try:
        return SUITES[name]
    except KeyError:
        raise SuiteError(
            f"unknown suite {name!r} (known: {', '.join(SUITES)})", tuple(SUITES)
        ) from None


__all__ = [
    "BASELINE_POLICY",
    "BASELINE_SCENARIO",
    "ENGINE_RUNNER",
    "LIBVIRT_POLICIES",
    "LIBVIRT_RUNNER",
    "LIVEMIG_POLICY",
    "PEER_POLICIES",
    "RAW_RUNNER",
    "SUITES",
    "Availability",
    "Comparison",
    "Omitted",
    "Scenario",
    "Suite",
    "runnable",
    "suite_named",
]
