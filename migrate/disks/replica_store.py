"""The replica directory: images, the state file, and the lock.

A replica directory on the target host holds, per source disk ``NAME``:

* ``NAME.qcow2`` — the last good replica (generation ``G`` of the state file);
* ``NAME.next.qcow2`` — a run in progress (a full copy, or an overlay backed by
  ``NAME.qcow2`` that receives only the dirty clusters); removed if that run fails;
* ``NAME.commit.qcow2`` — a finished incremental run, recorded in the state file as
  the top of ``NAME.qcow2``'s chain until it is committed into it.

``replica.json`` (written to a temporary file, fsynced, renamed) records each disk's
generation, the source bitmap that holds what changed since it, the last run's time,
mode, bytes and duration. At every instant the state file names a valid image
chain: a killed run leaves at worst a stale ``.next`` image, which the next run
removes. ``.lock`` (``flock``) keeps two runs from sharing a directory.

A migration that starts from a replica (:mod:`~migrate.disks.replica_mirror`) makes
its target image an overlay backed by ``NAME.qcow2``, and marks the disk's entry:
``in_use_by`` (its migration id) while it runs, cleared when it rolls back (the
replica untouched, reusable); ``consumed_by`` once the target holds the VM: the base
image then backs the migrated VM's disk, and the source bitmap no longer describes
it. A replica in use or consumed is never written by ``livemig replicate`` (a clear
refusal: writing the base would corrupt the VM that runs on it) nor used by another
migration (which then mirrors the whole disk). ``livemig recover`` settles the mark
of a migration whose engine died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from migrate.errors import ConfigError

STATE_FILE = "replica.json"
STATE_FORMAT = "livemig-replica"
STATE_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_MAX_STATE_BYTES = 1 << 20


def check_disk_name(name: str) -> str:
    """A disk name usable as a file name and an NBD export name; else ConfigError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(f"disk name {name!r} cannot name a replica (letters, digits, _ . -)")
    return name


