"""A few cells of the fault matrix against real QEMUs (``livemig bench run --suite
faults-short``): every cell must end with at most one running copy (exactly one
here: no cell of the short suite destroys the VM), its memory intact, nothing left
behind, and a truthful status and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lab.faults import SUITES
from lab.guest import GuestImage


def test_short_fault_matrix_every_cell_ok(guest: GuestImage, tmp_path: Path) -> None:
    out = tmp_path / "faults"
    result = subprocess.run(
        [sys.executable, "-m", "migrate.cli", "bench", "run", "--suite", "faults-short",
         "--out", str(out)],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert (out / "results.json").exists(), result.stderr
    data = json.loads((out / "results.json").read_text())
    cells = data["cells"]
    expected = {(c.fault.value, c.phase.value, c.strategy) for c in SUITES["faults-short"].cells}
    assert {(c["fault"], c["phase"], c["strategy"]) for c in cells} == expected
    for cell in cells:
        name = f"{cell['fault']}/{cell['phase']}/{cell['strategy']}"
        assert cell["injected"], name
        assert cell["outcome_ok"], (name, cell["problems"], cell["error"], cell["notes"])
        assert cell["running_copies"] == 1 and cell["memory_intact"] is True, name
        assert cell["leftovers"] == [], name
    lost_cont = next(c for c in cells if c["fault"] == "lost-cont")
    assert lost_cont["status"] == "completed" and lost_cont["running_on"] == ["target"]
    assert any("dropped 1" in note for note in lost_cont["notes"]), lost_cont["notes"]
    report = (out / "report.md").read_text()
    assert "| fault | phase |" in report and "**NOT OK**" not in report
    assert result.returncode == 0, result.stderr
