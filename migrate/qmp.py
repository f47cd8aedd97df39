"""QMP sessions: a thin layer over :class:`qemu.qmp.QMPClient`.

It adds what the engine needs on every call: errors translated into
:class:`~migrate.errors.QemuError` carrying the command and QEMU's error class, a
connect that waits for a socket with a deadline, and QMP event timestamps as floats
(CLOCK_REALTIME seconds, the clock QEMU stamps events with).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.events import ListenerError
from qemu.qmp.message import Message

from migrate.deadline import within
from migrate.errors import ConfigError, QemuError


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event: its name, data and QEMU's timestamp (realtime seconds)."""

    name: str
    data: dict[str, Any]
    timestamp: float

    @classmethod
    def from_message(cls, msg: Any) -> QmpEvent:
        ts = msg.get("timestamp") or {}
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(name=str(msg["event"]), data=dict(msg.get("data") or {}), timestamp=stamp)


#: How long a QMP command may take to answer before the peer counts as silent (s).
DEFAULT_COMMAND_TIMEOUT_S = 10.0
#: How long closing a session may take before its connection is aborted (s).
CLOSE_TIMEOUT_S = 2.0


class QmpTimeout(QemuError):
    """A QMP command got no answer within its deadline: the peer's state is unknown."""


class QmpSession:
    """A connected QMP session to one QEMU. Use :meth:`connect`; close with :meth:`close`.

    Every command has a deadline (``timeout_s``, or the ``timeout`` of one call): a
    peer that stays silent raises :class:`QmpTimeout` naming the command and the
    side, instead of hanging whoever waits.
    """

    def __init__(
        self, client: QMPClient, address: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S
    ) -> None:
        self.client = client
        self.address = address
        self.timeout_s = timeout_s
        self.peer_pid: int | None = _peer_pid(client)

    @classmethod
    async def connect(cls, path: str | Path, name: str, timeout: float = 10.0) -> QmpSession:
        """Connect to the QMP UNIX socket at ``path``, waiting up to ``timeout`` s for it.

        Raises :class:`ConfigError` if no socket appears, :class:`QemuError` if the
        peer does not speak QMP.
        """
        path = Path(path)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if path.is_socket():
                client = QMPClient(name)
                try:
                    # A peer that accepts but never greets must not hang us.
                    remaining = max(0.5, deadline - time.monotonic())
                    await within(client.connect(str(path)), remaining)
                    return cls(client, str(path))
                except TimeoutError:
                    await _quiet_disconnect(client)
                    raise QemuError(
                        f"no QMP greeting on {path} within {timeout:.0f} s "
                        "(QEMU serves one QMP client at a time: is another one connected?)"
                    ) from None
                except (QMPError, OSError) as exc:
                    last = exc
                    await _quiet_disconnect(client)
            elif path.exists():
                raise ConfigError(f"{path} is not a UNIX socket")
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if last is None:
            raise ConfigError(f"no QMP socket at {path}")
        raise QemuError(f"cannot open a QMP session on {path}: {last}") from last

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        name: str,
        ssl_context: ssl.SSLContext,
        timeout: float = 10.0,
    ) -> QmpSession:
        """Connect to a QMP server on ``host:port`` over TLS (QEMU's ``-chardev
        socket,host=,port=,server=on,tls-creds=``), within ``timeout`` s.

        The server's certificate is checked against ``ssl_context`` (and against
        ``host`` when the context checks host names). Raises :class:`QemuError`
        if nothing answers, the TLS handshake fails or the peer does not speak QMP.
        """
        address = f"{host}:{port}"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            client = _TlsQmpClient(name)
            try:
                remaining = max(0.5, deadline - time.monotonic())
                await within(client.connect((host, port), ssl=ssl_context), remaining)
                return cls(client, address)
            except TimeoutError:
                await _quiet_disconnect(client)
                raise QemuError(
                    f"no QMP greeting from {address} within {timeout:.0f} s "
                    "(QEMU serves one QMP client at a time: is another one connected?)"
                ) from None
            except ssl.SSLError as exc:
                await _quiet_disconnect(client)
                raise QemuError(f"TLS with the QMP server at {address} failed: {exc}") from exc
            except (QMPError, OSError) as exc:
                last = exc
                await _quiet_disconnect(client)
                if isinstance(getattr(exc, "exc", None), ssl.SSLError):
                    raise QemuError(f"TLS with the QMP server at {address} failed: {exc}") from exc
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        raise QemuError(f"cannot open a QMP session on {address}: {last}") from last

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command; return its ``return`` value.

        Raises :class:`QemuError` with ``command`` and QEMU's error class/description,
        :class:`QmpTimeout` when no answer comes within ``timeout`` (default
        ``timeout_s``) seconds.
        """
        limit = self.timeout_s if timeout is None else timeout
        try:
            return await within(self._send(command, arguments), limit)
        except TimeoutError:
            raise QmpTimeout(
                f"{command} to {self.client.name}: no answer within {limit:g} s (QEMU stuck or "
                "unreachable)",
                command=command,
            ) from None

    async def gone(self) -> bool | None:
        """Whether this QEMU has provably exited: True when nothing listens on its
        QMP socket any more (or whatever accepts hangs up at once), False when a
        QEMU greets, None when that cannot be told (not a UNIX socket path, or a
        listener that stays silent: it may serve another client, or be stuck)."""
        if self.peer_pid is not None:
            # The QEMU at the other end of this session is a process on this host:
            # gone, a zombie or exiting (a SIGKILLed QEMU tears its RAM down before it
            # closes its sockets) is gone; otherwise it lives.
            return process_exited(self.peer_pid)
        path = Path(self.address)
        if not path.is_absolute():
            return None
        for _attempt in range(3):  # a dying QEMU may still hold its listener a moment
            if not path.exists():
                return True
            try:
                reader, writer = await within(asyncio.open_unix_connection(str(path)), 2.0)
            except (ConnectionRefusedError, FileNotFoundError):
                return True
            except (OSError, TimeoutError):
                return None
            try:
                greeting: bytes | None = await within(reader.read(6), 1.0)
            except (OSError, TimeoutError):
                greeting = None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if greeting:
                return False
            if greeting is None:
                return None
            await asyncio.sleep(0.2)  # hung up at once: look again
        return True

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError as exc:
            raise QemuError(
                f"{command} failed on {self.client.name}: {exc.error.error.desc}",
                command=command,
                detail={"class": exc.error_class, "desc": exc.error.error.desc},
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(
                f"{command}: lost the QMP session to {self.client.name} ({exc or type(exc).__name__})",
                command=command,
            ) from exc

    async def status(self, timeout: float | None = None) -> str:
        """The VM's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``...)."""
        result = await self.execute("query-status", timeout=timeout)
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise QemuError(f"query-status on {self.client.name}: unexpected answer {result!r:.80}")
        return str(result["status"])

    @contextmanager
    def listener(self, names: Iterable[str] = ()) -> Iterator[EventListener]:
        """Scope an event listener (all events when ``names`` is empty)."""
        with self.client.listener(tuple(names)) as events:
            yield events

    async def close(self) -> None:
        """End the session; a peer that does not let it end within
        :data:`CLOSE_TIMEOUT_S` (QEMU 7.2's TLS chardev) has its connection aborted."""
        if isinstance(self.client, _TlsQmpClient):
            # QEMU 7.2 never reads our TLS close_notify (see _TlsQmpClient), and
            # QMP has no goodbye: drop the connection instead of waiting on it.
            _abort(self.client)
        task = asyncio.ensure_future(_quiet_disconnect(self.client))
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            _abort(self.client)
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


