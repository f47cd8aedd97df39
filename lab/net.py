"""A two-host lab on one machine: network namespaces joined by a switch bridge.

::

      client ns ─┐                       ┌─ host A ns: br0 ── tapN (source VM)
   198.18.0.2/24 ├── switch ns: br0 ─────┤
                 │                       └─ host B ns: br0 ── tapN (target VM)
      host A ns: mig0 198.19.0.1/30 ══ veth ══ host B ns: mig0 198.19.0.2/30

Guests and the client share 198.18.0.0/24 through the switch; the migration stream
has its own A↔B link (``mig0``), which is where the optional ``tc tbf`` cap sits, so
the probe path stays clean. Addresses exist only inside these namespaces.

A :class:`Lab` owns everything it creates and removes it on ``__exit__`` (processes
still inside its namespaces are killed first). Namespace names carry the owner's
PID, so ``python -m lab.net sweep`` can remove labs whose owner was killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lab.errors import LabError
from migrate import cli_args

NAME_PREFIX = "livemig"
GUEST_NETWORK = ipaddress.ip_network("198.18.0.0/24")
CLIENT_ADDR = ipaddress.ip_address("198.18.0.2")
FIRST_GUEST_ADDR = ipaddress.ip_address("198.18.0.10")
MIGRATION_NETWORK = ipaddress.ip_network("198.19.0.0/30")
MIGRATION_IFACE = "mig0"
BRIDGE = "br0"
UPLINK = "up0"

_NAME_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)-(\d+)-(sw|a|b|c)$")
_counter = itertools.count()


@dataclass(frozen=True)
class LabHost:
    """One hypervisor host of the lab."""

    name: str
    netns: str
    migration_addr: str

    def migration_uri(self, port: int) -> str:
        """A QEMU migration URI on this host's migration address."""
        return f"tcp:{self.migration_addr}:{port}"


@dataclass(frozen=True)
class LinkStats:
    """Byte and packet counters of one interface, read from the kernel."""

    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


