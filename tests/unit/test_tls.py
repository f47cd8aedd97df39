"""TLS credentials, the pagestream stream over mutual TLS, and the request's TLS options."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from migrate.errors import ConfigError, StreamError
from migrate.pagestream.receiver import PageReceiver, ReceiverConfig
from migrate.pagestream.sender import PageSender, SenderConfig
from migrate.request import HostEndpoint, MigrationRequest, QmpTcpAddress, migration_uri_host
from migrate.tls import (
    MIGRATION_AUTHZ_ID,
    MIGRATION_CREDS_ID,
    MigrationTls,
    NodeCredentials,
    use_migration_tls,
    write_qemu_creds_dir,
)
from tests.fakes.qmp import FakeQmp
from tests.pki_helper import ThrowawayCa
from tests.unit.test_pagestream_stream import SESSION, Events, ram_file

QEMU_FILES = {
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
}


def test_qemu_creds_dir_has_the_files_qemu_reads(tmp_path: Path) -> None:
    creds = ThrowawayCa.create().issue(tmp_path / "node", "node-a", "198.19.0.1")
    out = write_qemu_creds_dir(creds, tmp_path / "qemu")
    assert {p.name for p in out.iterdir()} == QEMU_FILES
    assert (out / "server-cert.pem").read_bytes() == creds.cert.read_bytes()
    key = (out / "client-key.pem").read_bytes()
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert (out / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700


def test_qemu_creds_dir_refuses_what_gnutls_would(tmp_path: Path) -> None:
    creds = ThrowawayCa.create().issue(tmp_path / "node", "node-a", "198.19.0.1")
    with pytest.raises(ConfigError, match="cannot read the node key"):
        write_qemu_creds_dir(NodeCredentials(creds.ca, creds.cert, tmp_path / "nope"), tmp_path)
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    creds.key.write_bytes(ed)
    with pytest.raises(ConfigError, match="RSA or ECDSA"):
        write_qemu_creds_dir(creds, tmp_path / "qemu")
    creds.cert.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        write_qemu_creds_dir(creds, tmp_path / "qemu")


def _stream(
    tmp_path: Path, server: NodeCredentials, client: NodeCredentials, peer_name: str | None = None
) -> tuple[Path, Path, Events, list[BaseException]]:
    source = ram_file(tmp_path / "source.ram", 256)
    target = ram_file(tmp_path / "target.ram", 256, seed=None)
    events = Events()
    receiver = PageReceiver.bind(
        ReceiverConfig(
            target, "127.0.0.1", SESSION, accept_timeout_s=10, tls=server, peer_name=peer_name
        ),
        events,
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            receiver.run()
        except StreamError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        config = SenderConfig(source, "127.0.0.1", receiver.port, SESSION, tls=client)
        with PageSender.open(config) as sender:
            sender.sweep(final=True)
            sender.send_digest()
    except StreamError as exc:
        errors.append(exc)
    finally:
        thread.join(timeout=20)
        receiver.close()
    assert not thread.is_alive()
    return source, target, events, errors


def test_page_stream_over_mutual_tls(tmp_path: Path) -> None:
    ca = ThrowawayCa.create()
    server = ca.issue(tmp_path / "b", "node-b", "127.0.0.1")
    client = ca.issue(tmp_path / "a", "node-a", "198.19.0.1")
    source, target, events, errors = _stream(tmp_path, server, client)
    assert not errors
    assert events.named("verified")[0]["ok"] is True
    assert np.array_equal(np.fromfile(source, np.uint64), np.fromfile(target, np.uint64))


def test_page_stream_refuses_a_peer_of_another_ca(tmp_path: Path) -> None:
    server = ThrowawayCa.create().issue(tmp_path / "b", "node-b", "127.0.0.1")
    stranger = ThrowawayCa.create("intruder").issue(tmp_path / "x", "node-x", "198.19.0.9")
    _source, target, events, errors = _stream(tmp_path, server, stranger)
    assert errors and all(isinstance(e, StreamError) and e.kind == "transport" for e in errors)
    assert any("TLS" in str(e) for e in errors)
    assert not events.named("round") and not np.fromfile(target, np.uint64).any()


def test_page_stream_receiver_accepts_only_the_expected_sender(tmp_path: Path) -> None:
    ca = ThrowawayCa.create()
    server = ca.issue(tmp_path / "b", "node-b", "127.0.0.1")
    node_a = ca.issue(tmp_path / "a", "node-a", "198.19.0.1")
    other = ca.issue(tmp_path / "x", "node-x", "198.19.0.1")  # same CA, same address
    _source, target, events, errors = _stream(tmp_path / "x", server, other, peer_name="node-a")
    refusals = [e for e in errors if "presented" in str(e)]
    assert len(refusals) == 1 and isinstance(refusals[0], StreamError)
    assert str(refusals[0]) == (
        "the sender 127.0.0.1 presented node 'node-x''s certificate, not 'node-a''s"
    )
    assert refusals[0].kind == "transport" and "\n" not in str(refusals[0])
    assert not events.named("round") and not np.fromfile(target, np.uint64).any()
    (tmp_path / "ok").mkdir()
    source, target, events, errors = _stream(tmp_path / "ok", server, node_a, peer_name="node-a")
    assert not errors and events.named("verified")[0]["ok"] is True
    assert np.array_equal(np.fromfile(source, np.uint64), np.fromfile(target, np.uint64))


def test_page_stream_checks_the_receivers_name(tmp_path: Path) -> None:
    ca = ThrowawayCa.create()
    server = ca.issue(tmp_path / "b", "node-b", "198.19.0.2")  # not 127.0.0.1
    client = ca.issue(tmp_path / "a", "node-a", "198.19.0.1")
    _source, _target, _events, errors = _stream(tmp_path, server, client)
    assert any("TLS with the receiver" in str(e) for e in errors)


def test_request_tls_options_and_transport(tmp_path: Path) -> None:
    creds = NodeCredentials(tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    tls = MigrationTls(tmp_path / "a", tmp_path / "b")
    src = HostEndpoint("a", tmp_path / "a.sock")
    tgt = HostEndpoint(
        "b", migration_uri="tcp:198.19.0.2:4444", qmp_tcp=QmpTcpAddress("198.19.0.2", 4445, creds)
    )
    request = MigrationRequest(src, tgt, tls=tls)
    assert request.transport == "tls"
    assert MigrationRequest(src, tgt).transport == "tcp"
    unix = HostEndpoint("b", tmp_path / "b.sock", "unix:/tmp/x.sock")
    assert MigrationRequest(src, unix).transport == "unix"
    with pytest.raises(ConfigError, match="tcp:HOST:PORT"):
        MigrationRequest(src, unix, tls=tls)
    with pytest.raises(ConfigError, match="not both"):
        HostEndpoint("b", tmp_path / "b.sock", qmp_tcp=QmpTcpAddress("h", 1, creds))
    with pytest.raises(ConfigError, match="QMP port"):
        QmpTcpAddress("h", 0, creds)
    with pytest.raises(ConfigError, match="bad QMP host"):
        QmpTcpAddress("h;rm", 1, creds)
    with pytest.raises(ConfigError, match="absolute"):
        MigrationTls(Path("rel"), tmp_path)
    assert str(QmpTcpAddress("::1", 5, creds)) == "tls:[::1]:5"
    assert migration_uri_host("tcp:[::1]:4") == "::1"
    assert migration_uri_host("unix:/x") is None


def _tls_fakes() -> tuple[FakeQmp, FakeQmp]:
    source, target = FakeQmp("source"), FakeQmp("target", runstate="inmigrate", incoming="defer")
    for fake in (source, target):
        for command in ("object-add", "object-del", "migrate-set-parameters"):
            fake.on(command, {})
    return source, target


def test_native_tls_target_accepts_only_the_named_source(tmp_path: Path) -> None:
    source, target = _tls_fakes()
    tls = MigrationTls(tmp_path / "a", tmp_path / "b", source_name="node-a")
    asyncio.run(use_migration_tls(source, target, tls, "198.19.0.2"))
    adds = [c.arguments for c in target.calls if c.command == "object-add"]
    assert adds[-1] == {
        "qom-type": "authz-simple",
        "id": MIGRATION_AUTHZ_ID,
        "identity": "CN=node-a",
    }
    params = [c.arguments for c in target.calls if c.command == "migrate-set-parameters"]
    assert params == [{"tls-creds": MIGRATION_CREDS_ID, "tls-authz": MIGRATION_AUTHZ_ID}]
    # A stale authz object of an earlier attempt goes first, like the creds object.
    deleted = [c.arguments for c in target.calls if c.command == "object-del"]
    assert deleted == [{"id": MIGRATION_CREDS_ID}, {"id": MIGRATION_AUTHZ_ID}]
    assert target.commands == ["object-del", "object-add"] * 2 + ["migrate-set-parameters"]
    # The source is a client: QEMU checks no authz there.
    assert all(
        "tls-authz" not in (c.arguments or {})
        and (c.arguments or {}).get("qom-type") != "authz-simple"
        for c in source.calls
    )


def test_native_tls_without_a_source_name_sets_no_authz(tmp_path: Path) -> None:
    source, target = _tls_fakes()
    asyncio.run(
        use_migration_tls(source, target, MigrationTls(tmp_path / "a", tmp_path / "b"), "h")
    )
    assert "authz-simple" not in str(target.calls)
    params = [c.arguments for c in target.calls if c.command == "migrate-set-parameters"]
    assert params == [{"tls-creds": MIGRATION_CREDS_ID}]
    with pytest.raises(ConfigError, match="DN escapes"):
        MigrationTls(tmp_path / "a", tmp_path / "b", source_name="a,O=x")
