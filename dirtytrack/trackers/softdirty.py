"""Soft-dirty tracker: the kernel marks page-table entries QEMU writes to.

Writing ``4`` to ``/proc/PID/clear_refs`` clears the soft-dirty bit of every PTE of
the process and write-protects them; the next write faults and sets bit 55 of the
page's ``/proc/PID/pagemap`` entry again (Linux ``Documentation/admin-guide/mm/
soft-dirty.rst``). Guest writes under KVM are covered too: clearing invalidates the
EPT entries through the MMU notifier, so the next guest write faults in the host.

Pagemap entries (``Documentation/admin-guide/mm/pagemap.rst``), little-endian u64::

    bits 0-54  PFN if present (0 without CAP_SYS_ADMIN); if swapped: type 0-4, offset 5-54
    bit  55    PTE is soft-dirty
    bit  56    page exclusively mapped
    bit  57    PTE is uffd-wp write-protected
    bit  61    file page or shared anonymous page
    bit  62    swapped
    bit  63    present

Reading the bits and clearing them are two system calls, so a write that lands in
between would be cleared before anyone saw it. The tracker therefore freezes QEMU
(SIGSTOP, wait until every thread is stopped, read, clear, SIGCONT) around that
pair: a pause of a few milliseconds per round, the price of not losing pages.

Limits: the kernel needs ``CONFIG_MEM_SOFT_DIRTY`` (these lab machines lack it;
:func:`probe_soft_dirty` detects that). A PTE that disappears (reclaim of a
swappable shmem page) loses its bit; pages present at the previous clear and absent
now are reported as dirty, but a page faulted in, written and reclaimed within one
round is not, so use RAM that cannot be reclaimed (tmpfs without swap, hugetlbfs,
or mlock). Writes by in-flight ``O_DIRECT`` I/O pinned before a clear are not seen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from dirtytrack.bitmap import Bitmap
from dirtytrack.errors import TrackerUnavailable
from dirtytrack.ram import PAGE_SIZE, RamMapping
from dirtytrack.trackers.base import Baseline, PageArray, Tracker, TrackerKind

PM_PFN_MASK: Final = (1 << 55) - 1
PM_SWAP_TYPE_MASK: Final = (1 << 5) - 1
PM_SOFT_DIRTY: Final = 1 << 55
PM_MMAP_EXCLUSIVE: Final = 1 << 56
PM_UFFD_WP: Final = 1 << 57
PM_FILE: Final = 1 << 61
PM_SWAP: Final = 1 << 62
PM_PRESENT: Final = 1 << 63

#: What ``clear_refs`` takes to clear soft-dirty bits (1-3 clear accessed bits, 5 the
#: peak RSS).
CLEAR_REFS_SOFT_DIRTY: Final = b"4"

#: Pagemap entries read per system call: 512 KiB of entries for 256 MiB of RAM.
DEFAULT_PAGEMAP_CHUNK_PAGES: Final = 1 << 16

_KIND = TrackerKind.SOFT_DIRTY.value


# --- pagemap decoding ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PagemapEntries:
    """Decoded ``/proc/PID/pagemap`` entries, one per virtual page."""

    raw: npt.NDArray[np.uint64]

    def _bit(self, mask: int) -> npt.NDArray[np.bool_]:
        flags: npt.NDArray[np.bool_] = (self.raw & np.uint64(mask)) != 0
        return flags

    @property
    def present(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_PRESENT)

    @property
    def swapped(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_SWAP)

    @property
    def file_or_shared(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_FILE)

    @property
    def exclusive(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_MMAP_EXCLUSIVE)

    @property
    def uffd_wp(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_UFFD_WP)

    @property
    def soft_dirty(self) -> npt.NDArray[np.bool_]:
        return self._bit(PM_SOFT_DIRTY)

    @property
    def pfn(self) -> npt.NDArray[np.uint64]:
        """Page frame numbers; 0 where not present or hidden from non-admins."""
        frames = self.raw & np.uint64(PM_PFN_MASK)
        return np.where(self.present, frames, np.uint64(0))

    @property
    def swap_type(self) -> npt.NDArray[np.uint64]:
        """Swap device index where swapped, else 0."""
        kinds = self.raw & np.uint64(PM_SWAP_TYPE_MASK)
        return np.where(self.swapped & ~self.present, kinds, np.uint64(0))

    @property
    def swap_offset(self) -> npt.NDArray[np.uint64]:
        """Page offset in the swap device where swapped, else 0."""
        offsets = (self.raw & np.uint64(PM_PFN_MASK)) >> np.uint64(5)
        return np.where(self.swapped & ~self.present, offsets, np.uint64(0))


def decode_pagemap(data: bytes | bytearray | memoryview) -> PagemapEntries:
    """Decode raw pagemap bytes (little-endian u64 per page).

    Raises :class:`ValueError` if the length is not a multiple of 8.
    """
    view = memoryview(data).cast("B")
    if len(view) % 8:
        raise ValueError(f"pagemap data of {len(view)} bytes is not whole 8-byte entries")
    return PagemapEntries(np.frombuffer(view, dtype="<u8").astype(np.uint64))


# --- /proc/PID/maps --------------------------------------------------------------------


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``: a virtual memory area."""

    start: int
    end: int
    perms: str
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms.endswith("s")

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def file_path(self) -> str:
        """The mapped path without the kernel's `` (deleted)`` suffix."""
        return self.path.removesuffix(" (deleted)")


