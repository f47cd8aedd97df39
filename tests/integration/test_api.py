"""docs/api.md's example, run against real QEMU: once to the end, once aborted."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from migrate.report import Integrity, MigrationReport, Status
from tests.integration.conftest import VmFactory, guest_answers
from tests.jsonschemas import validate_report

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _example() -> Callable[..., Awaitable[MigrationReport]]:
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)
    assert blocks, "docs/api.md has no python example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], str(API_DOC), "exec"), namespace)
    move: Callable[..., Awaitable[MigrationReport]] = namespace["move"]
    return move


@pytest.mark.parametrize("give_up", [False, True], ids=["completes", "aborted"])
def test_api_doc_example_runs(
    vms: VmFactory, give_up: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    move = _example()

    async def scenario() -> None:
        if give_up:
            vms.lab.set_bandwidth(40)  # slow enough to abort part way
        async with vms.pair("dirty:8", 128, 32) as pair:
            await pair.source.release_qmp()
            await pair.target.release_qmp()
            report = await asyncio.wait_for(
                move(
                    pair.source.site.qmp_socket,
                    pair.target.site.qmp_socket,
                    pair.lab.host_b.migration_uri(4451),
                    give_up_after_mib=8.0 if give_up else None,
                ),
                120,
            )
            validate_report(report.to_dict())
            out = capsys.readouterr().out
            assert f"finished: {report.status}" in out
            if give_up:
                assert report.status is Status.ABORTED
                assert "maintenance window closed" in (report.error or "")
                assert any(d.reason.startswith("operator:") for d in report.decisions)
                assert await pair.target.wait_exited(10) is not None
                assert pair.source.alive
            else:
                assert report.status is Status.COMPLETED
                assert report.integrity is Integrity.OK
                assert await pair.source.wait_exited(10) is not None
            assert await guest_answers(pair.lab, pair.guest_ip) > 10

    asyncio.run(scenario())


def test_demo_events_lines_all_follow_the_schema(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.jsonschemas import validate_event_stream

    result = subprocess.run(
        [sys.executable, "-m", "migrate.cli", "demo", "--events", "--workload", "idle",
         "--memory-mib", "128", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    validate_event_stream(records)
    kinds = [r["event"] for r in records]
    assert kinds[0] == "planned" and kinds[-1] == "finished" and "progress" in kinds
    report = records[-1]["report"]
    assert report["status"] == "completed" and report["migration_id"] == records[0]["migration_id"]
    assert "environment" in report
