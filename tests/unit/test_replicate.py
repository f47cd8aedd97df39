"""Replication's pure parts: the state file, the directory lock, argument parsing,
the freshness rule of a replica."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from migrate.cli import main
from migrate.cli_replicate import interval
from migrate.disks.replica_mirror import fresh_replica
from migrate.disks.replica_store import DiskReplica, ReplicaState, ReplicaStore
from migrate.disks.replicate import SourceDisk
from migrate.disks.storage_daemon import NbdAddress
from migrate.errors import ConfigError


def _disk(**kwargs: object) -> DiskReplica:
    base: dict[str, object] = {
        "name": "disk0", "device": "drive-disk0", "virtual_size": 64 << 20, "generation": 3,
        "bitmap": "livemig-replica-0123abcd-3", "last_run": 1.5e9, "last_mode": "incremental",
        "last_bytes": 8 << 20, "last_seconds": 0.2, "total_bytes": 80 << 20, "runs": 3,
    }  # fmt: skip
    base.update(kwargs)
    return DiskReplica(**base)  # type: ignore[arg-type]


def test_state_round_trip_and_atomic_save(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    state = ReplicaState("0123abcd").with_disk(_disk()).with_disk(_disk(name="disk1"))
    store.save(state)
    assert store.load() == state
    assert ReplicaState.from_dict(json.loads(store.state_path.read_text())) == state
    assert not list(tmp_path.glob(".*.tmp"))
    assert state.bitmap_name(4) == "livemig-replica-0123abcd-4"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(version=99),
        lambda d: d.update(replica_id="../x"),
        lambda d: d["disks"][0].update(name="../../etc"),
        lambda d: d["disks"][0].update(generation=-1),
        lambda d: d["disks"][0].update(overlay="/etc/passwd"),
        lambda d: d["disks"][0].pop("bitmap"),
    ],
)
def test_malformed_state_is_one_config_error(tmp_path: Path, mutate: object) -> None:
    data = ReplicaState("0123abcd").with_disk(_disk()).to_dict()
    mutate(data)  # type: ignore[operator]
    (tmp_path / "replica.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        ReplicaStore(tmp_path).load()


def test_not_json_state(tmp_path: Path) -> None:
    (tmp_path / "replica.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not JSON"):
        ReplicaStore(tmp_path).load()


def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    with store.locked(), pytest.raises(ConfigError, match="another"), store.locked():
        pass


def test_interval() -> None:
    assert interval("15m") == 900.0
    assert interval("90") == 90.0
    assert interval("2h") == 7200.0
    for bad in ("0s", "15x", "-1m", "40d", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            interval(bad)


def test_nbd_address() -> None:
    assert NbdAddress.parse("/run/x.sock").client_arg() == {"type": "unix", "path": "/run/x.sock"}
    tcp = NbdAddress.parse("[fd00::1]:10809")
    assert tcp.server_arg() == {"type": "inet", "data": {"host": "fd00::1", "port": "10809"}}
    for bad in ("nohost", "h:", "h:port", ":1"):
        with pytest.raises(ConfigError):
            NbdAddress.parse(bad)


def _source(bitmaps: tuple[dict[str, object], ...], size: int = 64 << 20) -> SourceDisk:
    return SourceDisk("disk0", "drive-disk0", size, "/x.qcow2", bitmaps)


def test_fresh_replica_rules(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    good = {"name": "livemig-replica-0123abcd-3", "persistent": True, "recording": True,
            "count": 0}  # fmt: skip
    assert fresh_replica(store, _source((good,))) is None  # no state file
    store.save(ReplicaState("0123abcd").with_disk(_disk()))
    assert fresh_replica(store, _source((good,))) is None  # no image
    store.base("disk0").write_bytes(b"")
    assert fresh_replica(store, _source((good,))) == _disk()
    assert fresh_replica(store, _source((good,), size=128 << 20)) is None
    assert fresh_replica(store, _source(({**good, "inconsistent": True},))) is None
    assert fresh_replica(store, _source(({**good, "persistent": False},))) is None
    assert fresh_replica(store, _source(({**good, "name": "livemig-replica-0123abcd-2"},))) is None
    store.save(ReplicaState("0123abcd").with_disk(_disk(overlay="disk0.commit.qcow2")))
    assert fresh_replica(store, _source((good,))) is None  # a commit is pending


def test_cli_status_without_replica_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replicate", "status", "--replica-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no replica" in err


def test_cli_run_needs_qmp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replicate", "--replica-dir", str(tmp_path)]) == 1
    assert "--qmp" in capsys.readouterr().err


def test_cli_status_lists_disks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ReplicaStore(tmp_path).save(ReplicaState("0123abcd").with_disk(_disk()))
    assert main(["replicate", "status", "--replica-dir", str(tmp_path), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["disks"]
    assert (listed["generation"], listed["last_bytes"], listed["runs"]) == (3, 8 << 20, 3)
    assert main(["replicate", "status", "--replica-dir", str(tmp_path)]) == 0
    assert "disk0: generation 3" in capsys.readouterr().out


# -- a replica a migration used ------------------------------------------------------------


def test_a_migration_claims_releases_and_consumes_a_replica(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    good = {"name": "livemig-replica-0123abcd-3", "persistent": True, "recording": True,
            "count": 0}  # fmt: skip
    store.save(ReplicaState("0123abcd").with_disk(_disk()))
    store.base("disk0").write_bytes(b"")
    assert store.mark("disk0", "m1", "claim").in_use_by == "m1"
    # The migration holding it still sees it fresh; another one does not, nor claims it.
    assert fresh_replica(store, _source((good,)), "m1") is not None
    assert fresh_replica(store, _source((good,)), "m2") is None
    with pytest.raises(ConfigError, match=r"in use by migration m1.*livemig recover"):
        store.mark("disk0", "m2", "claim")
    # A rollback releases it (another migration's release changes nothing)...
    assert store.mark("disk0", "m2", "release").in_use_by == "m1"
    assert store.mark("disk0", "m1", "release").in_use_by is None
    assert fresh_replica(store, _source((good,)), "m2") is not None
    # ... a completed migration consumes it, for good.
    store.mark("disk0", "m2", "claim")
    consumed = store.mark("disk0", "m2", "consume")
    assert (consumed.in_use_by, consumed.consumed_by) == (None, "m2")
    assert consumed.consumed_at is not None
    assert store.load().disks["disk0"] == consumed  # survives the state file
    assert store.mark("disk0", "m2", "release") == consumed
    for migration in ("m2", "m3", None):
        assert fresh_replica(store, _source((good,)), migration) is None
    with pytest.raises(ConfigError, match="consumed by migration m2"):
        store.mark("disk0", "m3", "claim")


def test_replication_refuses_a_consumed_replica_in_one_line(tmp_path: Path) -> None:
    import asyncio

    from migrate.disks.replicate import replicate_once
    from tests.fakes import FakeQmp
    from tests.fakes.qmp import Reply
    from tests.unit.test_disks import QUERY_BLOCK

    store = ReplicaStore(tmp_path)
    store.save(ReplicaState("0123abcd").with_disk(_disk(virtual_size=1 << 26)))
    store.base("disk0").write_bytes(b"generation 3")
    store.mark("disk0", "m1", "consume")
    source = FakeQmp()
    source.on("query-block", Reply(QUERY_BLOCK))
    with pytest.raises(ConfigError) as refused:
        asyncio.run(replicate_once(source, store))
    message = str(refused.value)
    assert "\n" not in message
    assert "replica of disk disk0 was consumed by migration m1" in message
    assert "start a new replica in another directory" in message and str(tmp_path) in message
    # Nothing was written: no fresh baseline over the image a migrated VM runs on.
    assert store.base("disk0").read_bytes() == b"generation 3"
    assert list(tmp_path.glob("*.next.qcow2")) == []
    assert [c for c in source.commands if c != "query-block"] == []
    store.save(store.load().with_disk(_disk(virtual_size=1 << 26, in_use_by="m9")))
    with pytest.raises(ConfigError, match="in use by migration m9"):
        asyncio.run(replicate_once(source, store))
