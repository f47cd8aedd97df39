"""``python -m migrate.pagestream.agent --role sender|receiver``: one end of a stream.

The engine starts one agent per host, inside that host's network namespace
(``ip netns exec NS python -m migrate.pagestream.agent ...``) or in its own when
there is none; across real hosts the target's node agent starts the receiver and
relays this channel over its API (``migrate.agent.streamlink``). The engine
drives it over a JSON-lines control channel::

    engine → agent (stdin)   {"id": 1, "cmd": "sweep", "args": {...}}
    agent → engine (stdout)  {"id": 1, "ok": true, "result": {...}}
                             {"id": 1, "ok": false, "error": {"type": ..., "message": ...}}
                             {"event": "applied", ...}        (receiver, unsolicited)

Sender commands: ``open``, ``sweep`` (one pre-copy round), ``final`` (the last
sweep, with the VM stopped, and the digest), ``close``. Receiver commands:
``listen`` (then the stream is served on a thread, reporting events), ``close``.
End of stdin ends the agent; the engine also kills it if it does not go (and it
dies with the engine: PDEATHSIG). Logs and tracebacks go to stderr.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from dirtytrack.errors import DirtyTrackError
from dirtytrack.trackers import TrackerKind
from migrate.errors import ConfigError, StreamError
from migrate.pagestream.receiver import PageReceiver, ReceiverConfig
from migrate.pagestream.sender import PageSender, SenderConfig, find_mapping_pid
from migrate.tls import NodeCredentials

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class Channel:
    """Writes replies and events as JSON lines; safe from several threads."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def write(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def event(self, name: str, data: dict[str, Any]) -> None:
        self.write({"event": name, **data})


