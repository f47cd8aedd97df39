"""TLS for the data paths: QEMU's ``tls-creds-x509`` objects and Python ``ssl`` contexts.

One set of files serves every encrypted path a node takes part in. A node holds
its cluster credentials (:class:`NodeCredentials`: the cluster CA, its own
certificate, which carries both ``serverAuth`` and ``clientAuth``, and its key);
:func:`write_qemu_creds_dir` lays them out the way QEMU's ``tls-creds-x509``
object reads a directory::

    ca-cert.pem      the cluster CA
    server-cert.pem  this node's certificate   (endpoint=server: incoming side, QMP)
    server-key.pem   its key, unencrypted PEM
    client-cert.pem  the same certificate      (endpoint=client: outgoing side)
    client-key.pem   the same key

QEMU 7.2's gnutls reads RSA and ECDSA keys in PKCS#1/SEC1 or PKCS#8 PEM; keys are
written as unencrypted PKCS#8 PEM, other key types are refused here rather than
by QEMU mid-migration. The same directory serves pagestream's agents
(:func:`client_context` / :func:`server_context` over the ``client-*``/``server-*``
files, mutual authentication: both sides require a certificate of the CA).

:class:`MigrationTls` is the request option (see
:class:`~migrate.request.MigrationRequest`); :func:`add_tls_creds` and
:func:`remove_tls_creds` put the objects into a QEMU over QMP.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from migrate import validate
from migrate.errors import ConfigError, QemuError
from migrate.qmp import QmpSession

CA_FILE = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
#: The id of the ``tls-creds-x509`` object the engine adds for a migration.
MIGRATION_CREDS_ID = "livemig-mig-tls"
#: The id of the ``authz-simple`` object naming the one source a target accepts.
MIGRATION_AUTHZ_ID = "livemig-mig-authz"


def qemu_peer_name(node: str) -> str:
    """The distinguished name QEMU sees in ``node``'s certificate (``CN=node``).

    QEMU's TLS session names its peer by gnutls's RFC 4514 rendering of the
    certificate's subject (``gnutls_x509_crt_get_dn``); a node certificate's
    subject is its CN alone (:mod:`migrate.cluster.pki`).
    """
    return f"CN={node}"


@dataclass(frozen=True)
class NodeCredentials:
    """A node's cluster credentials: CA certificate, node certificate, node key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> NodeCredentials:
        """The files a node's state dir holds: ``ca.pem``, ``node.pem``, ``node-key.pem``."""
        return cls(state_dir / "ca.pem", state_dir / "node.pem", state_dir / "node-key.pem")

    @classmethod
    def from_qemu_dir(cls, directory: Path, endpoint: str) -> NodeCredentials:
        """The ``client``- or ``server``-side files of a QEMU creds dir."""
        if endpoint not in ("client", "server"):
            raise ConfigError(f"TLS endpoint must be client or server, not {endpoint!r}")
        return cls(
            directory / CA_FILE,
            directory / f"{endpoint}-cert.pem",
            directory / f"{endpoint}-key.pem",
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def write_qemu_creds_dir(creds: NodeCredentials, dest: Path) -> Path:
    """Lay ``creds`` out in ``dest`` (created, mode 0700) as QEMU's ``tls-creds-x509`` reads it.

    Returns ``dest``. Raises :class:`ConfigError` if a file is missing, not PEM,
    an encrypted key, or a key type other than RSA/ECDSA.
    """
    ca_pem, cert_pem = _read(creds.ca, "CA certificate"), _read(creds.cert, "node certificate")
    for pem, what in ((ca_pem, "CA certificate"), (cert_pem, "node certificate")):
        try:
            x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise ConfigError(f"the {what} is not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(_read(creds.key, "node key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"the node key {creds.key} is not an unencrypted PEM key: {exc}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"the node key is {type(key).__name__}: QEMU's gnutls needs an RSA or ECDSA key"
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dest, 0o700)
    files = {
        CA_FILE: ca_pem,
        SERVER_CERT: cert_pem,
        CLIENT_CERT: cert_pem,
        SERVER_KEY: key_pem,
        CLIENT_KEY: key_pem,
    }
    for name, data in files.items():
        path = dest / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    return dest


def _context(purpose: ssl.Purpose, creds: NodeCredentials) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(creds.ca))
        context.load_cert_chain(str(creds.cert), str(creds.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS credentials ({creds.cert}, {creds.key}): {exc}"
        ) from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(creds: NodeCredentials, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context presenting ``creds`` and trusting only their CA.

    With ``check_hostname`` the server's certificate must name the address
    connected to (its SAN). Raises :class:`ConfigError` if the files do not load.
    """
    context = _context(ssl.Purpose.SERVER_AUTH, creds)
    context.check_hostname = check_hostname
    return context


def server_context(creds: NodeCredentials) -> ssl.SSLContext:
    """A server context presenting ``creds`` and requiring a client certificate of their CA.

    It sends no TLS 1.3 session tickets: a client that only writes (pagestream's
    sender) would leave them unread, and closing a socket with unread data sends
    a reset that makes the peer's kernel drop the stream's unread tail.
    """
    context = _context(ssl.Purpose.CLIENT_AUTH, creds)
    context.num_tickets = 0
    return context


def peer_node_name(sock: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The node name (CN) in the certificate the peer of a handshaken ``sock`` presented."""
    subject = (sock.getpeercert() or {}).get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for attribute in rdn:
            if isinstance(attribute, tuple) and attribute[0] == "commonName":
                return str(attribute[1])
    return None


@dataclass(frozen=True)
class MigrationTls:
    """Encrypt and authenticate a migration's data path with the cluster's certificates.

    ``source_dir`` and ``target_dir`` are QEMU creds dirs (:func:`write_qemu_creds_dir`)
    as each host sees them: QEMU reads them, and pagestream's agents run on the
    same hosts. ``hostname`` is the name the target's certificate must carry
    (QEMU's ``tls-hostname``; None: the host of the migration URI).
    ``source_name`` is the node name (CN) the source's certificate must carry:
    the target QEMU (``tls-authz``) and pagestream's receiver refuse any other
    certificate of the CA; None: any certificate the CA signed.
    """

    source_dir: Path
    target_dir: Path
    hostname: str | None = None
    source_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("source_dir", "target_dir"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
            elif not isinstance(value, Path):
                raise ConfigError(f"tls {name} must be a path, not {value!r}")
            if not getattr(self, name).is_absolute():
                raise ConfigError(f"tls {name} must be an absolute path, not {str(value)!r}")
        if self.hostname is not None:
            validate.text(self.hostname, "tls hostname", max_length=253)
        if self.source_name is not None:
            validate.text(self.source_name, "tls source name", max_length=253)
            if any(c in self.source_name for c in ',+=\\"<>;#'):
                raise ConfigError(
                    f"tls source name {self.source_name!r} has a character a DN escapes"
                )

    def stream_client(self) -> NodeCredentials:
        """The sender's (source host) files."""
        return NodeCredentials.from_qemu_dir(self.source_dir, "client")

    def stream_server(self) -> NodeCredentials:
        """The receiver's (target host) files."""
        return NodeCredentials.from_qemu_dir(self.target_dir, "server")


async def add_tls_creds(
    session: QmpSession, directory: Path, endpoint: str, creds_id: str = MIGRATION_CREDS_ID
) -> None:
    """``object-add`` a ``tls-creds-x509`` (``verify-peer``) reading ``directory``.

    An object of that id left by an earlier attempt is replaced. Raises
    :class:`QemuError` if QEMU refuses (e.g. unreadable files).
    """
    await remove_tls_creds(session, creds_id)
    await session.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": creds_id,
            "dir": str(directory),
            "endpoint": endpoint,
            "verify-peer": True,
        },
    )


async def remove_tls_creds(session: QmpSession, creds_id: str = MIGRATION_CREDS_ID) -> bool:
    """``object-del`` the creds object if present; whether one was removed."""
    try:
        await session.execute("object-del", {"id": creds_id})
    except QemuError:
        return False
    return True


async def use_migration_tls(
    source: QmpSession, target: QmpSession, tls: MigrationTls, hostname: str
) -> None:
    """Creds objects on both QEMUs (source: client, target: server, both verifying
    the peer), then ``tls-creds`` on both and ``tls-hostname`` on the source: QEMU's
    migration stream runs over mutual TLS. Call before ``migrate-incoming``.

    With ``tls.source_name`` the target also gets an ``authz-simple`` object naming
    the source's certificate (:func:`qemu_peer_name`) as its ``tls-authz``: QEMU
    refuses the handshake of any other client certificate.

    ``hostname`` is used when ``tls.hostname`` is None. Raises :class:`QemuError`.
    """
    await add_tls_creds(source, tls.source_dir, "client")
    await add_tls_creds(target, tls.target_dir, "server")
    target_params: dict[str, object] = {"tls-creds": MIGRATION_CREDS_ID}
    if tls.source_name is not None:
        await remove_tls_creds(target, MIGRATION_AUTHZ_ID)
        await target.execute(
            "object-add",
            {
                "qom-type": "authz-simple",
                "id": MIGRATION_AUTHZ_ID,
                "identity": qemu_peer_name(tls.source_name),
            },
        )
        target_params["tls-authz"] = MIGRATION_AUTHZ_ID
    await target.execute("migrate-set-parameters", target_params)
    await source.execute(
        "migrate-set-parameters",
        {"tls-creds": MIGRATION_CREDS_ID, "tls-hostname": tls.hostname or hostname},
    )


async def drop_migration_tls(source: QmpSession) -> None:
    """Undo :func:`use_migration_tls` on a source the VM stays on (errors ignored:
    a QEMU that is gone has nothing left to undo)."""
    with contextlib.suppress(QemuError):
        await source.execute(
            "migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""}, timeout=5.0
        )
        await remove_tls_creds(source)
