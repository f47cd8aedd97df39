"""The migration journal: what a crashed ``livemig`` left half done, on disk.

One JSON file per migration, ``<state dir>/journal/<migration id>.json``, written
atomically (temporary file, fsync, rename, fsync of the directory) before every
phase change, so that after a crash of the engine (SIGKILL, OOM, a reboot of the
machine running it) :mod:`migrate.recover` knows which two QEMUs to look at and
which of them may hold the VM. It records:

- the endpoints (QMP sockets resolved, migration URI, netns) and the strategy;
- whether the VM ran on the source at the start, and the source's migration
  settings then (``query-migrate-capabilities``/``-parameters``), to put back;
- the phase, and the *point of no return*: set just before the target is sent
  ``cont`` (by :func:`point_of_no_return`, which :mod:`migrate.safety` calls), from
  when on the target, not the source, is the VM;
- with ``--with-local-disks``, the disk copy (:class:`JournalDisks`: the target's
  image paths and NBD exports, the source's NBD client nodes and mirror jobs),
  written before the target's NBD server starts, so that recovery can stop the
  copy and remove the target's partial images (or, the VM on the target, drop
  its exports);
- the outcome, after which the journal is *finished*: its file moves to
  ``journal/done/`` (pruned after :data:`KEEP_FINISHED_S`).

An unfinished journal names a VM (its source QMP socket, and its name) that
``livemig migrate`` refuses to touch until ``livemig recover`` settled it. While a
migration runs, its process holds an ``flock`` on ``journal/<id>.lock``: the kernel
drops it when the process dies, so a held lock means "in progress", never "crashed".

A journal is opened by :func:`migrate.engine.run_migration` when the request has a
``state_dir`` (the CLI's ``--state-dir``, default ``/var/lib/livemig``); without one
(library users who did not ask) nothing is written. While a migration runs, its
journal is the *active* one of the task running it (a context variable), which is
how the switchover tail in :mod:`migrate.safety` reaches it without a parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from migrate.codec import from_dict, to_dict
from migrate.errors import ConfigError
from migrate.phase import Phase
from migrate.request import HostEndpoint, MigrationRequest

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR: Final = Path("/var/lib/livemig")
STATE_DIR_ENV: Final = "LIVEMIG_STATE_DIR"
JOURNAL_VERSION: Final = 1
#: Finished journals are kept this long in ``journal/done/`` (30 days).
KEEP_FINISHED_S: Final = 30 * 86400
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def state_dir_for_cli(flag: Path | None) -> Path:
    """The CLI's state directory: ``--state-dir``, else ``$LIVEMIG_STATE_DIR``, else the default."""
    if flag is not None:
        return flag
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else DEFAULT_STATE_DIR


# -- the record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEndpoint:
    """One side as recorded: the QMP socket (resolved), migration URI, netns."""

    name: str
    qmp_socket: str | None
    migration_uri: str | None = None
    netns: str | None = None

    @classmethod
    def of(cls, endpoint: HostEndpoint, with_uri: bool) -> JournalEndpoint:
        sock = str(endpoint.qmp_socket.resolve()) if endpoint.qmp_socket is not None else None
        uri = endpoint.migration_uri if with_uri else None
        return cls(endpoint.name, sock, uri, endpoint.netns)


@dataclass(frozen=True)
class MigrationSettings:
    """A QEMU's migration capabilities and parameters, as it reported them."""

    capabilities: dict[str, bool]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class PhaseMark:
    phase: Phase
    at: float


@dataclass(frozen=True)
class JournalDisk:
    """One local disk being copied: its names on both sides.

    ``target_image``: the target QEMU's image of it (on the target host), partial
    until the migration completes; ``export_id``: the target's NBD export of it;
    ``client_node``/``job_id``: the source's NBD client node and mirror job;
    ``source_node``: the source's disk node (where the comparison's bitmap goes);
    ``replica_dir``: the replica directory the copy starts from (recovery releases
    the replica, or marks it consumed), None for a full copy.
    """

    name: str
    target_image: str | None
    export_id: str
    client_node: str
    job_id: str
    source_node: str
    replica_dir: str | None = None