@dataclass(frozen=True)
class DiskReplica:
    """One disk's replica: its generation and what the last run did.

    ``bitmap`` is the persistent dirty bitmap on the source disk that records every
    write since generation ``generation`` was taken; ``overlay`` names a finished
    incremental run's image not yet committed into the base image; times are
    realtime seconds, sizes bytes.
    """

    name: str
    device: str
    virtual_size: int
    generation: int
    bitmap: str
    last_run: float
    last_mode: str
    last_bytes: int
    last_seconds: float
    total_bytes: int = 0
    runs: int = 0
    overlay: str | None = None
    in_use_by: str | None = None
    consumed_by: str | None = None
    consumed_at: float | None = None

    @property
    def image(self) -> str:
        return f"{self.name}.qcow2"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "virtual_size": self.virtual_size,
            "generation": self.generation,
            "bitmap": self.bitmap,
            "last_run": self.last_run,
            "last_mode": self.last_mode,
            "last_bytes": self.last_bytes,
            "last_seconds": self.last_seconds,
            "total_bytes": self.total_bytes,
            "runs": self.runs,
            "overlay": self.overlay,
            "in_use_by": self.in_use_by,
            "consumed_by": self.consumed_by,
            "consumed_at": self.consumed_at,
        }

    def unusable(self, migration_id: str | None = None) -> str | None:
        """Why this replica may not be written nor migrated from (None: it may).
        ``migration_id``: the migration asking, which may use a replica it holds."""
        if self.consumed_by is not None:
            return (
                f"replica of disk {self.name} was consumed by migration {self.consumed_by} "
                f"(its base image backs that VM's disk on the target since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.consumed_at or 0))}): "
                "it is stale; start a new replica in another directory"
            )
        if self.in_use_by is not None and self.in_use_by != migration_id:
            return (
                f"replica of disk {self.name} is in use by migration {self.in_use_by} "
                "(if that migration's livemig died, run `livemig recover`)"
            )
        return None

    @classmethod
    def from_dict(cls, data: Any) -> DiskReplica:
        """Raises :class:`ConfigError` for a malformed entry."""
        if not isinstance(data, dict):
            raise ConfigError("replica state: a disk entry is not an object")
        try:
            disk = cls(
                name=check_disk_name(data["name"]),
                device=str(data["device"]),
                virtual_size=_int(data["virtual_size"]),
                generation=_int(data["generation"]),
                bitmap=str(data["bitmap"]),
                last_run=float(data["last_run"]),
                last_mode=str(data["last_mode"]),
                last_bytes=_int(data["last_bytes"]),
                last_seconds=float(data["last_seconds"]),
                total_bytes=_int(data.get("total_bytes", 0)),
                runs=_int(data.get("runs", 0)),
                overlay=None if data.get("overlay") is None else str(data["overlay"]),
                in_use_by=_opt_str(data.get("in_use_by")),
                consumed_by=_opt_str(data.get("consumed_by")),
                consumed_at=None if data.get("consumed_at") is None else float(data["consumed_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"replica state: malformed disk entry ({exc})") from None
        if disk.overlay is not None and disk.overlay != f"{disk.name}.commit.qcow2":
            raise ConfigError(f"replica state: unexpected overlay {disk.overlay!r}")
        return disk


def _opt_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a whole number >= 0: {value!r}")
    return value


@dataclass(frozen=True)
class ReplicaState:
    """The state file: the replica's id (part of every source bitmap's name, so two
    replicas of one disk never share a bitmap), its disks, the last failure."""

    replica_id: str
    disks: dict[str, DiskReplica] = field(default_factory=dict)
    last_failure: dict[str, Any] | None = None

    @classmethod
    def new(cls) -> ReplicaState:
        return cls(replica_id=secrets.token_hex(4))

    def bitmap_prefix(self) -> str:
        return f"livemig-replica-{self.replica_id}-"

    def bitmap_name(self, generation: int) -> str:
        return f"{self.bitmap_prefix()}{generation}"

    def with_disk(self, disk: DiskReplica) -> ReplicaState:
        return replace(self, disks={**self.disks, disk.name: disk}, last_failure=None)

    def with_failure(self, message: str) -> ReplicaState:
        return replace(self, last_failure={"time": time.time(), "error": message})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "replica_id": self.replica_id,
            "disks": [d.to_dict() for d in sorted(self.disks.values(), key=lambda d: d.name)],
            "last_failure": self.last_failure,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReplicaState:
        """Raises :class:`ConfigError` for another file, a newer version or bad data."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ConfigError("not a livemig replica state file")
        if data.get("version") != STATE_VERSION:
            raise ConfigError(f"replica state version {data.get('version')!r} not supported")
        replica_id = data.get("replica_id")
        if not isinstance(replica_id, str) or not re.fullmatch(r"[0-9a-f]{8}", replica_id):
            raise ConfigError(f"replica state: bad replica_id {replica_id!r}")
        entries = data.get("disks")
        if not isinstance(entries, list):
            raise ConfigError("replica state: disks is not a list")
        disks = [DiskReplica.from_dict(e) for e in entries]
        failure = data.get("last_failure")
        if failure is not None and not isinstance(failure, dict):
            raise ConfigError("replica state: last_failure is not an object")
        return cls(replica_id, {d.name: d for d in disks}, failure)


class ReplicaStore:
    """A replica directory (see the module docstring). Paths only; no QEMU."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def base(self, name: str) -> Path:
        return self.dir / f"{check_disk_name(name)}.qcow2"

    def next(self, name: str) -> Path:
        return self.dir / f"{check_disk_name(name)}.next.qcow2"

    def commit(self, name: str) -> Path:
        return self.dir / f"{check_disk_name(name)}.commit.qcow2"

    def top(self, disk: DiskReplica) -> Path:
        """The image whose chain holds generation ``disk.generation``."""
        return self.dir / disk.overlay if disk.overlay else self.base(disk.name)

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load(self) -> ReplicaState:
        """The state, or a new one for a directory without a state file.

        Raises :class:`ConfigError` for an unreadable or malformed file.
        """
        try:
            with self.state_path.open("rb") as handle:
                raw = handle.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return ReplicaState.new()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.state_path}: {exc.strerror}") from None
        if len(raw) > _MAX_STATE_BYTES:
            raise ConfigError(f"{self.state_path}: larger than {_MAX_STATE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.state_path}: not JSON ({exc})") from None
        try:
            return ReplicaState.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{self.state_path}: {exc}") from None

    def save(self, state: ReplicaState) -> None:
        """Replace the state file atomically (temporary file, fsync, rename, fsync dir)."""
        tmp = self.dir / f".{STATE_FILE}.tmp"
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(state.to_dict(), handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)
        self.sync_dir()

    def sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark(self, name: str, migration_id: str, action: str) -> DiskReplica:
        """Mark disk ``name``'s replica for migration ``migration_id`` (under the lock):
        ``claim`` (in use by it), ``release`` (no longer: it rolled back), ``consume``
        (the target holds the VM). Raises :class:`ConfigError` if the replica is gone,
        unusable for this migration, or a replication run holds the directory."""
        with self.locked():
            state = self.load()
            disk = state.disks.get(name)
            if disk is None:
                raise ConfigError(f"no replica of disk {name} in {self.dir}")
            if action == "claim":
                why = disk.unusable(migration_id)
                if why is not None:
                    raise ConfigError(why)
                disk = replace(disk, in_use_by=migration_id)
            elif action == "release":
                if disk.in_use_by != migration_id or disk.consumed_by is not None:
                    return disk
                disk = replace(disk, in_use_by=None)
            elif action == "consume":
                if disk.consumed_by is not None:
                    return disk
                disk = replace(disk, in_use_by=None, consumed_by=migration_id,
                               consumed_at=time.time())  # fmt: skip
            else:
                raise ValueError(f"unknown replica mark {action!r}")
            self.save(replace(state, disks={**state.disks, name: disk}))
            return disk

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock; :class:`ConfigError` if another run holds it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create replica directory {self.dir}: {exc}") from None
        with (self.dir / ".lock").open("a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another livemig replicate run uses {self.dir}") from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
