"""What an embedding program hands the engine: the two hosts, the request, its hooks."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate import validate
from migrate.errors import ConfigError
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.report import new_migration_id
from migrate.tls import MigrationTls, NodeCredentials

if TYPE_CHECKING:
    from migrate.pagestream.control import AgentChannel
    from migrate.remoteram import RemoteRam

#: The longest path a UNIX socket address holds (``sun_path`` is 108 bytes, NUL included).
MAX_SOCKET_PATH_BYTES = 107

#: The migration URIs the engine hands QEMU: ``tcp:HOST:PORT`` (a host name, an IPv4
#: address or a bracketed IPv6 one) and ``unix:/ABSOLUTE/PATH``. QEMU takes more
#: (``exec:`` runs a shell command, ``fd:``, ``file:``, ``rdma:``); the engine never
#: passes those on, whoever asks.
_URI_RE = re.compile(
    r"tcp:(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])"
    r":(?P<port>[0-9]{1,5})"
    r"|unix:(?P<path>/[^\s]*)",
    re.ASCII,
)


def parse_migration_uri(text: Any) -> str:
    """``text`` if it is ``tcp:HOST:PORT`` (port 1-65535) or ``unix:/PATH``.

    Anything else (``exec:``, ``fd:``, ``file:``, ``rdma:``, a trailing newline,
    whitespace or control characters, a relative UNIX path) raises :class:`ConfigError`.
    """
    if not isinstance(text, str):
        raise ConfigError(f"bad migration URI {text!r} (want tcp:HOST:PORT or unix:/PATH)")
    match = _URI_RE.fullmatch(text)
    if match is None or validate.has_control(text) or any(c.isspace() for c in text):
        raise ConfigError(f"bad migration URI {text!r} (want tcp:HOST:PORT or unix:/PATH)")
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigError(f"bad port in migration URI {text!r} (want 1-65535)")
    host = match.group("host")
    if host is not None and len(host) > 253:
        raise ConfigError(f"bad host in migration URI {text[:40]!r}... (longer than 253)")
    path = match.group("path")
    if path is not None:
        if path.rstrip("/") == "":
            raise ConfigError(f"bad migration URI {text!r}: the UNIX socket needs a path")
        _socket_path(Path(path), "migration URI socket")
    return text


def migration_uri_host(uri: str) -> str | None:
    """The host of a ``tcp:HOST:PORT`` migration URI (brackets of IPv6 removed); None for unix:."""
    match = _URI_RE.fullmatch(uri)
    host = match.group("host") if match is not None else None
    return host.strip("[]") if host is not None else None


def _socket_path(value: Any, name: str) -> Path | None:
    """``value`` as a Path to a QMP socket (a str is taken), or None."""
    if value is None:
        return None
    if isinstance(value, str) or (isinstance(value, os.PathLike) and not isinstance(value, Path)):
        value = Path(value)
    if not isinstance(value, Path):
        raise ConfigError(f"{name} must be a path, not {value!r}")
    raw = str(value)
    if raw in ("", ".") or validate.has_control(raw):
        raise ConfigError(f"{name} is not a usable socket path: {raw!r}")
    try:
        size = len(os.fsencode(raw))
    except UnicodeEncodeError:
        raise ConfigError(f"{name} is not a usable socket path: {raw!r}") from None
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{name} {raw[:60]!r}... is longer than a UNIX socket address allows "
            f"({MAX_SOCKET_PATH_BYTES} bytes)"
        )
    return value


_HOST_RE = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]+", re.ASCII
)


@dataclass(frozen=True)
class QmpTcpAddress:
    """A QMP server reached over TCP with mutual TLS (a QEMU on another host).

    The QEMU side is ``-object tls-creds-x509,id=T,dir=DIR,endpoint=server,verify-peer=on
    -chardev socket,id=qmp,host=HOST,port=PORT,server=on,wait=off,tls-creds=T -mon
    chardev=qmp,mode=control``. ``credentials`` are this side's (client) files; the
    server's certificate must carry ``host`` in its SAN. Plain TCP is not offered:
    QMP controls the whole VM.
    """

    host: str
    port: int
    credentials: NodeCredentials

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for a bad host, port or credentials."""
        if not isinstance(self.host, str) or not _HOST_RE.fullmatch(self.host):
            raise ConfigError(f"bad QMP host {self.host!r} (a host name or an IP address)")
        validate.whole(self.port, "QMP port", minimum=1, maximum=65535)
        if not isinstance(self.credentials, NodeCredentials):
            raise ConfigError(f"QMP credentials must be NodeCredentials, not {self.credentials!r}")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls:{host}:{self.port}"


