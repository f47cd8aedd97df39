"""The lab by hand: `scripts/lab hold` builds a working lab and removes it on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from lab.net import lab_namespaces

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lab"


def test_scripts_lab_hold_builds_a_working_lab_and_removes_it() -> None:
    proc = subprocess.Popen(
        [str(SCRIPT), "hold", "--bandwidth-mbit", "100"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not (line := proc.stdout.readline()).startswith("holding"):
            assert line, f"scripts/lab exited early: {lines}"
            lines.append(line)
        host_a = next(line.split()[2].rstrip(":") for line in lines if line.startswith("host a"))
        assert host_a in lab_namespaces()
        # The migration link carries traffic, and tbf sits on it.
        ping = subprocess.run(
            ["ip", "netns", "exec", host_a, "ping", "-c", "1", "-W", "2", "198.19.0.2"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        qdisc = subprocess.run(
            ["tc", "-n", host_a, "qdisc", "show", "dev", "mig0"], capture_output=True, text=True
        ).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "lab removed" in out
        assert host_a not in lab_namespaces()
        assert ping.returncode == 0, ping.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
