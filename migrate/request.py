"""What an embedding program hands the engine: the two hosts, the request, its hooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from migrate.errors import ConfigError
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.report import new_migration_id


@dataclass(frozen=True)
class HostEndpoint:
    """How to reach one side: its QMP socket and (target) the migration listen URI.

    ``netns`` is the network namespace the host's migration address lives in (the
    lab's hosts); helpers that must reach that address (pagestream's agents) run
    there. None: this machine's own namespace.
    """

    name: str
    qmp_socket: Path | None = None
    migration_uri: str | None = None
    netns: str | None = None


@dataclass(frozen=True)
class MigrationHooks:
    """Points where an embedding program (or a fault-injection test) may act.

    ``before_target_resume`` runs once the target has loaded the VM, paused, before
    the integrity check and ``cont``. ``point_of_no_return`` runs right before
    ``cont`` goes to the target (synchronously: a journal records it there).
    """

    before_target_resume: Callable[[], Awaitable[None]] | None = None
    point_of_no_return: Callable[[], None] | None = None


@dataclass(frozen=True)
class MigrationRequest:
    """One migration to perform.

    ``offline`` stops a running VM first and starts it on the target afterwards.
    ``verify`` compares source and target RAM before the target resumes (needs both
    RAMs in files this process can map, and a target started with ``-S``).
    ``repair`` copies pages that differ from the stopped source into the paused
    target (then re-verifies) instead of aborting; see :mod:`migrate.integrity`.
    ``quit_source`` ends the source QEMU once the VM runs on the target.
    ``force`` overrides forceable preflight refusals (CPU, target memory);
    ``cpu_model`` is the VM's ``-cpu`` string when known (QMP shows only the model
    name); ``source_host``/``target_host`` describe the hosts for preflight.
    ``predict`` measures the VM and forecasts the migration before it starts
    (:mod:`migrate.plan`; about a second more before ``migrate``; the CLI and the
    demo ask for it); ``link_mbit`` is the migration link's speed when known (the
    forecast's bandwidth; otherwise a stated assumption). ``migration_id`` names
    this migration in its report and events. ``qmp_timeout_s`` is the deadline of
    every QMP command (a silent QEMU is an error, never a hang);
    ``stall_timeout_s`` how long pre-copy may make no progress (nothing sent: the
    link is down, or QEMU stuck) before the migration is rolled back.
    ``state_dir`` keeps a journal of the
    migration under ``state_dir/journal`` (:mod:`migrate.journal`): ``livemig
    recover`` settles a migration whose engine crashed, and a VM with an unfinished
    journal is refused; None (the default for library use): no journal.
    """

    source: HostEndpoint
    target: HostEndpoint
    strategy: str = "native"
    policy: Policy = field(default_factory=Policy)
    offline: bool = False
    verify: bool = True
    repair: bool = True
    quit_source: bool = True
    force: bool = False
    cpu_model: str | None = None
    source_host: HostFacts = field(default_factory=HostFacts)
    target_host: HostFacts = field(default_factory=HostFacts)
    sample_interval_s: float = 0.1
    vm: str = "vm"
    hooks: MigrationHooks = field(default_factory=MigrationHooks)
    predict: bool = False
    link_mbit: float | None = None
    migration_id: str = field(default_factory=new_migration_id)
    qmp_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0
    state_dir: Path | None = None

    @property
    def migration_uri(self) -> str:
        if not self.target.migration_uri:
            raise ConfigError("the target needs a migration URI (e.g. tcp:198.19.0.2:4444)")
        return self.target.migration_uri
