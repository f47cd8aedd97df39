"""What a libvirt migration is asked to do: the two daemons, the domain, the policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from migrate.errors import ConfigError
from migrate.policy import Policy
from migrate.report import new_migration_id


@dataclass(frozen=True)
class LibvirtEndpoint:
    """One libvirt daemon.

    ``uri`` is how the engine connects (e.g. ``qemu+tcp://host-b/system``);
    ``peer_uri`` how the *source daemon* reaches this one for a peer-to-peer
    migration, when that differs (the lab's daemons listen for peers only inside
    their namespaces, and for the engine on private UNIX sockets). ``name`` labels
    the host in the report.
    """

    name: str
    uri: str
    peer_uri: str | None = None

    def __post_init__(self) -> None:
        if not self.uri.strip():
            raise ConfigError(f"libvirt endpoint {self.name!r} has no URI")

    @property
    def migration_uri(self) -> str:
        return self.peer_uri or self.uri


@dataclass(frozen=True)
class LibvirtRequest:
    """One migration of a libvirt domain from ``source`` to ``target``.

    ``offline``: a running domain moves paused (no ``VIR_MIGRATE_LIVE``); a shut-off
    domain always moves offline (its definition only). ``verify`` keeps the target
    paused at the end (``VIR_MIGRATE_PAUSED``) until its RAM matched the stopped
    source's, then resumes it (needs both RAM files mappable here: a shared
    ``memoryBacking`` file); ``repair`` copies differing pages from the stopped source
    first. ``force`` overrides forceable preflight refusals (CPU, target memory).
    ``sample_interval_s`` is how often the job's statistics are read.
    """

    source: LibvirtEndpoint
    target: LibvirtEndpoint
    domain: str
    policy: Policy = field(default_factory=Policy)
    offline: bool = False
    verify: bool = True
    repair: bool = True
    force: bool = False
    sample_interval_s: float = 0.1
    job_timeout_s: float = 600.0
    migration_id: str = field(default_factory=new_migration_id)

    def __post_init__(self) -> None:
        if not self.domain.strip():
            raise ConfigError("name the libvirt domain to migrate")
        if self.source.uri == self.target.uri and self.source.peer_uri == self.target.peer_uri:
            raise ConfigError(f"source and target are the same libvirt daemon ({self.source.uri})")
        if not 0.01 <= self.sample_interval_s <= 10:
            raise ConfigError(f"sample_interval_s must be 0.01-10 s, not {self.sample_interval_s}")
        if self.job_timeout_s <= 0:
            raise ConfigError(f"job_timeout_s must be positive, not {self.job_timeout_s}")
