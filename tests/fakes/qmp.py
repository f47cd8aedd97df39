"""A scripted, in-process QEMU behind a QMP session: engine unit tests without root or QEMU.

:class:`FakeQmp` is a :class:`~migrate.qmp.QmpSession` (a subclass: it goes wherever
one goes, :class:`~migrate.qmp.EventRecorder` included). Behind it sits a small model
of one QEMU:

- a run state (``running``, ``paused``, ``inmigrate``, ``finish-migrate``,
  ``postmigrate``, ``shutdown``), with the ``STOP``/``RESUME`` events QEMU emits on
  leaving/entering ``running``;
- a migration status (``none``, ``setup``, ``active``, ``pre-switchover``,
  ``device``, ``cancelling``, ``cancelled``, ``completed``, ``failed``; the
  ``postcopy-*`` ones can be set by a test, the simulation does not walk them), with
  ``MIGRATION {status}`` events while the ``events`` capability is on (as in QEMU);
- migration capabilities and parameters (QEMU 7.2's defaults), set and queried.

The default simulation, for two fakes sharing a :class:`FakeWorld` (:func:`fake_pair`):
``migrate`` on the source connects to the fake whose ``migrate-incoming`` listens on
that URI (or fails on the next poll: connection refused); each ``query-migrate`` on
the source advances it (setup -> active -> ``precopy_polls`` active polls -> the source
stops (``STOP``, ``finish-migrate``), is ``postmigrate`` and ``completed``); the
target then completes and stays ``paused`` (``-S``) or runs (``autostart``); ``cont``
runs a paused VM (``RESUME``; on an ``inmigrate`` QEMU it only sets autostart, as
QEMU does); ``migrate_cancel`` cancels, and the source restarts if completion had
stopped it; a target whose incoming migration fails exits (QEMU does, unless told
otherwise); a dead side breaks the other side's migration; ``quit`` kills the VM
(further commands raise :class:`~migrate.errors.QemuError` "connection lost").
With ``precopy_polls=None`` pre-copy never converges, unless the downtime-limit is
raised to at least ``SWITCH_ANYWAY_MS`` (then it switches over at the next poll).

Scripting: per-command rules, the latest rule for a command deciding::

    fake.on("cont", lose_reply=True)                   # effect performed, no reply ever
    fake.on("query-migrate", [{"status": "active"}, Fail("boom"), DEFAULT])
    fake.on("migrate-incoming", error="Failed to bind socket")
    fake.on("query-status", hang=True)                 # never answers
    fake.on("quit", delay=0.2)                         # answers late
    fake.on("migrate_cancel", error="nope", after=1)   # the 2nd call on fails
    fake.on("query-version", Reply({"qemu": ...}), times=1)

A list is one action per call (then the simulation answers again); wrap a reply
whose value is itself a list in :class:`Reply`. Whole-QEMU faults:
:meth:`FakeQmp.cut_link` (QMP unreachable, the VM lives on), :meth:`FakeQmp.freeze`
(every new command hangs), :meth:`FakeQmp.kill` (the process is gone).

Every command received is logged in order (:attr:`FakeQmp.calls`), and the shared
:attr:`FakeWorld.log` orders commands, replies, events, run-state and migration
changes of both sides, for assertions across sessions. :attr:`FakeWorld.violations`
lists breaches of the one-copy rule: two sides running at once, or a source
running again after its VM ran on the target (the target's work is lost).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.events import Events
from qemu.qmp.message import Message

from migrate.errors import QemuError
from migrate.qmp import QmpSession

RUNSTATES = frozenset(
    {"running", "paused", "inmigrate", "finish-migrate", "postmigrate", "prelaunch", "shutdown"}
)
MIGRATION_STATUSES = (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
    "postcopy-paused", "postcopy-recover", "completed", "failed", "pre-switchover",
    "device", "wait-unplug",
)  # fmt: skip
IN_PROGRESS = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active",
     "postcopy-paused", "postcopy-recover", "wait-unplug"}
)  # fmt: skip
_CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device"})

# QEMU 7.2's defaults for what the engine sets (query-migrate-capabilities/-parameters).
DEFAULT_CAPABILITIES: dict[str, bool] = {
    "xbzrle": False,
    "rdma-pin-all": False,
    "auto-converge": False,
    "zero-blocks": False,
    "compress": False,
    "events": False,
    "postcopy-ram": False,
    "x-colo": False,
    "release-ram": False,
    "return-path": False,
    "pause-before-switchover": False,
    "multifd": False,
    "dirty-bitmaps": False,
    "postcopy-blocktime": False,
    "late-block-activate": False,
    "x-ignore-shared": False,
    "validate-uuid": False,
    "background-snapshot": False,
    "zero-copy-send": False,
    "postcopy-preempt": False,
}
DEFAULT_PARAMETERS: dict[str, Any] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "compress-level": 1,
    "compress-threads": 8,
    "decompress-threads": 2,
    "compress-wait-thread": True,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "max-bandwidth": 134217728,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "block-incremental": False,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
}


# -- what a rule does with one call ---------------------------------------------------


#: A downtime-limit from which the fake switches over at once (1000 s).
SWITCH_ANYWAY_MS = 1_000_000


class Action:
    """What a scripted rule does with one call."""


@dataclass(frozen=True)
class Default(Action):
    """Let the simulation act and answer."""


DEFAULT = Default()


@dataclass(frozen=True)
class Reply(Action):
    """Answer ``value``; the simulated QEMU is not touched."""

    value: Any = field(default_factory=dict)


@dataclass(frozen=True)
class Fail(Action):
    """Answer a QMP error: :class:`QemuError` with ``detail={"class", "desc"}``, as
    :meth:`QmpSession.execute` raises it. With ``effect`` the simulation acts first."""

    desc: str
    error_class: str = "GenericError"
    effect: bool = False


@dataclass(frozen=True)
class Delay(Action):
    """Wait ``seconds`` (``asyncio.sleep``), then do ``then``."""

    seconds: float
    then: Action = DEFAULT


@dataclass(frozen=True)
class Hang(Action):
    """Never answer: until the caller cancels, or the session is lost (then QemuError)."""


@dataclass(frozen=True)
class LoseReply(Action):
    """Act (the simulation's effect happens), then never answer: a lost reply."""


Answer = Action | Callable[[dict[str, Any] | None], Any]


class _Rule:
    def __init__(self, steps: list[Action] | None, each: Answer, skip: int, times: int | None):
        self.steps = steps
        self.each = each
        self.skip = skip
        self.times = times

    def take(self, arguments: dict[str, Any] | None) -> Action | None:
        """This call's action; None once the rule is spent."""
        if self.skip > 0:
            self.skip -= 1
            return DEFAULT
        if self.steps is not None:
            return self.steps.pop(0) if self.steps else None
        if self.times is not None:
            if self.times <= 0:
                return None
            self.times -= 1
        if isinstance(self.each, Action):
            return self.each
        return _as_action(self.each(arguments))


def _as_action(value: Any) -> Action:
    return value if isinstance(value, Action) else Reply(value)


_UNSET: Any = object()


# -- logs -------------------------------------------------------------------------------


@dataclass
class Call:
    """One command a fake received, and what became of it.

    ``outcome``: ``pending``, ``ok``, ``error``, ``unreachable`` (session lost),
    ``hung`` (never answered), ``reply-lost`` (acted, never answered), ``cancelled``.
    """

    seq: int
    command: str
    arguments: dict[str, Any] | None
    at: float
    outcome: str = "pending"
    reply: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Entry:
    """One line of the shared log: ``kind`` is ``command``, ``reply``, ``event``,
    ``runstate``, ``migration`` or ``died``; ``at`` is monotonic seconds."""

    seq: int
    at: float
    session: str
    kind: str
    name: str
    data: Mapping[str, Any]

    def __str__(self) -> str:
        data = f" {dict(self.data)}" if self.data else ""
        return f"{self.seq:4d} {self.session:>8} {self.kind:<9} {self.name}{data}"


class FakeWorld:
    """What fakes share: one ordered log, the migration URIs, the one-copy invariant."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self.sessions: dict[str, FakeQmp] = {}
        self.violations: list[str] = []
        self._seq = itertools.count()
        self._ran_on: dict[str, str] = {}  # source name -> target its VM has run on

    def add(self, fake: FakeQmp) -> None:
        if fake.name in self.sessions:
            raise ValueError(f"two fakes called {fake.name!r} in one world")
        self.sessions[fake.name] = fake

    def record(
        self, session: str, kind: str, name: str, data: Mapping[str, Any] | None = None
    ) -> Entry:
        entry = Entry(next(self._seq), time.monotonic(), session, kind, name, dict(data or {}))
        self.log.append(entry)
        return entry

    def entries(
        self,
        session: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        **data: Any,
    ) -> list[Entry]:
        """Log entries matching every given field (``data`` keys compared by value)."""
        return [
            e
            for e in self.log
            if (session is None or e.session == session)
            and (kind is None or e.kind == kind)
            and (name is None or e.name == name)
            and all(e.data.get(k) == v for k, v in data.items())
        ]

    def position(self, session: str, kind: str, name: str, **data: Any) -> int:
        """The sequence number of the first matching entry. AssertionError (with the
        log) if there is none."""
        found = self.entries(session, kind, name, **data)
        if not found:
            raise AssertionError(f"no {kind} {name} {data} on {session} in:\n{self.format()}")
        return found[0].seq

    def format(self) -> str:
        return "\n".join(str(e) for e in self.log)

    def listening(self, uri: str, other_than: FakeQmp) -> FakeQmp | None:
        for fake in self.sessions.values():
            waiting = fake.runstate == "inmigrate" and fake.incoming_from is None
            if fake is not other_than and fake.alive and fake.incoming_uri == uri and waiting:
                return fake
        return None

    def started_running(self, fake: FakeQmp) -> None:
        others = [f.name for f in self.sessions.values() if f is not fake and f.running]
        if others:
            self.violations.append(
                f"{fake.name} started running while {', '.join(others)} ran: two copies of the VM"
            )
        if fake.name in self._ran_on:
            self.violations.append(
                f"{fake.name} ran again after its VM ran on {self._ran_on[fake.name]}: "
                "the work done there is lost (split brain)"
            )
        if fake.incoming_from is not None:
            self._ran_on.setdefault(fake.incoming_from.name, fake.name)


# -- the fake session -------------------------------------------------------------------


class FakeClient(Events):
    """The surface of ``qemu.qmp.QMPClient`` the engine touches: ``name``, listener
    registration (the real mixin: :class:`~migrate.qmp.EventRecorder` works unchanged)
    and ``execute`` (for ``cpumodel``'s ``QmpCpuSession``; errors as ``QMPError``)."""

    def __init__(self, fake: FakeQmp, name: str) -> None:
        self.name = name
        self.logger = logging.getLogger(f"tests.fakes.qmp.{name}")
        super().__init__()
        self._fake = fake

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None) -> Any:
        try:
            return await self._fake.execute(cmd, dict(arguments) if arguments is not None else None)
        except QemuError as exc:
            raise QMPError(str(exc)) from exc

    async def dispatch(self, message: Message) -> None:
        await self._event_dispatch(message)


class FakeQmp(QmpSession):
    """A QMP session to a simulated QEMU; see the module's documentation.

    ``incoming`` is the ``-incoming`` flag (``"defer"`` or a URI already listening;
    None: not a target); ``autostart=False`` is ``-S``. ``precopy_polls`` is how many
    ``query-migrate`` polls in ``active`` pre-copy lasts (None: forever).
    ``exit_on_incoming_failure``: a target whose incoming migration fails exits.
    """

    def __init__(
        self,
        name: str = "source",
        *,
        runstate: str = "running",
        incoming: str | None = None,
        autostart: bool = True,
        precopy_polls: int | None = 2,
        ram_bytes: int = 128 << 20,
        cpu_model: str = "qemu64",
        machine: str = "pc-i440fx-7.2",
        version: tuple[int, int, int] = (7, 2, 0),
        blockers: tuple[str, ...] = (),
        exit_on_incoming_failure: bool = True,
        world: FakeWorld | None = None,
    ) -> None:
        if runstate not in RUNSTATES:
            raise ValueError(f"unknown run state {runstate!r}")
        self._client = FakeClient(self, name)
        super().__init__(cast(QMPClient, self._client), f"fake:{name}")
        self.name = name
        self.world = world if world is not None else FakeWorld()
        self.world.add(self)
        self.runstate = runstate
        self.autostart = autostart
        self.precopy_polls = precopy_polls
        self.ram_bytes = ram_bytes
        self.cpu_model = cpu_model
        self.machine = machine
        self.version = version
        self.blockers = blockers
        self.exit_on_incoming_failure = exit_on_incoming_failure
        self.capabilities = dict(DEFAULT_CAPABILITIES)
        self.parameters = dict(DEFAULT_PARAMETERS)
        self.migration_status = "none"
        self.error_desc: str | None = None
        self.incoming = incoming
        self.incoming_uri = incoming if incoming not in (None, "defer") else None
        self.incoming_from: FakeQmp | None = None
        self.outgoing_to: FakeQmp | None = None
        self.alive = True
        self.reachable = True
        self.frozen = False
        self.closed = False
        self.calls: list[Call] = []
        self._rules: dict[str, list[_Rule]] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self._polls = 0
        self._connect_error: str | None = None
        self._migrate_t0 = 0.0
        self._total_ms: float | None = None
        self._was_running = False

    # -- inspection ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether guest code runs here now."""
        return self.alive and self.runstate == "running"

    @property
    def commands(self) -> list[str]:
        """Names of the commands received, in order."""
        return [c.command for c in self.calls]

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c.command == command)

    def calls_to(self, command: str) -> list[Call]:
        return [c for c in self.calls if c.command == command]

    def events(self, name: str | None = None) -> list[Entry]:
        """Events this QEMU emitted (whether or not anyone received them)."""
        return self.world.entries(self.name, "event", name)

    async def wait_command(self, command: str, n: int = 1, timeout: float = 5.0) -> Call:
        """The ``n``-th ``command`` received, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        while self.count(command) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} got no {command} #{n}: {self.commands}")
            await asyncio.sleep(0.001)
        return self.calls_to(command)[n - 1]

    # -- scripting ------------------------------------------------------------------------

    def on(
        self,
        command: str,
        reply: Any = _UNSET,
        *,
        error: str | None = None,
        error_class: str = "GenericError",
        delay: float = 0.0,
        hang: bool = False,
        lose_reply: bool = False,
        after: int = 0,
        times: int | None = None,
    ) -> FakeQmp:
        """Script ``command``; returns the fake, to chain.

        ``reply``: a value (answered as is, no effect), an :class:`Action`, a callable
        of the arguments returning either, or a list: one of those per call, after
        which the rule is spent. Or one of ``error`` (a QMP error with this
        description), ``hang``, ``lose_reply``. ``delay`` waits first (alone: the
        simulation answers late). ``after`` lets that many calls through to the
        simulation first; ``times`` spends the rule after that many calls.
        """
        chosen = [reply is not _UNSET, error is not None, hang, lose_reply]
        if sum(chosen) > 1:
            raise ValueError("give one of reply, error, hang, lose_reply")
        steps: list[Action] | None = None
        each: Answer = DEFAULT
        if isinstance(reply, list):
            steps = [_as_action(r) for r in reply]
            if delay:
                steps = [Delay(delay, s) for s in steps]
        else:
            if error is not None:
                each = Fail(error, error_class)
            elif hang:
                each = Hang()
            elif lose_reply:
                each = LoseReply()
            elif reply is not _UNSET:
                plain = callable(reply) and not isinstance(reply, Action)
                each = reply if plain else _as_action(reply)
            if delay:
                if not isinstance(each, Action):
                    raise ValueError("delay with a callable reply: return Delay(...) from it")
                each = Delay(delay, each)
        self._rules.setdefault(command, []).append(_Rule(steps, each, after, times))
        return self

    def _action_for(self, command: str, arguments: dict[str, Any] | None) -> Action:
        rules = self._rules.get(command, [])
        while rules:
            action = rules[-1].take(arguments)
            if action is not None:
                return action
            rules.pop()
        return DEFAULT

    # -- whole-QEMU faults ----------------------------------------------------------------

    def cut_link(self) -> None:
        """QMP becomes unreachable (commands raise "connection lost"); the VM lives on."""
        self.reachable = False
        self._fail_pending("connection lost")

    def restore_link(self) -> None:
        self.reachable = True

    def freeze(self) -> None:
        """Every new command hangs (a wedged QEMU, a black-holed socket)."""
        self.frozen = True

    def thaw(self) -> None:
        """New commands are answered again (hung ones stay hung)."""
        self.frozen = False

    def drop_pending(self) -> None:
        """Hung commands raise "connection lost" now (the state is untouched)."""
        self._fail_pending("connection lost")

    async def kill(self, reason: str = "killed") -> None:
        """The QEMU process ends: its VM stops, its session and migrations break."""
        if not self.alive:
            return
        self.alive = False
        self.runstate = "shutdown"
        self.world.record(self.name, "died", reason)
        self._fail_pending("connection lost")
        peer = self.outgoing_to
        if peer is not None and peer.alive and peer.migration_status in IN_PROGRESS:
            await peer._incoming_failed("load of migration failed: Input/output error")
        source = self.incoming_from
        if source is not None and source.alive and source.migration_status in IN_PROGRESS:
            await source._fail_outgoing("Unable to write to socket: Connection reset by peer")

    async def close(self) -> None:
        self.closed = True
        self._fail_pending("session closed")

    # -- the session ----------------------------------------------------------------------

    async def gone(self) -> bool | None:
        """Dead: provably gone; link cut: cannot tell; otherwise alive."""
        if not self.alive:
            return True
        return None if not self.reachable else False

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        # QmpSession.execute wraps this with the command deadline.
        entry = self.world.record(self.name, "command", command, arguments)
        call = Call(entry.seq, command, copy.deepcopy(arguments), entry.at)
        self.calls.append(call)
        try:
            self._check_reachable(command)
            action = Hang() if self.frozen else self._action_for(command, arguments)
            while isinstance(action, Delay):
                await asyncio.sleep(action.seconds)
                self._check_reachable(command)
                action = action.then
            result = await self._perform(call, action)
        except asyncio.CancelledError:
            if call.outcome == "pending":
                call.outcome = "cancelled"
            raise
        except QemuError as exc:
            if call.outcome == "pending":
                call.outcome = "unreachable" if exc.detail is None else "error"
            call.error = str(exc)
            self.world.record(self.name, "reply", command, {"error": str(exc)})
            raise
        call.outcome, call.reply = "ok", result
        self.world.record(self.name, "reply", command)
        return result

    def _check_reachable(self, command: str) -> None:
        if not (self.alive and self.reachable and not self.closed):
            raise QemuError(
                f"{command}: lost the QMP session to {self.name} (connection lost)",
                command=command,
            )

    async def _perform(self, call: Call, action: Action) -> Any:
        command, arguments = call.command, call.arguments
        if isinstance(action, Reply):
            return copy.deepcopy(action.value)
        if isinstance(action, Fail):
            if action.effect:
                await self._simulate(command, arguments)
            raise self._error(command, action.desc, action.error_class)
        if isinstance(action, Hang):
            call.outcome = "hung"
            return await self._hang(command)
        if isinstance(action, LoseReply):
            await self._simulate(command, arguments)
            call.outcome = "reply-lost"
            return await self._hang(command)
        return await self._simulate(command, arguments)

    async def _hang(self, command: str) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(future)
        try:
            await future
        finally:
            self._pending.discard(future)
        raise AssertionError("a hung fake command was answered")  # _fail_pending raises

    def _fail_pending(self, why: str) -> None:
        for future in list(self._pending):
            if not future.done():
                future.set_exception(
                    QemuError(f"lost the QMP session to {self.name} ({why})", command=None)
                )

    def _error(self, command: str, desc: str, error_class: str = "GenericError") -> QemuError:
        return QemuError(
            f"{command} failed on {self.name}: {desc}",
            command=command,
            detail={"class": error_class, "desc": desc},
        )

    async def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Emit a QMP event, stamped now (realtime), to every listener of this session."""
        now = time.time()
        seconds = int(now)
        message: dict[str, Any] = {
            "event": name,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
        if data is not None:
            message["data"] = dict(data)
        self.world.record(self.name, "event", name, data)
        if self.alive and self.reachable and not self.closed:
            await self._client.dispatch(Message(message))

    async def set_runstate(self, state: str) -> None:
        """Move the VM to ``state``, with QEMU's ``STOP``/``RESUME`` events."""
        if state not in RUNSTATES:
            raise ValueError(f"unknown run state {state!r}")
        previous = self.runstate
        if state == previous:
            return
        self.runstate = state
        self.world.record(self.name, "runstate", state, {"from": previous})
        if state == "running":
            self.world.started_running(self)
            await self.emit("RESUME")
        elif previous == "running":
            await self.emit("STOP")

    async def set_migration(self, status: str, error_desc: str | None = None) -> None:
        """Move the migration to ``status``; ``MIGRATION`` event if ``events`` is on."""
        if status not in MIGRATION_STATUSES:
            raise ValueError(f"unknown migration status {status!r}")
        previous = self.migration_status
        self.migration_status = status
        if error_desc is not None:
            self.error_desc = error_desc
        self.world.record(self.name, "migration", status, {"from": previous})
        if self.capabilities.get("events"):
            await self.emit("MIGRATION", {"status": status})

    # -- the simulation -------------------------------------------------------------------

    async def _simulate(self, command: str, arguments: dict[str, Any] | None) -> Any:
        handler = getattr(self, "_qmp_" + command.replace("-", "_"), None)
        if handler is None:
            raise self._error(
                command, f"The command {command} has not been found", "CommandNotFound"
            )
        return await handler(arguments or {})

    async def _qmp_query_status(self, args: dict[str, Any]) -> Any:
        return {"status": self.runstate, "running": self.running, "singlestep": False}

    async def _qmp_query_migrate(self, args: dict[str, Any]) -> Any:
        if self._migrate_t0 and self.migration_status in ("setup", "active"):
            await self._advance_outgoing()
        return self._migration_info()

    async def _qmp_query_memory_size_summary(self, args: dict[str, Any]) -> Any:
        return {"base-memory": self.ram_bytes, "plugged-memory": 0}

    async def _qmp_query_cpus_fast(self, args: dict[str, Any]) -> Any:
        return [
            {
                "cpu-index": 0,
                "qom-path": "/machine/unattached/device[0]",
                "thread-id": 4242,
                "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0},
                "target": "x86_64",
            }
        ]

    async def _qmp_qom_get(self, args: dict[str, Any]) -> Any:
        path, prop = args.get("path"), args.get("property")
        if (path, prop) == ("/machine", "type"):
            return f"{self.machine}-machine"
        if (path, prop) == ("/machine/unattached/device[0]", "type"):
            return f"{self.cpu_model}-x86_64-cpu"
        raise self._error("qom-get", f"Device '{path}' not found", "DeviceNotFound")

    async def _qmp_qom_list(self, args: dict[str, Any]) -> Any:
        if args.get("path") == "/objects":
            return [{"name": "pc.ram", "type": "child<memory-backend-ram>"}]
        raise self._error("qom-list", f"Device '{args.get('path')}' not found", "DeviceNotFound")

    async def _qmp_query_block(self, args: dict[str, Any]) -> Any:
        return []

    async def _qmp_query_version(self, args: dict[str, Any]) -> Any:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}

    async def _qmp_query_kvm(self, args: dict[str, Any]) -> Any:
        return {"enabled": False, "present": False}

    async def _qmp_query_migrate_capabilities(self, args: dict[str, Any]) -> Any:
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    async def _qmp_query_migrate_parameters(self, args: dict[str, Any]) -> Any:
        return dict(self.parameters)

    async def _qmp_migrate_set_capabilities(self, args: dict[str, Any]) -> Any:
        if self.migration_status in IN_PROGRESS:
            raise self._error("migrate-set-capabilities", "There's a migration process in progress")
        for cap in args.get("capabilities", []):
            if cap["capability"] not in self.capabilities:
                raise self._error(
                    "migrate-set-capabilities",
                    f"Parameter 'capability' does not accept value '{cap['capability']}'",
                )
        for cap in args.get("capabilities", []):
            self.capabilities[cap["capability"]] = bool(cap["state"])
        return {}

    async def _qmp_migrate_set_parameters(self, args: dict[str, Any]) -> Any:
        for key in args:
            if key not in self.parameters:
                raise self._error("migrate-set-parameters", f"Parameter '{key}' is unexpected")
        self.parameters.update(args)
        return {}

    async def _qmp_stop(self, args: dict[str, Any]) -> Any:
        if self.runstate == "inmigrate":
            self.autostart = False
        elif self.runstate == "running":
            await self.set_runstate("paused")
        return {}

    async def _qmp_cont(self, args: dict[str, Any]) -> Any:
        if self.runstate == "inmigrate":
            self.autostart = True  # QEMU: runs once the incoming migration completes
        elif self.runstate != "running":
            await self.set_runstate("running")
        return {}

    async def _qmp_quit(self, args: dict[str, Any]) -> Any:
        await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        await self.kill("quit")
        return {}

    async def _qmp_announce_self(self, args: dict[str, Any]) -> Any:
        return {}

    async def _qmp_migrate(self, args: dict[str, Any]) -> Any:
        if self.migration_status in IN_PROGRESS:
            raise self._error("migrate", "There's a migration process in progress")
        uri = str(args["uri"])
        self.outgoing_to = self.world.listening(uri, other_than=self)
        refused = f"Failed to connect to '{uri}': Connection refused"
        self._connect_error = None if self.outgoing_to is not None else refused
        self._polls, self._migrate_t0 = 0, time.monotonic()
        self._total_ms = self.error_desc = None
        await self.set_migration("setup")
        if self.outgoing_to is not None:
            await self.outgoing_to._incoming_connected(self)
        return {}

    async def _qmp_migrate_cancel(self, args: dict[str, Any]) -> Any:
        if self.migration_status in _CANCELLABLE:
            await self.set_migration("cancelling")
            await self.set_migration("cancelled")
            await self._restart_after_failed_completion()
            await self._break_peer("load of migration failed: Input/output error")
        return {}

    async def _qmp_migrate_continue(self, args: dict[str, Any]) -> Any:
        if self.migration_status != args.get("state") or self.migration_status != "pre-switchover":
            raise self._error(
                "migrate-continue", f"Migration not in expected state: {self.migration_status}"
            )
        await self._complete_outgoing()
        return {}

    async def _qmp_migrate_incoming(self, args: dict[str, Any]) -> Any:
        if self.incoming != "defer" or self.runstate != "inmigrate":
            raise self._error("migrate-incoming", "For use with '-incoming defer'")
        if self.incoming_uri is not None:
            raise self._error("migrate-incoming", "The incoming migration has already been started")
        self.incoming_uri = str(args["uri"])
        await self.set_migration("setup")
        return {}

    # -- the two ends of a migration --------------------------------------------------------

    def _migration_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.blockers:
            info["blocked-reasons"] = list(self.blockers)
        if self.migration_status == "none":
            return info
        info["status"] = self.migration_status
        if self.error_desc is not None and self.migration_status == "failed":
            info["error-desc"] = self.error_desc
        if not self._migrate_t0:
            return info  # the incoming side reports only its status
        done = self.migration_status in ("completed", "device", "pre-switchover")
        share = 1.0 if done else min(1.0, self._polls / max(1, (self.precopy_polls or 8) + 1))
        transferred = int(self.ram_bytes * share)
        elapsed_ms = (time.monotonic() - self._migrate_t0) * 1e3
        info["setup-time"] = 1
        info["total-time"] = int(self._total_ms if self._total_ms is not None else elapsed_ms)
        info["ram"] = {
            "total": self.ram_bytes,
            "transferred": transferred,
            "remaining": self.ram_bytes - transferred,
            "duplicate": 0,
            "normal": transferred // 4096,
            "normal-bytes": transferred,
            "dirty-pages-rate": 0,
            "mbps": 1000.0,
            "dirty-sync-count": self._polls + 1,
            "page-size": 4096,
            "postcopy-requests": 0,
        }
        if self.migration_status == "active":
            info["expected-downtime"] = 10
        if self.migration_status == "completed":
            info["downtime"] = 12
        return info

    async def _advance_outgoing(self) -> None:
        if self.migration_status == "setup":
            if self._connect_error is not None:
                await self._fail_outgoing(self._connect_error)
            else:
                await self.set_migration("active")
            return
        self._polls += 1
        # QEMU switches over once the rest fits the downtime-limit; a limit in the
        # thousands of seconds (the operator's "switch over now") always fits.
        forced = int(self.parameters.get("downtime-limit", 300)) >= SWITCH_ANYWAY_MS
        if forced or (self.precopy_polls is not None and self._polls >= self.precopy_polls):
            self._was_running = self.runstate == "running"
            await self.set_runstate("finish-migrate")
            if self.capabilities["pause-before-switchover"]:
                await self.set_migration("pre-switchover")
            else:
                await self._complete_outgoing()

    async def _complete_outgoing(self) -> None:
        peer = self.outgoing_to
        if peer is None or not peer.alive:
            await self._fail_outgoing("Unable to write to socket: Broken pipe")
            return
        if self.migration_status == "pre-switchover":
            await self.set_migration("device")
        await self.set_runstate("postmigrate")
        self._total_ms = (time.monotonic() - self._migrate_t0) * 1e3
        await self.set_migration("completed")
        await peer._incoming_completed()

    async def _fail_outgoing(self, desc: str) -> None:
        await self.set_migration("failed", error_desc=desc)
        await self._restart_after_failed_completion()
        await self._break_peer("load of migration failed: Input/output error")

    async def _restart_after_failed_completion(self) -> None:
        # QEMU's migration_iteration_finish: a VM that ran before completion stopped it
        # runs again; otherwise it stays stopped (postmigrate).
        if self.runstate == "finish-migrate":
            await self.set_runstate("running" if self._was_running else "postmigrate")

    async def _break_peer(self, desc: str) -> None:
        peer = self.outgoing_to
        if peer is not None and peer.alive and peer.migration_status in IN_PROGRESS:
            await peer._incoming_failed(desc)

    async def _incoming_connected(self, source: FakeQmp) -> None:
        self.incoming_from = source
        await self.set_migration("active")

    async def _incoming_completed(self) -> None:
        # QEMU's process_incoming_migration_bh: run state first, then the status.
        await self.set_runstate("running" if self.autostart else "paused")
        await self.set_migration("completed")

    async def _incoming_failed(self, desc: str) -> None:
        await self.set_migration("failed", error_desc=desc)
        if self.exit_on_incoming_failure:
            await self.kill(f"incoming migration failed: {desc}")


def fake_pair(
    *,
    precopy_polls: int | None = 2,
    autostart: bool = False,
    ram_bytes: int = 128 << 20,
    world: FakeWorld | None = None,
) -> tuple[FakeQmp, FakeQmp]:
    """A running source and a target waiting with ``-incoming defer`` (``-S`` unless
    ``autostart``), sharing one :class:`FakeWorld`."""
    world = world if world is not None else FakeWorld()
    source = FakeQmp(
        "source", runstate="running", precopy_polls=precopy_polls, ram_bytes=ram_bytes, world=world
    )
    target = FakeQmp(
        "target",
        runstate="inmigrate",
        incoming="defer",
        autostart=autostart,
        ram_bytes=ram_bytes,
        world=world,
    )
    return source, target
