"""Where a libvirt domain's RAM lives, so the engine can compare both sides.

A domain with ``<memoryBacking><source type='file'/><access mode='shared'/>`` runs
with a shared ``memory-backend-file`` in its daemon's ``memory_backing_dir``.
libvirt's domain XML does not show the file, and during an incoming migration
libvirt lets no monitor command through to the target QEMU, so the file is read
from the QEMU process itself: the one whose command line carries the domain's
``-uuid`` (an incoming target also ``-incoming``), its ``memory-backend-file``
object's ``mem-path`` with ``share`` on. This works where the engine runs on the
machine holding the QEMU (the lab; one host migrating within itself); elsewhere
the RAM is reported as not compared, with this reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _qemu_cmdlines(proc: Path) -> Iterator[list[str]]:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv and "qemu-system" in Path(argv[0]).name:
            yield argv


def _option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def _backend_file(value: str) -> tuple[str | None, bool]:
    """``mem-path`` and ``share`` of a ``-object`` value (JSON or key=value form)."""
    props: dict[str, Any]
    if value.startswith("{"):
        try:
            loaded = json.loads(value)
        except ValueError:
            return None, False
        props = loaded if isinstance(loaded, dict) else {}
    else:
        kind, _, rest = value.partition(",")
        props = {"qom-type": kind}
        for item in rest.split(","):
            key, _, val = item.partition("=")
            props[key] = val
    if props.get("qom-type") != "memory-backend-file":
        return None, False
    path = props.get("mem-path")
    share = props.get("share") in (True, "on", "yes", "true")
    return (path if isinstance(path, str) else None), share


def qemu_ram_file(uuid: str, incoming: bool, proc: Path = PROC) -> tuple[Path | None, str]:
    """The shared RAM file of the QEMU running domain ``uuid`` here (the incoming one
    if ``incoming``), or ``(None, why not)``."""
    found = [
        argv
        for argv in _qemu_cmdlines(proc)
        if uuid in _option(argv, "-uuid") and (("-incoming" in argv) == incoming)
    ]
    side = "incoming " if incoming else ""
    if not found:
        return None, f"no {side}QEMU of domain {uuid} on this machine"
    if len(found) > 1:
        return None, f"{len(found)} {side}QEMUs of domain {uuid} on this machine"
    for value in _option(found[0], "-object"):
        path, share = _backend_file(value)
        if path is None:
            continue
        if not share:
            return None, f"its RAM file {path} is not shared (<access mode='shared'/>)"
        if not Path(path).is_file():
            return None, f"its RAM file {path} is not visible here"
        return Path(path), ""
    return None, "its RAM is not in a file (no <memoryBacking><source type='file'/>)"
