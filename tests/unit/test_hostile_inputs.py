"""An attacker's table: hostile input to every ``livemig`` command and to the Python API.

Every row is refused with one clear error: no traceback, no hang, no silent accept.

- CLI rows: ``(argv, exit code, fragment of the one stderr line)``. Each runs the
  ``main`` that ``python -m migrate.cli`` runs, in its own child process with a
  20 s deadline; the children are forked from one interpreter that has imported the
  CLI once (:data:`_RUNNER`), so the table takes seconds, not minutes. A sample of
  rows also goes through a real ``python -m migrate.cli`` and must answer the same.
  Each row asserts the exit code, exactly one stderr line ``livemig: error: ...``
  holding the fragment, nothing on stdout, and that the child ended by itself.
  Commands that boot the lab (``demo``, ``plan --lab``, ``bench run``) appear only
  with input refused before anything boots.
- API rows: ``(call, exception type, fragment)`` against the types themselves
  (``MigrationRequest``, ``HostEndpoint``, ``Policy``, ``HostFacts``, ``Migration``,
  the cpumodel and bench loaders, the lab's ``DemoConfig``/``Workload``), each under
  a 20 s timeout.

The table (259 rows: 151 CLI, 108 API) by category:

=================================================  ===  ===
category                                           CLI  API
=================================================  ===  ===
migration URI (exec:, fd:, newline, port, ...)      20   17
numbers (nan, inf, 1e999, zero, negative, range)    35   34
text (newlines, control chars, whitespace, names)   13   22
files (FIFO, device, directory, size, encoding)     32   10
JSON (depth, NaN/Infinity, shape)                   11    6
CPU description semantics (CPUID, TSC, family)      19   11
output directories (file, read-only, non-UTF-8)     12    6
usage (unknown command, choice, conflict)            9    2
=================================================  ===  ===
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import cpumodel.qemu
from bench.errors import OutputError, ResultsError
from bench.report import write_report
from bench.results import BenchResults, check_results_dir
from bench.runner import run_suite
from cpumodel.cpuid import parse_cpuid_text
from cpumodel.errors import CpuMapError, CpuParseError
from cpumodel.host import HostCpu, SourceKind
from cpumodel.inputfile import InputFileError, loads_json, read_input_json
from cpumodel.libvirt import load_cpu_map, parse_libvirt_cpus
from cpumodel.models import ModelCatalog
from cpumodel.qemu import host_from_expansion
from cpumodel.sources import load_catalog_file, load_host, parse_hosts
from lab.demo import DemoConfig, Workload
from migrate.api import Migration
from migrate.errors import ConfigError
from migrate.files import check_output_dir
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.presets import preset
from migrate.request import HostEndpoint, MigrationRequest, parse_migration_uri
from migrate.vmspec import VMSpec
from tests.fakes import fake_pair
from tests.unit.test_bench import NATIVE, bench_results, completed_run
from tests.unit.test_safety_fake_qmp import make_request

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "cpu"
MODELS = str(FIXTURES / "qemu-models.json")
MILAN = str(FIXTURES / "milan-epyc-7713.json")
DEADLINE_S = 20.0
URI = "tcp:198.19.0.2:4444"
NAN, INF = math.nan, math.inf
NON_UTF8 = "bad-\udcff-name"  # argv bytes b"bad-\xff-name"

# --- the hostile files ---------------------------------------------------------------

ZERO_CPUID = (
    "CPUID 00000000: 00000000-00000000-00000000-00000000\n"
    "CPUID 00000001: 00000000-00000000-00000000-00000000\n"
)
ZERO_CPUID_R = "CPU 0:\n" + "".join(
    f"   0x0000000{leaf} 0x00: eax=0x00000000 ebx=0x00000000 ecx=0x00000000 edx=0x00000000\n"
    for leaf in (0, 1)
)
NO_VENDOR_CPUID = (
    "CPUID 00000000: 00000010-00000000-00000000-00000000\n"
    "CPUID 00000001: 00A00F11-00800800-7EDA320B-178BFBFF\n"
)
NO_SIGNATURE_CPUID = (
    "CPUID 00000000: 00000010-68747541-444D4163-69746E65\n"
    "CPUID 00000001: 00000000-00800800-7EDA320B-178BFBFF\n"
)
BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE cpu [<!ENTITY a "aaaaaaaaaa">'
    + "".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "]>\n<cpu><model>&i;</model></cpu>\n"
)
XXE = '<!DOCTYPE cpu [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<cpu><model>&x;</model></cpu>\n'


def _libvirt(counter: str) -> str:
    return f"<cpu><arch>x86_64</arch><feature policy='require' name='sse2'/>{counter}</cpu>\n"


def _milan(**changes: Any) -> str:
    data = json.loads(Path(MILAN).read_text())
    data.update(changes)
    return json.dumps(data)


TEXT_FILES: dict[str, str | bytes] = {
    "empty.txt": b"",
    "nonutf8.txt": b"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu \xff\xfe sse2\n",
    "utf16.txt": "processor : 0\nflags : fpu sse2\n".encode("utf-16"),
    "zero-cpuid.txt": ZERO_CPUID,
    "zero-cpuid-r.txt": ZERO_CPUID_R,
    "no-vendor-cpuid.txt": NO_VENDOR_CPUID,
    "no-signature-cpuid.txt": NO_SIGNATURE_CPUID,
    "neg-tsc.json": _milan(tsc_khz=-2_000_000),
    "zero-tsc.json": _milan(tsc_khz=0),
    "neg-family.json": _milan(family=-1),
    "float-family.json": _milan(family=25.5),
    "huge-tsc.json": _milan(tsc_khz=10**12),
    "deep-cpu.json": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "nan-cpu.json": _milan(tsc_khz=None).replace('"tsc_khz": null', '"tsc_khz": NaN'),
    "libvirt-neg-tsc.xml": _libvirt("<counter name='tsc' frequency='-3000000000'/>"),
    "libvirt-zero-tsc.xml": _libvirt("<counter name='tsc' frequency='0'/>"),
    "libvirt-bad-tsc.xml": _libvirt("<counter name='tsc' frequency='fast'/>"),
    "libvirt-model.xml": "<cpu><arch>x86_64</arch><model>EPYC</model></cpu>\n",
    "qmp-neg-tsc.json": json.dumps(
        {"return": {"model": {"name": "host", "props": {"sse2": True, "tsc-frequency": -1}}}}
    ),
    "cpuinfo-neg-family.txt": "processor : 0\nvendor_id : AuthenticAMD\ncpu family : -6\n"
    "model : 1\nstepping : 1\nflags : fpu sse sse2 lm\n",
    "lscpu-huge-family.txt": "Architecture: x86_64\nVendor ID: GenuineIntel\nCPU family: 9999\n"
    "Model: 1\nStepping: 1\nFlags: fpu sse sse2 lm\n",
    "billion-laughs.xml": BILLION_LAUGHS,
    "xxe.xml": XXE,
    "deep.xml": "<cpu>" + "<x>" * 20_000 + "</x>" * 20_000 + "</cpu>\n",
    "catalogue-deep.json": "[" * 100_000 + "]" * 100_000,
    "catalogue-nan.json": '{"qemu_version": "9.0", "models": [], "binary": NaN}',
    "catalogue-list.json": "[1, 2, 3]",
    "catalogue-inf.json": '{"qemu_version": 1e999, "models": []}',
    "plain.txt": "not a directory\n",
}


@dataclass
class Hostile:
    """Paths of the hostile inputs, by name (``{name}`` in a row's argv)."""

    root: Path
    paths: dict[str, str]

    def __getitem__(self, name: str) -> Path:
        return Path(self.paths[name])


def _results_dir(path: Path, content: str | bytes | None = None) -> Path:
    path.mkdir(parents=True)
    if content is None:
        bench_results((completed_run("openssl", NATIVE),)).save(path)
    else:
        data = content if isinstance(content, bytes) else content.encode()
        (path / "results.json").write_bytes(data)
    return path


def _read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable even for root (immutable), else by permissions."""
    undo: Callable[[], None]
    if os.geteuid() == 0 and shutil.which("chattr") is not None:
        subprocess.run(["chattr", "+i", str(path)], check=True)

        def undo() -> None:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    else:
        path.chmod(0o555)

        def undo() -> None:
            path.chmod(0o755)

    try:
        (path / "probe").touch()
    except OSError:
        return undo
    undo()
    raise AssertionError(f"cannot make {path} read-only here; the table needs one")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    paths: dict[str, str] = {}
    for name, content in TEXT_FILES.items():
        data = content if isinstance(content, bytes) else content.encode()
        (root / name).write_bytes(data)
        paths[name.rsplit(".", 1)[0]] = str(root / name)
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    big = root / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(17 << 20)  # sparse: 17 MiB of NULs
    huge = root / "huge-results"
    huge.mkdir()
    with (huge / "results.json").open("wb") as handle:
        handle.truncate(300 << 20)
    os.symlink("/dev/zero", root / "zero-link")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "listening.sock"))  # bound, never accepts a reader
    cpu_map = root / "cpu-map-fifo"
    cpu_map.mkdir()
    (cpu_map / "index.xml").write_text(
        "<cpus><arch name='x86'><include filename='x86_features.xml'/></arch></cpus>\n"
    )
    os.mkfifo(cpu_map / "x86_features.xml")
    results = {
        "results-fifo": None,
        "results-as-dir": None,
        "results-deep": "[" * 100_000 + "]" * 100_000,
        "results-nan": '{"format_version": NaN}',
        "results-inf": '{"format_version": 1, "started_at": -1e999}',
        "results-nonutf8": b'{"format_version": 1, "command": "\xff\xfe"}',
        "results-list": "[1]",
        "results-string-version": '{"format_version": "1"}',
        "results-ok": None,
        "results-ro": None,
    }
    for name, content in results.items():
        if name in ("results-fifo", "results-as-dir"):
            (root / name).mkdir()
            target = root / name / "results.json"
            os.mkfifo(target) if name == "results-fifo" else target.mkdir()
        else:
            _results_dir(root / name, content)
    ro_dir = root / "ro"
    ro_dir.mkdir()
    undo = [_read_only(ro_dir), _read_only(root / "results-ro")]
    paths.update(
        root=str(root),
        fifo=str(root / "fifo"),
        dir=str(root / "dir"),
        missing=str(root / "missing"),
        big=str(big),
        huge_results=str(huge),
        zero_link=str(root / "zero-link"),
        socket=str(root / "listening.sock"),
        cpu_map_fifo=str(cpu_map),
        ro=str(ro_dir),
        nonutf8_dir=str(root / NON_UTF8),
        **{name.replace("-", "_"): str(root / name) for name in results},
    )
    (root / NON_UTF8).mkdir()
    bench_results((completed_run("openssl", NATIVE),)).save(root / NON_UTF8)
    yield Hostile(root, {k.replace("-", "_"): v for k, v in paths.items()})
    server.close()
    for step in undo:
        step()


# --- CLI rows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    category: str
    argv: tuple[str, ...]
    code: int
    fragment: str


URI_ = "migration URI"
NUM = "numbers"
TEXT = "text"
FILES = "files"
JSON_ = "JSON"
CPU = "CPU description semantics"
OUT = "output directories"
USAGE = "usage"

MIGRATE = ("migrate", "--source-qmp", "{missing}", "--target-qmp", "{dir}")
MIG_OK = (*MIGRATE, "--target-uri", URI)
SHOW = ("cpu", "show", "--models", MODELS)
CHECK = ("cpu", "check", "--models", MODELS, "--model", "EPYC")


def _uri(uri: str, fragment: str = "bad migration URI") -> Cli:
    return Cli(URI_, (*MIGRATE, "--target-uri", uri), 1, fragment)


def _cli(category: str, code: int, fragment: str, *argv: str) -> Cli:
    return Cli(category, argv, code, fragment)


# fmt: off
CLI: dict[str, Cli] = {
    # -- migration URIs: only tcp:HOST:PORT and unix:/PATH reach QEMU
    "uri exec shell": _uri("exec:touch /tmp/livemig-pwned"),
    "uri exec": _uri("exec:cat"),
    "uri trailing newline": _uri(URI + "\n"),
    "uri trailing CR": _uri(URI + "\r"),
    "uri fd": _uri("fd:3"),
    "uri file": _uri("file:/tmp/vm.state"),
    "uri rdma": _uri("rdma:198.19.0.2:4444"),
    "uri port 0": _uri("tcp:198.19.0.2:0", "bad port"),
    "uri port 65536": _uri("tcp:198.19.0.2:65536", "bad port"),
    "uri no host": _uri("tcp::4444"),
    "uri unix relative": _uri("unix:relative.sock"),
    "uri unix space": _uri("unix:/tmp/a b.sock"),
    "uri unix too long": _uri("unix:/" + "a" * 200, "longer than a UNIX socket address allows"),
    "uri leading space": _uri(" " + URI),
    "uri arabic digits": _uri("tcp:198.19.0.2:\u0664\u0664\u0664\u0664"),
    "uri upper case": _uri("TCP:198.19.0.2:4444"),
    "uri options": _uri(URI + ",ipv4=on"),
    "uri shell host": _uri("tcp:host;reboot:4444"),
    "uri empty": _uri(""),
    "uri open bracket": _uri("tcp:[::1:4444"),
    # -- numbers: finite, in range
    "migrate link nan": _cli(NUM, 2, "not a finite number", *MIG_OK, "--link-mbit", "nan"),
    "migrate link inf": _cli(NUM, 2, "not a finite number", *MIG_OK, "--link-mbit", "inf"),
    "migrate link 1e999": _cli(NUM, 2, "not a finite number", *MIG_OK, "--link-mbit", "1e999"),
    "migrate link negative": _cli(NUM, 2, "must be positive", *MIG_OK, "--link-mbit", "-5"),
    "migrate link zero": _cli(NUM, 2, "must be positive", *MIG_OK, "--link-mbit", "0"),
    "migrate link text": _cli(NUM, 2, "not a number", *MIG_OK, "--link-mbit", "12abc"),
    "migrate total inf": _cli(NUM, 2, "not a finite", *MIG_OK, "--max-total-time-s", "inf"),
    "migrate total zero": _cli(NUM, 2, "must be positive", *MIG_OK, "--max-total-time-s", "0"),
    "migrate max dt nan": _cli(NUM, 2, "not a finite", *MIG_OK, "--max-downtime-ms", "NaN"),
    "migrate max dt huge": _cli(NUM, 2, "at most 2e+06", *MIG_OK, "--max-downtime-ms", "3e6"),
    "migrate limit -inf": _cli(NUM, 2, "not a finite", *MIG_OK, "--downtime-limit-ms=-inf"),
    "migrate limit negative": _cli(NUM, 2, "must be positive", *MIG_OK, "--downtime-limit-ms", "-1" ),
    "migrate throttle 100": _cli(NUM, 2, "must be 0-99", *MIG_OK, "--max-throttle-pct", "100"),
    "migrate throttle -1": _cli(NUM, 2, "must be 0-99", *MIG_OK, "--max-throttle-pct", "-1"),
    "migrate throttle float": _cli(NUM, 2, "not a whole number", *MIG_OK, "--max-throttle-pct", "50.5" ),
    "migrate throttle nan": _cli(NUM, 2, "not a whole number", *MIG_OK, "--max-throttle-pct", "nan" ),
    "demo bandwidth nan": _cli(NUM, 2, "not a finite", "demo", "--bandwidth-mbit", "nan"),
    "demo memory 0": _cli(NUM, 2, "must be positive", "demo", "--memory-mib", "0"),
    "demo memory 8": _cli(NUM, 2, "must be 16-1048576", "demo", "--memory-mib", "8"),
    "demo memory huge": _cli(NUM, 2, "must be 16-1048576", "demo", "--memory-mib", "99999999999"),
    "demo dirty negative": _cli(NUM, 2, "must be positive", "demo", "--dirty-mib", "-1"),
    "demo limit inf": _cli(NUM, 2, "not a finite", "demo", "--downtime-limit-ms", "inf"),
    "demo total nan": _cli(NUM, 2, "not a finite", "demo", "--max-total-time-s", "nan"),
    "demo dirty over memory": _cli(NUM, 1, "more than the guest's memory_mib", "demo", "--memory-mib", "64", "--dirty-mib", "128"),
    "plan link nan": _cli(NUM, 2, "not a finite", "plan", "--source-qmp", "{missing}", "--link-mbit", "nan" ),
    "plan max dt inf": _cli(NUM, 2, "not a finite", "plan", "--source-qmp", "{missing}", "--max-downtime-ms", "inf" ),
    "plan lab bandwidth -1": _cli(NUM, 2, "must be positive", "plan", "--lab", "--bandwidth-mbit", "-1" ),
    "plan lab memory 0": _cli(NUM, 2, "must be positive", "plan", "--lab", "--memory-mib", "0"),
    "plan lab dirty -5": _cli(NUM, 2, "must be positive", "plan", "--lab", "--dirty-mib", "-5"),
    "plan lab with disks": _cli(USAGE, 1, "--with-local-disks goes with --source-qmp", "plan", "--lab", "--with-local-disks"),
    "plan calc time 0": _cli(NUM, 2, "must be positive", "plan", "--lab", "--calc-time-s", "0"),
    "plan calc time 61": _cli(NUM, 2, "must be 1-60", "plan", "--lab", "--calc-time-s", "61"),
    "plan dirty over memory": _cli(NUM, 1, "more than the guest's memory_mib", "plan", "--lab", "--memory-mib", "32", "--dirty-mib", "64"),
    "bench repetitions 0": _cli(NUM, 2, "must be positive", "bench", "run", "--repetitions", "0"),
    "bench repetitions nan": _cli(NUM, 2, "not a whole number", "bench", "run", "--repetitions", "nan" ),
    "bench repetitions 1001": _cli(NUM, 2, "must be 1-1000", "bench", "run", "--repetitions", "1001" ),
    # -- text: newlines, control characters, whitespace
    "demo workload newline": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "openssl\n"),
    "demo workload space": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "idle "),
    "demo workload kernel arg": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "idle init=/bin/sh" ),
    "demo workload nan": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "dirty:nan"),
    "demo workload inf": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "dirty:inf"),
    "demo workload 1e3": _cli(TEXT, 2, "unknown workload", "demo", "--workload", "dirty:1e3"),
    "plan workload negative": _cli(TEXT, 2, "unknown workload", "plan", "--lab", "--workload", "dirty:-1" ),
    "demo cpu newline": _cli(TEXT, 2, "control characters", "demo", "--cpu", "host\n"),
    "demo cpu extra args": _cli(TEXT, 2, "whitespace", "demo", "--cpu", "host -device x"),
    "migrate cpu-model newline": _cli(TEXT, 2, "control characters", *MIG_OK, "--cpu-model", "max\n" ),
    "migrate cpu-model escape": _cli(TEXT, 2, "control characters", *MIG_OK, "--cpu-model", "max\x1b[2J" ),
    "cpu check model newline": _cli(TEXT, 2, "control characters", "cpu", "check", "--model", "host\n", "--source", MILAN, "--target", MILAN),
    "cpu check model empty": _cli(TEXT, 2, "must not be empty", "cpu", "check", "--model", "", "--source", MILAN, "--target", MILAN),
    # -- files: FIFOs, devices, directories, size, encoding
    "cpu show fifo": _cli(FILES, 1, "FIFO", *SHOW, "{fifo}"),
    "cpu show /dev/zero": _cli(FILES, 1, "character device", *SHOW, "/dev/zero"),
    "cpu show /dev/null": _cli(FILES, 1, "character device", *SHOW, "/dev/null"),
    "cpu show link to /dev/zero": _cli(FILES, 1, "character device", *SHOW, "{zero_link}"),
    "cpu show directory": _cli(FILES, 1, "a directory", *SHOW, "{dir}"),
    "cpu show socket": _cli(FILES, 1, "cannot read", *SHOW, "{socket}"),
    "cpu show missing": _cli(FILES, 1, "No such file", *SHOW, "{missing}"),
    "cpu show 17 MiB": _cli(FILES, 1, "larger than 16 MiB", *SHOW, "{big}"),
    "cpu show not utf-8": _cli(FILES, 1, "not UTF-8 text", *SHOW, "{nonutf8}"),
    "cpu show utf-16": _cli(FILES, 1, "not UTF-8 text", *SHOW, "{utf16}"),
    "cpu show empty": _cli(FILES, 1, "empty CPU description", *SHOW, "{empty}"),
    "cpu show non-utf-8 name": _cli(FILES, 2, "not valid UTF-8", *SHOW, NON_UTF8),
    "cpu check source fifo": _cli(FILES, 1, "FIFO", *CHECK, "--source", "{fifo}", "--target", MILAN ),
    "cpu check target zero": _cli(FILES, 1, "character device", *CHECK, "--source", MILAN, "--target", "/dev/zero" ),
    "cpu baseline fifo": _cli(FILES, 1, "FIFO", "cpu", "baseline", "--models", MODELS, MILAN, "{fifo}" ),
    "cpu models fifo": _cli(FILES, 1, "FIFO", "cpu", "models", "--models", "{fifo}"),
    "cpu models /dev/zero": _cli(FILES, 1, "character device", "cpu", "models", "--models", "/dev/zero" ),
    "cpu models not utf-8": _cli(FILES, 1, "not UTF-8", "cpu", "models", "--models", "{nonutf8}"),
    "cpu map fifo include": _cli(FILES, 1, "FIFO", *SHOW, "--cpu-map", "{cpu_map_fifo}", "{libvirt_model}" ),
    "cpu show --qmp fifo": _cli(FILES, 1, "cannot connect", "cpu", "show", "--qmp", "{fifo}"),
    "cpu show --qmp file": _cli(FILES, 1, "cannot connect", "cpu", "show", "--qmp", "{plain}"),
    "migrate source cpu fifo": _cli(FILES, 1, "FIFO", *MIG_OK, "--source-cpu", "{fifo}"),
    "migrate target cpu zero": _cli(FILES, 1, "character device", *MIG_OK, "--target-cpu", "/dev/zero" ),
    "migrate source cpu dir": _cli(FILES, 1, "a directory", *MIG_OK, "--source-cpu", "{dir}"),
    "migrate qmp fifo": _cli(FILES, 1, "not a UNIX socket", "migrate", "--source-qmp", "{fifo}", "--target-qmp", "{dir}", "--target-uri", URI),
    "migrate same qmp": _cli(FILES, 1, "same QEMU", "migrate", "--source-qmp", "{plain}", "--target-qmp", "{plain}", "--target-uri", URI),
    "migrate qmp empty": _cli(FILES, 2, "empty path", "migrate", "--source-qmp", "", "--target-qmp", "{dir}", "--target-uri", URI),
    "migrate qmp non-utf-8": _cli(FILES, 2, "not valid UTF-8", "migrate", "--source-qmp", NON_UTF8, "--target-qmp", "{dir}", "--target-uri", URI),
    "bench plot results fifo": _cli(FILES, 1, "FIFO", "bench", "plot", "{results_fifo}"),
    "bench plot results dir": _cli(FILES, 1, "a directory", "bench", "plot", "{results_as_dir}"),
    "bench plot /dev/zero": _cli(FILES, 1, "character device", "bench", "plot", "/dev/zero"),
    "bench plot 300 MiB": _cli(FILES, 1, "larger than 256 MiB", "bench", "plot", "{huge_results}"),
    # -- JSON: depth, NaN/Infinity, shape
    "cpu show deep json": _cli(JSON_, 1, "nested deeper than 100", *SHOW, "{deep_cpu}"),
    "cpu show NaN json": _cli(JSON_, 1, "NaN is not a JSON number", *SHOW, "{nan_cpu}"),
    "cpu models deep": _cli(JSON_, 1, "nested deeper than 100", "cpu", "models", "--models", "{catalogue_deep}" ),
    "cpu models NaN": _cli(JSON_, 1, "NaN is not a JSON number", "cpu", "models", "--models", "{catalogue_nan}" ),
    "cpu models 1e999": _cli(JSON_, 1, "out of range", "cpu", "models", "--models", "{catalogue_inf}" ),
    "cpu models list": _cli(JSON_, 1, "malformed CPU model catalogue", "cpu", "models", "--models", "{catalogue_list}" ),
    "bench plot deep": _cli(JSON_, 1, "nested deeper than 100", "bench", "plot", "{results_deep}"),
    "bench plot NaN": _cli(JSON_, 1, "NaN is not a JSON number", "bench", "plot", "{results_nan}"),
    "bench plot -1e999": _cli(JSON_, 1, "out of range", "bench", "plot", "{results_inf}"),
    "bench plot list": _cli(JSON_, 1, "results format None", "bench", "plot", "{results_list}"),
    "bench plot version string": _cli(JSON_, 1, "results format '1'", "bench", "plot", "{results_string_version}" ),
    # -- CPU description semantics
    "cpuid all zero": _cli(CPU, 1, "only zero registers", *SHOW, "{zero_cpuid}"),
    "cpuid -r all zero": _cli(CPU, 1, "only zero registers", *SHOW, "{zero_cpuid_r}"),
    "cpuid no vendor": _cli(CPU, 1, "no vendor string", *SHOW, "{no_vendor_cpuid}"),
    "cpuid no signature": _cli(CPU, 1, "no family/model/stepping", *SHOW, "{no_signature_cpuid}"),
    "migrate zero cpuid": _cli(CPU, 1, "only zero registers", *MIG_OK, "--target-cpu", "{zero_cpuid}" ),
    "json negative tsc": _cli(CPU, 1, "TSC frequency -2000000 kHz", *SHOW, "{neg_tsc}"),
    "json zero tsc": _cli(CPU, 1, "TSC frequency 0 kHz", *SHOW, "{zero_tsc}"),
    "json 1 PHz tsc": _cli(CPU, 1, "TSC frequency 1000000000000 kHz", *SHOW, "{huge_tsc}"),
    "json negative family": _cli(CPU, 1, "family -1 is out of range", *SHOW, "{neg_family}"),
    "json float family": _cli(CPU, 1, "25.5 is not a whole number", *SHOW, "{float_family}"),
    "libvirt negative tsc": _cli(CPU, 1, "TSC frequency '-3000000000' Hz", *SHOW, "{libvirt_neg_tsc}" ),
    "libvirt zero tsc": _cli(CPU, 1, "TSC frequency '0' Hz", *SHOW, "{libvirt_zero_tsc}"),
    "libvirt tsc text": _cli(CPU, 1, "TSC frequency 'fast' Hz", *SHOW, "{libvirt_bad_tsc}"),
    "qmp negative tsc": _cli(CPU, 1, "negative tsc-frequency", *SHOW, "{qmp_neg_tsc}"),
    "cpuinfo negative family": _cli(CPU, 1, "family -6 is out of range", *SHOW, "{cpuinfo_neg_family}" ),
    "lscpu family 9999": _cli(CPU, 1, "family 9999 is out of range", *SHOW, "{lscpu_huge_family}" ),
    "libvirt billion laughs": _cli(CPU, 1, "libvirt XML", *SHOW, "{billion_laughs}"),
    "libvirt external entity": _cli(CPU, 1, "libvirt XML", *SHOW, "{xxe}"),
    "libvirt 20000 deep": _cli(CPU, 1, "names no model and no known feature", *SHOW, "{deep}"),
    # -- output directories
    "bench run out is a file": _cli(OUT, 1, "exists and is not a directory", "bench", "run", "--out", "{plain}" ),
    "bench run out under a file": _cli(OUT, 1, "is not a directory", "bench", "run", "--out", "{plain}/sub" ),
    "bench run out read-only": _cli(OUT, 1, "is not writable", "bench", "run", "--out", "{ro}"),
    "bench run out in read-only": _cli(OUT, 1, "cannot be created in", "bench", "run", "--out", "{ro}/new" ),
    "bench run out in sysfs": _cli(OUT, 1, "cannot be created in", "bench", "run", "--out", "/sys/kernel/livemig-out" ),
    "bench run out non-utf-8": _cli(OUT, 2, "not valid UTF-8", "bench", "run", "--out", NON_UTF8),
    "bench plot read-only": _cli(OUT, 1, "is not writable", "bench", "plot", "{results_ro}"),
    "bench plot non-utf-8 dir": _cli(OUT, 2, "not valid UTF-8", "bench", "plot", "{nonutf8_dir}"),
    "bench plot empty": _cli(OUT, 2, "empty path", "bench", "plot", ""),
    "demo log dir is a file": _cli(OUT, 1, "exists and is not a directory", "demo", "--log-dir", "{plain}" ),
    "demo log dir read-only": _cli(OUT, 1, "is not writable", "demo", "--log-dir", "{ro}"),
    "plan log dir is a file": _cli(OUT, 1, "exists and is not a directory", "plan", "--lab", "--log-dir", "{plain}" ),
    # -- usage
    "no command": _cli(USAGE, 2, "required: command"),
    "unknown command": _cli(USAGE, 2, "invalid choice: 'teleport'", "teleport"),
    "unknown strategy": _cli(USAGE, 2, "invalid choice: 'exec'", *MIG_OK, "--strategy", "exec"),
    "unknown policy": _cli(USAGE, 2, "invalid choice: 'none'", *MIG_OK, "--policy", "none"),
    "plan both sources": _cli(USAGE, 2, "not allowed with", "plan", "--lab", "--source-qmp", "{missing}" ),
    "cpu show file and qmp": _cli(USAGE, 2, "not allowed with", "cpu", "show", "--qmp", "{fifo}", MILAN ),
    "bench unknown suite": _cli(USAGE, 2, "invalid choice: 'nope'", "bench", "run", "--suite", "nope" ),
    "bench list extra": _cli(USAGE, 2, "unrecognized arguments", "bench", "list", "extra"),
}
# fmt: on

#: Rows also run through a real ``python -m migrate.cli``: one per command.
REAL_ENTRY_POINT = (
    "uri exec shell",
    "demo workload newline",
    "plan lab memory 0",
    "cpu show fifo",
    "bench plot results fifo",
)

# Each child runs `migrate.cli.main` exactly as `python -m migrate.cli` does
# (`sys.exit(main())` with sys.argv set), its stdout and stderr going to files. A
# safety net: should a row get past validation, booting the lab (the guest, the
# benchmark's backend) or probing QEMU raises, so the row fails with a traceback
# instead of starting VMs as root.
_RUNNER = r"""
import json, os, shutil, sys, tempfile, time, traceback, signal
import migrate.cli
migrate.cli.build_parser()  # every command's module
import lab.demo, bench.results, bench.report, bench.runner, bench.plots  # what handlers load
import cpumodel.qemu, migrate.cli_bench

def would_boot(*args, **kwargs):
    raise RuntimeError("hostile table: this row got past validation and would boot")

lab.demo.prepare_guest = would_boot
migrate.cli_bench._backend = would_boot
cpumodel.qemu.probe_catalog = would_boot
cases, deadline, parallel = json.loads(sys.stdin.read())
work = tempfile.mkdtemp(prefix="livemig-hostile-")
results = [None] * len(cases)
running = {}

def start(i):
    out, err = (os.path.join(work, f"{i}.{s}") for s in ("out", "err"))
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = ["livemig", *cases[i]]
            try:
                sys.exit(migrate.cli.main())
            except SystemExit as exc:
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    running[pid] = (i, time.monotonic(), out, err)

todo = list(range(len(cases)))
while todo or running:
    while todo and len(running) < parallel:
        start(todo.pop(0))
    time.sleep(0.005)
    for pid, (i, began, out, err) in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        took = time.monotonic() - began
        if not done and took < deadline:
            continue
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status) if done else None
        read = lambda p: open(p, "rb").read().decode("utf-8", "backslashreplace")
        results[i] = {"code": code, "stdout": read(out), "stderr": read(err), "seconds": took}
        del running[pid]
