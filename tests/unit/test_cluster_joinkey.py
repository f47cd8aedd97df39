"""The join key: one line, round trip, every damage detected."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from migrate.cluster.errors import JoinKeyError
from migrate.cluster.joinkey import PREFIX, JoinKey, b64url

KEY = JoinKey("198.19.0.1:7443", hashlib.sha256(b"ca").hexdigest(), b64url(bytes(range(32))))


def test_round_trip_is_one_printable_line() -> None:
    text = KEY.encode()
    assert text.startswith(PREFIX) and text.isprintable() and "\n" not in text
    assert JoinKey.decode(text) == KEY
    assert JoinKey.decode(f"  {text}\n") == KEY


def test_every_changed_character_is_detected() -> None:
    text = KEY.encode()
    for i in range(len(PREFIX), len(text)):
        for replacement in {"A", "_", "0"} - {text[i]}:
            damaged = text[:i] + replacement + text[i + 1 :]
            with pytest.raises(JoinKeyError):
                JoinKey.decode(damaged)


def test_a_rebuilt_key_is_well_formed_but_says_something_else() -> None:
    # The check is against accidents: a key re-encoded with another fingerprint
    # decodes; the fingerprint comparison and the token refuse it later.
    other = dataclasses.replace(KEY, ca_sha256="0" * 64)
    assert JoinKey.decode(other.encode()).ca_sha256 == "0" * 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello", "not a join key"),
        ("livemig-join:v2:abc.def", "unsupported version"),
        (PREFIX + "abc", "check is missing"),
        (PREFIX + "x" * 2000, "longer than"),
    ],
)
def test_not_a_key(text: str, message: str) -> None:
    with pytest.raises(JoinKeyError, match=message):
        JoinKey.decode(text)


@pytest.mark.parametrize(
    "change",
    [{"address": "no-port"}, {"ca_sha256": "ABC"}, {"token": "short"}, {"address": "1.2.3.4:0"}],
)
def test_fields_are_checked(change: dict[str, str]) -> None:
    with pytest.raises(JoinKeyError):
        dataclasses.replace(KEY, **change)
