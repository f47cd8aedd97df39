"""After a crash: bring each VM of an unfinished journal back to exactly one running copy.

:func:`recover_all` takes every unfinished journal (:mod:`migrate.journal`) whose
owner process is gone, looks at both QEMUs (``query-status``, ``query-migrate``,
each with a deadline) and acts on what it finds:

- **the target runs**: it is the VM (after the point of no return, or a target
  started without ``-S``): the source QEMU is told to quit (after a post-copy has
  brought the target every page), and the target's NBD exports of a disk copy
  dropped (its images, the VM's disks now, stay);
- **after the point of no return**, the target paused with the whole VM (its
  incoming migration completed): it gets ``cont``, then as above;
- **before the point of no return**: the source's outgoing migration is cancelled,
  a disk copy stopped (:mod:`migrate.disks.leftovers`: mirror jobs, NBD client
  nodes), the target QEMU quit and, once it is gone, its partial disk images
  removed; the source's migration settings put back as they were at the start,
  and the source resumed if it ran then;
- **neither side provable** (both unreachable, or the side that should run is
  gone, or a target that may hold the whole VM cannot be reached): nothing is
  resumed; the result is ``unknown`` with both sides' state and what to do.

Each action is checked afterwards with the same test the engine applies at the
end of every journaled migration (:func:`vm_location`): exactly one side runs, the
other is not running (or its QEMU is gone). Only then is the journal finished.

A QEMU is *gone* when its QMP socket is missing or refuses connections (nobody
listens: the process has exited); *unreachable* when it listens but does not
answer within the deadline (alive, state unknown). QEMU serves one QMP client at
a time, so recovery needs the crashed engine's sessions to be closed, which the
kernel does when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from migrate.codec import to_dict
from migrate.deadline import within
from migrate.disks.leftovers import (
    remove_target_images,
    settle_replicas,
    stop_source_copy,
    stop_target_exports,
)
from migrate.errors import ConfigError, QemuError
from migrate.journal import (
    JournalBusy,
    JournalOutcome,
    JournalRecord,
    JournalStore,
    MigrationSettings,
)
from migrate.qmp import QmpSession
from migrate.safety import ACTIVE_STATUSES, ANNOUNCE_NOW, restore_settings

T = TypeVar("T")

VM_BACK_ON_SOURCE: Final = "vm back on source"
VM_ON_TARGET: Final = "vm on target"
UNKNOWN: Final = "unknown"
IN_PROGRESS: Final = "in progress"
#: How long a quit QEMU may take to go away (its socket to refuse connections).
QUIT_WAIT_S: Final = 5.0
#: How long a cancelled outgoing migration may take to stop.
CANCEL_WAIT_S: Final = 10.0
_POSTCOPY_LIVE: Final = frozenset({"postcopy-active", "postcopy-recover"})
_POSTCOPY: Final = _POSTCOPY_LIVE | {"postcopy-paused"}


@dataclass(frozen=True)
class SideState:
    """What was seen of one QEMU.

    ``reachable``: it answered; then ``status`` (run state) and ``migration``
    (``query-migrate``'s status, ``none`` if it never migrated). ``gone``: provably
    no QEMU behind the socket. Neither: alive or unknown, state unknown (``detail``).
    """

    side: str
    socket: str | None
    reachable: bool = False
    gone: bool = False
    status: str | None = None
    migration: str | None = None
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.reachable and self.status == "running"

    @property
    def not_running(self) -> bool:
        """Provably not running the VM: gone, or answering with another state."""
        return self.gone or (self.reachable and self.status != "running")

    def describe(self) -> str:
        if self.reachable:
            return f"{self.side} {self.status}, migration {self.migration}"
        if self.gone:
            return f"{self.side} QEMU gone ({self.detail})"
        return f"{self.side} unreachable ({self.detail})"


def vm_location(was_running: bool, source: SideState, target: SideState) -> str | None:
    """Where the one copy of the VM is: ``source``, ``target``, or None (not settled).

    Settled on the target: it runs and the source provably does not. On the
    source: the target provably does not run, the source answers without an
    outgoing migration under way, and runs if the VM ran at the start.
    """
    if target.running and source.not_running:
        return "target"
    if (
        target.not_running
        and source.reachable
        and source.migration not in ACTIVE_STATUSES
        and (source.running or not was_running)
    ):
        return "source"
    return None


# -- reaching QEMUs ---------------------------------------------------------------------


class Qemus(Protocol):
    """How recovery reaches a QEMU by its QMP socket (a fake one in unit tests)."""

    async def listening(self, socket: str, timeout: float) -> bool | None:
        """True: something listens on ``socket``; False: provably nothing; None: cannot tell."""
        ...

    async def connect(self, socket: str, side: str, timeout: float) -> QmpSession:
        """A QMP session (raises QemuError/ConfigError)."""
        ...


class SocketQemus:
    """QEMUs behind real UNIX sockets."""

    async def listening(self, socket: str, timeout: float) -> bool | None:
        path = Path(socket)
        if not path.exists():
            return False
        if not path.is_socket():
            return None
        try:
            _, writer = await within(asyncio.open_unix_connection(socket), timeout)
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # nobody listens: the QEMU that did has exited
        except (OSError, TimeoutError):
            return None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def connect(self, socket: str, side: str, timeout: float) -> QmpSession:
        return await QmpSession.connect(socket, f"recover-{side}", timeout)


async def _bounded(call: Awaitable[T], timeout: float, what: str) -> T:
    try:
        return await within(call, timeout)
    except TimeoutError:
        raise QemuError(f"{what}: no answer within {timeout:g} s", command=what) from None


async def query_side(
    session: QmpSession, side: str, socket: str | None, timeout: float
) -> SideState:
    """``query-status`` and ``query-migrate`` on a session (each within ``timeout``)."""
    status = await _bounded(session.status(), timeout, f"query-status on the {side}")
    info = await _bounded(session.execute("query-migrate"), timeout, f"query-migrate on the {side}")
    return SideState(side, socket, True, False, status, str(info.get("status", "none")))


class Side:
    """One QEMU of a journal: its socket, the session recovery opened, what it saw."""

    def __init__(self, side: str, socket: str | None, qemus: Qemus, timeout: float) -> None:
        self.side = side
        self.socket = socket
        self.qemus = qemus
        self.timeout = timeout
        self.session: QmpSession | None = None
        self.state = SideState(side, socket, detail="not looked at")

    async def observe(self) -> SideState:
        """Look (again): through the open session, else by connecting."""
        self.state = await self._observe()
        return self.state

    async def _observe(self) -> SideState:
        if self.session is not None:
            try:
                return await query_side(self.session, self.side, self.socket, self.timeout)
            except QemuError as exc:
                await self.close()
                return await self._unanswered(str(exc))
        if self.socket is None:
            return SideState(self.side, None, detail="no QMP socket recorded in the journal")
        gone = await self._gone_detail()
        if gone is not None:
            return SideState(self.side, self.socket, gone=True, detail=gone)
        try:
            self.session = await self.qemus.connect(self.socket, self.side, self.timeout)
        except (QemuError, ConfigError) as exc:
            return await self._unanswered(str(exc))
        return await self._observe()

    async def _unanswered(self, why: str) -> SideState:
        gone = await self._gone_detail()
        if gone is not None:
            return SideState(self.side, self.socket, gone=True, detail=gone)
        return SideState(self.side, self.socket, detail=why)

    async def _gone_detail(self) -> str | None:
        if self.socket is None:
            return None
        listening = await self.qemus.listening(self.socket, self.timeout)
        return f"nothing listens on {self.socket}" if listening is False else None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.session is None:
            raise QemuError(f"{command}: no QMP session to the {self.side}", command=command)
        return await _bounded(
            self.session.execute(command, arguments), self.timeout, f"{command} on the {self.side}"
        )

    async def quit(self) -> str:
        """Tell the QEMU to quit and wait for it to go; what happened, as a note."""
        with contextlib.suppress(QemuError):  # QEMU may close the socket while answering
            await self.execute("quit")
        await self.close()
        if await self.wait_gone(QUIT_WAIT_S):
            return f"quit the {self.side} QEMU"
        return f"the {self.side} QEMU was told to quit but still listens after {QUIT_WAIT_S:g} s"

    async def wait_gone(self, seconds: float) -> bool:
        if self.socket is None:
            return False
        deadline = time.monotonic() + seconds
        while await self.qemus.listening(self.socket, self.timeout) is not False:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        self.state = SideState(self.side, self.socket, gone=True, detail="its QEMU exited")
        return True

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


# -- one journal -----------------------------------------------------------------------------


@dataclass
class Recovery:
    """What recovery found and did for one migration (``--json`` prints these)."""

    migration_id: str
    vm: str
    strategy: str
    phase: str
    point_of_no_return: bool
    result: str = UNKNOWN
    recovered: bool = False
    source: SideState | None = None
    target: SideState | None = None
    actions: list[str] = field(default_factory=list)
    advice: str | None = None
    seconds: float = 0.0
    journal: str | None = None

    @classmethod
    def of(cls, record: JournalRecord) -> Recovery:
        return cls(
            record.migration_id, record.vm, record.strategy, str(record.phase),
            record.point_of_no_return,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_dict(self)
        return data

    @property
    def where(self) -> str | None:
        return {VM_BACK_ON_SOURCE: "source", VM_ON_TARGET: "target"}.get(self.result)


class _Recoverer:
    def __init__(self, record: JournalRecord, qemus: Qemus, timeout: float, postcopy_wait_s: float):
        self.record = record
        self.result = Recovery.of(record)
        self.src = Side("source", record.source.qmp_socket, qemus, timeout)
        self.tgt = Side("target", record.target.qmp_socket, qemus, timeout)
        self.postcopy_wait_s = postcopy_wait_s

    def did(self, note: str) -> None:
        self.result.actions.append(note)

    async def run(self) -> Recovery:
        began = time.monotonic()
        try:
            src, tgt = await self.src.observe(), await self.tgt.observe()
            self.result.source, self.result.target = src, tgt
            try:
                if tgt.running:
                    await self._on_target()
                elif self.record.point_of_no_return:
                    await self._after_point_of_no_return()
                else:
                    await self._before_point_of_no_return()
            except QemuError as exc:
                self._unknown(f"recovery stopped: {exc}")
        finally:
            await self.src.close()
            await self.tgt.close()
            self.result.seconds = time.monotonic() - began
        return self.result

    # --- the branches ---------------------------------------------------------------

    async def _after_point_of_no_return(self) -> None:
        tgt = self.tgt.state
        # It loaded the VM (pre-copy) or its device state (post-copy) and waits for cont.
        loaded = tgt.migration == "completed" or tgt.migration in _POSTCOPY
        whole = tgt.reachable and loaded and tgt.status in ("paused", "inmigrate")
        if not whole:
            self._unknown(
                f"the point of no return was passed, so the target holds the VM, but "
                f"{tgt.describe()}; the source's copy is stale"
            )
            return
        await self.tgt.execute("cont")
        self.did("resumed the VM on the target")
        with contextlib.suppress(QemuError):
            await self.tgt.execute("announce-self", ANNOUNCE_NOW)
        await self._on_target()

    async def _on_target(self) -> None:
        """The target is the VM: let a post-copy finish, then quit the source."""
        if not await self._postcopy_done():
            return
        if self.src.state.reachable:
            self.did(await self.src.quit())
        elif self.src.state.gone:
            self.did("the source QEMU was already gone")
        else:
            self._unknown(
                f"the VM runs on the target, but the source QEMU cannot be reached to quit it "
                f"({self.src.state.detail}): kill it, it must never run again"
            )
            return
        if self.record.disks is not None and self.tgt.session is not None:
            # The disk copy's NBD exports would leave the VM's disks writable by anyone
            # reaching the port; its images are the VM's disks now and stay.
            for note in await stop_target_exports(self.tgt.execute, self.record.disks):
                self.did(note)
        if self.record.disks is not None:
            for note in settle_replicas(self.record.disks, self.record.migration_id, True):
                self.did(note)
        await self._conclude("target", VM_ON_TARGET)

    async def _postcopy_done(self) -> bool:
        """Wait while the target still pulls pages from the source (post-copy)."""
        deadline = time.monotonic() + self.postcopy_wait_s
        waited = False
        while True:
            tgt = await self.tgt.observe()
            if tgt.migration not in _POSTCOPY_LIVE:
                break
            if time.monotonic() > deadline:
                self._unknown(
                    f"the VM runs on the target, but its post-copy is still {tgt.migration} after "
                    f"{self.postcopy_wait_s:g} s: the source QEMU holds pages it needs; run "
                    "`livemig recover` again later (never kill the source before it completes)"
                )
                return False
            waited = True
            await asyncio.sleep(0.1)
        if tgt.migration == "postcopy-paused":
            self._unknown(
                "post-copy is paused (the link broke): the source QEMU still holds pages the "
                "target needs; resume it with QEMU's migrate-recover/migrate resume=true, then "
                "run `livemig recover` again (never kill the source before that)"
            )
            return False
        if waited:
            self.did(f"waited for the post-copy to complete ({tgt.migration})")
        return True

    async def _before_point_of_no_return(self) -> None:
        src, tgt = self.src.state, self.tgt.state
        if not src.reachable:
            self._unknown(
                f"the VM should go back to the source, but {src.describe()}; "
                f"{tgt.describe()} (its copy was never verified)"
            )
            return
        if not tgt.not_running and src.migration == "completed":
            self._unknown(
                "the source sent the whole VM and the target cannot be reached: it may run "
                "it; resuming the source could start a second copy"
            )
            return
        harmless_target = False
        if src.migration in ACTIVE_STATUSES - {"cancelling"}:
            await self.src.execute("migrate_cancel")
            self.did("cancelled the outgoing migration")
        if not await self._source_migration_stopped():
            return
        if self.record.disks is not None:
            # Before the target goes: a mirror writing to a vanished NBD server fails.
            for note in await stop_source_copy(self.src.execute, self.record.disks):
                self.did(note)
        was_gone, was_reachable = self.tgt.state.gone, self.tgt.state.reachable
        tgt = self.tgt.state if was_gone else await self.tgt.observe()
        if was_reachable and not tgt.reachable and not tgt.gone:
            # Its incoming migration was cancelled: QEMU exits; give it the time to.
            await self.tgt.wait_gone(QUIT_WAIT_S)
            tgt = self.tgt.state
        if tgt.running:
            # A target without -S may have finished loading meanwhile: then it is the VM.
            await self._on_target()
            return
        if tgt.reachable:
            self.did(await self.tgt.quit())
        elif tgt.gone:
            self.did(
                "the target QEMU was already gone"
                if was_gone
                else "the target QEMU exited (its incoming migration was cancelled)"
            )
        else:
            # Reached only if the source never completed its migration (checked above).
            self.did(
                f"could not quit the target QEMU ({tgt.detail}): kill it; it cannot "
                "run the VM (its incoming migration never completed)"
            )
            harmless_target = True
        if self.record.disks is not None:
            if self.tgt.state.gone:
                # A job that outlived its cancel (a slow link's writes in flight) ended
                # when its NBD server went: what it held can go now.
                for note in await stop_source_copy(self.src.execute, self.record.disks):
                    self.did(note)
                for note in remove_target_images(self.record.disks):
                    self.did(note)
            else:
                self.did("kept the target's partial disk images: its QEMU may still hold them")
            for note in settle_replicas(self.record.disks, self.record.migration_id, False):
                self.did(note)
        if self.record.settings is not None:
            await self._restore_settings(self.record.settings)
        if self.record.source_was_running:
            if (await self.src.observe()).status != "running":
                await self.src.execute("cont")
                self.did("resumed the VM on the source")
            with contextlib.suppress(QemuError):
                await self.src.execute("announce-self", ANNOUNCE_NOW)
        await self._conclude("source", VM_BACK_ON_SOURCE, harmless_target)

    async def _source_migration_stopped(self) -> bool:
        deadline = time.monotonic() + CANCEL_WAIT_S
        while (
            state := await self.src.observe()
        ).migration in ACTIVE_STATUSES or not state.reachable:
            if not state.reachable or time.monotonic() > deadline:
                self._unknown(
                    f"the source's outgoing migration did not stop ({self.src.state.describe()})"
                )
                return False
            await asyncio.sleep(0.05)
        return True

    async def _restore_settings(self, settings: MigrationSettings) -> None:
        """Put back the capabilities and parameters the source had at the start."""
        if self.src.session is None:
            self.did("could not restore the source's migration settings: no QMP session")
            return
        for note in await restore_settings(self.src.session, settings):
            self.did(note)

    # --- the verdict ------------------------------------------------------------------

    async def _conclude(self, side: str, result: str, harmless_target: bool = False) -> None:
        """Check the VM runs exactly on ``side``; the result, or unknown.

        ``harmless_target``: an unreachable target counts as not running (it never
        received the whole VM).
        """
        src = await self.src.observe() if self.src.session is not None else self.src.state
        tgt = await self.tgt.observe() if self.tgt.session is not None else self.tgt.state
        if harmless_target and not tgt.reachable:
            tgt = SideState("target", tgt.socket, gone=True, detail=tgt.detail)
        where = vm_location(self.record.source_was_running, src, tgt)
        if where == side:
            self.result.result, self.result.recovered = result, True
            return
        self._unknown(f"after recovery: {src.describe()}; {tgt.describe()}")

    def _unknown(self, why: str) -> None:
        record = self.record
        self.result.result, self.result.recovered = UNKNOWN, False
        done = "; ".join(self.result.actions)
        self.result.advice = (
            f"{why}. {f'Done so far: {done}' if done else 'Nothing was resumed'}. "
            f"Check both QEMUs by hand (source QMP "
            f"{record.source.qmp_socket}, target QMP {record.target.qmp_socket}); make exactly "
            "one copy of the VM run (`cont` it on the side that holds its latest state, `quit` "
            "the other), then run `livemig recover` again; if the VM is restarted from its disks "
            f"instead, `livemig recover --forget {record.migration_id}`"
        )


async def recover_record(
    record: JournalRecord,
    qemus: Qemus | None = None,
    timeout: float = 5.0,
    postcopy_wait_s: float = 120.0,
) -> Recovery:
    """Inspect and settle one journal's VM (the journal itself is not touched)."""
    recoverer = _Recoverer(record, qemus or SocketQemus(), timeout, postcopy_wait_s)
    return await recoverer.run()


async def recover_all(
    store: JournalStore,
    qemus: Qemus | None = None,
    timeout: float = 5.0,
    postcopy_wait_s: float = 120.0,
) -> list[Recovery]:
    """Recover every unfinished journal of ``store``; finish those whose VM was settled.

    A journal whose owner still runs (its lock held) is left alone (``in progress``).
    """
    results = []
    for record in store.unfinished():
        try:
            with store.claim(record) as journal:
                current = _reread(store, record)
                if current is None:
                    continue  # finished by its owner meanwhile
                journal.record = current
                result = await recover_record(current, qemus, timeout, postcopy_wait_s)
                result.journal = str(journal.path)
                if result.recovered:
                    outcome = JournalOutcome("recovered", None, result.where, time.time())
                    journal.finish(outcome, result.to_dict())
                    result.journal = str(store.done_dir / journal.path.name)
        except JournalBusy:
            result = Recovery.of(record)
            result.result = IN_PROGRESS
            result.advice = (
                f"process {record.owner_pid} still handles it (its journal lock is held); if it "
                "hangs, end that process and run `livemig recover` again"
            )
        results.append(result)
    return results


def _reread(store: JournalStore, record: JournalRecord) -> JournalRecord | None:
    try:
        return JournalRecord.from_json(store.path(record.migration_id).read_bytes())
    except FileNotFoundError:
        return None


def forget(store: JournalStore, migration_id: str) -> JournalRecord:
    """Mark an unfinished journal finished without touching its VM (the operator settled it).

    Raises :class:`ConfigError` if there is no such unfinished journal,
    :class:`JournalBusy` if its owner still runs.
    """
    for record in store.unfinished():
        if record.migration_id == migration_id:
            with store.claim(record) as journal:
                journal.finish(
                    JournalOutcome("forgotten", "settled by the operator", None, time.time())
                )
            return record
    raise ConfigError(f"no unfinished migration {migration_id} in {store.dir}")


# -- the engine's check at the end of a journaled migration ----------------------------------


async def observe_held(
    session: QmpSession,
    side: str,
    socket: str | None,
    timeout: float,
    qemus: Qemus | None = None,
    gone_wait_s: float = 0.0,
) -> SideState:
    """What a session the engine still holds shows; a lost one is checked through its socket.

    ``gone_wait_s``: how long a lost QEMU may take to stop listening (one told to
    quit is still exiting).
    """
    try:
        return await query_side(session, side, socket, timeout)
    except QemuError as exc:
        why = str(exc)
    if socket is None:
        return SideState(side, None, detail=why)
    probe = Side(side, socket, qemus or SocketQemus(), timeout)
    if await probe.wait_gone(gone_wait_s):
        return SideState(side, socket, gone=True, detail=why)
    return SideState(side, socket, detail=why)
