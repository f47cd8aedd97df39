"""Integrity rules: same RAM file refused, every backend compared, repair bounded."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from migrate import integrity
from migrate.errors import ConfigError
from migrate.integrity import RamComparison, RamComparisons
from migrate.ramfiles import known_tcg_dirty_bug, refuse_shared_file
from migrate.report import Integrity
from tests.fakes import FakeQmp

PAGE = 4096


def _ram(path: Path, pages: int, fill: int = 7) -> Path:
    path.write_bytes(bytes([fill]) * (pages * PAGE))
    return path


def test_the_same_file_on_both_sides_is_refused(tmp_path: Path) -> None:
    ram = _ram(tmp_path / "ram", 4)
    os.link(ram, tmp_path / "alias")
    with pytest.raises(ConfigError, match="same file"):
        refuse_shared_file(ram, tmp_path / "alias")
    refuse_shared_file(ram, _ram(tmp_path / "other", 4))  # distinct files are fine
    refuse_shared_file(ram, tmp_path / "elsewhere")  # not on this host: nothing to compare


def test_every_backend_is_compared(tmp_path: Path) -> None:
    parts = {
        "ram0": RamComparison(_ram(tmp_path / "s0", 64), _ram(tmp_path / "t0", 64)),
        "ram1": RamComparison(_ram(tmp_path / "s1", 64), _ram(tmp_path / "t1", 64, fill=9)),
    }
    both = RamComparisons(parts)

    async def go() -> None:
        both.prepare()
        await both.ready()
        result = await both.compare(repair=False)
        assert result.integrity is Integrity.FAILED
        assert "ram0:" in result.detail and "ram1: 64 of 64 pages differ" in result.detail
        await both.close()

    asyncio.run(go())


def test_repair_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integrity, "MAX_REPAIR_PAGES", 8)
    small = RamComparison(_ram(tmp_path / "s", 64), _ram(tmp_path / "t", 64))
    big = RamComparison(_ram(tmp_path / "S", 64), _ram(tmp_path / "T", 64, fill=1))
    with open(tmp_path / "t", "r+b") as f:  # two stale pages: repaired
        f.seek(3 * PAGE)
        f.write(b"\x00" * PAGE)
        f.seek(9 * PAGE)
        f.write(b"\x00" * PAGE)

    async def go() -> None:
        for c in (small, big):
            c.prepare()
            await c.ready()
        fixed = await small.compare(repair=True)
        assert fixed.integrity is Integrity.OK and fixed.repaired_pages == 2
        refused = await big.compare(repair=True)
        assert refused.integrity is Integrity.FAILED and "more than the 8" in refused.detail
        assert refused.repaired_pages == 0
        for c in (small, big):
            await c.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("kvm", "major", "expected"), [(False, 7, True), (True, 7, False), (False, 9, False)]
)
def test_repair_only_where_the_known_bug_applies(kvm: bool, major: int, expected: bool) -> None:
    fake = FakeQmp("source")
    fake.on("query-kvm", {"enabled": kvm, "present": True})
    fake.on("query-version", {"qemu": {"major": major, "minor": 2, "micro": 0}, "package": ""})
    assert asyncio.run(known_tcg_dirty_bug(fake)) is expected


def test_a_target_ram_file_that_cannot_fit_is_refused_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dirtytrack import ram as ram_module
    from migrate import ramfiles

    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(256 << 20)  # sparse, like a fresh incoming QEMU's

    class Full:
        f_bavail, f_frsize = 16, 1 << 20  # 16 MiB free

    monkeypatch.setattr(ram_module, "filesystem_type", lambda _path: "tmpfs")
    monkeypatch.setattr(ram_module.os, "fstatvfs", lambda _fd: Full())
    with pytest.raises(ConfigError, match=r"needs 256 MiB but its filesystem has room for 16"):
        ramfiles.check_ram_space(ram)
    Full.f_bavail = 512
    ramfiles.check_ram_space(ram)
    # hugetlbfs reserves at mmap: nothing to check there
    Full.f_bavail = 0
    monkeypatch.setattr(ram_module, "filesystem_type", lambda _path: "hugetlbfs")
    ramfiles.check_ram_space(ram)


def test_a_check_then_a_repair_finds_and_mends_every_stale_page(tmp_path: Path) -> None:
    """safety.finish_on_target checks before it knows the target is paused, then
    repairs: the repair reuses the check's target digest and still mends every page."""
    source, target = _ram(tmp_path / "s", 2048), _ram(tmp_path / "t", 2048)
    stale = (0, 511, 512, 1500, 2047)  # chunk edges, the first and the last page
    with open(target, "r+b") as f:
        for page in stale:
            f.seek(page * PAGE + PAGE - 1)
            f.write(b"\x00")
    comparison = RamComparison(source, target)

    async def go() -> None:
        comparison.prepare()
        await comparison.ready()
        comparison.source_stopped()
        checked = await comparison.compare(repair=False)
        assert checked.integrity is Integrity.FAILED
        assert checked.differing_pages == stale and "5 of 2048 pages differ" in checked.detail
        repaired = await comparison.compare(repair=True)
        assert repaired.integrity is Integrity.OK and repaired.repaired_pages == 5
        again = await comparison.compare(repair=False)  # a fresh digest after the repair
        assert again.integrity is Integrity.OK and again.repaired_pages == 0
        await comparison.close()

    asyncio.run(go())
    assert source.read_bytes() == target.read_bytes()
