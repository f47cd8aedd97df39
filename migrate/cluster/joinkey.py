"""The join key: one printable line that lets one new node into the cluster.

::

    livemig-join:v1:<payload>.<check>

``payload`` is base64url (no padding) of the JSON object ``{"address": "HOST:PORT",
"ca_sha256": "<64 hex>", "token": "<base64url of 32 random bytes>"}``; ``check`` is
base64url of the first 6 bytes of SHA-256 over the payload text. The check catches
a key damaged in copy and paste (a tampered key is refused before anything is
sent); it is not what makes joining safe. That is the fingerprint (the new node
refuses an agent whose CA is another) and the token (one use, expires, stored on
the agent only as its SHA-256).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

from migrate.cluster.address import parse_address
from migrate.cluster.errors import JoinKeyError
from migrate.errors import ConfigError

PREFIX = "livemig-join:v1:"
#: A key is short; anything longer is not one (bounded before decoding).
MAX_KEY_LENGTH = 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, base64url without padding


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Decode base64url without padding; raises ``ValueError``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def well_formed(token: object) -> bool:
    """Whether ``token`` looks like a join token (32 bytes of base64url)."""
    return isinstance(token, str) and _TOKEN.match(token) is not None


def _check(payload: str) -> str:
    return b64url(hashlib.sha256(payload.encode("ascii")).digest()[:6])


@dataclass(frozen=True)
class JoinKey:
    """What a join key carries: the agent's address, the CA's fingerprint, the token."""

    address: str
    ca_sha256: str
    token: str

    def __post_init__(self) -> None:
        try:
            parse_address(self.address)
        except ConfigError as exc:
            raise JoinKeyError(f"join key: {exc}") from None
        if not isinstance(self.ca_sha256, str) or not _HEX64.match(self.ca_sha256):
            raise JoinKeyError("join key: the CA fingerprint is not 64 hex digits")
        if not well_formed(self.token):
            raise JoinKeyError("join key: the token is not 32 bytes of base64url")

    def encode(self) -> str:
        """The one-line key."""
        body = {"address": self.address, "ca_sha256": self.ca_sha256, "token": self.token}
        payload = b64url(json.dumps(body, separators=(",", ":")).encode("utf-8"))
        return f"{PREFIX}{payload}.{_check(payload)}"

    @classmethod
    def decode(cls, text: str) -> JoinKey:
        """Parse a key; raises :class:`JoinKeyError` naming what is wrong."""
        text = text.strip()
        if len(text) > MAX_KEY_LENGTH:
            raise JoinKeyError(f"not a join key: longer than {MAX_KEY_LENGTH} characters")
        if not text.startswith(PREFIX):
            if text.startswith("livemig-join:"):
                raise JoinKeyError("join key of an unsupported version (this livemig reads v1)")
            raise JoinKeyError(f"not a join key (it starts with {PREFIX!r})")
        payload, dot, check = text[len(PREFIX) :].partition(".")
        if not dot:
            raise JoinKeyError("join key is damaged: its check is missing")
        if not hmac.compare_digest(_check(payload), check):
            raise JoinKeyError("join key is damaged: its check does not match (copied wrong?)")
        try:
            body = json.loads(unb64url(payload))
        except (ValueError, UnicodeDecodeError) as exc:
            raise JoinKeyError(f"join key is damaged: {exc}") from None
        if not isinstance(body, dict) or set(body) != {"address", "ca_sha256", "token"}:
            raise JoinKeyError("join key is damaged: unexpected fields")
        return cls(address=body["address"], ca_sha256=body["ca_sha256"], token=body["token"])
