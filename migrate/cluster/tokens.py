"""One-time join tokens, kept on the CA node as SHA-256 hashes.

``cluster join-key`` issues a token (32 random bytes) and writes only its hash, its
expiry and "not used yet" into ``tokens.json``; the agent reads that file when a
node asks to join. Both hold ``tokens.lock`` (``flock``) while they read and
rewrite the file, so a token is consumed exactly once even if two joins race.
A token is consumed only when the join it authorises succeeds: a refused request
(bad CSR, name taken) leaves it as it was.

Entries are kept a day past their expiry so a late replay is told "expired" or
"used" rather than "unknown"; older ones are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from migrate.cluster.errors import StateError, TokenError
from migrate.cluster.joinkey import b64url, well_formed

__all__ = ["DEFAULT_TTL_S", "TokenEntry", "TokenStore", "token_hash", "well_formed"]
from migrate.cluster.state import KEY_MODE, TOKENS_JSON, TOKENS_LOCK, StateDir
from migrate.journal import write_atomically

T = TypeVar("T")

DEFAULT_TTL_S = 900
MAX_TTL_S = 7 * 24 * 3600
MAX_TOKENS = 4096
_KEEP_AFTER_EXPIRY_S = 24 * 3600


def token_hash(token: str) -> str:
    """SHA-256 of the token text, hex (the token is 256 random bits: no salt or
    slow hash is needed to keep it from being guessed back)."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    sha256: str
    created_at: float
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "used_at": self.used_at,
            "used_by": self.used_by,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TokenEntry:
        try:
            return cls(
                sha256=str(data["sha256"]),
                created_at=float(data["created_at"]),
                expires_at=float(data["expires_at"]),
                used_at=None if data.get("used_at") is None else float(data["used_at"]),
                used_by=None if data.get("used_by") is None else str(data["used_by"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{TOKENS_JSON}: malformed entry: {exc!r}") from None


class TokenStore:
    """The CA node's join tokens (see the module docstring)."""

    def __init__(self, state: StateDir, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self._clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.state.file(TOKENS_LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> list[TokenEntry]:
        path = self.state.file(TOKENS_JSON)
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {path}: {exc}", path) from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise StateError(f"{path}: malformed", path)
        return [TokenEntry.from_dict(e) for e in data["tokens"]]

    def _save(self, entries: list[TokenEntry]) -> None:
        body = {"version": 1, "tokens": [e.to_dict() for e in entries]}
        write_atomically(
            self.state.file(TOKENS_JSON), (json.dumps(body, indent=2) + "\n").encode(), KEY_MODE
        )

    def _pruned(self, entries: list[TokenEntry]) -> list[TokenEntry]:
        now = self._clock()
        return [e for e in entries if e.expires_at + _KEEP_AFTER_EXPIRY_S > now]

    def issue(self, ttl_s: float = DEFAULT_TTL_S) -> str:
        """A new token valid for ``ttl_s`` seconds; only its hash is stored."""
        if not 0 < ttl_s <= MAX_TTL_S:
            raise StateError(f"token lifetime must be 1-{MAX_TTL_S} s, not {ttl_s}")
        self.state.ca_key_pem()  # only the CA node issues tokens
        token = b64url(secrets.token_bytes(32))
        now = self._clock()
        with self._locked():
            entries = self._pruned(self._load())
            if len(entries) >= MAX_TOKENS:
                raise StateError(f"{MAX_TOKENS} join tokens are outstanding; let some expire")
            entries.append(TokenEntry(token_hash(token), now, now + ttl_s))
            self._save(entries)
        return token

    def redeem(self, token: str, used_by: str, then: Callable[[], T]) -> T:
        """Check ``token`` and run ``then``; mark the token used only if ``then``
        returns. Raises :class:`TokenError` (reason ``unknown``, ``expired``, ``used``)
        or whatever ``then`` raises (the token stays unused)."""
        wanted = token_hash(token)
        with self._locked():
            entries = self._load()
            now = self._clock()
            index = next(
                (i for i, e in enumerate(entries) if hmac.compare_digest(e.sha256, wanted)), None
            )
            if index is None:
                raise TokenError("join token unknown (tampered, or never issued here)", "unknown")
            entry = entries[index]
            if entry.used_at is not None:
                raise TokenError(
                    f"join token already used (by {entry.used_by!r}): a join key works once",
                    "used",
                )
            if now >= entry.expires_at:
                raise TokenError(
                    f"join token expired {now - entry.expires_at:.0f} s ago: make a new join key",
                    "expired",
                )
            result = then()
            entries[index] = TokenEntry(
                entry.sha256, entry.created_at, entry.expires_at, now, used_by
            )
            self._save(self._pruned(entries))
            return result
