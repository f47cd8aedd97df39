"""The fault matrix's pure parts: the verdict, the lost-`cont` proxy, the report, the
suite names the CLI knows, and the RAM mapping's refusal to touch a full tmpfs."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from dirtytrack import ram as ram_module
from dirtytrack.errors import RamMappingError
from dirtytrack.ram import RamMapping, filesystem_type
from lab.faults import (
    SUITES,
    Cell,
    CellResult,
    Fault,
    FaultPhase,
    FaultResults,
    QmpProxy,
    judge,
    render_report,
)
from migrate import cli_bench

BULK_NATIVE = Cell(Fault.KILL_TARGET, FaultPhase.BULK, "native")


def _judge(cell: Cell = BULK_NATIVE, **kw: object) -> tuple[str, ...]:
    args: dict[str, object] = {
        "status": "failed",
        "running_on": ("source",),
        "memory_intact": True,
        "leftovers": (),
        "exit_code": 4,
        "error": "target gone; the VM kept running on the source",
        "vm_destroyed": False,
        "injected": True,
        "recover": "n/a",
    }
    args.update(kw)
    return judge(cell, **args)  # type: ignore[arg-type]


def test_a_rolled_back_migration_with_the_vm_on_the_source_is_ok() -> None:
    assert _judge() == ()


def test_two_running_copies_are_not_ok() -> None:
    assert any("more than one" in p for p in _judge(running_on=("source", "target")))


def test_no_copy_although_nothing_was_destroyed_is_not_ok() -> None:
    problems = _judge(running_on=(), memory_intact=None, status="unknown",
                      error="neither copy was resumed")  # fmt: skip
    assert any("no copy runs" in p for p in problems)


def test_completed_needs_the_vm_on_the_target() -> None:
    assert any("does not run on the target" in p for p in _judge(status="completed", exit_code=0))
    assert _judge(status="completed", exit_code=0, running_on=("target",)) == ()


def test_failed_while_the_target_runs_is_a_lie() -> None:
    assert any("runs on the target" in p for p in _judge(running_on=("target",)))


def test_a_dead_source_must_be_called_a_lost_vm() -> None:
    cell = Cell(Fault.KILL_SOURCE, FaultPhase.BULK, "native")
    quiet = _judge(cell, running_on=(), memory_intact=None, vm_destroyed=True, error="failed")
    assert any("lost" in p for p in quiet)
    told = _judge(cell, running_on=(), memory_intact=None, vm_destroyed=True,
                  error="the source QEMU is gone: the VM is lost")  # fmt: skip
    assert told == ()


def test_memory_leftovers_and_exit_codes_count() -> None:
    assert any("memory" in p for p in _judge(memory_intact=False))
    assert any("left behind" in p for p in _judge(leftovers=("pid 1",)))
    assert any("exit code" in p for p in _judge(exit_code=0))
    sigterm = Cell(Fault.ENGINE_SIGTERM, FaultPhase.BULK, "native")
    assert _judge(sigterm, status="aborted", exit_code=143) == ()


def test_a_vm_killed_after_completion_keeps_the_truthful_completed() -> None:
    cell = Cell(Fault.KILL_TARGET, FaultPhase.AFTER, "native")
    ok = _judge(cell, status="completed", exit_code=0, running_on=(), memory_intact=None,
                vm_destroyed=True)  # fmt: skip
    assert ok == ()


def test_the_cli_knows_every_fault_suite_without_loading_the_lab() -> None:
    assert set(cli_bench.FAULT_SUITES) == set(SUITES)
    short = SUITES["faults-short"].cells
    assert 3 <= len(short) <= 5 and len(set(short)) == len(short)
    full = SUITES["faults"].cells
    assert set(short) <= set(full) and len(set(full)) == len(full)
    assert {c.strategy for c in full} == {"native", "pagestream"}
    assert {c.fault for c in full} == set(Fault)
    assert {c.phase for c in full} == set(FaultPhase)


def test_report_renders_the_matrix() -> None:
    result = CellResult(
        fault="kill-target", phase="bulk", strategy="native", status="failed", injected=True,
        fired_in="precopy", running_copies=1, running_on=("source",), memory_intact=True,
        memory_check="source: ok", leftovers=(), exit_code=4, error="x", vm_destroyed=False,
        recover="n/a", problems=(), duration_s=12.0,
    )  # fmt: skip
    results = FaultResults("faults-short", "cmd", 0.0, [result])
    text = render_report(results)
    assert "| fault | phase | native |" in text
    assert "| kill-target | bulk | failed, runs on source, exit 4: ok |" in text
    assert json.loads(json.dumps(results.to_dict()))["cells"][0]["outcome_ok"] is True


async def _fake_qemu(path: Path, seen: list[dict[str, object]]) -> asyncio.AbstractServer:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        while line := await reader.readline():
            message = json.loads(line)
            seen.append(message)
            writer.write(json.dumps({"return": {}, "id": message.get("id")}).encode() + b"\r\n")
            await writer.drain()

    return await asyncio.start_unix_server(serve, str(path))


def test_the_proxy_drops_only_the_reply_to_cont(tmp_path: Path) -> None:
    async def scenario() -> None:
        seen: list[dict[str, object]] = []
        server = await _fake_qemu(tmp_path / "qemu.sock", seen)
        async with QmpProxy(tmp_path / "qemu.sock", tmp_path / "proxy.sock") as proxy:
            reader, writer = await asyncio.open_unix_connection(str(proxy.path))
            assert b"QMP" in await reader.readline()
            for n, command in enumerate(("query-status", "cont", "query-status")):
                writer.write(json.dumps({"execute": command, "id": n}).encode())
            await writer.drain()
            replies = [json.loads(await reader.readline()) for _ in range(2)]
            assert [r["id"] for r in replies] == [0, 2]
            assert [m["execute"] for m in seen] == ["query-status", "cont", "query-status"]
            assert proxy.dropped == 1
            writer.close()
        server.close()

    asyncio.run(scenario())


def test_filesystem_type_finds_the_mount(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(tmp_path) is not None


def test_a_ram_file_its_tmpfs_cannot_hold_is_refused_before_any_touch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ram"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # sparse: nothing allocated yet
    monkeypatch.setattr(ram_module, "filesystem_type", lambda _p: "tmpfs")

    class Tiny:
        f_bavail, f_frsize = 4, 4096

    monkeypatch.setattr(os, "fstatvfs", lambda _fd: Tiny())
    with pytest.raises(RamMappingError, match="room for 0 MiB"):
        RamMapping(path, populate=True).open()
    # Without populate nothing is touched up front: no refusal.
    mapping = RamMapping(path)
    mapping.open()
    mapping.close()
