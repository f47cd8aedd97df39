"""The remote RAM check: the engine maps only the source; the owner digests and writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dirtytrack.digest import RamDigest
from dirtytrack.ram import WORDS_PER_PAGE
from migrate.errors import ConfigError
from migrate.remoteram import RamOwner, RemoteRam, RemoteRamComparison, decode_digest, encode_digest
from migrate.report import Integrity

PAGES = 1536  # 6 MiB: three 2 MiB chunks


def _ram(path: Path, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    path.write_bytes(rng.integers(0, 1 << 62, size=(PAGES, WORDS_PER_PAGE), dtype=np.uint64))
    return path


def _poke(path: Path, pages: list[int]) -> None:
    data = np.fromfile(path, np.uint64).reshape(PAGES, WORDS_PER_PAGE)
    data[pages] ^= np.uint64(1)
    data.tofile(path)


class Counting:
    """The owner's calls, counted: what an agent would serve over HTTPS."""

    def __init__(self, owner: RamOwner) -> None:
        self.owner = owner
        self.calls: list[str] = []

    async def digest(self) -> RamDigest:
        self.calls.append("digest")
        # Over the wire: encoded and decoded on the way.
        return decode_digest(encode_digest(await self.owner.digest()))

    async def page_hashes(self, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        self.calls.append(f"hashes {len(pages)}")
        return await self.owner.page_hashes(pages)

    async def write_pages(self, pages: npt.NDArray[np.intp], data: bytes) -> None:
        self.calls.append(f"write {len(pages)}")
        await self.owner.write_pages(pages, data)

    def remote(self) -> RemoteRam:
        return RemoteRam(self.digest, self.page_hashes, self.write_pages)


async def _check(source: Path, target: Path, repair: bool) -> tuple[object, list[str]]:
    async with RamOwner(target) as owner:
        counting = Counting(owner)
        check = RemoteRamComparison(source, counting.remote())
        check.prepare()
        await check.ready()
        check.source_stopped()
        try:
            return await check.compare(repair=repair), counting.calls
        finally:
            await check.close()


def test_identical_ram_is_ok_with_one_digest_call(tmp_path: Path) -> None:
    source, target = _ram(tmp_path / "s"), _ram(tmp_path / "t")
    result, calls = asyncio.run(_check(source, target, repair=True))
    assert result.integrity is Integrity.OK and calls == ["digest"]  # type: ignore[attr-defined]


def test_stale_pages_are_named_and_repaired_through_the_owner(tmp_path: Path) -> None:
    source, target = _ram(tmp_path / "s"), _ram(tmp_path / "t")
    _poke(target, [3, 700, 1535])
    failed, _ = asyncio.run(_check(source, target, repair=False))
    assert failed.integrity is Integrity.FAILED  # type: ignore[attr-defined]
    assert failed.differing_pages == (3, 700, 1535)  # type: ignore[attr-defined]
    result, calls = asyncio.run(_check(source, target, repair=True))
    assert result.integrity is Integrity.OK and result.repaired_pages == 3  # type: ignore[attr-defined]
    assert calls == ["digest", f"hashes {PAGES}", "write 3", "digest"]
    assert source.read_bytes() == target.read_bytes()


def test_an_owner_that_fails_leaves_ram_unchecked(tmp_path: Path) -> None:
    source = _ram(tmp_path / "s")

    async def broken() -> RamDigest:
        raise OSError("agent unreachable")

    async def never(*_args: object) -> None:
        raise AssertionError("not called")

    async def run() -> object:
        check = RemoteRamComparison(source, RemoteRam(broken, never, never))  # type: ignore[arg-type]
        try:
            return await check.compare(repair=True)
        finally:
            await check.close()

    result = asyncio.run(run())
    assert result.integrity is Integrity.UNCHECKED  # type: ignore[attr-defined]
    assert "agent unreachable" in result.detail  # type: ignore[attr-defined]


def test_owner_refuses_bad_writes(tmp_path: Path) -> None:
    target = _ram(tmp_path / "t")

    async def run() -> None:
        async with RamOwner(target) as owner:
            with pytest.raises(ConfigError, match="bytes of data"):
                await owner.write_pages(np.array([1]), b"x")
            with pytest.raises(ConfigError, match="outside RAM"):
                await owner.write_pages(np.array([PAGES]), bytes(4096))
            with pytest.raises(ConfigError, match="outside RAM"):
                await owner.page_hashes(np.array([-1]))

    asyncio.run(run())


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"size": 4096, "chunk_size": 4096},
        {"size": 0, "chunk_size": 4096, "hashes": ""},
        {"size": 8192, "chunk_size": 100, "hashes": "AAAAAAAAAAA="},
        {"size": 8192, "chunk_size": 4096, "hashes": "AAAAAAAAAAA="},  # one hash for two chunks
        {"size": 4096, "chunk_size": 4096, "hashes": "!!!!!!!!!!!="},
        {"size": True, "chunk_size": 4096, "hashes": "AAAAAAAAAAA="},
    ],
)
def test_decode_digest_refuses_bad_shapes(bad: object) -> None:
    with pytest.raises(ConfigError):
        decode_digest(bad)
