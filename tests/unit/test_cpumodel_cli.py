"""``livemig cpu ...`` as a subprocess: JSON shapes, exit codes, and bad input turned
into one clear line on stderr (never a traceback).

The commands get ``--models`` (the committed QEMU 7.2 catalogue) so no QEMU is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpumodel.models import psabi_level
from tests.unit.test_cpumodel_fixtures import FIXTURES, HOSTS

LIVEMIG = Path(sys.executable).with_name("livemig")
MODELS = str(FIXTURES / "qemu-models.json")


def fixture(name: str) -> str:
    return str(FIXTURES / f"{HOSTS[name]}.json")


def livemig(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LIVEMIG_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [str(LIVEMIG), "cpu", *args], capture_output=True, text=True, env=env, timeout=60
    )


def json_of(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.stdout.count("\n") == 1, run.stdout  # exactly one JSON object
    data: dict[str, Any] = json.loads(run.stdout)
    return data


def test_check_host_milan_to_rocketlake(tmp_path: Path) -> None:
    run = livemig(
        "check", "--json", "--models", MODELS, "--model", "host",
        "--source", fixture("milan"), "--target", fixture("rocketlake"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr  # refused
    result = json_of(run)
    assert set(result) == {"compatible", "missing", "warnings"}
    assert result["compatible"] is False
    assert {"sse4a", "misalignsse", "clzero"} <= set(result["missing"])
    assert any("across vendors" in w for w in result["warnings"])


def test_check_kvm64_is_compatible(tmp_path: Path) -> None:
    run = livemig(
        "check", "--json", "--models", MODELS, "--model", "kvm64",
        "--source", fixture("milan"), "--target", fixture("alderlake"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json_of(run)["compatible"] is True


def test_check_human_output_names_a_model_that_works(tmp_path: Path) -> None:
    run = livemig(
        "check", "--models", MODELS, "--model", "host",
        "--source", fixture("rocketlake"), "--target", fixture("alderlake"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 3
    assert "INCOMPATIBLE" in run.stdout
    assert "missing on target: " in run.stdout and "avx512f" in run.stdout
    assert "would work: -cpu Skylake-Client-v4," in run.stdout


def test_baseline_json(tmp_path: Path) -> None:
    run = livemig(
        "baseline", "--json", "--models", MODELS,
        fixture("milan"), fixture("rocketlake"), fixture("alderlake"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    baseline = json_of(run)
    assert set(baseline) == {"cpu", "level", "features", "hosts"}
    assert baseline["level"] == "x86-64-v3"
    assert baseline["cpu"].startswith("kvm64,")
    assert baseline["features"] == sorted(baseline["features"])
    assert psabi_level("x86-64-v3").flags <= set(baseline["features"])
    assert [h["name"] for h in baseline["hosts"]] == [
        HOSTS[n] for n in ("milan", "rocketlake", "alderlake")
    ]
    assert [h["vendor"] for h in baseline["hosts"]] == ["AMD", "Intel", "Intel"]
    assert baseline["hosts"][1]["lacks_for_next_level"] == []


def test_show_cpuinfo_json(tmp_path: Path) -> None:
    cpuinfo = str(FIXTURES / "lab-vm-amd-family26-cpuinfo.txt")
    run = livemig("show", "--json", "--models", MODELS, cpuinfo, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    shown = json_of(run)
    assert shown["source"] == "cpuinfo" and shown["vendor"] == "AuthenticAMD"
    assert shown["level"] == "x86-64-v4"
    # The lab VM's hypervisor hides rdseed and perfctr_core, so no EPYC model fits it.
    assert "rdseed" not in shown["flags"]
    assert shown["usable_models"] and not any(m.startswith("EPYC") for m in shown["usable_models"])


def test_show_human(tmp_path: Path) -> None:
    run = livemig("show", "--models", MODELS, fixture("rocketlake"), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Intel (GenuineIntel), family 6 model 167 stepping 1" in run.stdout
    assert "psABI level x86-64-v4" in run.stdout
    assert "TSC         3192.000 MHz" in run.stdout


def _write(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


BAD_INPUTS = {
    "empty cpuinfo": (["show", "{empty}"], "empty CPU description"),
    "garbage cpuinfo": (["show", "{garbage}"], "not a CPU description"),
    "cpuinfo without x86 flags": (["show", "{noflags}"], "none of the 2 flags"),
    "missing file": (["show", "{missing}"], "cannot read"),
    "unknown model": (
        ["check", "--model", "Skylake-Clinet", "--source", "{milan}", "--target", "{milan}"],
        "unknown CPU model 'Skylake-Clinet'",
    ),
    "unknown flag": (
        ["check", "--model", "kvm64,+avx513f", "--source", "{milan}", "--target", "{milan}"],
        "unknown CPU flag 'avx513f'",
    ),
    "unknown libvirt model": (["baseline", "{milan}", "{badxml}"], "Nehalem-Turbo"),
    "garbage in baseline": (["baseline", "{milan}", "{garbage}"], "not a CPU description"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_1(case: str, tmp_path: Path) -> None:
    files = {
        "empty": _write(tmp_path, "empty.txt", b""),
        "garbage": _write(tmp_path, "garbage.txt", b"\x00\xffprocessor? no.\nflags maybe\n"),
        "noflags": _write(tmp_path, "noflags.txt", b"processor : 0\nflags : foo bar\n"),
        "missing": str(tmp_path / "does-not-exist.txt"),
        "badxml": _write(tmp_path, "bad.xml", b"<cpu><model>Nehalem-Turbo</model></cpu>"),
        "milan": fixture("milan"),
    }
    argv, message = BAD_INPUTS[case]
    run = livemig(*(a.format(**files) for a in argv), "--models", MODELS, tmp_path=tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("livemig: error: ")
    assert message in run.stderr
    assert run.stdout == ""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    run = livemig("check", "--model", "kvm64", tmp_path=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
