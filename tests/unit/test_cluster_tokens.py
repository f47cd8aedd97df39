"""Join tokens: stored hashed, single use, expire, consumed only by a join that succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrate.cluster.address import parse_address
from migrate.cluster.errors import StateError, TokenError
from migrate.cluster.state import StateDir, create_cluster
from migrate.cluster.tokens import TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    s = StateDir(tmp_path / "a")
    create_cluster(s, "a", parse_address("127.0.0.1:7443"))
    return s


def test_only_the_hash_is_stored_with_key_permissions(state: StateDir) -> None:
    token = TokenStore(state).issue(60)
    text = state.file("tokens.json").read_text()
    assert token not in text
    assert state.file("tokens.json").stat().st_mode & 0o777 == 0o600


def test_a_token_works_once(state: StateDir) -> None:
    store = TokenStore(state)
    token = store.issue(60)
    assert store.redeem(token, "b", lambda: "joined") == "joined"
    with pytest.raises(TokenError, match="already used") as info:
        store.redeem(token, "c", lambda: "again")
    assert info.value.reason == "used"


def test_a_token_expires(state: StateDir) -> None:
    clock = Clock()
    store = TokenStore(state, clock)
    token = store.issue(5)
    clock.now += 5
    with pytest.raises(TokenError, match="expired") as info:
        store.redeem(token, "b", lambda: None)
    assert info.value.reason == "expired"


def test_unknown_and_tampered_tokens(state: StateDir) -> None:
    store = TokenStore(state)
    token = store.issue(60)
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(TokenError) as info:
        store.redeem(tampered, "b", lambda: None)
    assert info.value.reason == "unknown"
    store.redeem(token, "b", lambda: None)  # the real one still works


def test_a_failed_join_leaves_the_token_unused(state: StateDir) -> None:
    store = TokenStore(state)
    token = store.issue(60)
    before = state.file("tokens.json").read_bytes()

    def refuse() -> None:
        raise StateError("name taken")

    with pytest.raises(StateError):
        store.redeem(token, "b", refuse)
    assert state.file("tokens.json").read_bytes() == before
    store.redeem(token, "b", lambda: None)


def test_only_the_ca_node_issues_tokens(state: StateDir) -> None:
    state.file("ca-key.pem").unlink()
    with pytest.raises(StateError, match="does not hold the cluster CA"):
        TokenStore(state).issue(60)


def test_lifetime_is_bounded(state: StateDir) -> None:
    with pytest.raises(StateError):
        TokenStore(state).issue(0)
