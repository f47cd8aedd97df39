"""A node's state directory: who this node is, its keys, the cluster's members.

Layout (``DIR`` is ``--state-dir``)::

    DIR/node.json       this node: {"version": 1, "name", "address"}; written last, so
                        a directory without it holds no cluster (a failed join leaves
                        nothing that counts)
    DIR/ca.pem          the cluster CA's certificate (every node)
    DIR/ca-key.pem      the CA's private key, 0600 — only on the node that ran
                        ``cluster create``; only that node can make join keys
    DIR/node.pem        this node's certificate (CN = name, SAN = address host,
                        serverAuth + clientAuth), signed by the CA
    DIR/node-key.pem    this node's private key, 0600
    DIR/members.json    {"version": 1, "members": [{name, address, ca, cert_sha256,
                        joined_at}]}; kept by the CA node, pushed to the others
    DIR/tokens.json     join tokens (CA node only), 0600: SHA-256 of each token,
                        its expiry and when it was used — never the token itself
    DIR/tokens.lock     flock(2) serialising ``cluster join-key`` and the agent
    DIR/agent.log       the agent's log, one line per request or refusal

Every file is replaced atomically (temporary file, fsync, rename): a reader or a
crash sees the old or the new file whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from migrate.cluster import pki
from migrate.cluster.address import Address, parse_address
from migrate.cluster.errors import StateError, TrustError
from migrate.errors import ConfigError
from migrate.journal import write_atomically

STATE_VERSION = 1
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: Bounds on what a members list may hold (it also arrives from other nodes).
MAX_MEMBERS = 1024
MAX_MEMBERS_BYTES = 1 << 20

NODE_JSON = "node.json"
CA_PEM = "ca.pem"
CA_KEY = "ca-key.pem"
NODE_PEM = "node.pem"
NODE_KEY = "node-key.pem"
MEMBERS_JSON = "members.json"
TOKENS_JSON = "tokens.json"
TOKENS_LOCK = "tokens.lock"
AGENT_LOG = "agent.log"

KEY_MODE = 0o600
PUBLIC_MODE = 0o644


def check_name(name: str) -> str:
    """A node name: lowercase letters, digits and ``-``, 1-63 long (a DNS label)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"node name must be a DNS label (a-z, 0-9, '-'; 1-63 long): {name!r}")
    return name


