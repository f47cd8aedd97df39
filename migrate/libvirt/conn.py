"""libvirt-python, imported once, and connections to the daemons.

libvirt delivers domain and QEMU monitor events only through an event loop
registered before connections open: :func:`open_connection` registers libvirt's
default implementation once per process and runs it in a daemon thread. Every
libvirt call blocks; callers run them in threads (``asyncio.to_thread``), one
connection per concurrent role (the migration job, the control calls), which is
how libvirt expects a job to be watched and steered while it runs.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from migrate.errors import ConfigError, LivemigError

try:  # libvirt-python is a dependency, but it builds against the system's libvirt.
    import libvirt
except ImportError:  # pragma: no cover - exercised only without the package
    libvirt = None

_loop_lock = threading.Lock()
_loop_started = False


class LibvirtError(LivemigError):
    """A libvirt call failed: ``call`` names it, ``code`` is libvirt's error code."""

    def __init__(self, message: str, call: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.call = call
        self.code = code


def require_libvirt() -> Any:
    """The ``libvirt`` module. Raises :class:`ConfigError` when it is missing."""
    if libvirt is None:
        raise ConfigError(
            "libvirt-python is not installed (pip install libvirt-python; it needs the "
            "system's libvirt-dev and pkg-config, see scripts/setup-system.sh)"
        )
    return libvirt


def translate(exc: Exception, call: str) -> LibvirtError:
    """A libvirt-python error as a :class:`LibvirtError` naming the call."""
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    message = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
    return LibvirtError(f"{call}: {message or exc}", call, code)


def _ignore_error(_context: object, _error: object) -> None:
    return None


def _run_event_loop() -> None:
    lv = require_libvirt()
    while True:
        lv.virEventRunDefaultImpl()


def ensure_event_loop() -> None:
    """Register libvirt's default event loop (once) and run it in a daemon thread."""
    global _loop_started
    lv = require_libvirt()
    with _loop_lock:
        if _loop_started:
            return
        # libvirt's default handler prints every error to stderr, also those the
        # engine expects and handles (a lookup that finds nothing): errors reach the
        # caller as exceptions only.
        lv.registerErrorHandler(_ignore_error, None)
        lv.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: str) -> Any:
    """A read-write connection to ``uri`` (events enabled). Raises :class:`LibvirtError`."""
    lv = require_libvirt()
    ensure_event_loop()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise translate(exc, f"connect {uri}") from exc
    if conn is None:  # pragma: no cover - older bindings returned None
        raise LibvirtError(f"connect {uri}: no connection", "connect")
    # A dead peer is noticed within ~15 s instead of a TCP timeout.
    with contextlib.suppress(lv.libvirtError):  # keepalive is optional
        conn.setKeepAlive(5, 3)
    return conn


def close_quietly(conn: Any) -> None:
    """Close a connection, ignoring a daemon that has already gone."""
    if conn is None:
        return
    lv = require_libvirt()
    with contextlib.suppress(lv.libvirtError):
        conn.close()