shutil.rmtree(work)
print(json.dumps(results))
"""


def _argv(row: Cli, hostile: Hostile) -> list[str]:
    return [arg.format_map(hostile.paths) if "{" in arg else arg for arg in row.argv]


def _env() -> dict[str, str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def cli_results(hostile: Hostile) -> dict[str, dict[str, Any]]:
    names = sorted(CLI)
    cases = [_argv(CLI[name], hostile) for name in names]
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps([cases, DEADLINE_S, 3]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=DEADLINE_S * len(cases) / 3 + 120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(names, json.loads(run.stdout.splitlines()[-1]), strict=True))


def _assert_refused(row: Cli, code: int | None, stdout: str, stderr: str) -> None:
    assert code is not None, f"still running after {DEADLINE_S:.0f} s (a hang)"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("livemig: error: "), stderr
    assert row.fragment in lines[0], lines[0]
    assert code == row.code, stderr
    assert stdout == "", stdout


@pytest.mark.parametrize("name", sorted(CLI))
def test_cli_refuses_in_one_line(name: str, cli_results: dict[str, dict[str, Any]]) -> None:
    result = cli_results[name]
    _assert_refused(CLI[name], result["code"], result["stdout"], result["stderr"])


@pytest.mark.parametrize("name", REAL_ENTRY_POINT)
def test_python_dash_m_answers_the_same(
    name: str, hostile: Hostile, cli_results: dict[str, dict[str, Any]]
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "migrate.cli", *_argv(CLI[name], hostile)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=DEADLINE_S,
        stdin=subprocess.DEVNULL,
        check=False,
        errors="backslashreplace",
    )
    _assert_refused(CLI[name], run.returncode, run.stdout, run.stderr)
    assert run.stderr == cli_results[name]["stderr"]


# --- API rows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    category: str
    call: Callable[[Hostile], object]
    error: type[BaseException]
    fragment: str


def _endpoint(uri: str) -> Callable[[Hostile], object]:
    return lambda h: HostEndpoint("target", Path("/run/t.sock"), uri)


def _request(**changes: Any) -> Callable[[Hostile], object]:
    def build(_h: Hostile) -> object:
        fields: dict[str, Any] = {
            "source": HostEndpoint("source", Path("/run/s.sock")),
            "target": HostEndpoint("target", Path("/run/t.sock"), URI),
        }
        return MigrationRequest(**(fields | changes))

    return build


def _request_with_target(uri: str) -> Callable[[Hostile], object]:
    """A target whose URI was changed after it was built: the request checks again."""

    def build(_h: Hostile) -> object:
        target = HostEndpoint("target", Path("/run/t.sock"), URI)
        object.__setattr__(target, "migration_uri", uri)
        return MigrationRequest(HostEndpoint("source", Path("/run/s.sock")), target)

    return build


def _policy(**changes: Any) -> Callable[[Hostile], object]:
    return lambda h: Policy(**changes)


def _host(**changes: Any) -> Callable[[Hostile], object]:
    fields: dict[str, Any] = {
        "name": "h",
        "vendor": "GenuineIntel",
        "flags": frozenset({"sse2"}),
        "source": SourceKind.CPUINFO,
    }
    return lambda h: HostCpu(**(fields | changes))


async def _update_policy_while_running(**changes: Any) -> None:
    source, target = fake_pair(precopy_polls=None)
    migration = Migration(make_request(), source=source, target=target)
    await migration.start()
    try:
        migration.update_policy(**changes)
    finally:
        migration.abort("test over")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(migration.wait(), 10)


def _update_policy(**changes: Any) -> Callable[[Hostile], object]:
    return lambda h: asyncio.run(_update_policy_while_running(**changes))


def _suite_into(path: str) -> Callable[[Hostile], object]:
    return lambda h: asyncio.run(
        run_suite(bench_results(()).suite, object(), h[path], command="t")  # type: ignore[arg-type]
    )


# fmt: off
API: dict[str, Api] = {
    # -- migration URIs in the types, whoever builds them
    "endpoint exec": Api(URI_, _endpoint("exec:touch /tmp/livemig-pwned"), ConfigError, "bad migration URI" ),
    "endpoint fd": Api(URI_, _endpoint("fd:3"), ConfigError, "bad migration URI"),
    "endpoint file": Api(URI_, _endpoint("file:/tmp/state"), ConfigError, "bad migration URI"),
    "endpoint rdma": Api(URI_, _endpoint("rdma:198.19.0.2:4444"), ConfigError, "bad migration URI"),
    "endpoint newline": Api(URI_, _endpoint(URI + "\n"), ConfigError, "bad migration URI"),
    "endpoint NUL": Api(URI_, _endpoint("tcp:198.19.0.2\x00:4444"), ConfigError, "bad migration URI" ),
    "endpoint tab": Api(URI_, _endpoint("tcp:198.19.0.2:4444\t"), ConfigError, "bad migration URI"),
    "endpoint port 0": Api(URI_, _endpoint("tcp:198.19.0.2:0"), ConfigError, "bad port"),
    "endpoint port 99999": Api(URI_, _endpoint("tcp:198.19.0.2:99999"), ConfigError, "bad port"),
    "endpoint unix relative": Api(URI_, _endpoint("unix:x.sock"), ConfigError, "bad migration URI"),
    "endpoint unix root": Api(URI_, _endpoint("unix:/"), ConfigError, "needs a path"),
    "endpoint unix NBSP": Api(URI_, _endpoint("unix:/tmp/a\u00a0b"), ConfigError, "bad migration URI" ),
    "endpoint uri int": Api(URI_, _endpoint(4444), ConfigError, "bad migration URI"),
    "request re-checks uri": Api(URI_, _request_with_target("exec:id"), ConfigError, "bad migration URI" ),
    "parse uri exec": Api(URI_, lambda h: parse_migration_uri("exec:id"), ConfigError, "bad migration URI" ),
    "parse uri host too long": Api(URI_, lambda h: parse_migration_uri(f"tcp:{'a' * 300}:1"), ConfigError, "longer than 253" ),
    "parse uri surrogate": Api(URI_, lambda h: parse_migration_uri("unix:/tmp/\ud800"), ConfigError, "not a usable socket path"),
    # -- numbers
    "request interval 0": Api(NUM, _request(sample_interval_s=0), ConfigError, "sample_interval_s must be greater than 0" ),
    "request interval nan": Api(NUM, _request(sample_interval_s=NAN), ConfigError, "must be a finite number" ),
    "request interval inf": Api(NUM, _request(sample_interval_s=INF), ConfigError, "must be a finite number" ),
    "request interval -1": Api(NUM, _request(sample_interval_s=-1.0), ConfigError, "greater than 0" ),
    "request interval hour": Api(NUM, _request(sample_interval_s=3600), ConfigError, "at most 60"),
    "request interval str": Api(NUM, _request(sample_interval_s="0.1"), ConfigError, "must be a number" ),
    "request link 0": Api(NUM, _request(link_mbit=0), ConfigError, "link_mbit must be greater than 0" ),
    "request link nan": Api(NUM, _request(link_mbit=NAN), ConfigError, "link_mbit must be a finite" ),
    "request link -inf": Api(NUM, _request(link_mbit=-INF), ConfigError, "link_mbit must be a finite" ),
    "request link bool": Api(NUM, _request(link_mbit=True), ConfigError, "link_mbit must be a number" ),
    "policy limit nan": Api(NUM, _policy(downtime_limit_ms=NAN), ConfigError, "downtime_limit_ms must be a finite" ),
    "policy limit inf": Api(NUM, _policy(downtime_limit_ms=INF), ConfigError, "must be a finite"),
    "policy limit 0": Api(NUM, _policy(downtime_limit_ms=0), ConfigError, "greater than 0"),
    "policy limit str": Api(NUM, _policy(downtime_limit_ms="20"), ConfigError, "must be a number"),
    "policy max dt 3e6": Api(NUM, _policy(max_downtime_ms=3e6), ConfigError, "at most 2e+06"),
    "policy max dt -1": Api(NUM, _policy(max_downtime_ms=-1.0), ConfigError, "greater than 0"),
    "policy total 0": Api(NUM, _policy(max_total_time_s=0.0), ConfigError, "max_total_time_s must be greater than 0" ),
    "policy total nan": Api(NUM, _policy(max_total_time_s=NAN), ConfigError, "must be a finite"),
    "policy throttle 100": Api(NUM, _policy(max_throttle_pct=100), ConfigError, "at most 99"),
    "policy throttle -1": Api(NUM, _policy(max_throttle_pct=-1), ConfigError, "at least 0"),
    "policy throttle 50.5": Api(NUM, _policy(max_throttle_pct=50.5), ConfigError, "whole number"),
    "policy bandwidth -1": Api(NUM, _policy(max_bandwidth_bytes_per_s=-1), ConfigError, "at least 0" ),
    "policy bandwidth nan": Api(NUM, _policy(max_bandwidth_bytes_per_s=NAN), ConfigError, "whole number" ),
    "policy bandwidth 2^64": Api(NUM, _policy(max_bandwidth_bytes_per_s=1 << 64), ConfigError, "at most" ),
    "policy announce -1": Api(NUM, _policy(announce_initial_ms=-1), ConfigError, "announce_initial_ms must be at least 0" ),
    "preset replaced with nan": Api(NUM, lambda h: dataclasses.replace(preset("proxmox"), downtime_limit_ms=NAN), ConfigError, "must be a finite"),
    "running update nan": Api(NUM, _update_policy(max_downtime_ms=NAN), ConfigError, "max_downtime_ms must be a finite" ),
    "running update throttle": Api(NUM, _update_policy(max_throttle_pct=100), ConfigError, "at most 99" ),
    "host facts memory -1": Api(NUM, lambda h: HostFacts(available_memory=-1), ConfigError, "available_memory must be at least 0"),
    "host facts memory float": Api(NUM, lambda h: HostFacts(available_memory=1.5), ConfigError, "whole number" ),
    "demo memory 0": Api(NUM, lambda h: DemoConfig(memory_mib=0), ConfigError, "memory_mib must be at least 16" ),
    "demo dirty over memory": Api(NUM, lambda h: DemoConfig(memory_mib=256, dirty_mib=512), ConfigError, "more than the guest's"),
    "demo bandwidth nan": Api(NUM, lambda h: DemoConfig(bandwidth_mbit=NAN), ConfigError, "must be a finite" ),
    "demo warmup -1": Api(NUM, lambda h: DemoConfig(warmup_s=-1), ConfigError, "warmup_s must be at least 0" ),
    # -- text and names
    "endpoint name empty": Api(TEXT, lambda h: HostEndpoint(""), ConfigError, "host name must not be empty" ),
    "endpoint name newline": Api(TEXT, lambda h: HostEndpoint("a\nb"), ConfigError, "control characters" ),
    "endpoint socket int": Api(TEXT, lambda h: HostEndpoint("s", 42), ConfigError, "must be a path" ),
    "endpoint socket NUL": Api(TEXT, lambda h: HostEndpoint("s", Path("/run/a\x00b")), ConfigError, "not a usable socket path"),
    "endpoint socket too long": Api(TEXT, lambda h: HostEndpoint("s", Path("/" + "s" * 200)), ConfigError, "longer than a UNIX socket address"),
    "endpoint netns slash": Api(TEXT, lambda h: HostEndpoint("s", netns="../../proc/1/ns"), ConfigError, "not a valid name" ),
    "request vm empty": Api(TEXT, _request(vm=""), ConfigError, "vm name must not be empty"),
    "request vm slash": Api(TEXT, _request(vm="a/b"), ConfigError, "not a valid name"),
    "request vm newline": Api(TEXT, _request(vm="vm\n"), ConfigError, "control characters"),
    "request cpu model newline": Api(TEXT, _request(cpu_model="host\n"), ConfigError, "control characters" ),
    "request cpu model space": Api(TEXT, _request(cpu_model="host -S"), ConfigError, "whitespace"),
    "request id traversal": Api(TEXT, _request(migration_id="../../etc"), ConfigError, "not a valid name" ),
    "request strategy space": Api(TEXT, _request(strategy="native x"), ConfigError, "whitespace"),
    "request policy str": Api(TEXT, _request(policy="livemig"), ConfigError, "policy must be a Policy" ),
    "request verify str": Api(TEXT, _request(verify="no"), ConfigError, "verify must be True or False" ),
    "request source str": Api(TEXT, _request(source="/run/s.sock"), ConfigError, "source must be a HostEndpoint" ),
    "policy name newline": Api(TEXT, _policy(name="x\n"), ConfigError, "control characters"),
    "policy capability value": Api(TEXT, _policy(capabilities=(("xbzrle", "yes"))), ConfigError, "(name, True/False) pairs" ),
    "policy capability name": Api(TEXT, _policy(capabilities=(("x bzrle", True))), ConfigError, "(name, True/False) pairs" ),
    "workload newline": Api(TEXT, lambda h: Workload("openssl\n"), ConfigError, "unknown workload"),
    "workload kernel arg": Api(TEXT, lambda h: Workload("idle init=/bin/sh"), ConfigError, "unknown workload" ),
    "vmspec cpu model": Api(TEXT, lambda h: VMSpec("vm", 128, cpu_model="host\n-S"), ConfigError, "control characters" ),
    # -- files
    "load host fifo": Api(FILES, lambda h: load_host(h["fifo"]), CpuParseError, "FIFO"),
    "load host /dev/zero": Api(FILES, lambda h: load_host(Path("/dev/zero")), CpuParseError, "character device" ),
    "load host directory": Api(FILES, lambda h: load_host(h["dir"]), CpuParseError, "a directory"),
    "load host 17 MiB": Api(FILES, lambda h: load_host(h["big"]), CpuParseError, "larger than 16 MiB" ),
    "load host not utf-8": Api(FILES, lambda h: load_host(h["nonutf8"]), CpuParseError, "not UTF-8 text (byte 0xff" ),
    "host facts fifo": Api(FILES, lambda h: HostFacts.from_file(h["fifo"]), CpuParseError, "FIFO"),
    "cpu map fifo include": Api(FILES, lambda h: load_cpu_map(h["cpu_map_fifo"]), CpuMapError, "FIFO" ),
    "results fifo": Api(FILES, lambda h: BenchResults.load(h["results_fifo"]), ResultsError, "FIFO" ),
    "results /dev/zero": Api(FILES, lambda h: BenchResults.load(Path("/dev/zero")), ResultsError, "character device" ),
    # -- JSON
    "json 10^6 deep": Api(JSON_, lambda h: loads_json("[" * 1_000_000), InputFileError, "nested deeper than 100" ),
    "json Infinity": Api(JSON_, lambda h: loads_json('{"a": Infinity}'), InputFileError, "Infinity is not a JSON number"),
    "json file deep": Api(JSON_, lambda h: read_input_json(h["catalogue_deep"]), InputFileError, "nested deeper" ),
    "catalogue deep": Api(JSON_, lambda h: load_catalog_file(h["catalogue_deep"]), CpuParseError, "nested deeper" ),
    "results deep": Api(JSON_, lambda h: BenchResults.load(h["results_deep"]), ResultsError, "nested deeper" ),
    "results not utf-8": Api(FILES, lambda h: BenchResults.load(h["results_nonutf8"]), ResultsError, "not UTF-8" ),
    # -- CPU description semantics
    "cpuid zero text": Api(CPU, lambda h: parse_cpuid_text(ZERO_CPUID), CpuParseError, "only zero registers" ),
    "cpuid no vendor text": Api(CPU, lambda h: parse_cpuid_text(NO_VENDOR_CPUID), CpuParseError, "no vendor string" ),
    "host tsc -1": Api(CPU, _host(tsc_khz=-1), CpuParseError, "TSC frequency -1 kHz"),
    "host tsc 0": Api(CPU, _host(tsc_khz=0), CpuParseError, "TSC frequency 0 kHz"),
    "host tsc float": Api(CPU, _host(tsc_khz=2.5e6), CpuParseError, "TSC frequency 2500000.0 kHz"),
    "host family -1": Api(CPU, _host(family=-1), CpuParseError, "family -1 is out of range"),
    "host stepping 16": Api(CPU, _host(stepping=16), CpuParseError, "stepping 16 is out of range"),
    "host source str": Api(CPU, _host(source="cpuinfo"), CpuParseError, "unknown CPU description source" ),
    "host json tsc": Api(CPU, lambda h: HostCpu.from_dict(json.loads(_milan(tsc_khz=-5))), CpuParseError, "TSC frequency -5"),
    "qmp props tsc": Api(CPU, lambda h: host_from_expansion({"sse2": True, "tsc-frequency": -1}, "q"), CpuParseError, "negative tsc-frequency"),
    "libvirt laughs": Api(CPU, lambda h: parse_libvirt_cpus(BILLION_LAUGHS, lambda n: frozenset()), CpuParseError, "libvirt XML"),
    "json text deep": Api(JSON_, lambda h: parse_hosts('{"a":' * 10_000, "x"), CpuParseError, "nested deeper" ),
    # -- output directories
    "check dir is a file": Api(OUT, lambda h: check_output_dir(Path(h.paths["plain"])), ConfigError, "exists and is not a directory"),
    "check dir non-utf-8": Api(OUT, lambda h: check_output_dir(h.root / NON_UTF8 / "x"), ConfigError, "not valid UTF-8" ),
    "results dir read-only": Api(OUT, lambda h: check_results_dir(h["ro"]), OutputError, "is not writable" ),
    "save into read-only": Api(OUT, lambda h: bench_results(()).save(h["ro"]), OutputError, "cannot write" ),
    "report into read-only": Api(OUT, lambda h: write_report(BenchResults.load(h["results_ro"]), h["results_ro"]), OutputError, "is not writable"),
    "suite into a file": Api(OUT, _suite_into("plain"), OutputError, "exists and is not a directory" ),
    # -- usage of the handle
    "migration one session": Api(USAGE, lambda h: Migration(_request()(h), source=fake_pair()[0]), ConfigError, "both QMP sessions"),
    "migration unknown strategy": Api(USAGE, lambda h: Migration(_request(strategy="teleport")(h)), ConfigError, "unknown strategy"),
}
# fmt: on


@pytest.fixture(autouse=True)
def _no_qemu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight's CPU check would probe the installed QEMU for its models."""
    catalog = ModelCatalog.from_dict(json.loads(Path(MODELS).read_text()))
    monkeypatch.setattr(cpumodel.qemu, "load_catalog", lambda *a, **k: catalog)