@dataclass(frozen=True)
class Member:
    """One node of the cluster. ``ca``: it holds the CA key (signs joins, pushes members)."""

    name: str
    address: str
    ca: bool
    cert_sha256: str
    joined_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "ca": self.ca,
            "cert_sha256": self.cert_sha256,
            "joined_at": self.joined_at,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Member:
        """Checked: raises :class:`ConfigError` on a malformed entry."""
        if not isinstance(data, dict):
            raise ConfigError("member entry is not an object")
        try:
            name = check_name(data["name"])
            address = str(parse_address(data["address"]))
            ca = data["ca"]
            cert_sha256 = data["cert_sha256"]
            joined_at = data["joined_at"]
        except KeyError as exc:
            raise ConfigError(f"member entry lacks {exc}") from None
        if not isinstance(ca, bool):
            raise ConfigError("member 'ca' must be true or false")
        if not isinstance(cert_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", cert_sha256):
            raise ConfigError("member 'cert_sha256' must be 64 hex digits")
        if isinstance(joined_at, bool) or not isinstance(joined_at, int | float):
            raise ConfigError("member 'joined_at' must be a number")
        return cls(name, address, ca, cert_sha256, float(joined_at))


def members_to_json(members: Sequence[Member]) -> dict[str, Any]:
    return {"version": STATE_VERSION, "members": [m.to_dict() for m in members]}


def members_from_json(data: Any) -> tuple[Member, ...]:
    """Checked member list; raises :class:`ConfigError` (shape, duplicates, size)."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ConfigError(f"members: expected an object with version {STATE_VERSION}")
    entries = data.get("members")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_MEMBERS:
        raise ConfigError(f"members: expected a list of 1-{MAX_MEMBERS} members")
    members = tuple(Member.from_dict(e) for e in entries)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError("members: a name appears twice")
    if sum(m.ca for m in members) != 1:
        raise ConfigError("members: exactly one member must hold the CA")
    return members


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    address: Address


class StateDir:
    """One node's state directory (see the module docstring for its files)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name

    # -- what is there ---------------------------------------------------------------

    @property
    def is_member(self) -> bool:
        return self.file(NODE_JSON).is_file()

    @property
    def holds_ca(self) -> bool:
        return self.file(CA_KEY).is_file()

    def require_member(self) -> NodeIdentity:
        """This node's identity; raises :class:`StateError` if it is in no cluster."""
        if not self.is_member:
            raise StateError(
                f"{self.path} holds no cluster: run `livemig cluster create` or `cluster join`",
                self.file(NODE_JSON),
            )
        data = self._read_json(NODE_JSON)
        try:
            if data.get("version") != STATE_VERSION:
                raise ConfigError(
                    f"version {data.get('version')!r} (this livemig reads {STATE_VERSION})"
                )
            return NodeIdentity(check_name(data["name"]), parse_address(data["address"]))
        except (ConfigError, KeyError, AttributeError) as exc:
            raise StateError(
                f"{self.file(NODE_JSON)}: malformed: {exc}", self.file(NODE_JSON)
            ) from None

    def require_empty(self) -> None:
        """Refuse a directory that already holds a cluster."""
        if self.is_member:
            node = self._read_json(NODE_JSON)
            raise StateError(
                f"{self.path} already holds cluster node {node.get('name')!r}: use another --state-dir",
                self.file(NODE_JSON),
            )

    def _read(self, name: str, limit: int = MAX_MEMBERS_BYTES) -> bytes:
        path = self.file(name)
        try:
            with path.open("rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}", path) from None
        if len(data) > limit:
            raise StateError(f"{path} is larger than {limit} bytes", path)
        return data

    def _read_json(self, name: str) -> Any:
        try:
            return json.loads(self._read(name))
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.file(name)} is not JSON: {exc}", self.file(name)) from None

    # -- certificates and keys -------------------------------------------------------

    def ca_cert(self) -> x509.Certificate:
        try:
            return pki.load_cert(self._read(CA_PEM))
        except TrustError as exc:
            raise StateError(f"{self.file(CA_PEM)}: {exc}", self.file(CA_PEM)) from None

    def ca_pem(self) -> bytes:
        return pki.cert_pem(self.ca_cert())

    def ca_fingerprint(self) -> str:
        return pki.fingerprint(self.ca_cert())

    def ca_key_pem(self) -> bytes:
        if not self.holds_ca:
            raise StateError(
                f"this node does not hold the cluster CA ({self.file(CA_KEY)} is absent): "
                "join keys are made on the node that created the cluster",
                self.file(CA_KEY),
            )
        return self._read(CA_KEY)

    def node_cert(self) -> x509.Certificate:
        try:
            return pki.load_cert(self._read(NODE_PEM))
        except TrustError as exc:
            raise StateError(f"{self.file(NODE_PEM)}: {exc}", self.file(NODE_PEM)) from None

    @property
    def cert_path(self) -> Path:
        return self.file(NODE_PEM)

    @property
    def key_path(self) -> Path:
        return self.file(NODE_KEY)

    @property
    def ca_path(self) -> Path:
        return self.file(CA_PEM)

    # -- members ---------------------------------------------------------------------

    def members(self) -> tuple[Member, ...]:
        try:
            return members_from_json(self._read_json(MEMBERS_JSON))
        except ConfigError as exc:
            raise StateError(f"{self.file(MEMBERS_JSON)}: {exc}", self.file(MEMBERS_JSON)) from None

    def write_members(self, members: Sequence[Member]) -> None:
        members_from_json(members_to_json(members))  # the same checks as a reader's
        self._write(MEMBERS_JSON, _json_bytes(members_to_json(members)), PUBLIC_MODE)

    # -- writing ---------------------------------------------------------------------

    def _write(self, name: str, data: bytes, mode: int) -> None:
        write_atomically(self.file(name), data, mode)

    def _ensure_dir(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.path}: {exc.strerror}", self.path) from None
        if not os.access(self.path, os.W_OK):
            raise StateError(f"{self.path} is not writable", self.path)

    def install(
        self,
        identity: NodeIdentity,
        ca_pem: bytes,
        node_pem: bytes,
        node_key_pem: bytes,
        members: Sequence[Member],
        ca_key_pem: bytes | None = None,
    ) -> None:
        """Write a node's whole state; ``node.json`` last, so an interrupted install
        leaves a directory that still holds no cluster."""
        self.require_empty()
        self._ensure_dir()
        ca = pki.load_cert(ca_pem)
        pki.check_node_cert(pki.load_cert(node_pem), ca, node_key_pem)
        self._write(CA_PEM, ca_pem, PUBLIC_MODE)
        if ca_key_pem is not None:
            self._write(CA_KEY, ca_key_pem, KEY_MODE)
        self._write(NODE_KEY, node_key_pem, KEY_MODE)
        self._write(NODE_PEM, node_pem, PUBLIC_MODE)
        self.write_members(members)
        node = {"version": STATE_VERSION, "name": identity.name, "address": str(identity.address)}
        self._write(NODE_JSON, _json_bytes(node), PUBLIC_MODE)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def create_cluster(state: StateDir, name: str, address: Address) -> Member:
    """Make a cluster CA and this node's certificate in ``state``; return the member."""
    state.require_empty()
    check_name(name)
    ca_cert, ca_key = pki.create_ca(name)
    node = pki.make_csr(name, address.host)
    csr = pki.load_csr(node.csr_pem)
    cert = pki.sign_node(csr, name, address.host, ca_cert, ca_key)
    member = Member(name, str(address), True, pki.fingerprint(cert), time.time())
    state.install(
        NodeIdentity(name, address),
        pki.cert_pem(ca_cert),
        pki.cert_pem(cert),
        node.key_pem,
        [member],
        ca_key_pem=pki.key_to_pem(ca_key),
    )
    return member


def without_member(members: Iterable[Member], name: str, this_node: str) -> tuple[Member, ...]:
    """``members`` less ``name``; raises :class:`ConfigError` if it is no member, this
    node, or the node holding the CA."""
    current = tuple(members)
    gone = next((m for m in current if m.name == name), None)
    if gone is None:
        raise ConfigError(f"no node {name!r} in the cluster ({', '.join(m.name for m in current)})")
    if name == this_node:
        raise ConfigError(f"node {name!r} is this node: remove it from another member")
    if gone.ca:
        raise ConfigError(f"node {name!r} holds the cluster CA and cannot be removed")
    return tuple(m for m in current if m.name != name)


def with_member(members: Iterable[Member], new: Member) -> tuple[Member, ...]:
    """``members`` plus ``new``; raises :class:`ConfigError` if the name or address is taken."""
    current = tuple(members)
    for m in current:
        if m.name == new.name:
            raise ConfigError(f"a node named {new.name!r} is already a member")
        if m.address == new.address:
            raise ConfigError(f"node {m.name!r} already has address {new.address}")
    return (*current, new)
