"""The state directory: layout, permissions, members, refusing to overwrite a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migrate.cluster.address import parse_address
from migrate.cluster.errors import StateError
from migrate.cluster.state import Member, StateDir, create_cluster, members_from_json, with_member
from migrate.errors import ConfigError


def test_create_writes_the_documented_files(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "a")
    create_cluster(state, "a", parse_address("198.19.0.1:7443"))
    names = {p.name for p in state.path.iterdir()}
    assert names == {
        "node.json",
        "ca.pem",
        "ca-key.pem",
        "node.pem",
        "node-key.pem",
        "members.json",
    }
    for key in ("ca-key.pem", "node-key.pem"):
        assert state.file(key).stat().st_mode & 0o777 == 0o600
    identity = state.require_member()
    assert identity.name == "a" and str(identity.address) == "198.19.0.1:7443"
    (member,) = state.members()
    assert member.ca and member.name == "a"
    with pytest.raises(StateError, match="already holds cluster node 'a'"):
        create_cluster(state, "b", parse_address("198.19.0.1:7443"))


def test_an_empty_dir_is_no_member(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="holds no cluster"):
        StateDir(tmp_path).require_member()


def test_members_are_checked(tmp_path: Path) -> None:
    a = Member("a", "10.0.0.1:7443", True, "0" * 64, 1.0)
    b = Member("b", "10.0.0.2:7443", False, "1" * 64, 2.0)
    assert members_from_json({"version": 1, "members": [a.to_dict(), b.to_dict()]}) == (a, b)
    with pytest.raises(ConfigError, match="already a member"):
        with_member([a, b], Member("b", "10.0.0.3:7443", False, "2" * 64, 3.0))
    with pytest.raises(ConfigError, match="already has address"):
        with_member([a], Member("c", "10.0.0.1:7443", False, "2" * 64, 3.0))
    for bad in (
        {"version": 1, "members": [b.to_dict()]},  # nobody holds the CA
        {"version": 1, "members": [a.to_dict(), a.to_dict()]},
        {"version": 2, "members": [a.to_dict()]},
        {"version": 1, "members": [{**a.to_dict(), "name": "A B"}]},
        {"version": 1, "members": [{**a.to_dict(), "ca": "yes"}]},
        json.loads('{"version": 1, "members": []}'),
    ):
        with pytest.raises(ConfigError):
            members_from_json(bad)


@pytest.mark.parametrize("text", ["nohost", "host:", "host:0", "host:70000", "a b:1", "[::1:5"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_addresses() -> None:
    assert str(parse_address("[::1]:7443")) == "[::1]:7443"
    assert parse_address("Node-A.example:80").host == "node-a.example"