@pytest.mark.timeout(DEADLINE_S)
@pytest.mark.parametrize("name", sorted(API))
def test_api_refuses_with_a_clear_error(name: str, hostile: Hostile) -> None:
    row = API[name]
    with pytest.raises(row.error) as info:
        row.call(hostile)
    assert row.fragment in str(info.value)
    assert "\n" not in str(info.value)


# --- the table as the docstring counts it ------------------------------------------


def test_the_table_is_what_the_docstring_says() -> None:
    doc = __doc__ or ""
    rows = {
        category: (
            sum(r.category == category for r in CLI.values()),
            sum(r.category == category for r in API.values()),
        )
        for category in (URI_, NUM, TEXT, FILES, JSON_, CPU, OUT, USAGE)
    }
    for category, (cli, api) in rows.items():
        line = next(line for line in doc.splitlines() if line.lower().startswith(category.lower()))
        assert re.findall(r"\d+", line)[-2:] == [str(cli), str(api)], (category, cli, api)
    total = len(CLI) + len(API)
    assert f"({total} rows: {len(CLI)} CLI, {len(API)} API)" in doc
    assert total >= 100


def test_hostile_files_are_what_they_claim(hostile: Hostile) -> None:
    assert stat.S_ISFIFO(os.stat(hostile["fifo"]).st_mode)
    assert os.path.getsize(hostile["big"]) == 17 << 20
    with pytest.raises(OSError):
        (hostile["ro"] / "x").touch()
