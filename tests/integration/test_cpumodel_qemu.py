"""cpumodel against the installed QEMU: its flag names and models, the probe's cleanup,
``cpu show --qmp``, and baseline CPU strings that QEMU accepts and realises under TCG.

Nothing here skips: a missing QEMU is a failure (scripts/setup-system.sh installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cpumodel import compute_baseline
from cpumodel import flags as F
from cpumodel.errors import QemuProbeError
from cpumodel.models import ModelCatalog, parse_cpu_string, psabi_level
from cpumodel.qemu import DEFAULT_QEMU, QemuCpuProbe, load_catalog
from tests.unit.test_cpumodel_fixtures import FIXTURES, catalog, host

pytestmark = pytest.mark.integration

CLUSTERS = {
    "milan+rocketlake+alderlake": ("milan", "rocketlake", "alderlake"),
    "rocketlake+alderlake": ("rocketlake", "alderlake"),
    "milan": ("milan",),
}


@pytest.fixture(scope="module")
def qemu_binary() -> str:
    path = shutil.which(DEFAULT_QEMU)
    assert path is not None, f"{DEFAULT_QEMU} is not installed (run scripts/setup-system.sh)"
    return path


@pytest.fixture(scope="module")
def installed_catalog(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    return load_catalog(qemu_binary, cache_dir=tmp_path_factory.mktemp("cache"), refresh=True)


def test_recognized_flags_match_installed_qemu(qemu_binary: str) -> None:
    out = subprocess.run(
        [qemu_binary, "-cpu", "help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    section = out.split("Recognized CPUID flags:", 1)[1]
    assert set(section.split()) == F.QEMU_FLAGS


def test_committed_catalogue_matches_installed_qemu(installed_catalog: ModelCatalog) -> None:
    committed = catalog()
    assert installed_catalog.qemu_version == committed.qemu_version, (
        "QEMU changed: run tests/fixtures/cpu/regenerate.py"
    )
    assert installed_catalog.models == committed.models


def test_catalogue_is_cached_per_binary(qemu_binary: str, tmp_path: Path) -> None:
    first = load_catalog(qemu_binary, cache_dir=tmp_path)
    cached = list((tmp_path / "cpumodel").glob("qemu-models-*.json"))
    assert len(cached) == 1
    assert load_catalog(qemu_binary, cache_dir=tmp_path) == first


def _probe_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("livemig-cpuprobe-")}


class _BodyFailed(Exception):
    pass


def test_probe_kills_qemu_and_removes_its_directory_when_the_body_fails(
    qemu_binary: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    probe = QemuCpuProbe(qemu_binary)
    seen: dict[str, object] = {}

    async def run() -> None:
        async with probe as session:
            assert probe.pid is not None and probe.workdir is not None
            seen["pid"] = probe.pid
            seen["dir"] = probe.workdir
            assert (await session.version()).count(".") == 2
            raise _BodyFailed

    with pytest.raises(_BodyFailed):
        asyncio.run(run())
    assert not Path(str(seen["dir"])).exists()
    assert not Path(f"/proc/{seen['pid']}").exists() or str(seen["dir"]) not in Path(
        f"/proc/{seen['pid']}/cmdline"
    ).read_text(errors="replace")
    assert _probe_dirs() == set()


def test_probe_reports_a_qemu_that_does_not_start(
    qemu_binary: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def run() -> None:
        async with QemuCpuProbe(qemu_binary, extra_args=("-no-such-option",)):
            pass

    with pytest.raises(QemuProbeError) as info:
        asyncio.run(run())
    assert "-no-such-option" in info.value.argv
    assert "no-such-option" in info.value.output
    assert _probe_dirs() == set()
    with pytest.raises(QemuProbeError, match="not found"):
        load_catalog("qemu-system-does-not-exist", cache_dir=tmp_path)


def test_cpu_show_over_qmp(qemu_binary: str, tmp_path: Path) -> None:
    socket = tmp_path / "show.sock"
    livemig = Path(sys.executable).with_name("livemig")

    async def run() -> subprocess.CompletedProcess[str]:
        extra = ("-qmp", f"unix:{socket},server=on,wait=off")
        async with QemuCpuProbe(qemu_binary, extra_args=extra):
            proc = await asyncio.create_subprocess_exec(
                str(livemig), "cpu", "show", "--json", "--qmp", str(socket),
                "--models", str(FIXTURES / "qemu-models.json"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())

    run_result = asyncio.run(run())
    assert run_result.returncode == 0, run_result.stderr
    shown = json.loads(run_result.stdout)
    assert shown["source"] == "qmp"
    # Under TCG the QEMU's "host" is TCG's max model: x86-64-v3 in QEMU 7.2.
    assert shown["level"] == "x86-64-v3"
    assert "qemu64" in shown["runnable_models"]


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_baseline_cpu_string_runs_in_qemu_under_tcg(
    cluster: str, qemu_binary: str, installed_catalog: ModelCatalog
) -> None:
    baseline = compute_baseline([host(n) for n in CLUSTERS[cluster]], installed_catalog)
    config = parse_cpu_string(baseline.cpu, installed_catalog)

    async def run() -> tuple[dict[str, bool], str]:
        probe = QemuCpuProbe(qemu_binary, machine="pc", extra_args=("-cpu", baseline.cpu))
        async with probe as session:
            # QEMU knows every flag of the string: expanding it with them as props works.
            props = {f: True for f in config.enable} | {f: False for f in config.disable}
            expansion = await session.expand(config.base, props)
            assert expansion.flags >= config.enable
            cpus = await session.execute("query-cpus-fast")
            path = cpus[0]["qom-path"]
            values = {}
            for feature in baseline.features:
                values[feature] = await session.execute(
                    "qom-get", {"path": path, "property": feature}
                )
            return values, probe.output()

    values, output = asyncio.run(run())
    assert not re.search(r"(?i)error|invalid|not found|can't apply", output), output
    # TCG lacks some features (vme, invpcid, arch-capabilities MSR...): QEMU switches those
    # off with a warning naming each; every other requested feature must be on.
    filtered = set(re.findall(r"doesn't support requested feature: \S+?\.([\w.-]+) \[bit", output))
    requested = (installed_catalog.get(config.base).flags | config.enable) - config.disable
    for feature, on in values.items():
        if feature in requested:
            assert on or feature in filtered, (feature, output)
    # QEMU 7.2's TCG implements every x86-64-v3 instruction: the level is real under TCG.
    assert baseline.level is not None
    level_flags = psabi_level(baseline.level).flags
    assert all(values[f] for f in level_flags), {f: values[f] for f in level_flags}
    assert not level_flags & filtered
