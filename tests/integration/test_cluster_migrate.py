"""VMs owned by agents, moved by name between two lab hosts: ``livemig migrate VM --to NODE``.

Two lab hosts, an agent each (own namespace, own state directory), one cluster.
Everything is driven with ``livemig`` commands in the hosts' namespaces.

- ``livemig demo --cluster --json`` (native): create → join-key → join → vm create
  on A → migrate by name to B; completed, RAM integrity ok (digested by each
  agent), data path over TLS, the ``cluster`` field; nothing left behind.
- pagestream, asked from host B (any member may ask; A's agent runs it): completed,
  integrity ok, TLS; the definition moved (A lists nothing, B the running VM);
  both agents counted it in their metrics. Then B's agent is restarted while idle:
  the VM keeps running (same QEMU), the new agent re-adopts it. Refusals: an
  unknown node, a VM no node has. ``vm adopt`` of a QEMU started by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lab.cluster_demo import VM_NAME, ClusterLab, _wait_in_file, definition_json
from lab.demo import DemoConfig, Workload, guest_spec
from lab.net import Lab, LabHost
from migrate.agent.vms import ram_file
from migrate.qmp import process_exited

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _qemu_pids_under(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and text.encode() in cmd:
                pids.append(int(proc.name))
    return pids


def _stream_agents(agents: dict[str, str]) -> dict[int, tuple[str, str]]:
    """pagestream agent processes below this cluster's node agents (``agents``: state
    dir -> node): pid -> (role, the node whose agent is its parent, or says how far)."""
    found: dict[int, tuple[str, str]] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "migrate.pagestream.agent" not in cmd or "--role" not in cmd[:-1]:
            continue
        try:
            above = [" ".join(p.cmdline()) for p in proc.parents()]
        except psutil.Error:
            continue
        for depth, line in enumerate(above):
            node = next((n for d, n in agents.items() if f"agent --state-dir {d}" in line), None)
            if node is not None:
                where = node if depth == 0 else f"{node} (depth {depth + 1})"
                found[proc.info["pid"]] = (cmd[cmd.index("--role") + 1], where)
                break
    return found


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{([^}}]*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


def _check_report(report: dict[str, object], strategy: str) -> None:
    assert report["status"] == "completed", report.get("error")
    assert report["strategy"] == strategy
    assert report["integrity"] == "ok", report.get("integrity_detail")
    # native: the engine's digest of the source against the target agent's; pagestream:
    # the stream's agents digest their own host's RAM.
    owner_check = "remote target" if strategy == "native" else "pagestream digest"
    assert owner_check in str(report.get("integrity_detail")), report.get("integrity_detail")
    assert report["transport"] == "tls"


def test_demo_cluster_json(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the cluster lab needs root (network namespaces)")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "migrate.cli", "demo", "--cluster", "--json",
         "--workload", "openssl", "--memory-mib", "128", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, env=_env(), timeout=300, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    _check_report(report, "native")
    assert report["cluster"] == {"nodes": 2, "control": "mtls", "migration_tls": True}
    assert report["guest_downtime_ms"] is not None and report["guest_downtime_ms"] > 0
    assert str(report["guest_check"]).startswith("ok"), report["guest_check"]
    assert report["wire_bytes"] > 0
    # Nothing left behind: QEMUs, RAM files; the state dirs are under --log-dir.
    root = tmp_path / "logs" / "cluster"
    assert _qemu_pids_under(str(root)) == []
    assert not [n for n in ("a", "b") if ram_file(n, root / n, "demo").exists()]
    assert not list(root.glob("*/vms/*/run.json"))
    print(f"\ndemo --cluster native: {elapsed:.1f} s, guest downtime "
          f"{report['guest_downtime_ms']:.0f} ms, total {report['total_time_ms']:.0f} ms")  # fmt: skip


def test_pagestream_by_name_restart_adopt(tmp_path: Path, guest: object, accel: object) -> None:
    if os.geteuid() != 0:
        pytest.fail("the cluster lab needs root (network namespaces)")
    import asyncio

    from lab.accel import AccelChoice
    from lab.guest import GuestImage

    assert isinstance(guest, GuestImage) and isinstance(accel, AccelChoice)
    config = DemoConfig(workload=Workload("dirty:8"), memory_mib=128, dirty_mib=16)
    with Lab() as lab:
        world = ClusterLab(lab, tmp_path)
        try:
            world.form()
            a, b = world.a, world.b
            spec = guest_spec(config, guest, accel, lab.next_guest_address())
            definition = tmp_path / "demo.json"
            definition.write_text(json.dumps(definition_json(config, spec)))
            out = world.cli(a, "vm", "create", "--state-dir", world.state(a), str(definition))
            assert "VM demo defined on node a: running" in out
            asyncio.run(_wait_in_file(world.serial_log(a), r"^MEMDIRTY pass=", 90))

            # Asked from host B: A's agent (the owner) runs it. While it runs, every
            # pagestream agent process is noted with its parent: the receiver must be a
            # child of B's agent (the target), the sender of A's; none other.
            follow = subprocess.Popen(
                lab.netns_argv(b.netns, [
                    sys.executable, "-m", "migrate.cli", "migrate", VM_NAME, "--to", "b",
                    "--strategy", "pagestream", "--json", "--state-dir", world.state(b),
                ]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            )  # fmt: skip
            agents = {str(world.cluster.state_dir(h)): h.name for h in (a, b)}
            seen: dict[int, tuple[str, str]] = {}
            try:
                deadline = time.monotonic() + 300
                while follow.poll() is None and time.monotonic() < deadline:
                    seen.update(_stream_agents(agents))
                    time.sleep(0.1)
                out, err = follow.communicate(timeout=max(1.0, deadline - time.monotonic()))
            finally:
                if follow.poll() is None:
                    follow.kill()
            moved = subprocess.CompletedProcess(follow.args, follow.returncode, out, err)
            parents = set(seen.values())
            assert parents == {("receiver", "b"), ("sender", "a")}, seen
            assert moved.returncode == 0, moved.stderr[-3000:]
            report = json.loads(moved.stdout)
            _check_report(report, "pagestream")
            assert report["stream"] is not None
            listed_a = json.loads(
                world.cli(a, "vm", "list", "--json", "--state-dir", world.state(a))
            )
            assert listed_a["vms"] == []
            assert not (world.cluster.state_dir(a) / "vms" / VM_NAME).exists()
            show = json.loads(world.cli(b, "vm", "show", VM_NAME, "--state-dir", world.state(b)))
            assert show["state"] == "running" and show["qemu_status"] == "running", show
            pid = int(show["pid"])
            asyncio.run(_wait_in_file(world.serial_log(b), r"^MEMDIRTY pass=", 60))
            text = world.serial_log(b).read_text()
            lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
            passes = [ln for ln in lines if ln.startswith("MEMDIRTY pass=")]
            assert passes and all(" bad=0 " in ln for ln in passes), passes
            for host in (a, b):
                state = world.cluster.state_dir(host)
                metrics = world.cluster.python(
                    host, "-m", "lab.cluster", "request",
                    f"https://{world.cluster.address(host)}/metrics",
                    "--cert", str(state / "node.pem"), "--key", str(state / "node-key.pem"),
                )  # fmt: skip
                assert metrics.returncode == 0, metrics.stderr
                answer = json.loads(metrics.stdout)
                assert answer.get("status") == 200, answer
                assert _metric(answer["body"], "livemig_migrations_total",
                               status="completed", strategy="pagestream") == 1.0, host.name  # fmt: skip

            # B's agent restarted while idle: the VM keeps running and is re-adopted.
            world.cluster.stop_agent(b)
            time.sleep(0.5)
            assert not process_exited(pid), "the VM died with its agent"
            world.cluster.start_agent(b)
            assert "VM demo re-adopted" in (world.cluster.state_dir(b) / "agent.log").read_text()
            listed = json.loads(world.cli(b, "vm", "list", "--json", "--state-dir", world.state(b)))
            assert [(v["name"], v["pid"], v["state"]) for v in listed["vms"]] == [
                (VM_NAME, pid, "running")
            ]
            assert listed["vms"][0]["qemu_status"] == "running"

            # Refusals: one line, non-zero, nothing changed.
            bad = world.cluster.cli(
                b, "migrate", VM_NAME, "--to", "nosuch", "--state-dir", world.state(b)
            )
            assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
            assert "no node 'nosuch'" in bad.stderr
            bad = world.cluster.cli(
                a, "migrate", "ghost", "--to", "b", "--state-dir", world.state(a)
            )
            assert bad.returncode == 1 and "no node of the cluster has a VM 'ghost'" in bad.stderr

            # Adopt a QEMU started by hand on host A (shared-file RAM, a QMP socket; a
            # kernel: a definition needs something to boot).
            sock, pidfile = tmp_path / "hand.qmp", tmp_path / "hand.pid"
            ram = Path("/dev/shm") / f"livemig-test-hand-{os.getpid()}.ram"
            try:
                _adopt_and_stop_a_hand_started_qemu(world, a, spec.kernel, sock, pidfile, ram)
            finally:  # whatever failed above: no QEMU, no RAM file left behind
                with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                    os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
                ram.unlink(missing_ok=True)

            # Ctrl-C while it copies (link capped): the source agent aborts, the VM stays
            # on B (its owner), A (the target) keeps nothing.
            lab.set_bandwidth(40)
            follower = subprocess.Popen(
                lab.netns_argv(a.netns, [sys.executable, "-m", "migrate.cli", "migrate", VM_NAME,
                                         "--to", "a", "--events", "--no-predict",
                                         "--state-dir", world.state(a)]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            )  # fmt: skip
            before: list[str] = []
            try:
                assert follower.stdout is not None
                for line in follower.stdout:
                    before.append(line)
                    if json.loads(line).get("event") == "progress":
                        break
                follower.send_signal(signal.SIGINT)
                out, err = follower.communicate(timeout=60)
            finally:
                if follower.poll() is None:
                    follower.kill()
                lab.set_bandwidth(None)
            assert follower.returncode == 130, err
            final = json.loads(out.strip().splitlines()[-1])
            # The VM arrived here by pagestream (its QEMU kept x-ignore-shared from that
            # incoming migration: the engine turns it off, else the target drops the
            # stream at once and the migration fails before the abort lands).
            assert final["event"] == "finished", final
            assert final["report"]["status"] == "aborted", final["report"]["error"]
            assert "turned off x-ignore-shared on the source QEMU" in "".join(before), before
            print(f"\nCtrl-C: {final['report']['status']}: {final['report']['error']}")
            listed_a = json.loads(
                world.cli(a, "vm", "list", "--json", "--state-dir", world.state(a))
            )
            assert [(v["name"], v["state"]) for v in listed_a["vms"]] == [("hand", "stopped")]
            assert not (world.cluster.state_dir(a) / "vms" / VM_NAME).exists()
            again = json.loads(world.cli(b, "vm", "show", VM_NAME, "--state-dir", world.state(b)))
            assert (again["state"], again["pid"], again["qemu_status"]) == (
                "running",
                pid,
                "running",
            )

            world.cli(b, "vm", "stop", VM_NAME, "--state-dir", world.state(b))
            assert process_exited(pid) or not _qemu_pids_under(str(tmp_path))
        finally:
            world.close()
    assert _qemu_pids_under(str(tmp_path)) == []


def _adopt_and_stop_a_hand_started_qemu(
    world: ClusterLab, a: LabHost, kernel: Path, sock: Path, pidfile: Path, ram: Path
) -> None:
    """``vm adopt`` of a QEMU started by hand on ``a``, then ``vm stop`` ends it."""
    hand = subprocess.run(
        world.lab.netns_argv(a.netns, [
            "qemu-system-x86_64", "-name", "hand", "-nodefaults", "-display", "none",
            "-m", "64M", "-kernel", str(kernel),
            "-object", f"memory-backend-file,id=ram0,size=64M,mem-path={ram},share=on",
            "-machine", "pc,memory-backend=ram0", "-S",
            "-chardev", f"socket,id=m,path={sock},server=on,wait=off",
            "-mon", "chardev=m,mode=control", "-daemonize", "-pidfile", str(pidfile),
        ]), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert hand.returncode == 0, hand.stderr
    adopted = world.cli(a, "vm", "adopt", str(sock), "--state-dir", world.state(a))
    assert "VM hand adopted by node a" in adopted
    shown = json.loads(world.cli(a, "vm", "show", "hand", "--state-dir", world.state(a)))
    assert shown["adopted"] is True and shown["definition"]["memory_mib"] == 64
    hand_pid = int(shown["pid"])
    world.cli(a, "vm", "stop", "hand", "--state-dir", world.state(a))
    deadline = time.monotonic() + 10
    while not process_exited(hand_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_exited(hand_pid)
