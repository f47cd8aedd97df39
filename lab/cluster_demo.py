"""``livemig demo --cluster``: two lab hosts made a cluster, the guest moved by name.

Each lab host runs its own agent (its namespace, its state directory); everything
goes through ``livemig`` commands run in the hosts' namespaces, as an operator
would on two machines::

    host A: livemig cluster create --name a --address 198.19.0.1:7443 ; livemig agent
    host A: livemig cluster join-key                     → KEY
    host B: livemig cluster join --name b --address 198.19.0.2:7443 KEY ; livemig agent
    host A: livemig vm create demo.json                  (the lab guest, on host A's bridge)
    host A: livemig migrate demo --to b --json

The guest is probed from the lab's client namespace as in ``livemig demo``; the
report gets the guest-visible downtime, the bytes on the migration link, the
guest's own check (read from the target's serial log) and
``cluster: {nodes, control, migration_tls}``. Afterwards the VM is stopped on B,
the agents are stopped, QEMUs they left are killed, and the state directories
(in a temporary directory unless ``log_dir``) go with the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cluster import LabCluster
from lab.demo import DemoConfig, DemoEnvironment, Workload, _with_probe, guest_spec, prepare_guest
from lab.errors import LabError
from lab.net import BRIDGE, Lab, LabHost
from lab.probe import NetworkProbe
from migrate.errors import ConfigError, MigrationError, PreflightError
from migrate.files import check_output_dir
from migrate.report import MigrationReport
from migrate.vmdef import NicDef, VmDefinition

VM_NAME = "demo"
_KERNEL_TROUBLE = re.compile(r"(BUG:|Oops|Kernel panic|general protection|soft lockup)")


@dataclass(frozen=True)
class ClusterDemoResult:
    report: MigrationReport
    environment: DemoEnvironment
    cluster: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = self.report.to_dict()
        data["environment"] = dataclasses.asdict(self.environment)
        data["cluster"] = self.cluster
        return data


def definition_json(config: DemoConfig, spec_args: Any) -> dict[str, Any]:
    """The lab guest as an agent's VM definition (its NIC on the host's bridge)."""
    spec = spec_args
    return VmDefinition(
        name=VM_NAME,
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        cpu_model=spec.cpu_model,
        accelerator=spec.accelerator,
        kernel=str(spec.kernel),
        initrd=str(spec.initrd),
        append=spec.append,
        nics=tuple(NicDef(mac=n.mac, id=n.id, model=n.model, bridge=BRIDGE) for n in spec.nics),
    ).to_dict()


def _ok(cluster: LabCluster, host: LabHost, *args: str, timeout_s: float = 60.0) -> str:
    result = cluster.cli(host, *args, timeout_s=timeout_s)
    if result.returncode != 0:
        line = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise LabError(f"`livemig {args[0]} {args[1]}` on host {host.name}: {line}")
    return result.stdout


async def _wait_in_file(path: Path, pattern: str, timeout_s: float, since: int = 0) -> str:
    """The first line of ``path`` (from byte ``since``) matching ``pattern``."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern, re.MULTILINE)
    while True:
        with contextlib.suppress(OSError):
            text = path.read_bytes()[since:].decode(errors="replace")
            match = regex.search(text.replace("\r", ""))
            if match:
                return text[match.start() :].split("\n", 1)[0]
        if time.monotonic() > deadline:
            raise LabError(f"no {pattern!r} in {path.name} within {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def guest_check_log(serial_log: Path, workload: Workload) -> str:
    """The guest's verdict from the target's serial log (all of it is post-migration)."""
    verdicts = []
    try:
        if workload.dirties_memory:
            await _wait_in_file(serial_log, r"^MEMDIRTY pass=", 30)
            text = serial_log.read_text(errors="replace")
            bad = [
                ln
                for ln in text.splitlines()
                if ln.startswith("MEMDIRTY pass=") and " bad=0 " not in ln
            ]
            if bad:
                return f"failed: {bad[0]}"
            verdicts.append("memdirty verified on target")
        if workload.runs_openssl:
            await _wait_in_file(serial_log, r"^OPENSSL ", 30)
            verdicts.append("openssl running on target")
    except LabError as exc:
        return f"failed: {exc}"
    trouble = _KERNEL_TROUBLE.search(serial_log.read_text(errors="replace"))
    if trouble:
        return f"failed: guest kernel: {trouble.group(0)}"
    return "ok: " + (", ".join(verdicts) or "guest runs on target")


def kill_leftover_qemus(root: Path) -> list[int]:
    """SIGKILL every QEMU a state directory under ``root`` still records (and remove
    its RAM file): nothing the demo or a test started outlives it."""
    killed = []
    for run_json in root.glob("*/vms/*/run.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            run = json.loads(run_json.read_text())
            pid = int(run["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(run["qmp_socket"]).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if str(run.get("ram_path", "")).startswith("/dev/shm/livemig-"):
                Path(run["ram_path"]).unlink(missing_ok=True)
    return killed


class ClusterLab:
    """A lab with an agent per host, joined into one cluster (``a`` holds the CA)."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.cluster = LabCluster(lab, root)
        self.a, self.b = lab.host_a, lab.host_b

    def state(self, host: LabHost) -> str:
        return str(self.cluster.state_dir(host))

    def cli(self, host: LabHost, *args: str, timeout_s: float = 60.0) -> str:
        return _ok(self.cluster, host, *args, timeout_s=timeout_s)

    def form(self) -> None:
        """create → agent A → join-key → join → agent B."""
        c, a, b = self.cluster, self.a, self.b
        self.cli(a, "cluster", "create", "--state-dir", self.state(a), "--name", "a",
                 "--address", c.address(a))  # fmt: skip
        c.start_agent(a)
        key = self.cli(a, "cluster", "join-key", "--state-dir", self.state(a)).strip()
        self.cli(b, "cluster", "join", "--state-dir", self.state(b), "--name", "b",
                 "--address", c.address(b), key)  # fmt: skip
        c.start_agent(b)

    def serial_log(self, host: LabHost, vm: str = VM_NAME) -> Path:
        return self.cluster.state_dir(host) / "vms" / vm / "serial.log"

    def close(self) -> None:
        try:
            self.cluster.close()
        finally:
            kill_leftover_qemus(self.root)


async def run_cluster_demo(config: DemoConfig, tls: bool = True) -> ClusterDemoResult:
    """Run the cluster demo; the result carries the report also when the migration
    failed. Raises :class:`~migrate.errors.LivemigError` subclasses for set-up failures."""
    if config.log_dir is not None:
        check_output_dir(config.log_dir, "log directory")
    guest, accel, environment = await prepare_guest(config)
    with contextlib.ExitStack() as stack:
        if config.log_dir is not None:
            root = config.log_dir / "cluster"
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="livemig-cluster-")))
        lab = stack.enter_context(Lab(bandwidth_mbit=config.bandwidth_mbit))
        world = ClusterLab(lab, root)
        stack.callback(world.close)
        await asyncio.to_thread(world.form)
        address = lab.next_guest_address()
        spec = guest_spec(config, guest, accel, address)
        definition = root / "demo.json"
        definition.write_text(json.dumps(definition_json(config, spec), indent=2))
        await asyncio.to_thread(
            world.cli, world.a, "vm", "create", "--state-dir", world.state(world.a), str(definition)
        )
        source_log = world.serial_log(world.a)
        await _wait_in_file(source_log, r"^LIVEMIG READY", 60)
        if config.workload.runs_openssl:
            await _wait_in_file(source_log, r"^OPENSSL ", 60)
        if config.workload.dirties_memory:
            await _wait_in_file(source_log, r"^MEMDIRTY pass=", 60)
        argv = ["migrate", VM_NAME, "--to", "b", "--state-dir", world.state(world.a), "--json",
                "--strategy", config.strategy, "--policy", config.policy.name]  # fmt: skip
        argv += [] if tls else ["--no-tls"]
        argv += [] if config.verify else ["--no-verify"]
        argv += [] if config.repair else ["--no-repair"]
        argv += [] if config.predict else ["--no-predict"]
        argv += ["--force"] if config.force else []
        async with NetworkProbe(
            address.split("/")[0], lab.client_ns, config.probe_interval_ms / 1e3
        ) as probe:
            probe_started = time.time()
            await asyncio.sleep(config.warmup_s)
            link_before = lab.migration_link_stats(lab.host_a).tx_bytes
            result = await asyncio.to_thread(world.cluster.cli, world.a, *argv, timeout_s=600.0)
            await asyncio.sleep(config.settle_s)
            wire = lab.migration_link_stats(lab.host_a).tx_bytes - link_before
        (root / "migrate.out").write_text(result.stdout + result.stderr)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            line = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            if result.returncode == 3:
                raise PreflightError(line.removeprefix("livemig: error: "), []) from None
            raise MigrationError(f"livemig migrate --to b: {line}") from None
        report = MigrationReport.from_dict(data)
        if report.status == "completed":
            check = await guest_check_log(world.serial_log(world.b), config.workload)
            report = dataclasses.replace(report, guest_check=check)
        assert probe.record is not None
        report = dataclasses.replace(
            _with_probe(report, probe.record, probe_started), wire_bytes=wire
        )
        owner = world.b if report.status == "completed" else world.a
        listing = json.loads(
            world.cli(owner, "vm", "list", "--state-dir", world.state(owner), "--json")
        )
        if [vm["name"] for vm in listing["vms"]] != [VM_NAME]:
            raise ConfigError(f"after the migration node {owner.name} lists {listing['vms']}")
        await asyncio.to_thread(
            world.cli, owner, "vm", "stop", "--state-dir", world.state(owner), VM_NAME
        )
    cluster = {"nodes": 2, "control": "mtls", "migration_tls": report.transport == "tls"}
    return ClusterDemoResult(report, environment, cluster)
