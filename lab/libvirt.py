"""Two libvirt "hosts" on one machine: one libvirtd per lab host namespace.

Each :class:`LibvirtHost` runs ``libvirtd --listen`` inside its lab host's network
namespace *and* its own mount namespace (``unshare --mount --uts``), where a tmpfs
covers /run/libvirt and private directories are bind-mounted over /etc/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt: the two daemons share
nothing but the kernel (recipe and why: LAB-NOTES, "Two libvirt hosts on one
machine"). Each listens for peers on plain TCP at its migration address (the
source daemon reaches the target's at ``qemu+tcp://198.19.0.2/system`` over the
migration link) and for this process on a UNIX socket in its private directory
(``unix_sock_dir``), since the lab's addresses exist only inside its namespaces.
Guest RAM goes to ``memory_backing_dir`` under /dev/shm, where the engine can map
it, under the same path in every namespace.

:class:`LibvirtLab` owns both daemons, their directories and every process started
inside their mount namespaces (the daemons' QEMUs): on exit, on every path, it
destroys the domains, stops the daemons (SIGTERM, then SIGKILL), kills what is left
in their mount namespaces and removes the directories. Directory names carry the
owner's PID; :func:`sweep` removes those of dead owners (``python -m lab.libvirt
sweep``).

:func:`domain_xml` renders the test guest's :class:`~migrate.vmspec.VMSpec` as a
libvirt domain for a host: direct kernel boot, RAM in a shared file
(``<memoryBacking><source type='file'/><access mode='shared'/>``), its NIC on a tap
of that host's bridge, its serial console on a UNIX socket this process reads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape, quoteattr

from lab.errors import LabError
from lab.net import Lab, LabHost
from migrate.vmspec import Accelerator, VMSpec

#: The mount point every daemon covers with its own tmpfs (created on the real fs).
RUN_DIR = Path("/run/libvirt")
#: What each daemon gets a private copy of (mount target → subdirectory).
PRIVATE_MOUNTS = {
    "/etc/libvirt": "etc",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
WORK_ROOT = Path(tempfile.gettempdir())
RAM_ROOT = Path("/dev/shm")
DIR_PREFIX = "livemig-libvirt"
_DIR_RE = re.compile(rf"^{DIR_PREFIX}-(\d+)-")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_mount_namespace(mnt_ns: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _mount_namespace(int(entry.name)) == mnt_ns:
            found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class LibvirtConfig:
    """What a lab daemon is told: ``libvirtd.conf`` and ``qemu.conf`` of one host."""

    listen_addr: str
    unix_sock_dir: Path
    host_uuid: str
    log_file: Path
    memory_backing_dir: Path

    def libvirtd_conf(self) -> str:
        return "\n".join(
            [
                "listen_tls = 0",
                "listen_tcp = 1",
                f'listen_addr = "{self.listen_addr}"',
                'auth_tcp = "none"',
                'auth_unix_rw = "none"',
                'auth_unix_ro = "none"',
                f'unix_sock_dir = "{self.unix_sock_dir}"',
                # No DMI here; migration cookies compare host UUIDs, so each host its own.
                f'host_uuid = "{self.host_uuid}"',
                f'log_outputs = "3:file:{self.log_file}"',
                "",
            ]
        )

    def qemu_conf(self) -> str:
        return "\n".join(
            [
                'user = "root"',
                'group = "root"',
                "dynamic_ownership = 0",
                "remember_owner = 0",
                'security_driver = "none"',
                "namespaces = [ ]",
                # Without it the hostname is used, and it resolves nowhere.
                f'migration_host = "{self.listen_addr}"',
                # virtlogd would have to run inside the host's namespaces too.
                'stdio_handler = "file"',
                f'memory_backing_dir = "{self.memory_backing_dir}"',
                "",
            ]
        )


class LibvirtHost:
    """One libvirtd in ``host``'s network namespace with its own mount namespace.

    ``uri`` is how this process connects (the private UNIX socket); ``peer_uri`` how
    the other host's daemon does (TCP on the migration address). Owned by
    :class:`LibvirtLab`; :meth:`start` and :meth:`stop` are its steps.
    """

    def __init__(
        self, host: LabHost, workdir: Path, ram_dir: Path, cache_dir: Path | None = None
    ) -> None:
        self.host = host
        self.workdir = workdir
        self.ram_dir = ram_dir
        # libvirt probes QEMU's capabilities on first use (~4 s); a kept cache saves it.
        self.cache_dir = cache_dir or workdir / "cache"
        self.config = LibvirtConfig(
            listen_addr=host.migration_addr,
            unix_sock_dir=workdir / "sock",
            host_uuid=str(uuid.uuid4()),
            log_file=workdir / "log" / "libvirtd.log",
            memory_backing_dir=ram_dir,
        )
        self.pid_file = workdir / "libvirtd.pid"
        self.output = workdir / "libvirtd.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._mnt_ns: str | None = None

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.config.unix_sock_dir}/libvirt-sock"

    @property
    def peer_uri(self) -> str:
        return f"qemu+tcp://{self.host.migration_addr}/system"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def qemu_log_dir(self) -> Path:
        """Where the daemon writes its domains' QEMU logs (``<domain>.log``)."""
        return self.workdir / "log" / "qemu"

    def _write_files(self) -> Path:
        for sub in PRIVATE_MOUNTS.values():
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.qemu_log_dir.mkdir(parents=True, exist_ok=True)
        self.config.unix_sock_dir.mkdir(parents=True, exist_ok=True)
        self.ram_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "etc" / "libvirtd.conf").write_text(self.config.libvirtd_conf())
        (self.workdir / "etc" / "qemu.conf").write_text(self.config.qemu_conf())
        sources = {t: self.workdir / sub for t, sub in PRIVATE_MOUNTS.items()}
        sources["/var/cache/libvirt"] = self.cache_dir
        binds = "\n".join(f"mount --bind {src} {target}" for target, src in sources.items())
        script = self.workdir / "start.sh"
        script.write_text(
            "set -e\n"
            f"mount -t tmpfs -o mode=0755 livemig-libvirt {RUN_DIR}\n"
            f"{binds}\n"
            f"hostname livemig-{self.host.name}\n"
            # /run is shared between the hosts: the pid file stays private.
            f"exec libvirtd --listen --pid-file {self.pid_file}\n"
        )
        return script

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon; return once it answers. Raises :class:`LabError`."""
        if shutil.which("libvirtd") is None:
            raise LabError(
                "libvirtd is not installed (libvirt-daemon-system, scripts/setup-system.sh)"
            )
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        script = self._write_files()
        argv = [
            "ip", "netns", "exec", self.host.netns,
            "unshare", "--mount", "--uts", "--propagation", "private", "sh", str(script),
        ]  # fmt: skip
        with self.output.open("ab") as out:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        socket_path = self.config.unix_sock_dir / "libvirt-sock"
        while not socket_path.is_socket():
            if self._proc.poll() is not None:
                raise LabError(f"libvirtd on host {self.name} exited: {self._tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd on host {self.name} did not start in {timeout:.0f} s")
            time.sleep(0.02)
        self._mnt_ns = _mount_namespace(self._proc.pid)
        if self._mnt_ns is None or self._mnt_ns == _mount_namespace(os.getpid()):
            # Never kill "everything in its mount namespace" when that one is ours.
            self._mnt_ns = None
            raise LabError(f"libvirtd on host {self.name} is not in a mount namespace of its own")
        self._wait_answers(deadline)

    def _wait_answers(self, deadline: float) -> None:
        while True:
            result = subprocess.run(
                ["virsh", "-q", "-c", self.uri, "hostname"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd on host {self.name} does not answer: {result.stderr}")
            time.sleep(0.05)

    def _tail(self) -> str:
        try:
            lines = self.output.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return " | ".join(lines[-3:]) or "no output"

    def virsh(self, *args: str, check: bool = True) -> str:
        """Run ``virsh -c URI ARGS`` against this daemon; stdout. Raises :class:`LabError`."""
        argv = ["virsh", "-q", "-c", self.uri, *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise LabError(
                f"`{' '.join(argv)}` failed: {result.stderr.strip()}", argv, result.stderr
            )
        return result.stdout

    def stop(self) -> list[str]:
        """Destroy its domains, stop the daemon and everything in its mount namespace.

        Idempotent; returns what could not be done (empty when all went well).
        """
        problems: list[str] = []
        if self._proc is None:
            return problems
        if self._proc.poll() is None:
            names = self.virsh("list", "--name", check=False).split()
            for name in names:
                self.virsh("destroy", name, check=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(5)
        if self._mnt_ns is not None:
            # QEMUs the daemon started (daemonized, not our children) and helpers.
            for pid in _pids_in_mount_namespace(self._mnt_ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while (left := _pids_in_mount_namespace(self._mnt_ns)) and time.monotonic() < deadline:
                time.sleep(0.02)
            if left:
                problems.append(f"host {self.name}: processes {left} survived SIGKILL")
        self._proc = None
        return problems


class LibvirtLab:
    """A libvirtd on lab host A and one on host B; a context manager.

    ``cache_dir`` keeps libvirt's QEMU capability cache across labs (a subdirectory
    per host); by default each lab probes QEMU afresh. Needs a :class:`~lab.net.Lab` (its namespaces and migration link) that outlives
    it. Raises :class:`LabError` when a daemon cannot start (after stopping the
    other and removing everything).
    """

    def __init__(self, lab: Lab, cache_dir: Path | None = None) -> None:
        self.lab = lab
        stem = f"{DIR_PREFIX}-{os.getpid()}-"
        self._workdirs: list[Path] = []
        self.hosts: list[LibvirtHost] = []
        for host in (lab.host_a, lab.host_b):
            workdir = Path(tempfile.mkdtemp(prefix=f"{stem}{host.name}-", dir=WORK_ROOT))
            ram_dir = RAM_ROOT / workdir.name
            self._workdirs += [workdir, ram_dir]
            cache = cache_dir / host.name if cache_dir is not None else None
            self.hosts.append(LibvirtHost(host, workdir, ram_dir, cache))

    @property
    def host_a(self) -> LibvirtHost:
        return self.hosts[0]

    @property
    def host_b(self) -> LibvirtHost:
        return self.hosts[1]

    def __enter__(self) -> LibvirtLab:
        try:
            for host in self.hosts:
                host.start()
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

    def close(self) -> None:
        """Stop both daemons and everything they started; remove their directories."""
        problems: list[str] = []
        for host in reversed(self.hosts):
            problems += host.stop()
        for path in self._workdirs:
            shutil.rmtree(path, ignore_errors=True)
        if problems:
            raise LabError("libvirt lab cleanup incomplete: " + "; ".join(problems))


# -- the test guest as a libvirt domain -------------------------------------------------


@dataclass(frozen=True)
class DomainSite:
    """The host-specific half of a domain: its tap and its serial socket."""

    tap: str
    serial_socket: Path


def domain_xml(
    spec: VMSpec, site: DomainSite, cpu_xml: str | None = None, persistent_name: str | None = None
) -> str:
    """``spec`` as a libvirt domain on one host (``type='qemu'`` under TCG).

    RAM in a shared file (libvirt puts it in ``memory_backing_dir``); NICs as
    ``type='ethernet'`` on the site's existing tap (``managed='no'``); the serial
    console on a UNIX socket server. ``cpu_xml`` replaces the ``<cpu>`` element
    built from ``spec.cpu_model``.
    """
    if spec.kernel is None:
        raise LabError("the lab's libvirt domains boot a kernel directly (spec.kernel)")
    domain_type = "kvm" if spec.accelerator is Accelerator.KVM else "qemu"
    cpu = cpu_xml or (
        "<cpu mode='custom' match='exact' check='none'>"
        f"<model fallback='forbid'>{escape(spec.cpu_model)}</model></cpu>"
    )
    initrd = f"<initrd>{escape(str(spec.initrd))}</initrd>" if spec.initrd else ""
    nics = "".join(
        f"<interface type='ethernet'><mac address={quoteattr(nic.mac)}/>"
        f"<target dev={quoteattr(site.tap)} managed='no'/><model type='virtio'/></interface>"
        for nic in spec.nics
    )
    return f"""<domain type='{domain_type}'>
  <name>{escape(persistent_name or spec.name)}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine={quoteattr(spec.machine)}>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel>{initrd}
    <cmdline>{escape(spec.append)}</cmdline>
  </os>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which(spec.binary) or spec.binary)}</emulator>
    {nics}
    <serial type='unix'><source mode='bind' path={quoteattr(str(site.serial_socket))}/>
      <target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def sweep(all_dirs: bool = False) -> list[Path]:
    """Remove lab daemon directories of dead owners (or all); return what was removed.

    The daemons themselves die with their owner (PDEATHSIG); their QEMUs stay in
    the lab's network namespaces, which ``python -m lab.net sweep`` removes.
    """
    removed = []
    for root in (WORK_ROOT, RAM_ROOT):
        for path in root.glob(f"{DIR_PREFIX}-*"):
            match = _DIR_RE.match(path.name)
            if match is None:
                continue
            owner = int(match.group(1))
            if all_dirs or not Path(f"/proc/{owner}").exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def libvirt_lab(bandwidth_mbit: float | None = None) -> Iterator[tuple[Lab, LibvirtLab]]:
    """A fresh :class:`~lab.net.Lab` with a libvirtd on each host."""
    from lab.guest import cache_dir

    with (
        Lab(bandwidth_mbit=bandwidth_mbit) as lab,
        LibvirtLab(lab, cache_dir() / "libvirt") as daemons,
    ):
        yield lab, daemons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.libvirt")
    parser.add_argument("action", choices=["hold", "sweep"])
    args = parser.parse_args(argv)
    try:
        if args.action == "sweep":
            for path in sweep():
                print(f"removed {path}")
            return 0
        with libvirt_lab() as (_lab, daemons):
            for host in daemons.hosts:
                print(f"host {host.name}: {host.uri}  (peers: {host.peer_uri})", flush=True)
            print("holding; Ctrl-C removes it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except LabError as exc:
        print(f"livemig: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