def parse_maps(text: str) -> list[Vma]:
    """Parse ``/proc/PID/maps``. Raises :class:`ValueError` on a malformed line."""
    vmas: list[Vma] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=5)
        try:
            low, high = fields[0].split("-")
            major, minor = fields[3].split(":")
            vmas.append(
                Vma(
                    start=int(low, 16),
                    end=int(high, 16),
                    perms=fields[1],
                    offset=int(fields[2], 16),
                    dev_major=int(major, 16),
                    dev_minor=int(minor, 16),
                    inode=int(fields[4]),
                    path=fields[5].strip() if len(fields) > 5 else "",
                )
            )
        except (IndexError, ValueError) as exc:
            raise ValueError(f"maps line {number} is malformed: {line!r}") from exc
    return vmas


@dataclass(frozen=True)
class RamSpan:
    """RAM-file pages ``[first_page, first_page + page_count)`` mapped at ``first_vpage``."""

    first_page: int
    page_count: int
    first_vpage: int


def locate_ram(vmas: list[Vma], ram_path: str | os.PathLike[str], page_count: int) -> list[RamSpan]:
    """Where a process maps the first ``page_count`` pages of a RAM file.

    Matches VMAs by path (a `` (deleted)`` file still matches) and, when the file
    exists, by inode too. QEMU maps the file once, but madvise/mprotect can split
    that into several VMAs; they must together cover every page. Raises
    :class:`TrackerUnavailable` if the file is not mapped shared or not fully.
    """
    path = os.fspath(ram_path)
    try:
        inode: int | None = os.stat(path).st_ino
    except OSError:
        inode = None
    spans: list[RamSpan] = []
    for vma in vmas:
        if vma.file_path != path or (inode is not None and vma.inode not in (0, inode)):
            continue
        if not vma.shared:
            raise TrackerUnavailable(
                f"{path} is mapped private ({vma.perms}); QEMU needs share=on", _KIND
            )
        first_page = vma.offset // PAGE_SIZE
        last_page = min(first_page + (vma.end - vma.start) // PAGE_SIZE, page_count)
        if last_page > first_page:
            spans.append(RamSpan(first_page, last_page - first_page, vma.start // PAGE_SIZE))
    spans.sort(key=lambda span: span.first_page)
    covered = 0
    for span in spans:
        if span.first_page > covered:
            break
        covered = max(covered, span.first_page + span.page_count)
    if covered < page_count:
        raise TrackerUnavailable(
            f"{path}: only pages 0..{covered} of {page_count} are mapped by the process", _KIND
        )
    return spans


# --- /proc access ------------------------------------------------------------------


class ProcFS:
    """The few ``/proc`` files the tracker needs; ``root`` is replaceable for tests.

    Every :class:`OSError` becomes :class:`TrackerUnavailable` naming the file.
    """

    def __init__(self, root: str | os.PathLike[str] = "/proc") -> None:
        self.root = Path(root)

    def path(self, pid: int | str, name: str) -> Path:
        return self.root / str(pid) / name

    def maps(self, pid: int | str) -> list[Vma]:
        path = self.path(pid, "maps")
        try:
            text = path.read_text()
        except OSError as exc:
            raise _unavailable(path, "read", exc) from exc
        return parse_maps(text)

    def read_pagemap(self, pid: int | str, first_vpage: int, count: int) -> npt.NDArray[np.uint64]:
        """``count`` raw entries starting at virtual page ``first_vpage``."""
        path = self.path(pid, "pagemap")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _unavailable(path, "open", exc) from exc
        try:
            data = bytearray(count * 8)
            view = memoryview(data)
            done = 0
            while done < len(data):
                # The kernel may return short reads; keep reading until complete.
                got = os.preadv(fd, [view[done:]], first_vpage * 8 + done)
                if got <= 0:
                    raise TrackerUnavailable(
                        f"{path}: short read at virtual page {first_vpage + done // 8}", _KIND
                    )
                done += got
            return np.frombuffer(data, dtype="<u8").astype(np.uint64)
        except OSError as exc:
            raise _unavailable(path, "read", exc) from exc
        finally:
            os.close(fd)

    def clear_soft_dirty(self, pid: int | str) -> None:
        path = self.path(pid, "clear_refs")
        try:
            with open(path, "wb", buffering=0) as stream:
                stream.write(CLEAR_REFS_SOFT_DIRTY)
        except OSError as exc:
            raise _unavailable(path, "write", exc) from exc

    def can_clear(self, pid: int | str) -> bool:
        return os.access(self.path(pid, "clear_refs"), os.W_OK)

    def thread_states(self, pid: int | str) -> dict[int, str]:
        """State letter (``R``, ``S``, ``T``, ...) of every thread of ``pid``."""
        states: dict[int, str] = {}
        task_dir = self.path(pid, "task")
        try:
            tids = [int(name) for name in os.listdir(task_dir)]
        except OSError as exc:
            raise _unavailable(task_dir, "list", exc) from exc
        for tid in tids:
            try:
                stat = (task_dir / str(tid) / "stat").read_text()
            except FileNotFoundError:
                continue  # the thread exited between listdir and read
            except OSError as exc:
                raise _unavailable(task_dir / str(tid) / "stat", "read", exc) from exc
            # The command name may contain spaces and parentheses: the state
            # follows the last ')'.
            states[tid] = stat[stat.rindex(")") + 2]
        return states

    def mem_available_bytes(self) -> int | None:
        """``MemAvailable`` from ``meminfo`` in bytes, or ``None`` if not reported."""
        try:
            text = (self.root / "meminfo").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return None


def _unavailable(path: Path, action: str, exc: OSError) -> TrackerUnavailable:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        reason += " (needs ptrace access to the process: same user or CAP_SYS_PTRACE)"
    elif exc.errno in (errno.ENOENT, errno.ESRCH):
        reason += " (process gone, or no CONFIG_PROC_PAGE_MONITOR)"
    return TrackerUnavailable(f"cannot {action} {path}: {reason}", _KIND)


# --- freezing QEMU around read+clear ---------------------------------------------------


class Freezer(Protocol):
    """Keeps the guest from writing RAM while the tracker reads and clears bits."""

    def frozen(self) -> AbstractContextManager[None]: ...


class NoFreeze:
    """Freezes nothing. Correct only if nothing writes guest RAM meanwhile (the VM is
    stopped via QMP, or a test drives the writes itself)."""

    def frozen(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


class SigstopFreezer:
    """SIGSTOP the QEMU process, wait until all its threads are stopped, SIGCONT after.

    A process that was already stopped is left stopped. Raises
    :class:`TrackerUnavailable` for our own pid (we would stop ourselves) and, from
    :meth:`frozen`, if the threads do not stop within ``timeout_s`` (QEMU is
    continued before raising).
    """

    def __init__(
        self,
        pid: int,
        proc: ProcFS | None = None,
        timeout_s: float = 1.0,
        poll_interval_s: float = 0.0002,
    ) -> None:
        if pid == os.getpid():
            raise TrackerUnavailable("cannot SIGSTOP this process to freeze itself", _KIND)
        self.pid = pid
        self.proc = proc or ProcFS()
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        if self._all_stopped():
            yield
            return
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError as exc:
            raise TrackerUnavailable(f"QEMU process {self.pid} is gone", _KIND) from exc
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self._all_stopped():
                if time.monotonic() > deadline:
                    raise TrackerUnavailable(
                        f"threads of process {self.pid} did not stop within {self.timeout_s} s",
                        _KIND,
                    )
                time.sleep(self.poll_interval_s)
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):  # it died while stopped
                os.kill(self.pid, signal.SIGCONT)

    def _all_stopped(self) -> bool:
        states = self.proc.thread_states(self.pid)
        # t = stopped by a tracer; Z/X = exiting threads that cannot write any more.
        return bool(states) and all(state in "TtZX" for state in states.values())


# --- probe ---------------------------------------------------------------------------


def probe_soft_dirty(pid: int | None = None, proc: ProcFS | None = None) -> None:
    """Check that soft-dirty tracking works here, and for ``pid`` if given.

    Clears this process's own soft-dirty bits, writes a page and checks that bit 55
    appeared (kernels without ``CONFIG_MEM_SOFT_DIRTY`` never set it). For ``pid``,
    checks that its pagemap is readable and its clear_refs writable, without
    clearing anything. Clearing our own bits write-protects this process's pages
    once (each takes one fault on its next write where soft-dirty exists), so probe
    before allocating large buffers. Raises :class:`TrackerUnavailable` saying which
    check failed.
    """
    proc = proc or ProcFS()
    scratch = np.zeros(3 * PAGE_SIZE, dtype=np.uint8)
    # A page-aligned address inside the buffer, so the write lands on a known page.
    address = -(-scratch.ctypes.data // PAGE_SIZE) * PAGE_SIZE
    offset = address - scratch.ctypes.data
    proc.clear_soft_dirty("self")
    scratch[offset] = 0xA5
    entry = decode_pagemap(proc.read_pagemap("self", address // PAGE_SIZE, 1).tobytes())
    if not entry.present[0]:
        raise TrackerUnavailable("pagemap shows a just-written page as not present", _KIND)
    if not entry.soft_dirty[0]:
        raise TrackerUnavailable(
            "kernel does not set soft-dirty bits after a write (CONFIG_MEM_SOFT_DIRTY off)",
            _KIND,
        )
    if pid is not None:
        proc.read_pagemap(pid, 0, 1)
        if not proc.can_clear(pid):
            raise TrackerUnavailable(f"{proc.path(pid, 'clear_refs')} is not writable", _KIND)


# --- the tracker -----------------------------------------------------------------------


class SoftDirtyTracker(Tracker):
    """Dirty pages from QEMU's soft-dirty PTE bits for the VMA mapping the RAM file.

    ``ram`` is this process's own mapping of the same file (used to capture pages);
    ``pid`` is QEMU's process and ``ram_path`` the file QEMU maps (default: the
    mapping's path). Memory: two bitmaps (pending, present-at-clear), 1/16384 of
    RAM, plus 8 bytes per page of pagemap read per chunk. With ``Baseline.ZERO``
    the first collect reports every page (the kernel cannot tell zero pages).

    Raises :class:`TrackerUnavailable` if the process does not map the file shared
    and whole, or /proc access fails. Use :func:`probe_soft_dirty` first.
    """

    kind = TrackerKind.SOFT_DIRTY

    def __init__(
        self,
        ram: RamMapping | PageArray,
        *,
        pid: int,
        ram_path: str | os.PathLike[str] | None = None,
        baseline: Baseline = Baseline.ZERO,
        proc: ProcFS | None = None,
        freezer: Freezer | None = None,
        chunk_pages: int = DEFAULT_PAGEMAP_CHUNK_PAGES,
    ) -> None:
        super().__init__(ram)
        if ram_path is None:
            if not isinstance(ram, RamMapping):
                raise ValueError("ram_path is required when ram is an array")
            ram_path = ram.path
        if chunk_pages < 1:
            raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
        self._pid = pid
        self._ram_path = os.fspath(ram_path)
        self._proc = proc or ProcFS()
        self._freezer: Freezer = freezer if freezer is not None else SigstopFreezer(pid, self._proc)
        self._chunk_pages = chunk_pages
        locate_ram(self._proc.maps(pid), self._ram_path, self.page_count)  # fail early
        if baseline is Baseline.ZERO:
            self._pending = Bitmap.full(self.page_count)
            self._present_at_clear = Bitmap(self.page_count)
        else:
            self._pending = Bitmap(self.page_count)
            self._present_at_clear = self._scan_and_clear().present

    @property
    def memory_overhead_bytes(self) -> int:
        return self._pending.nbytes + self._present_at_clear.nbytes

    @property
    def pid(self) -> int:
        return self._pid

    def _collect(self) -> Bitmap:
        self._pending |= self._written_since_clear()
        return self._pending.copy()

    def _written_since_clear(self) -> Bitmap:
        scan = self._scan_and_clear()
        # A page present at the last clear and gone now may have been written and
        # lost its PTE (and bit) since: count it as dirty.
        lost = self._present_at_clear - scan.present
        self._present_at_clear = scan.present
        lost |= scan.soft_dirty
        return lost

    def _commit(self, start: int, data: PageArray) -> None:
        self._pending.clear_range(start, len(data))

    def _commit_pages(self, pages: npt.NDArray[np.int64], data: PageArray) -> None:
        self._pending.clear_indices(pages)

    def _release(self) -> None:
        self._pending = Bitmap(0)
        self._present_at_clear = Bitmap(0)

    def _reset(self, pages: Bitmap | None) -> None:
        # Bits of the reset pages are history now; those of other pages must not be
        # lost with the clear, so they move into pending.
        written = self._written_since_clear()
        if pages is None:
            self._pending.clear_all()
        else:
            self._pending |= written
            self._pending -= pages

    def _scan_and_clear(self) -> _Scan:
        soft_dirty = np.zeros(self.page_count, dtype=np.bool_)
        present = np.zeros(self.page_count, dtype=np.bool_)
        with self._freezer.frozen():
            # maps is read while frozen too: QEMU cannot remap RAM under our feet.
            spans = locate_ram(self._proc.maps(self._pid), self._ram_path, self.page_count)
            for span in spans:
                for first in range(0, span.page_count, self._chunk_pages):
                    count = min(self._chunk_pages, span.page_count - first)
                    raw = self._proc.read_pagemap(self._pid, span.first_vpage + first, count)
                    entries = PagemapEntries(raw)
                    page = span.first_page + first
                    soft_dirty[page : page + count] |= entries.soft_dirty
                    present[page : page + count] |= entries.present
            self._proc.clear_soft_dirty(self._pid)
        return _Scan(Bitmap.from_bools(soft_dirty), Bitmap.from_bools(present))


@dataclass(frozen=True, eq=False)
class _Scan:
    soft_dirty: Bitmap
    present: Bitmap
