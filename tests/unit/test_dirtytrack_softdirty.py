"""Soft-dirty plumbing: pagemap decoding, maps parsing, locating RAM, freezing, probing."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dirtytrack.errors import TrackerUnavailable
from dirtytrack.ram import PAGE_SIZE
from dirtytrack.trackers.softdirty import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
    ProcFS,
    SigstopFreezer,
    Vma,
    decode_pagemap,
    locate_ram,
    parse_maps,
    probe_soft_dirty,
)

# --- pagemap entries as the kernel writes them ----------------------------------------

# Built bit by bit from Documentation/admin-guide/mm/pagemap.rst, little-endian u64:
RECORDED = [
    # present file page of QEMU's RAM, PFN visible (root), written since clear
    PM_PRESENT | PM_FILE | PM_MMAP_EXCLUSIVE | PM_SOFT_DIRTY | 0x1A2B3C,
    # present, clean since clear, mapped by two processes (no exclusive bit)
    PM_PRESENT | PM_FILE | 0x1A2B3D,
    # present but PFN hidden (reader without CAP_SYS_ADMIN), soft-dirty
    PM_PRESENT | PM_FILE | PM_SOFT_DIRTY,
    # no PTE at all
    0,
    # hole in a VMA with VM_SOFTDIRTY (freshly mmapped): only bit 55
    PM_SOFT_DIRTY,
    # swapped anonymous page: swap type 3, offset 0x1234, soft-dirty kept in the swap PTE
    PM_SWAP | PM_SOFT_DIRTY | (0x1234 << 5) | 3,
    # present, write-protected by userfaultfd, clean
    PM_PRESENT | PM_UFFD_WP | 0x77,
]


def recorded_bytes() -> bytes:
    return struct.pack(f"<{len(RECORDED)}Q", *RECORDED)


def test_decode_recorded_pagemap() -> None:
    entries = decode_pagemap(recorded_bytes())
    assert entries.present.tolist() == [True, True, True, False, False, False, True]
    assert entries.soft_dirty.tolist() == [True, False, True, False, True, True, False]
    assert entries.file_or_shared.tolist() == [True, True, True, False, False, False, False]
    assert entries.exclusive.tolist() == [True, False, False, False, False, False, False]
    assert entries.swapped.tolist() == [False, False, False, False, False, True, False]
    assert entries.uffd_wp.tolist() == [False, False, False, False, False, False, True]
    assert entries.pfn.tolist() == [0x1A2B3C, 0x1A2B3D, 0, 0, 0, 0, 0x77]
    assert entries.swap_type.tolist() == [0, 0, 0, 0, 0, 3, 0]
    assert entries.swap_offset.tolist() == [0, 0, 0, 0, 0, 0x1234, 0]


def test_decode_is_little_endian_regardless_of_host() -> None:
    raw = (PM_PRESENT | PM_SOFT_DIRTY | 5).to_bytes(8, "little")
    entries = decode_pagemap(bytearray(raw))
    assert entries.soft_dirty.tolist() == [True] and entries.pfn.tolist() == [5]


def test_decode_rejects_partial_entries() -> None:
    with pytest.raises(ValueError):
        decode_pagemap(recorded_bytes()[:-3])


def test_read_pagemap_at_virtual_offsets(tmp_path: Path) -> None:
    """ProcFS seeks to vpage * 8, as the kernel file requires."""
    (tmp_path / "99").mkdir()
    vpage = 0x7F3A_4000_0000 // PAGE_SIZE
    with open(tmp_path / "99" / "pagemap", "wb") as stream:
        stream.seek(vpage * 8)
        stream.write(recorded_bytes())
    raw = ProcFS(tmp_path).read_pagemap(99, vpage + 1, 3)
    assert raw.tolist() == RECORDED[1:4]
    with pytest.raises(TrackerUnavailable, match="short read"):
        ProcFS(tmp_path).read_pagemap(99, vpage + len(RECORDED), 1)
    with pytest.raises(TrackerUnavailable, match="process gone"):
        ProcFS(tmp_path).read_pagemap(100, 0, 1)


# --- maps ------------------------------------------------------------------------------

QEMU_MAPS = """\
55d0c8a00000-55d0c8b2c000 r-xp 00000000 fd:01 1311                       /usr/bin/qemu-system-x86_64
55d0ca1f3000-55d0ca6b8000 rw-p 00000000 00:00 0                          [heap]
7f3a40000000-7f3a48000000 rw-s 00000000 00:1a 4711                       /dev/shm/lm ram0
7f3a48000000-7f3a50000000 rw-s 08000000 00:1a 4711                       /dev/shm/lm ram0
7f3a60000000-7f3a60001000 rw-s 00000000 00:1a 99                         /dev/shm/old (deleted)
7ffd5b0c2000-7ffd5b0e3000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
7f3a70000000-7f3a70001000 ---p 00000000 00:00 0
"""


def test_parse_maps_realistic_lines() -> None:
    vmas = parse_maps(QEMU_MAPS)
    assert len(vmas) == 8
    ram = vmas[2]
    assert ram == Vma(0x7F3A40000000, 0x7F3A48000000, "rw-s", 0, 0, 0x1A, 4711, "/dev/shm/lm ram0")
    assert ram.shared and not vmas[1].shared
    assert vmas[3].offset == 0x08000000
    assert vmas[4].deleted and vmas[4].file_path == "/dev/shm/old"
    assert vmas[7].path == ""
    with pytest.raises(ValueError, match="line 1"):
        parse_maps("not a maps line\n")


def test_locate_ram_joins_split_vmas() -> None:
    pages = (0x10000000) // PAGE_SIZE  # 256 MiB in two 128 MiB VMAs
    spans = locate_ram(parse_maps(QEMU_MAPS), "/dev/shm/lm ram0", pages)
    assert [(s.first_page, s.page_count, s.first_vpage) for s in spans] == [
        (0, pages // 2, 0x7F3A40000000 // PAGE_SIZE),
        (pages // 2, pages // 2, 0x7F3A48000000 // PAGE_SIZE),
    ]
    # A deleted file still matches by its path.
    assert locate_ram(parse_maps(QEMU_MAPS), "/dev/shm/old", 1)[0].first_page == 0


def test_locate_ram_refusals(tmp_path: Path) -> None:
    vmas = parse_maps(QEMU_MAPS)
    with pytest.raises(TrackerUnavailable, match=r"only pages 0\.\.0 "):
        locate_ram(vmas, "/dev/shm/absent", 10)
    with pytest.raises(TrackerUnavailable, match=r"only pages 0\.\.65536 "):
        locate_ram(vmas, "/dev/shm/lm ram0", 0x20000000 // PAGE_SIZE)
    private = parse_maps("7f0000000000-7f0000100000 rw-p 00000000 00:1a 5 /dev/shm/p\n")
    with pytest.raises(TrackerUnavailable, match="share=on"):
        locate_ram(private, "/dev/shm/p", 1)
    # Same path, different inode: a replaced file is not the one QEMU maps.
    real = tmp_path / "ram"
    real.write_bytes(b"")
    other_inode = os.stat(real).st_ino + 1
    stale = parse_maps(f"7f0000000000-7f0000100000 rw-s 00000000 00:1a {other_inode} {real}\n")
    with pytest.raises(TrackerUnavailable):
        locate_ram(stale, real, 1)


# --- the SIGSTOP freezer on a real child process ----------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    # A busy child with a few threads, like QEMU's vCPU and I/O threads.
    code = (
        "import threading\n"
        "def spin():\n"
        "    while True: pass\n"
        "for _ in range(3): threading.Thread(target=spin, daemon=True).start()\n"
        "threading.Event().wait()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def states(pid: int) -> set[str]:
    return set(ProcFS().thread_states(pid).values())


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll with a generous deadline: a guard against hanging, not a speed check."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.001)


def wait_for_threads(pid: int, count: int) -> None:
    wait_until(lambda: len(ProcFS().thread_states(pid)) >= count, f"{count} threads")


def test_sigstop_freezer_stops_every_thread_and_continues(child: subprocess.Popen[bytes]) -> None:
    wait_for_threads(child.pid, 4)
    freezer = SigstopFreezer(child.pid, timeout_s=30)
    with freezer.frozen():
        assert states(child.pid) <= {"T", "t"}
    assert not states(child.pid) <= {"T", "t"}
    assert child.poll() is None


def test_sigstop_freezer_leaves_a_stopped_process_stopped(child: subprocess.Popen[bytes]) -> None:
    wait_for_threads(child.pid, 4)
    os.kill(child.pid, signal.SIGSTOP)
    freezer = SigstopFreezer(child.pid, timeout_s=30)
    wait_until(lambda: states(child.pid) <= {"T", "t"}, "the child to stop")
    with freezer.frozen():
        pass
    assert states(child.pid) <= {"T", "t"}
    os.kill(child.pid, signal.SIGCONT)


def test_sigstop_freezer_refuses_self_and_reports_gone(child: subprocess.Popen[bytes]) -> None:
    with pytest.raises(TrackerUnavailable, match="itself"):
        SigstopFreezer(os.getpid())
    child.kill()
    child.wait()
    with pytest.raises(TrackerUnavailable), SigstopFreezer(child.pid).frozen():
        pass


# --- probe -----------------------------------------------------------------------------


class SelfPagemap(ProcFS):
    """Answers the probe's read of its own pagemap as a kernel with/without soft-dirty."""

    def __init__(self, root: Path, soft_dirty: bool) -> None:
        super().__init__(root)
        self.soft_dirty = soft_dirty
        self.cleared: list[str] = []

    def clear_soft_dirty(self, pid: int | str) -> None:
        self.cleared.append(str(pid))

    def read_pagemap(self, pid: int | str, first_vpage: int, count: int) -> npt.NDArray[np.uint64]:
        if pid == "self":
            bits = PM_PRESENT | (PM_SOFT_DIRTY if self.soft_dirty else 0)
            return np.full(count, bits, dtype=np.uint64)
        return super().read_pagemap(pid, first_vpage, count)