def run_ip(args: Sequence[str], netns: str | None = None) -> str:
    """Run ``ip [-n NS] ARGS``; return stdout. Raises :class:`LabError`."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return _run(argv)


def _run(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found (install iproute2)", argv) from exc
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise LabError(f"`{' '.join(argv)}` failed: {detail}", argv, detail)
    return result.stdout


class Lab:
    """The lab's namespaces, bridges, veths, taps and qdiscs; a context manager.

    ``bandwidth_mbit`` caps the A→B and B→A migration link with ``tc tbf``.
    Requires root; raises :class:`LabError` if anything cannot be created (after
    removing whatever was).
    """

    def __init__(self, bandwidth_mbit: float | None = None) -> None:
        if os.geteuid() != 0:
            raise LabError("the network lab needs root (network namespaces, taps): run with sudo")
        stem = f"{NAME_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.switch_ns = f"{stem}-sw"
        self.client_ns = f"{stem}-c"
        mig_a, mig_b = (str(a) for a in MIGRATION_NETWORK.hosts())
        self.host_a = LabHost("a", f"{stem}-a", mig_a)
        self.host_b = LabHost("b", f"{stem}-b", mig_b)
        self.bandwidth_mbit = bandwidth_mbit
        self._created: list[str] = []
        self._taps: dict[str, int] = {}
        self._next_guest = 0

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_ns, self.host_a.netns, self.host_b.netns, self.client_ns)

    def _build(self) -> None:
        for ns in self.namespaces:
            run_ip(["netns", "add", ns])
            self._created.append(ns)
            run_ip(["link", "set", "lo", "up"], ns)
        run_ip(["link", "add", BRIDGE, "type", "bridge"], self.switch_ns)
        run_ip(["link", "set", BRIDGE, "up"], self.switch_ns)
        for ns, port in (
            (self.host_a.netns, "p-a"),
            (self.host_b.netns, "p-b"),
            (self.client_ns, "p-c"),
        ):
            run_ip(
                ["link", "add", UPLINK, "netns", ns, "type", "veth",
                 "peer", "name", port, "netns", self.switch_ns]
            )  # fmt: skip
            run_ip(["link", "set", port, "master", BRIDGE, "up"], self.switch_ns)
        for host in (self.host_a, self.host_b):
            run_ip(["link", "add", BRIDGE, "type", "bridge"], host.netns)
            run_ip(["link", "set", UPLINK, "master", BRIDGE, "up"], host.netns)
            run_ip(["link", "set", BRIDGE, "up"], host.netns)
        prefix = GUEST_NETWORK.prefixlen
        run_ip(["addr", "add", f"{CLIENT_ADDR}/{prefix}", "dev", UPLINK], self.client_ns)
        run_ip(["link", "set", UPLINK, "up"], self.client_ns)
        run_ip(
            ["link", "add", MIGRATION_IFACE, "netns", self.host_a.netns, "type", "veth",
             "peer", "name", MIGRATION_IFACE, "netns", self.host_b.netns]
        )  # fmt: skip
        for host in (self.host_a, self.host_b):
            addr = f"{host.migration_addr}/{MIGRATION_NETWORK.prefixlen}"
            run_ip(["addr", "add", addr, "dev", MIGRATION_IFACE], host.netns)
            run_ip(["link", "set", MIGRATION_IFACE, "up"], host.netns)
        self.set_bandwidth(self.bandwidth_mbit)

    def close(self) -> None:
        """Kill processes left in the lab's namespaces and delete them. Idempotent."""
        errors: list[str] = []
        for ns in reversed(self._created):
            try:
                remove_namespace(ns)
            except LabError as exc:
                errors.append(str(exc))
        self._created.clear()
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))

    # -- using the lab ---------------------------------------------------------------

    def netns_argv(self, netns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``netns``."""
        return ["ip", "netns", "exec", netns, *argv]

    def add_tap(self, host: LabHost) -> str:
        """Create a tap on ``host``'s bridge and return its name (``tap0``, ``tap1``...)."""
        index = self._taps.get(host.netns, 0)
        self._taps[host.netns] = index + 1
        tap = f"tap{index}"
        run_ip(["tuntap", "add", "dev", tap, "mode", "tap"], host.netns)
        run_ip(["link", "set", tap, "master", BRIDGE, "up"], host.netns)
        return tap

    def remove_tap(self, host: LabHost, tap: str) -> None:
        run_ip(["link", "del", tap], host.netns)

    def next_guest_address(self) -> str:
        """A fresh guest address with prefix, e.g. ``198.18.0.10/24``."""
        addr = FIRST_GUEST_ADDR + self._next_guest
        self._next_guest += 1
        return f"{addr}/{GUEST_NETWORK.prefixlen}"

    def set_bandwidth(self, mbit: float | None) -> None:
        """Cap both directions of the migration link with tbf; ``None`` removes the cap."""
        for host in (self.host_a, self.host_b):
            if mbit is None:
                qdiscs = _run(["tc", "-n", host.netns, "qdisc", "show", "dev", MIGRATION_IFACE])
                if "tbf" in qdiscs:
                    _run(["tc", "-n", host.netns, "qdisc", "del", "dev", MIGRATION_IFACE, "root"])
                continue
            if mbit <= 0:
                raise LabError(f"bandwidth must be positive, not {mbit} Mbit/s")
            rate_bytes = mbit * 1e6 / 8
            # tbf needs a bucket of at least rate/HZ; 4 ms of traffic and >= 64 KiB
            # keeps large GSO segments from being dropped at low rates.
            burst = max(64 * 1024, int(rate_bytes * 0.004))
            _run(
                ["tc", "-n", host.netns, "qdisc", "replace", "dev", MIGRATION_IFACE, "root",
                 "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"]
            )  # fmt: skip
        self.bandwidth_mbit = mbit

    def migration_link_stats(self, host: LabHost) -> LinkStats:
        """Counters of ``host``'s end of the migration link."""
        out = run_ip(["-s", "-j", "link", "show", "dev", MIGRATION_IFACE], host.netns)
        stats = json.loads(out)[0]["stats64"]
        return LinkStats(
            tx_bytes=int(stats["tx"]["bytes"]),
            rx_bytes=int(stats["rx"]["bytes"]),
            tx_packets=int(stats["tx"]["packets"]),
            rx_packets=int(stats["rx"]["packets"]),
        )


def _namespace_pids(ns: str) -> list[int]:
    try:
        out = _run(["ip", "netns", "pids", ns])
    except LabError:
        return []
    return [int(p) for p in out.split()]


def remove_namespace(ns: str) -> None:
    """Kill every process inside ``ns`` and delete it (gone already is fine)."""
    for pid in _namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        _run(["ip", "netns", "del", ns])
    except LabError as exc:
        if "No such file" not in exc.output:
            raise


def lab_namespaces() -> list[str]:
    """All namespaces that look like a livemig lab's."""
    out = _run(["ip", "netns", "list"])
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NAME_RE.match(n)]


