import mmap
from pathlib import Path

import numpy as np
import pytest

from dirtytrack.digest import differing_pages, page_digests, ram_digest
from dirtytrack.errors import RamMappingError
from dirtytrack.ram import RamMapping


def _ram(pages: int, seed: int = 1) -> bytearray:
    rng = np.random.default_rng(seed)
    return bytearray(rng.integers(0, 256, pages * 4096, dtype=np.uint8).tobytes())


def test_equal_images_match_and_one_byte_is_found() -> None:
    a = _ram(1024)
    b = bytearray(a)
    da, db = ram_digest(memoryview(a), 64 * 4096), ram_digest(memoryview(b), 64 * 4096)
    assert da.matches(db)
    b[700 * 4096 + 5] ^= 0xFF
    db = ram_digest(memoryview(b), 64 * 4096)
    chunks = da.differing_chunks(db)
    assert list(chunks) == [700 // 64]
    assert list(differing_pages(memoryview(a), memoryview(b), chunks, 64 * 4096)) == [700]


def test_page_digests_change_only_where_pages_change() -> None:
    a = _ram(16)
    before = page_digests(memoryview(a))
    a[3 * 4096] ^= 1
    after = page_digests(memoryview(a))
    assert list(np.flatnonzero(before != after)) == [3]


def test_ram_mapping_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(_ram(8)))
    with RamMapping(path, populate=True) as ram:
        assert ram.page_count == 8 and ram.pages().shape == (8, 512)
        assert bytes(ram.buffer()[:16]) == path.read_bytes()[:16]


def test_ram_mapping_refuses_odd_sizes_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(RamMappingError, match="cannot open"):
        RamMapping(tmp_path / "nope").open()
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 100)
    with pytest.raises(RamMappingError, match="multiple of 4096"):
        RamMapping(odd).open()
    assert mmap.PAGESIZE == 4096


@pytest.mark.parametrize("threads", [2, 3, 64])
def test_a_parallel_digest_is_the_same_digest_and_finds_every_change(threads: int) -> None:
    a = _ram(1000)  # 1000 pages: 15 whole 64-page chunks and a short last one
    one = ram_digest(memoryview(a), 64 * 4096)
    assert np.array_equal(ram_digest(memoryview(a), 64 * 4096, threads).hashes, one.hashes)
    for page in (0, 63, 64, 500, 959, 960, 999):  # chunk edges, every part, the short tail
        b = bytearray(a)
        b[page * 4096 + 4095] ^= 0x01
        changed = ram_digest(memoryview(b), 64 * 4096, threads)
        chunks = one.differing_chunks(changed)
        assert list(chunks) == [page // 64]
        assert list(differing_pages(memoryview(a), memoryview(b), chunks, 64 * 4096)) == [page]


def test_a_digest_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="threads"):
        ram_digest(memoryview(_ram(1)), threads=0)