def _credentials(value: Any) -> NodeCredentials:
    """``{"ca": PATH, "cert": PATH, "key": PATH}`` as :class:`NodeCredentials`."""
    if not isinstance(value, dict) or set(value) != {"ca", "cert", "key"}:
        raise ConfigError("tls must be an object with exactly ca, cert and key paths")
    if not all(isinstance(v, str) and v for v in value.values()):
        raise ConfigError("tls paths must be non-empty strings")
    return NodeCredentials(Path(value["ca"]), Path(value["cert"]), Path(value["key"]))


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An exception as the engine will rebuild it (see ``control.AgentProcess``)."""
    if isinstance(exc, StreamError):
        return {
            "type": "StreamError",
            "message": str(exc),
            "side": exc.side,
            "kind": exc.kind,
            "detail": _jsonable(exc.detail),
        }
    if isinstance(exc, ConfigError | DirtyTrackError):
        return {"type": "ConfigError", "message": f"{type(exc).__name__}: {exc}"}
    if isinstance(exc, OSError):
        return {"type": "StreamError", "message": str(exc), "kind": "transport"}
    return {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}"}


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def _session(args: dict[str, Any]) -> bytes:
    return base64.b64decode(str(args["session"]))


# --- sender -----------------------------------------------------------------------


class SenderAgent:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sender: PageSender | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "open": self.open,
            "sweep": self.sweep,
            "final": self.final,
            "close": self.close,
        }

    def _require(self) -> PageSender:
        if self.sender is None:
            raise StreamError("sender not opened", side="sender", kind="config")
        return self.sender

    def open(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.sender is not None:
            raise StreamError("sender already open", side="sender", kind="config")
        ram_path = Path(args["ram_path"])
        preference = tuple(TrackerKind(kind) for kind in args.get("tracker") or ())
        config = SenderConfig(
            ram_path=ram_path,
            host=str(args["host"]),
            port=int(args["port"]),
            session=_session(args),
            qemu_pid=find_mapping_pid(ram_path),
            max_threads=int(args.get("max_threads", 2)),
            rate_limit_bytes_per_s=args.get("rate_limit_bytes_per_s"),
        )
        if args.get("tls") is not None:
            config = dataclasses.replace(
                config, tls=_credentials(args["tls"]), tls_hostname=args.get("tls_hostname")
            )
        if preference:
            config = dataclasses.replace(config, tracker=preference)
        if "batch_pages" in args:
            config = dataclasses.replace(config, batch_pages=int(args["batch_pages"]))
        if "start_level" in args:
            config = dataclasses.replace(config, start_level=args["start_level"])
        self.sender = PageSender.open(config)
        return {
            "tracker": self.sender.tracker.name,
            "tracker_reason": self.sender.tracker_reason,
            "tracker_memory_bytes": self.sender.tracker.memory_overhead_bytes,
            "page_count": self.sender.tracker.page_count,
            "qemu_pid": config.qemu_pid,
        }

    def sweep(self, args: dict[str, Any]) -> dict[str, Any]:
        sender = self._require()
        if "rate_limit_bytes_per_s" in args:
            sender.config = dataclasses.replace(
                sender.config, rate_limit_bytes_per_s=args["rate_limit_bytes_per_s"]
            )
        return dataclasses.asdict(sender.sweep(final=False))

    def final(self, args: dict[str, Any]) -> dict[str, Any]:
        sender = self._require()
        stats = sender.sweep(final=True)
        digest = sender.send_digest()
        return {
            "round": dataclasses.asdict(stats),
            "digest": dataclasses.asdict(digest),
            "zero_at_start": sender.zero_at_start,
        }

    def close(self, args: dict[str, Any]) -> dict[str, Any]:
        self.shutdown()
        return {}

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


# --- receiver ---------------------------------------------------------------------


class ReceiverAgent:
    def __init__(self, channel: Channel, receiver_type: type[PageReceiver] = PageReceiver) -> None:
        self.channel = channel
        self.receiver_type = receiver_type
        self.receiver: PageReceiver | None = None
        self.thread: threading.Thread | None = None

    def handlers(self) -> dict[str, Handler]:
        return {"listen": self.listen, "close": self.close}

    def listen(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.receiver is not None:
            raise StreamError("receiver already listening", side="receiver", kind="config")
        config = ReceiverConfig(
            ram_path=Path(args["ram_path"]),
            host=str(args["host"]),
            port=int(args.get("port", 0)),
            session=_session(args),
        )
        if "accept_timeout_s" in args:
            config = dataclasses.replace(config, accept_timeout_s=float(args["accept_timeout_s"]))
        if args.get("tls") is not None:
            config = dataclasses.replace(config, tls=_credentials(args["tls"]))
            if args.get("peer_name") is not None:
                config = dataclasses.replace(config, peer_name=str(args["peer_name"]))
        self.receiver = self.receiver_type.bind(config, self.channel.event)
        self.thread = threading.Thread(target=self._serve, name="receiver", daemon=True)
        self.thread.start()
        return {"port": self.receiver.port, "page_count": self.receiver.ram.page_count}

    def _serve(self) -> None:
        assert self.receiver is not None
        try:
            self.receiver.run()
        except Exception as exc:  # noqa: BLE001 - the thread's boundary: report, never lose
            traceback.print_exc(file=sys.stderr)
            self.channel.event("failed", {"error": error_payload(exc)})
        else:
            self.channel.event("done", {"verified": self.receiver.verified})

    def close(self, args: dict[str, Any]) -> dict[str, Any]:
        self.shutdown()
        return {}

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.receiver = None
        self.thread = None


# --- the control loop -------------------------------------------------------------


def serve(
    role: str,
    stdin: TextIO,
    stdout: TextIO,
    receiver_type: type[PageReceiver] = PageReceiver,
) -> int:
    """Answer commands from ``stdin`` until it ends. Returns the exit code.

    ``receiver_type`` is the receiver a ``listen`` binds (a subclass may observe
    or extend it; the stream and its checks are :class:`PageReceiver`'s).
    """
    channel = Channel(stdout)
    agent: SenderAgent | ReceiverAgent = (
        SenderAgent(channel) if role == "sender" else ReceiverAgent(channel, receiver_type)
    )
    handlers = agent.handlers()
    try:
        for line in stdin:
            if not line.strip():
                continue
            request_id: object = None
            try:
                message = json.loads(line)
                request_id = message.get("id")
                handler = handlers.get(str(message.get("cmd")))
                if handler is None:
                    raise ConfigError(f"unknown {role} command {message.get('cmd')!r}")
                result = handler(dict(message.get("args") or {}))
            except Exception as exc:  # noqa: BLE001 - the agent's boundary: every failure goes to the engine
                traceback.print_exc(file=sys.stderr)
                channel.write({"id": request_id, "ok": False, "error": error_payload(exc)})
                continue
            channel.write({"id": request_id, "ok": True, "result": result})
    finally:
        agent.shutdown()
    return 0


def main(
    argv: Sequence[str] | None = None, receiver_type: type[PageReceiver] = PageReceiver
) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrate.pagestream.agent")
    parser.add_argument("--role", choices=["sender", "receiver"], required=True)
    args = parser.parse_args(argv)
    return serve(args.role, sys.stdin, sys.stdout, receiver_type)


if __name__ == "__main__":
    sys.exit(main())