def sweep(all_labs: bool = False) -> list[str]:
    """Remove labs whose owning process is gone (or every lab), and the QEMU sites
    (RAM files, sockets under /dev/shm) nothing uses any more; return what was removed."""
    removed = []
    for ns in lab_namespaces():
        match = _NAME_RE.match(ns)
        assert match is not None
        owner = int(match.group(1))
        if all_labs or not _pid_alive(owner):
            remove_namespace(ns)
            removed.append(ns)
    return removed + sweep_sites()


_SITE_RE = re.compile(r"^livemig-(?:(\d+)-)?")


def sweep_sites(root: Path = Path("/dev/shm")) -> list[str]:
    """Remove QEMU site directories left by dead owners: the owner's PID (in the name)
    is gone, or (older names) nothing listens on the site's QMP socket."""
    removed = []
    for site in sorted(root.glob("livemig-*")) if root.is_dir() else []:
        match = _SITE_RE.match(site.name)
        if match is None or not site.is_dir():
            continue
        owner = match.group(1)
        if owner is not None and _pid_alive(int(owner)):
            continue
        qmp = site / "qmp.sock"
        if not qmp.exists() or _listening(qmp):
            continue  # not a QEMU site, or a QEMU still serves it
        shutil.rmtree(site, ignore_errors=True)
        removed.append(str(site))
    return removed


def _listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(lab: Lab) -> str:
    """Where everything is, for an operator exploring a held lab."""
    prefix = GUEST_NETWORK.prefixlen
    return "\n".join(
        [
            f"switch  {lab.switch_ns}: bridge {BRIDGE}",
            f"client  {lab.client_ns}: {UPLINK} {CLIENT_ADDR}/{prefix}",
            *(
                f"host {h.name}  {h.netns}: bridge {BRIDGE} (add taps for VMs), "
                f"{MIGRATION_IFACE} {h.migration_addr}/{MIGRATION_NETWORK.prefixlen}"
                for h in (lab.host_a, lab.host_b)
            ),
            f"guests: {FIRST_GUEST_ADDR}/{prefix} and up; migration cap: "
            f"{lab.bandwidth_mbit or 'none'} Mbit/s",
            f"e.g. ip netns exec {lab.host_a.netns} ping {lab.host_b.migration_addr}"
            "  (host A to host B over the migration link)",
        ]
    )


def hold(bandwidth_mbit: float | None) -> None:
    """Create a lab, print its layout, keep it until SIGINT/SIGTERM, then remove it."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _s, _f: stop.set())
    with Lab(bandwidth_mbit=bandwidth_mbit) as lab:
        print(describe(lab), flush=True)
        print("holding the lab; Ctrl-C removes it", flush=True)
        stop.wait()
    print("lab removed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.net")
    parser.add_argument("action", choices=["hold", "list", "sweep"])
    parser.add_argument("--all", action="store_true", help="sweep: remove live labs too")
    parser.add_argument("--bandwidth-mbit", type=cli_args.MBIT, default=None, help="hold: tbf cap")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            print("\n".join(lab_namespaces()))
        elif args.action == "hold":
            hold(args.bandwidth_mbit)
        else:
            for ns in sweep(all_labs=args.all):
                print(f"removed {ns}")
    except LabError as exc:
        print(f"livemig: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
