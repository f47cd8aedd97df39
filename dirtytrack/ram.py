"""Guest RAM backing files (``memory-backend-file,share=on``) mapped into this process."""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from dirtytrack.errors import RamMappingError

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8


#: Filesystems whose pages are allocated on first touch, also by a read through a
#: shared mapping: touching a hole when the filesystem is full raises SIGBUS.
_ALLOCATE_ON_TOUCH = frozenset({"tmpfs", "shm"})


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def require_room(path: Path, fd: int, size: int) -> None:
    """Refuse to touch every page of a file its tmpfs cannot hold (SIGBUS otherwise).

    Raises :class:`RamMappingError` naming the room there is.
    """
    if filesystem_type(path) not in _ALLOCATE_ON_TOUCH:
        return
    fs = os.fstatvfs(fd)
    free = fs.f_bavail * fs.f_frsize
    allocated = os.fstat(fd).st_blocks * 512
    if allocated + free < size:
        raise RamMappingError(
            f"guest RAM file {path} needs {size >> 20} MiB but its filesystem has room for "
            f"{(allocated + free) >> 20} MiB (touching the rest would kill this process with SIGBUS)"
        )


class RamMapping:
    """A shared mapping of a guest RAM file, closed on ``__exit__``.

    ``writable=False`` maps read-only (source side, integrity checks); ``True`` maps
    read-write so a receiver can place pages. The mapping is ``MAP_SHARED``: what QEMU
    writes is what we read, and what we write QEMU sees.

    Raises :class:`RamMappingError` if the file is missing, empty, or not a whole
    number of pages.
    """

    def __init__(
        self, path: str | os.PathLike[str], writable: bool = False, populate: bool = False
    ) -> None:
        self.path = Path(path)
        self.writable = writable
        # MAP_POPULATE pays every page fault up front (~20 ms per 256 MiB here), so a
        # later full read, e.g. a digest at switchover, runs at memory speed.
        self.populate = populate
        self._mmap: mmap.mmap | None = None

    def __enter__(self) -> RamMapping:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise RamMappingError(
                f"cannot open guest RAM file {self.path}: {exc.strerror}"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % PAGE_SIZE:
                raise RamMappingError(
                    f"guest RAM file {self.path} has {size} bytes, not a positive multiple of {PAGE_SIZE}"
                )
            if self.populate:
                require_room(self.path, fd, size)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
            if self.populate:
                # Touch one byte per page from numpy, which releases the GIL, rather
                # than MAP_POPULATE inside mmap(), which holds it (159 ms for a
                # sparse 256 MiB file here: the event loop would stall that long).
                np.frombuffer(self._mmap, dtype=np.uint8)[::PAGE_SIZE].max()
        except OSError as exc:
            raise RamMappingError(f"cannot map guest RAM file {self.path}: {exc}") from exc
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap. If numpy views or memoryviews of the mapping are still alive, the
        unmap happens when the last of them goes (the mmap object closes itself)."""
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None

    @property
    def size(self) -> int:
        """Size of the mapping in bytes."""
        return len(self._require())

    @property
    def page_count(self) -> int:
        return self.size // PAGE_SIZE

    def buffer(self) -> memoryview:
        """The whole mapping as a byte ``memoryview`` (valid until :meth:`close`)."""
        return memoryview(self._require())

    def pages(self) -> npt.NDArray[np.uint64]:
        """The mapping as a ``(page_count, 512)`` array of uint64 words, no copy."""
        words = np.frombuffer(self._require(), dtype=np.uint64)
        return words.reshape(-1, WORDS_PER_PAGE)

    def _require(self) -> mmap.mmap:
        if self._mmap is None:
            raise RamMappingError(f"guest RAM file {self.path} is not mapped")
        return self._mmap