def test_probe_with_and_without_kernel_support(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "pagemap").write_bytes(bytes(8))
    (tmp_path / "7" / "clear_refs").write_bytes(b"")
    supported = SelfPagemap(tmp_path, soft_dirty=True)
    probe_soft_dirty(7, supported)
    # The probe clears only its own bits, never QEMU's.
    assert supported.cleared == ["self"]
    with pytest.raises(TrackerUnavailable, match="CONFIG_MEM_SOFT_DIRTY") as info:
        probe_soft_dirty(7, SelfPagemap(tmp_path, soft_dirty=False))
    assert info.value.tracker == "soft-dirty"
    with pytest.raises(TrackerUnavailable, match="process gone"):
        probe_soft_dirty(8, SelfPagemap(tmp_path, soft_dirty=True))


def test_probe_against_this_kernel_agrees_with_a_direct_look() -> None:
    """Real /proc/self: the probe's verdict matches bit 55 read back by hand."""
    buffer = np.zeros(3 * PAGE_SIZE, dtype=np.uint8)
    address = -(-buffer.ctypes.data // PAGE_SIZE) * PAGE_SIZE
    ProcFS().clear_soft_dirty("self")
    buffer[address - buffer.ctypes.data] = 1
    with open("/proc/self/pagemap", "rb") as stream:
        stream.seek(address // PAGE_SIZE * 8)
        (entry,) = struct.unpack("<Q", stream.read(8))
    kernel_has_soft_dirty = bool(entry & PM_SOFT_DIRTY)
    try:
        probe_soft_dirty(os.getpid())
        verdict = True
    except TrackerUnavailable as exc:
        assert "soft-dirty" in str(exc)
        verdict = False
    assert verdict is kernel_has_soft_dirty