@dataclass(frozen=True)
class JournalDisks:
    """The disk copy of a migration: the target's NBD server (``nbd_address``, for
    messages), each disk, and the names the in-downtime comparison uses on the
    source (a block dirty bitmap on each disk node, a read-only NBD export)."""

    nbd_address: str
    disks: tuple[JournalDisk, ...]
    verify_bitmap: str = ""
    verify_export: str = ""


@dataclass(frozen=True)
class JournalOutcome:
    """How the migration ended: ``status`` (the report's, or ``refused``, ``error``,
    ``recovered``, ``forgotten``), why, and where the VM was found (``source``,
    ``target``, None: not confirmed)."""

    status: str
    error: str | None
    vm_on: str | None
    at: float


@dataclass(frozen=True)
class JournalRecord:
    """Everything the journal file holds (its JSON is ``codec.to_dict`` of this)."""

    migration_id: str
    vm: str
    vm_key: str
    strategy: str
    source: JournalEndpoint
    target: JournalEndpoint
    source_was_running: bool
    settings: MigrationSettings | None
    owner_pid: int
    owner_host: str
    created_at: float
    phase: Phase = Phase.SETUP
    history: tuple[PhaseMark, ...] = ()
    point_of_no_return: bool = False
    point_of_no_return_at: float | None = None
    outcome: JournalOutcome | None = None
    finished: bool = False
    recovery: dict[str, Any] | None = None
    disks: JournalDisks | None = None
    version: int = JOURNAL_VERSION

    @classmethod
    def for_request(
        cls,
        request: MigrationRequest,
        source_was_running: bool,
        settings: MigrationSettings | None,
    ) -> JournalRecord:
        now = time.time()
        return cls(
            migration_id=request.migration_id,
            vm=request.vm,
            vm_key=vm_key(request.source, request.vm),
            strategy=request.strategy,
            source=JournalEndpoint.of(request.source, with_uri=False),
            target=JournalEndpoint.of(request.target, with_uri=True),
            source_was_running=source_was_running,
            settings=settings,
            owner_pid=os.getpid(),
            owner_host=socket.gethostname(),
            created_at=now,
            history=(PhaseMark(Phase.SETUP, now),),
        )

    @property
    def sockets(self) -> frozenset[str]:
        return frozenset(s for s in (self.source.qmp_socket, self.target.qmp_socket) if s)

    def describe_vm(self) -> str:
        where = self.source.qmp_socket or "no QMP socket recorded"
        return f"{self.vm} ({where})"

    def to_json(self) -> bytes:
        return (json.dumps(to_dict(self), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> JournalRecord:
        return from_dict(cls, json.loads(data))


def vm_key(source: HostEndpoint, vm: str) -> str:
    """What names a VM across migrations: its source QMP socket (resolved), else its name."""
    if source.qmp_socket is not None:
        return f"qmp:{source.qmp_socket.resolve()}"
    return f"vm:{vm}"


def _request_sockets(request: MigrationRequest) -> frozenset[str]:
    return frozenset(
        str(e.qmp_socket.resolve())
        for e in (request.source, request.target)
        if e.qmp_socket is not None
    )


def _same_vm(record: JournalRecord, request: MigrationRequest) -> bool:
    """Whether ``request`` touches a QEMU of ``record`` (or, without sockets, its VM)."""
    mine = _request_sockets(request)
    if mine or record.sockets:
        return bool(mine & record.sockets)
    return record.vm_key == vm_key(request.source, request.vm)


# -- the files ----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a reader (or a crash) sees the old or the new file
    whole. ``mode`` is the new file's permissions (0o600 for keys: never readable by
    others, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crashed writer would keep its old mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class JournalBusy(ConfigError):
    """Another live process holds the journal's lock (migrating or recovering)."""


class JournalStore:
    """The journals under ``state_dir/journal``: unfinished ones there, finished in ``done/``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "journal"
        self.done_dir = self.dir / "done"

    def _ensure(self) -> None:
        try:
            self.done_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the journal directory {self.dir}: {exc}") from exc

    def path(self, migration_id: str) -> Path:
        if not _ID_RE.match(migration_id):
            raise ConfigError(f"migration id {migration_id!r} cannot name a journal file")
        return self.dir / f"{migration_id}.json"

    def lock_path(self, migration_id: str) -> Path:
        return self.dir / f"{migration_id}.lock"

    def unfinished(self) -> list[JournalRecord]:
        """Every unfinished journal, oldest first. Raises ConfigError for an unreadable one."""
        if not self.dir.is_dir():
            return []
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(JournalRecord.from_json(path.read_bytes()))
            except FileNotFoundError:
                continue  # finished meanwhile
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"unreadable migration journal {path}: {exc} (move it away after checking "
                    "its VM by hand)"
                ) from exc
        return sorted(records, key=lambda r: r.created_at)

    def finished(self, migration_id: str) -> JournalRecord | None:
        """The finished journal of ``migration_id``, if there is one."""
        path = self.done_dir / f"{migration_id}.json"
        try:
            return JournalRecord.from_json(path.read_bytes())
        except FileNotFoundError:
            return None

    def owner_alive(self, migration_id: str) -> bool:
        """Whether a live process holds the journal's lock (its migration or recovery runs)."""
        try:
            fd = os.open(self.lock_path(migration_id), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ConfigError(f"cannot open {self.lock_path(migration_id)}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def check_vm_free(self, request: MigrationRequest) -> None:
        """Refuse (:class:`ConfigError`) if a journal left unfinished touches the request's VM."""
        for record in self.unfinished():
            if not _same_vm(record, request):
                continue
            if self.owner_alive(record.migration_id):
                raise JournalBusy(
                    f"VM {record.describe_vm()} is being migrated (or recovered) by process "
                    f"{record.owner_pid}: migration {record.migration_id} (phase {record.phase})"
                )
            hint = "" if self.state_dir == DEFAULT_STATE_DIR else f" --state-dir {self.state_dir}"
            raise ConfigError(
                f"VM {record.describe_vm()} has an unfinished migration {record.migration_id} "
                f"(phase {record.phase}): run `livemig recover{hint}`"
            )

    @contextlib.contextmanager
    def _dir_lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock the journal directory {self.dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def begin(self, request: MigrationRequest, record: JournalRecord) -> MigrationJournal:
        """Write ``record`` as a new journal and take its lock; refuse like :meth:`check_vm_free`.

        Check and creation happen under one directory lock: two processes cannot both
        start on one VM.
        """
        self._ensure()
        path = self.path(record.migration_id)
        with self._dir_lock():
            self.check_vm_free(request)
            if path.exists() or (self.done_dir / path.name).exists():
                raise ConfigError(f"a journal for migration {record.migration_id} already exists")
            lock = self._take_lock(record.migration_id)
            try:
                write_atomically(path, record.to_json())
            except OSError as exc:
                self._drop_lock(record.migration_id, lock)
                raise ConfigError(f"cannot write the migration journal {path}: {exc}") from exc
        self.prune()
        return MigrationJournal(self, record, lock)

    def _take_lock(self, migration_id: str) -> int:
        path = self.lock_path(migration_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalBusy(
                f"migration {migration_id} is being handled by another process"
            ) from None
        return fd

    def _drop_lock(self, migration_id: str, fd: int) -> None:
        with contextlib.suppress(OSError):
            self.lock_path(migration_id).unlink()
        os.close(fd)

    @contextlib.contextmanager
    def claim(self, record: JournalRecord) -> Iterator[MigrationJournal]:
        """The unfinished journal of ``record``, locked for recovery (JournalBusy if held)."""
        fd = self._take_lock(record.migration_id)
        journal = MigrationJournal(self, record, fd)
        try:
            yield journal
        finally:
            journal.close()

    def prune(self, now: float | None = None) -> None:
        """Remove finished journals older than :data:`KEEP_FINISHED_S` (best effort)."""
        cutoff = (now if now is not None else time.time()) - KEEP_FINISHED_S
        for path in [*self.done_dir.glob("*.json"), *self.dir.glob(".*.tmp")]:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


class MigrationJournal:
    """One migration's journal, open and locked by the process migrating (or recovering) it.

    Every change rewrites the file atomically before returning. :meth:`phase` and
    :meth:`point_of_no_return` raise ``OSError`` if the file cannot be written (the
    migration must then not go on); :meth:`finish` never raises.
    """

    def __init__(self, store: JournalStore, record: JournalRecord, lock_fd: int | None) -> None:
        self.store = store
        self.record = record
        self._lock_fd = lock_fd
        self.write_seconds: list[float] = []

    @property
    def path(self) -> Path:
        return self.store.path(self.record.migration_id)

    def _write(self, **changes: Any) -> None:
        began = time.perf_counter()
        record = dataclasses.replace(self.record, **changes)
        write_atomically(self.path, record.to_json())
        self.record = record
        self.write_seconds.append(time.perf_counter() - began)

    def phase(self, phase: Phase) -> None:
        """Record the phase the migration enters."""
        if phase is self.record.phase or self.record.finished:
            return
        mark = PhaseMark(phase, time.time())
        self._write(phase=phase, history=(*self.record.history, mark))

    def point_of_no_return(self) -> None:
        """Record that the target may run the VM from now on (just before its ``cont``)."""
        if not self.record.point_of_no_return and not self.record.finished:
            self._write(point_of_no_return=True, point_of_no_return_at=time.time())

    def record_disks(self, disks: JournalDisks) -> None:
        """Record the disk copy about to start (before the target's NBD server)."""
        if not self.record.finished:
            self._write(disks=disks)

    def finish(self, outcome: JournalOutcome, recovery: dict[str, Any] | None = None) -> bool:
        """Record the outcome, mark the journal finished and move it to ``done/``.

        Best effort: False (logged) if the file could not be written or moved.
        """
        try:
            self._write(outcome=outcome, finished=True, recovery=recovery)
            os.replace(self.path, self.store.done_dir / self.path.name)
            _fsync_dir(self.store.done_dir)
            _fsync_dir(self.store.dir)
        except OSError as exc:
            log.error("migration journal %s: cannot mark it finished: %s", self.path, exc)
            return False
        finally:
            self.close()
        return True

    def keep(self, outcome: JournalOutcome) -> None:
        """Record the outcome but leave the journal unfinished (recovery needed); never raises."""
        try:
            self._write(outcome=outcome)
        except OSError as exc:
            log.error("migration journal %s: cannot record the outcome: %s", self.path, exc)
        self.close()

    def close(self) -> None:
        """Release the lock (the journal file stays as it is)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        if self.record.finished:
            with contextlib.suppress(OSError):
                self.store.lock_path(self.record.migration_id).unlink()
        os.close(fd)


# -- the journal of the migration this task runs -------------------------------------------

_ACTIVE: ContextVar[MigrationJournal | None] = ContextVar("livemig_journal", default=None)


@contextlib.contextmanager
def active(journal: MigrationJournal | None) -> Iterator[None]:
    """Make ``journal`` the one :func:`point_of_no_return` marks, in this task and its children."""
    token = _ACTIVE.set(journal)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def point_of_no_return() -> None:
    """Mark the point of no return in the running migration's journal (none: nothing).

    Call just before sending the target ``cont`` (or, for a target that runs on
    its own, before declaring it the VM): from then on recovery makes the target
    the VM. Raises ``OSError`` if the journal cannot be written; the target must
    then not be resumed.
    """
    journal = _ACTIVE.get()
    if journal is not None:
        journal.point_of_no_return()


def record_disks(disks: JournalDisks) -> None:
    """Record the disk copy in the running migration's journal (none: nothing).

    Call before the first step of the copy (the target's NBD server). Raises
    ``OSError`` if the journal cannot be written; the copy must then not start.
    """
    journal = _ACTIVE.get()
    if journal is not None:
        journal.record_disks(disks)
