"""`python -m lab.net sweep` removes QEMU sites of dead owners, never a live one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lab.net import sweep_sites


def _site(root: Path, name: str, qmp: str = "file") -> Path:
    site = root / name
    site.mkdir()
    (site / "ram").write_bytes(b"\0" * 4096)
    if qmp == "file":
        (site / "qmp.sock").write_bytes(b"")  # a dead QEMU's socket: nobody listens
    return site


def test_only_dead_unserved_qemu_sites_go(tmp_path: Path) -> None:
    dead_owner = _site(tmp_path, "livemig-999999999-demo-source-abc")
    live_owner = _site(tmp_path, f"livemig-{os.getpid()}-demo-target-def")
    old_style = _site(tmp_path, "livemig-demo-source-ghi")
    not_qemu = _site(tmp_path, "livemig-999999999-other", qmp="none")
    served = _site(tmp_path, "livemig-demo-target-jkl", qmp="none")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(served / "qmp.sock"))
        listener.listen(1)
        removed = sweep_sites(tmp_path)
    assert sorted(removed) == sorted([str(dead_owner), str(old_style)])
    assert live_owner.exists() and not_qemu.exists() and served.exists()
