"""The CLI's answers to bad input: one line on stderr, a non-zero exit, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from lab.demo import Workload
from migrate.cli_migrate import parse_migration_uri
from migrate.errors import ConfigError


def livemig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrate.cli", *args], capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livemig: error:"), result.stderr
    assert text in lines[0]


def test_missing_source_socket(tmp_path: Path) -> None:
    result = livemig("migrate", "--source-qmp", str(tmp_path / "nope.sock"),
                     "--target-qmp", str(tmp_path / "t.sock"), "--target-uri", "tcp:198.19.0.2:4444")  # fmt: skip
    assert_one_line_error(result, 1, "no QMP socket")


def test_not_a_socket(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("x")
    other = tmp_path / "other"
    other.write_text("x")
    result = livemig("migrate", "--source-qmp", str(plain), "--target-qmp", str(other),
                     "--target-uri", "tcp:198.19.0.2:4444")  # fmt: skip
    assert_one_line_error(result, 1, "not a UNIX socket")


@pytest.mark.parametrize("uri", ["198.19.0.2:4444", "tcp:host", "tcp:h:99999", "exec:cat", ""])
def test_bad_uri(tmp_path: Path, uri: str) -> None:
    with pytest.raises(ConfigError):
        parse_migration_uri(uri)


def test_bad_uri_from_cli(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        result = livemig("migrate", "--source-qmp", str(sock), "--target-qmp", str(sock),
                         "--target-uri", "udp:1.2.3.4:5")  # fmt: skip
    finally:
        server.close()
    assert_one_line_error(result, 1, "bad migration URI")


def test_same_qemu_as_both_ends(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    sock.write_text("")
    result = livemig("migrate", "--source-qmp", str(sock), "--target-qmp", str(sock),
                     "--target-uri", "tcp:198.19.0.2:4444")  # fmt: skip
    assert_one_line_error(result, 1, "same QEMU")


def test_good_uris() -> None:
    assert parse_migration_uri("tcp:198.19.0.2:4444") == "tcp:198.19.0.2:4444"
    assert parse_migration_uri("tcp:[::1]:4444") == "tcp:[::1]:4444"
    assert parse_migration_uri("unix:/run/mig.sock") == "unix:/run/mig.sock"


@pytest.mark.parametrize("args", [["demo", "--workload", "dirty:-1"], ["demo", "--memory-mib", "0"],
                                  ["demo", "--bandwidth-mbit", "fast"], ["nonsense"]])  # fmt: skip
def test_usage_errors(args: list[str]) -> None:
    result = livemig(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "livemig: error:" in result.stderr


@pytest.mark.parametrize("text", ["idle", "openssl", "dirty:40", "openssl+dirty:12.5"])
def test_workloads(text: str) -> None:
    workload = Workload.parse(text)
    assert workload.runs_openssl == text.startswith("openssl")
    assert workload.dirties_memory == ("dirty" in text)


@pytest.mark.parametrize("text", ["dirty", "dirty:0", "busy", "openssl+idle", "dirty:x"])
def test_bad_workloads(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown workload"):
        Workload.parse(text)