#: ``PF_EXITING`` in /proc/PID/stat's flags: the process is in do_exit.
_PF_EXITING = 0x4


def process_exited(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, or already exiting."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X") or bool(flags & _PF_EXITING)


class _TlsQmpClient(QMPClient):
    """A QMP client for QEMU's TLS chardev, with a workaround for QEMU's reads.

    QEMU 7.2 reads a TLS chardev only when its socket turns readable, and its
    QMP monitor takes few bytes per read: the rest of a TLS record that gnutls
    already decrypted waits in gnutls until more bytes reach the socket (checked
    here: a command is answered only once something else is sent). Each message
    is therefore followed by a whitespace-only record (QMP ignores whitespace
    between messages), whose arrival keeps the socket readable until the
    command's record is consumed. Upstream QEMU later made its TLS channel
    report gnutls' pending data as readable.
    """

    def _do_send(self, msg: Message) -> None:
        super()._do_send(msg)
        writer = self._writer
        if writer is not None:
            writer.write(b"\n")  # a separate write: a separate TLS record


def _abort(client: QMPClient) -> None:
    """End the connection under the session: the peer's end is shut down at the
    socket, so the transport sees end-of-stream rather than an abort (asyncio
    3.11's TLS transport logs a spurious error when aborted)."""
    writer = getattr(client, "_writer", None)  # qemu.qmp keeps its stream here
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _peer_pid(client: QMPClient) -> int | None:
    """The QEMU process at the other end of a UNIX QMP socket (SO_PEERCRED), if any."""
    writer = getattr(client, "_writer", None)  # qemu.qmp keeps its stream here
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid if pid > 0 else None


async def _quiet_disconnect(client: QMPClient) -> None:
    # Disconnecting re-raises the error that broke the session, if any; at close time
    # the session is being discarded, so that error has already been reported.
    with contextlib.suppress(QMPError, OSError, EOFError):
        await client.disconnect()


class EventRecorder:
    """Records every event of a session from ``__aenter__`` on, with QEMU's timestamps.

    :meth:`wait_for` returns a recorded event or waits for one, so nothing that
    happens between two awaits is missed.
    """

    def __init__(self, session: QmpSession) -> None:
        self.session = session
        self.events: list[QmpEvent] = []
        self._listener = EventListener()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventRecorder:
        self.session.client.register_listener(self._listener)
        self._task = asyncio.create_task(self._drain(), name=f"events {self.session.client.name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ListenerError):
            self.session.client.remove_listener(self._listener)

    async def _drain(self) -> None:
        while True:
            msg = await self._listener.get()
            self.events.append(QmpEvent.from_message(msg))
            async with self._changed:
                self._changed.notify_all()

    def find(
        self,
        name: str,
        predicate: Callable[[QmpEvent], bool] | None = None,
        since: int = 0,
    ) -> QmpEvent | None:
        """The first recorded ``name`` event at index >= ``since`` that matches."""
        for event in self.events[since:]:
            if event.name == name and (predicate is None or predicate(event)):
                return event
        return None

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[QmpEvent], bool] | None = None,
        timeout: float = 10.0,
        since: int = 0,
    ) -> QmpEvent | None:
        """Like :meth:`find`, waiting up to ``timeout`` s; None if it never came."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while (event := self.find(name, predicate, since)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await within(self._changed.wait(), remaining)
            return event

    async def wait_any(self, timeout: float, since: int) -> None:
        """Return when an event beyond index ``since`` exists, or after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while len(self.events) <= since:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await within(self._changed.wait(), remaining)


def migration_status_is(*statuses: str) -> Callable[[QmpEvent], bool]:
    """Predicate for MIGRATION events whose ``status`` is one of ``statuses``."""
    return lambda event: event.data.get("status") in statuses
