"""The receiving end: accept one stream, check every frame, write pages into target RAM.

Runs inside the target-side agent process, on one thread with a blocking socket.
The target QEMU maps the same RAM file ``MAP_SHARED``, so a page written here is
what the guest will read. The receiver reports progress through ``emit`` (the
agent turns each call into a JSON event for the engine):

``prepared``  target RAM mapped and zero (pages it had to clear)
``connected`` the sender is in (HELLO checked: session and RAM size)
``round``     a round's pages are all applied (counts checked against END_ROUND)
``applied``   the final round is applied: QEMU may load device state now
``verified``  target RAM digest against the sender's digest at stop time
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np

from dirtytrack.digest import RamDigest, ram_digest
from dirtytrack.ram import PAGE_SIZE, RamMapping
from migrate.errors import ConfigError, StreamError
from migrate.pagestream.protocol import FinalDigest, FrameReader, Hello, PageBatch, RoundEnd
from migrate.tls import NodeCredentials, peer_node_name, server_context

#: Chunks of target RAM named in a digest-mismatch report.
MAX_CHUNKS_NAMED: Final = 8
_CLEAR_CHUNK_PAGES: Final = 16384  # 64 MiB per step when zeroing target RAM

Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ReceiverConfig:
    ram_path: Path
    host: str
    session: bytes
    port: int = 0
    accept_timeout_s: float = 60.0
    io_timeout_s: float = 120.0
    #: Serve the stream over mutual TLS with these (server) credentials.
    tls: NodeCredentials | None = None
    #: With ``tls``: the node name (CN) the sender's certificate must carry (None:
    #: any certificate of the CA).
    peer_name: str | None = None


@dataclass
class _Round:
    pages: int = 0
    data_pages: int = 0
    zero_pages: int = 0
    wire_bytes: int = 0
    apply_s: float = 0.0


class PageReceiver:
    """Owns the listening socket, the one connection and the writable RAM mapping.

    :meth:`bind` maps and listens (``port`` tells where); :meth:`run` serves one
    stream to its end and raises :class:`StreamError` on anything wrong;
    :meth:`close` closes sockets and unmaps (also from another thread, to stop a
    blocked :meth:`run`).
    """

    def __init__(
        self, config: ReceiverConfig, ram: RamMapping, listener: socket.socket, emit: Emit
    ) -> None:
        self.config = config
        self.ram = ram
        self.listener = listener
        self.emit = emit
        self._conn: socket.socket | None = None
        self.verified: bool | None = None

    @classmethod
    def bind(cls, config: ReceiverConfig, emit: Emit) -> PageReceiver:
        """Map target RAM writable and listen on ``host:port`` (0: any free port).

        Raises :class:`~dirtytrack.errors.RamMappingError` or :class:`StreamError`.
        """
        ram = RamMapping(config.ram_path, writable=True, populate=True)
        ram.open()
        try:
            family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((config.host, config.port))
                listener.listen(1)
                listener.settimeout(config.accept_timeout_s)
            except OSError as exc:
                listener.close()
                raise StreamError(
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                    side="receiver",
                    kind="transport",
                ) from exc
        except BaseException:
            ram.close()
            raise
        return cls(config, ram, listener, emit)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def __enter__(self) -> PageReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- serving one stream -----------------------------------------------------------

    def run(self) -> None:
        """Prepare target RAM, accept the sender, apply every round, verify the digest."""
        cleared = self._clear_ram()
        self.emit("prepared", {"cleared_pages": cleared})
        try:
            conn, peer = self.listener.accept()
        except OSError as exc:
            raise StreamError(
                f"no sender connected within {self.config.accept_timeout_s:g} s ({exc})",
                side="receiver",
                kind="transport",
            ) from exc
        self._conn = conn
        try:
            self._serve_connection(conn, peer)
        finally:
            # Closing at once (unread data makes it a reset) stops a sender that is
            # still pushing pages into a stream this end gave up on.
            served, self._conn = self._conn, None
            if served is not None:
                served.close()  # the TLS socket took over conn's descriptor
            conn.close()

    def _serve_connection(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        conn.settimeout(self.config.io_timeout_s)
        if self.config.tls is not None:
            try:
                conn = server_context(self.config.tls).wrap_socket(conn, server_side=True)
            except (OSError, ConfigError) as exc:
                raise StreamError(
                    f"TLS with the sender {peer[0]} failed: {exc}",
                    side="receiver",
                    kind="transport",
                ) from exc
            self._conn = conn
            name = peer_node_name(conn)
            if self.config.peer_name is not None and name != self.config.peer_name:
                raise StreamError(
                    f"the sender {peer[0]} presented node {name!r}'s certificate, "
                    f"not {self.config.peer_name!r}'s",
                    side="receiver",
                    kind="transport",
                )
        reader = FrameReader(self._recv_exactly)
        hello = reader.next()
        if not isinstance(hello, Hello):
            raise StreamError("stream did not start with HELLO", side="receiver")
        if hello.session != self.config.session:
            raise StreamError(
                "HELLO from another migration (session id differs)", side="receiver", kind="config"
            )
        if hello.page_count != self.ram.page_count:
            raise StreamError(
                f"source RAM has {hello.page_count} pages, target RAM {self.ram.page_count}",
                side="receiver",
                kind="config",
            )
        self.emit("connected", {"peer": str(peer[0]), "pages": hello.page_count})
        self._serve(reader)

    def _serve(self, reader: FrameReader) -> None:
        current = _Round()
        own_digest: RamDigest | None = None
        while True:
            message = reader.next()
            if message is None:
                if self.verified is None:
                    raise StreamError(
                        "stream ended before the final digest", side="receiver", kind="transport"
                    )
                return
            if own_digest is not None and not isinstance(message, FinalDigest):
                raise StreamError(
                    f"{type(message).__name__} after the final round", side="receiver"
                )
            if isinstance(message, PageBatch):
                began = time.monotonic()
                self._apply(message)
                current.apply_s += time.monotonic() - began
                current.pages += message.extents.pages
                current.wire_bytes += message.wire_bytes
                if message.zero:
                    current.zero_pages += message.extents.pages
                else:
                    current.data_pages += message.extents.pages
            elif isinstance(message, RoundEnd):
                self._check_round(message, current)
                self.emit(
                    "round",
                    {
                        "round": message.round,
                        "final": message.final,
                        "pages": current.pages,
                        "wire_bytes": current.wire_bytes,
                        "apply_s": current.apply_s,
                    },
                )
                current = _Round()
                if message.final:
                    self.emit("applied", {"round": message.round, "time": time.time()})
                    began = time.monotonic()
                    own_digest = ram_digest(self.ram.buffer())
                    self._digest_s = time.monotonic() - began
            elif isinstance(message, FinalDigest):
                if own_digest is None:
                    raise StreamError("DIGEST before the final round", side="receiver")
                self._verify(own_digest, message.digest)
            else:
                raise StreamError("second HELLO in one stream", side="receiver")

    def _apply(self, batch: PageBatch) -> None:
        pages = self.ram.pages()
        extents = batch.extents
        if len(extents) == 1:
            first = int(extents.starts[0])
            target = pages[first : first + int(extents.counts[0])]
            if batch.rows is None:
                target[...] = 0
            else:
                target[...] = batch.rows
        else:
            numbers = extents.page_numbers()
            pages[numbers] = 0 if batch.rows is None else batch.rows

    def _check_round(self, end: RoundEnd, got: _Round) -> None:
        if (end.pages, end.data_pages, end.zero_pages) != (
            got.pages,
            got.data_pages,
            got.zero_pages,
        ):
            raise StreamError(
                f"round {end.round}: sender sent {end.pages} pages ({end.data_pages} data, "
                f"{end.zero_pages} zero), receiver got {got.pages} ({got.data_pages}, "
                f"{got.zero_pages})",
                side="receiver",
            )

    def _verify(self, ours: RamDigest, theirs: RamDigest) -> None:
        chunks = ours.differing_chunks(theirs)
        self.verified = len(chunks) == 0
        chunk_pages = theirs.chunk_size // PAGE_SIZE
        named = [
            {
                "chunk": int(chunk),
                "first_page": int(chunk) * chunk_pages,
                "last_page": min((int(chunk) + 1) * chunk_pages, self.ram.page_count) - 1,
            }
            for chunk in chunks[:MAX_CHUNKS_NAMED]
        ]
        self.emit(
            "verified",
            {
                "ok": self.verified,
                "ram_bytes": theirs.size,
                "chunk_bytes": theirs.chunk_size,
                "chunks": len(theirs.hashes),
                "differing_chunks": len(chunks),
                "named": named,
                "digest_s": self._digest_s,
                "time": time.time(),
            },
        )

    def _recv_exactly(self, n: int) -> bytes:
        assert self._conn is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                received = self._conn.recv_into(view[got:])
                if received == 0:
                    break
                got += received
        except OSError as exc:
            raise StreamError(
                f"receiving from the sender failed: {exc.strerror or exc}",
                side="receiver",
                kind="transport",
            ) from exc
        return bytes(buf) if got == n else bytes(buf[:got])

    def _clear_ram(self) -> int:
        """Make target RAM all zero, as the sender's zero baseline assumes.

        A fresh target's RAM file is zero already (QEMU leaves guest RAM alone
        while waiting for an incoming migration), so this normally clears nothing;
        it is one vectorised pass at memory speed, before the first page arrives.
        """
        pages = self.ram.pages()
        cleared = 0
        for first in range(0, len(pages), _CLEAR_CHUNK_PAGES):
            chunk = pages[first : first + _CLEAR_CHUNK_PAGES]
            dirty = np.flatnonzero(chunk.any(axis=1))
            if len(dirty):
                chunk[dirty] = 0
                cleared += len(dirty)
        return cleared

    _digest_s: float = 0.0

    def close(self) -> None:
        for sock in (self._conn, self.listener):
            if sock is not None:
                # Not connected (any more) is fine: closing is all that is left then.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._conn = None
        self.ram.close()
