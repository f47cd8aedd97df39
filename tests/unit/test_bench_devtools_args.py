"""The benchmark's developer tools refuse an output path that is a file, without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["bench.trackers", "bench.pagestream"])
def test_out_naming_a_file_is_refused(module: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    run = subprocess.run(
        [sys.executable, "-m", module, "--out", str(plain), "--sizes", "16M", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"{plain} exists and is not a directory" in run.stderr
    assert plain.read_text() == "x"
