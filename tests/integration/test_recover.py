"""Crash safety on real QEMUs: ``livemig migrate`` killed mid pre-copy, then ``livemig recover``.

The migration link is capped (40 Mbit/s) and the guest dirties 8 MiB/s, so the
bulk round of a 128 MiB guest lasts well over ten seconds: the engine is SIGKILLed
(no rollback runs) a few MiB in. QEMU's own migration goes on without it. Then:
its journal is unfinished, a second ``livemig migrate`` of the VM is refused, and
``livemig recover --json`` brings the VM back to exactly one running copy, the
source (the target QEMU exits, the guest answers on the network, its memory
checks hold), with the source's migration settings as they were, and the journal
finished. Then the VM migrates again, to a fresh target, with a journal that ends
finished on the target.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from lab.qemu import QemuProcess
from migrate.journal import JournalStore
from migrate.phase import Phase
from migrate.qmp import QmpSession
from tests.integration.conftest import Pair, VmFactory, guest_answers, livemig_cli

LINK_MBIT = 40
WORKLOAD = "dirty:8"
MEMORY_MIB = 128
WORKING_SET_MIB = 32
#: Kill the engine once this much has crossed the link (the bulk round is ~128 MiB).
KILL_AFTER_BYTES = 4 << 20


def _migrate_args(
    pair: Pair, state_dir: Path, target: QemuProcess | None = None, port: int = 4448
) -> list[str]:
    target = target or pair.target
    return [
        "--source-qmp", str(pair.source.site.qmp_socket),
        "--target-qmp", str(target.site.qmp_socket),
        "--target-uri", pair.lab.host_b.migration_uri(port),
        "--state-dir", str(state_dir),
        "--policy", "qemu-default", "--no-predict", "--link-mbit", str(LINK_MBIT),
    ]  # fmt: skip


async def _kill_mid_precopy(pair: Pair, state_dir: Path) -> None:
    """Run ``livemig migrate --events`` and SIGKILL it a few MiB into pre-copy."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "migrate.cli", "migrate", "--events", *_migrate_args(pair, state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the CLI ended before the migration ran"
            record = json.loads(line)
            sample = record.get("sample", {})
            if (
                record["event"] == "progress"
                and sample.get("ram_transferred_bytes", 0) > KILL_AFTER_BYTES
            ):
                break
        proc.kill()  # SIGKILL: no rollback, no report, the journal stays as it was
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode == -9


def test_recover_after_the_engine_was_killed_mid_precopy(vms: VmFactory, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"

    async def scenario() -> None:
        vms.lab.set_bandwidth(LINK_MBIT)
        async with vms.pair(WORKLOAD, MEMORY_MIB, WORKING_SET_MIB) as pair:
            before_caps = await pair.source.qmp.execute("query-migrate-capabilities")
            before_params = await pair.source.qmp.execute("query-migrate-parameters")
            await pair.source.release_qmp()
            await pair.target.release_qmp()
            await _kill_mid_precopy(pair, state_dir)

            store = JournalStore(state_dir)
            (record,) = store.unfinished()
            assert record.phase in (Phase.PRECOPY, Phase.THROTTLING), record.phase
            assert not record.point_of_no_return and record.source_was_running
            assert record.source.qmp_socket == str(pair.source.site.qmp_socket.resolve())
            assert not store.owner_alive(record.migration_id)

            # The VM is refused until recovered; nothing is touched.
            code, out, err = await livemig_cli("migrate", "--json", *_migrate_args(pair, state_dir))
            assert code == 1, (out, err)
            assert (
                f"has an unfinished migration {record.migration_id} (phase {record.phase}): "
                f"run `livemig recover --state-dir {state_dir}`"
            ) in err, err

            began = time.monotonic()
            code, out, err = await livemig_cli("recover", "--state-dir", str(state_dir), "--json")
            wall_s = time.monotonic() - began
            assert code == 0, (out, err)
            data = json.loads(out)
            (result,) = data["migrations"]
            print(
                f"\nlivemig recover: {result['seconds'] * 1e3:.0f} ms to recover "
                f"({data['seconds'] * 1e3:.0f} ms in all, {wall_s:.2f} s wall with the CLI's "
                f"start-up); found {result['source']['status']}/{result['source']['migration']} "
                f"and {result['target']['status']}/{result['target']['migration']}; did: "
                + "; ".join(result["actions"])
            )
            assert data["recovered"] is True and result["recovered"] is True
            assert result["result"] == "vm back on source", result
            assert result["source"]["migration"] in ("active", "setup"), result["source"]
            assert result["target"]["status"] == "inmigrate", result["target"]
            assert "cancelled the outgoing migration" in result["actions"]

            # Exactly one copy runs: the source; the target QEMU is gone.
            assert await pair.target.wait_exited(10) is not None
            session = await QmpSession.connect(pair.source.site.qmp_socket, "check", 5)
            try:
                assert await session.status() == "running"
                assert (await session.execute("query-migrate"))["status"] == "cancelled"
                assert await session.execute("query-migrate-capabilities") == before_caps
                assert await session.execute("query-migrate-parameters") == before_params
            finally:
                await session.close()
            assert await guest_answers(pair.lab, pair.guest_ip) > 10
            mark = len(pair.source.console.lines)
            line = await pair.source.console.wait_for(r"^MEMDIRTY pass=", 15, since=mark)
            assert " bad=0 " in line.text, line.text

            assert store.unfinished() == []
            done = store.finished(record.migration_id)
            assert done is not None and done.finished and done.outcome is not None
            assert (done.outcome.status, done.outcome.vm_on) == ("recovered", "source")

            # Settled, the VM migrates again (to a fresh target, link uncapped); this
            # journal passes the point of no return and finishes with the VM there.
            vms.lab.set_bandwidth(None)
            async with vms.target(pair.spec, role="target-2") as target2:
                await target2.release_qmp()
                code, out, err = await livemig_cli(
                    "migrate", "--json", *_migrate_args(pair, state_dir, target2, 4449)
                )
                assert code == 0, (out, err)
                report = json.loads(out)
                assert report["status"] == "completed", report
                again = store.finished(report["migration_id"])
                assert again is not None and again.outcome is not None
                assert again.point_of_no_return and again.phase is Phase.COMPLETED
                assert (again.outcome.status, again.outcome.vm_on) == ("completed", "target")
                assert store.unfinished() == []
                assert await guest_answers(pair.lab, pair.guest_ip) > 10

    asyncio.run(scenario())