@dataclass(frozen=True)
class HostEndpoint:
    """How to reach one side: its QMP socket and (target) the migration listen URI.

    Checked when built: ``migration_uri`` must be ``tcp:HOST:PORT`` or
    ``unix:/PATH`` (never ``exec:`` and the like, see :func:`parse_migration_uri`);
    ``qmp_socket`` a path short enough for a UNIX socket (a str is taken as one).

    ``netns`` is the network namespace the host's migration address lives in (the
    lab's hosts); helpers that must reach that address (pagestream's agents) run
    there. None: this machine's own namespace.

    ``qmp_tcp`` reaches a QEMU on another host (QMP over TCP with mutual TLS)
    instead of ``qmp_socket``; at most one of the two.
    """

    name: str
    qmp_socket: Path | None = None
    migration_uri: str | None = None
    netns: str | None = None
    qmp_tcp: QmpTcpAddress | None = None

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` for a bad name, socket path, URI or namespace."""
        validate.text(self.name, "host name", max_length=128, spaces=True)
        socket = _socket_path(self.qmp_socket, f"{self.name}: QMP socket")
        object.__setattr__(self, "qmp_socket", socket)  # a str is taken as a Path
        if self.migration_uri is not None:
            parse_migration_uri(self.migration_uri)
        if self.qmp_tcp is not None:
            if not isinstance(self.qmp_tcp, QmpTcpAddress):
                raise ConfigError(f"{self.name}: qmp_tcp must be a QmpTcpAddress")
            if self.qmp_socket is not None:
                raise ConfigError(f"{self.name}: give a QMP socket or a QMP TCP address, not both")
        if self.netns is not None:
            where = f"{self.name}: network namespace"
            validate.text(self.netns, where, pattern=validate.PLAIN_NAME, max_length=255)


@dataclass(frozen=True)
class MigrationHooks:
    """Points where an embedding program (or a fault-injection test) may act.

    ``before_target_resume`` runs once the target has loaded the VM, paused, before
    the integrity check and ``cont``. ``point_of_no_return`` runs right before
    ``cont`` goes to the target (synchronously: a journal records it there).
    ``after_disks_ready`` runs once every local disk's mirror is READY, before the
    background disk comparison starts; ``after_disks_compared`` once that background
    pass is done, before the RAM migration (and the switchover) start.
    """

    before_target_resume: Callable[[], Awaitable[None]] | None = None
    after_disks_ready: Callable[[], Awaitable[None]] | None = None
    after_disks_compared: Callable[[], Awaitable[None]] | None = None
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
    ``tls`` encrypts and authenticates the data path (native: QEMU's
    ``tls-creds-x509`` on both QEMUs; pagestream: its page stream over TLS),
    see :mod:`migrate.tls`; None: plain TCP (or a UNIX socket).
    ``target_ram`` reaches the target's RAM through its owner (digests, page
    writes) when this process cannot map the target's RAM file (another host),
    see :mod:`migrate.remoteram`; None: the file is mapped here.
    ``target_receiver`` makes the control channel of pagestream's receiver when
    the target host's own agent starts it (another host: the receiver writes RAM
    that only that host can map, and the agent picks the file and the
    credentials; the engine names no path of that host); None: the engine starts
    the receiver itself, in ``target.netns``.
    ``with_local_disks`` copies each writable disk the target does not share over
    NBD (:mod:`migrate.disks.mirror`) into the target QEMU's image of that disk
    (same format and virtual size, created before the target QEMU started);
    without it such a disk is refused. ``shared_disks`` names disks the operator
    declares shared (otherwise: shared when both QEMUs open the same file).
    ``disk_copy_mode`` is the mirror's (``write-blocking`` or ``background``);
    ``nbd_port`` the target's NBD port on the migration address (default: the
    migration port + 1); ``disk_ready_timeout_s`` how long the first full copy may take.
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
    tls: MigrationTls | None = None
    target_ram: RemoteRam | None = None
    target_receiver: Callable[[], AgentChannel] | None = None
    with_local_disks: bool = False
    shared_disks: tuple[str, ...] = ()
    disk_copy_mode: str = "write-blocking"
    nbd_port: int | None = None
    disk_ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` naming the first field with a bad value.

        The target's migration URI must be ``tcp:HOST:PORT`` or ``unix:/PATH`` (see
        :func:`parse_migration_uri`); numbers finite and positive; names plain.
        """
        for side in ("source", "target"):
            if not isinstance(getattr(self, side), HostEndpoint):
                raise ConfigError(f"{side} must be a HostEndpoint, not {getattr(self, side)!r}")
        if self.target.migration_uri is not None:
            parse_migration_uri(self.target.migration_uri)
        socket = self.source.qmp_socket
        if socket is not None and socket == self.target.qmp_socket:
            raise ConfigError(f"source and target are the same QEMU ({socket})")
        validate.text(self.strategy, "strategy", pattern=validate.PLAIN_NAME, max_length=64)
        if not isinstance(self.policy, Policy):
            raise ConfigError(f"policy must be a Policy, not {self.policy!r}")
        for name in (
            "offline",
            "verify",
            "repair",
            "quit_source",
            "force",
            "predict",
            "with_local_disks",
        ):
            validate.flag(getattr(self, name), name)
        if self.cpu_model is not None:
            validate.text(self.cpu_model, "cpu_model", max_length=4096)
        for name in ("source_host", "target_host"):
            if not isinstance(getattr(self, name), HostFacts):
                raise ConfigError(f"{name} must be a HostFacts, not {getattr(self, name)!r}")
        validate.number(self.sample_interval_s, "sample_interval_s", above=0, maximum=60)
        validate.text(self.vm, "vm name", pattern=validate.PLAIN_NAME, max_length=64)
        if not isinstance(self.hooks, MigrationHooks):
            raise ConfigError(f"hooks must be a MigrationHooks, not {self.hooks!r}")
        if self.link_mbit is not None:
            validate.number(self.link_mbit, "link_mbit", above=0, maximum=1e7)
        if not isinstance(self.shared_disks, tuple) or not all(
            isinstance(d, str) for d in self.shared_disks
        ):
            raise ConfigError(
                f"shared_disks must be a tuple of disk names, not {self.shared_disks!r}"
            )
        if self.disk_copy_mode not in ("write-blocking", "background"):
            raise ConfigError(
                f"unknown disk copy mode {self.disk_copy_mode!r} (write-blocking, background)"
            )
        if self.nbd_port is not None:
            validate.whole(self.nbd_port, "nbd_port", minimum=1, maximum=65535)
        validate.number(self.disk_ready_timeout_s, "disk_ready_timeout_s", above=0, maximum=86400)
        validate.text(
            self.migration_id, "migration_id", pattern=validate.PLAIN_NAME, max_length=128
        )
        if self.tls is not None and not isinstance(self.tls, MigrationTls):
            raise ConfigError(f"tls must be a MigrationTls, not {self.tls!r}")
        uri = self.target.migration_uri
        if self.tls is not None and uri is not None and not uri.startswith("tcp:"):
            raise ConfigError("a TLS migration needs a tcp:HOST:PORT migration URI")

    @property
    def transport(self) -> str:
        """The data path's transport: ``tls``, ``tcp`` or ``unix``."""
        if self.tls is not None:
            return "tls"
        uri = self.target.migration_uri or ""
        return "unix" if uri.startswith("unix:") else "tcp"

    @property
    def migration_uri(self) -> str:
        if not self.target.migration_uri:
            raise ConfigError("the target needs a migration URI (e.g. tcp:198.19.0.2:4444)")
        return self.target.migration_uri
