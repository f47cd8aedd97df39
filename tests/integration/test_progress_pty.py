"""The progress bar in a real terminal: ``livemig demo`` under a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from lab.guest import GuestImage

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"\b(demo|setup|precopy|throttling|postcopy|switchover|completed)\s+(\d+\.\d)%")


def _run_in_pty(argv: list[str], columns: int, timeout: float) -> tuple[int, str]:
    """Run ``argv`` with stdin/stdout/stderr on a new pty; return exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    # The terminal's own size, not an inherited COLUMNS, is what a user's bar gets.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_demo_draws_a_bar_whose_percentage_never_decreases(
    guest: GuestImage, tmp_path: Path
) -> None:
    code, out = _run_in_pty(
        [sys.executable, "-m", "migrate.cli", "demo", "--workload", "idle",
         "--memory-mib", "128", "--bandwidth-mbit", "200", "--log-dir", str(tmp_path)],
        columns=160,
        timeout=180,
    )  # fmt: skip
    assert code == 0, out[-2000:]
    # Every redraw starts with a carriage return; the terminal shows the last one.
    plain = _ANSI.sub("", out)
    frames = [frame for line in plain.splitlines() for frame in line.split("\r")]
    shown = [(m.group(1), float(m.group(2))) for f in frames if (m := _BAR.search(f))]
    percents = [p for _, p in shown]
    assert len(set(percents)) >= 5, shown
    assert percents == sorted(percents), shown
    assert percents[-1] == 100.0 and shown[-1][0] == "completed"
    assert {"precopy", "switchover"} <= {phase for phase, _ in shown}
    # The figures beside the bar: rate, remaining, ETA, round, dirty rate, limit.
    last_precopy = [f for f in frames if "precopy" in f and "MiB/s" in f][-1]
    for part in ("left ", " MiB/s", "ETA ", "round ", "dirty ", "limit "):
        assert part in last_precopy, last_precopy
    # The text report follows the bar on the same terminal.
    assert "migration completed" in out and "guest check:        ok" in out
