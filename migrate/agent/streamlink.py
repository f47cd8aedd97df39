"""pagestream's receiver across agents: the target's agent runs it, the source's engine drives it.

The receiver writes guest RAM that only the target host can map, so the target
node's agent starts it (a child process of the agent, on the agent's own host)
and relays its JSON-lines control channel over a websocket of the agent's
mutual-TLS API::

    source engine ── AgentReceiver ══ wss GET /v1/vms/NAME/incoming/pagestream ══▶ target agent
                                                                                  │ stdin/stdout
                                                                                  ▼
                                                          python -m migrate.pagestream.agent
                                                          --role receiver  (ram: the VM's file)

The source names no path of the target: ``listen`` carries only the stream's
session key and whether it runs over TLS; the target agent fills in its VM's RAM
file, its own address and its node credentials. Every other command but
``close`` is refused. Each line the receiver writes goes to the websocket as one
text message; when it exits the relay sends ``{"exited": {...}}`` (its exit
code, the tail of its stderr) and closes. When the websocket closes first (the
source's migration ended, was cancelled, or its agent died: pings go unanswered) the
relay ends the receiver: end of stdin, SIGTERM, SIGKILL, reaped. An incoming
migration has at most one receiver; discarding the incoming VM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from typing import Any, Final

import aiohttp
from aiohttp import web

from migrate.agent.app import AgentContext, Refusal, context, peer
from migrate.agent.client import AgentClient
from migrate.agent.vms import VmManager
from migrate.cluster.address import parse_address
from migrate.deadline import within
from migrate.errors import StreamError
from migrate.pagestream.control import AgentChannel, AgentProcess, AgentRole
from migrate.tls import NodeCredentials

#: The websocket's ping interval (s); a pong must follow within half of it. Long
#: enough for a busy event loop (the source's runs the engine), short enough that a
#: receiver whose source agent died goes within ~15 s.
HEARTBEAT_S: Final = 10.0
#: Largest control message (a scan result or an error may carry lists).
MAX_MESSAGE_BYTES: Final = 16 << 20
#: Deadline (s) of the websocket handshake (TCP, TLS, HTTP upgrade).
CONNECT_TIMEOUT_S: Final = 15.0
#: What the source may ask of the receiver; ``listen`` is rewritten by the target.
_COMMANDS: Final = frozenset({"listen", "close"})
_LISTEN_ARGS: Final = frozenset({"session", "tls", "accept_timeout_s"})


def path(vm: str) -> str:
    return f"/v1/vms/{vm}/incoming/pagestream"


# --- the target's side: the relay ------------------------------------------------------


def receivers(ctx: AgentContext) -> dict[str, asyncio.Task[None]]:
    """The running relays, by incoming VM name."""
    found = ctx.services.setdefault("pagestream_receivers", {})
    assert isinstance(found, dict)
    return found


async def end_receiver(ctx: AgentContext, vm: str, timeout_s: float = 10.0) -> None:
    """End ``vm``'s relay and its receiver, if any (the incoming VM is dropped)."""
    task = receivers(ctx).get(vm)
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await within(asyncio.shield(task), timeout_s)


class _Relayed(AgentProcess):
    """The receiver process, each stdout line passed on to the websocket."""

    def __init__(self, ws: web.WebSocketResponse, log_path: Any) -> None:
        super().__init__(AgentRole.RECEIVER, None, log_path)
        self.ws = ws
        self.gone = asyncio.Event()
        self.exit_message: dict[str, Any] = {}

    async def _on_line(self, line: bytes, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(line.decode(errors="replace").rstrip("\n"))

    async def _ended(self, error: StreamError) -> None:
        await super()._ended(error)
        self.exit_message = {
            "exited": {"message": str(error), "exit_code": self.returncode,
                       "stderr": self.stderr_tail[-10:]},
        }  # fmt: skip
        self.gone.set()


def vet(
    message: Any,
    vm_ram: str,
    host: str,
    creds: NodeCredentials | None,
    peer_name: str | None = None,
) -> dict[str, Any]:
    """The source's command as the receiver gets it. ``listen`` takes this host's
    RAM file, address and credentials (``creds``: TLS was asked for), and with TLS
    the node the stream must come from (``peer_name``: the member that opened the
    relay; the receiver refuses any other node's certificate). Raises
    :class:`ValueError` (one line) for anything else."""
    if not isinstance(message, dict) or message.get("cmd") not in _COMMANDS:
        cmd = message.get("cmd") if isinstance(message, dict) else None
        raise ValueError(f"the receiver relay takes listen and close, not {cmd!r}")
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ValueError("a command needs an integer id")
    args = message.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("args must be an object")
    if message["cmd"] == "close":
        return {"id": request_id, "cmd": "close", "args": {}}
    unknown = sorted(set(args) - _LISTEN_ARGS)
    if unknown:
        raise ValueError(f"listen: the target chooses {', '.join(unknown)}")
    if not isinstance(args.get("session"), str) or not isinstance(args.get("tls"), bool):
        raise ValueError("listen needs a session (base64) and tls (true or false)")
    listen: dict[str, Any] = {"ram_path": vm_ram, "host": host, "port": 0,
                              "session": args["session"]}  # fmt: skip
    if "accept_timeout_s" in args:
        timeout = args["accept_timeout_s"]
        if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise ValueError("accept_timeout_s must be a number in (0, 600]")
        listen["accept_timeout_s"] = float(timeout)
    if args["tls"]:
        if creds is None:
            raise ValueError("listen: this node has no TLS credentials for the stream")
        listen["tls"] = {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)}
        if peer_name is not None:
            listen["peer_name"] = peer_name
    return {"id": request_id, "cmd": "listen", "args": listen}


async def receiver_socket(request: web.Request) -> web.StreamResponse:
    """``GET /v1/vms/NAME/incoming/pagestream`` (websocket): start and relay the receiver."""
    from migrate.agent.routes_vm import _name, _target, manager

    ctx = context(request)
    name = _name(request)
    vms = manager(ctx)
    _target(vms, name)
    run = vms.alive(name)
    if run is None or not run.ram_path:
        raise Refusal(409, f"VM {name!r}'s incoming QEMU is not running", "vm")
    running = receivers(ctx).get(name)
    if running is not None and not running.done():
        raise Refusal(409, f"VM {name!r} already has a pagestream receiver", "busy")
    task = asyncio.current_task()
    assert task is not None
    receivers(ctx)[name] = task  # before any await: a second request is refused
    try:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        who = peer(request)
        await _relay(ctx, vms, name, run.ram_path, ws, who.name if who is not None else None)
    finally:
        if receivers(ctx).get(name) is task:
            receivers(ctx).pop(name, None)
    return ws


async def _relay(
    ctx: AgentContext,
    vms: VmManager,
    name: str,
    ram: str,
    ws: web.WebSocketResponse,
    source: str | None,
) -> None:
    proc = _Relayed(ws, vms.dir(name) / "pagestream-receiver.log")
    try:
        await proc.start()
    except StreamError as exc:
        await ws.send_str(json.dumps({"exited": {"message": str(exc), "exit_code": None}}))
        await ws.close()
        return
    ctx.log.info("VM %s: pagestream receiver started (pid %s)", name, proc.pid)
    inbound = asyncio.create_task(_inbound(ctx, vms, name, ram, ws, proc, source), name="relay in")
    gone = asyncio.create_task(proc.gone.wait(), name="relay exit")
    try:
        await asyncio.wait({inbound, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(proc.exit_message))
    finally:
        for task in (inbound, gone):
            task.cancel()
        await asyncio.gather(inbound, gone, return_exceptions=True)
        # Cancelled or not, the receiver does not outlive its relay.
        await asyncio.shield(proc.close())
        with contextlib.suppress(ConnectionError, RuntimeError):
            await within(asyncio.shield(ws.close()), 5.0)
        code = proc.returncode
        log = ctx.log.info if code == 0 else ctx.log.warning
        log("VM %s: pagestream receiver ended (exit code %s)%s", name, code,
            "" if code == 0 else ": " + " | ".join(proc.stderr_tail[-3:]))  # fmt: skip


async def _inbound(
    ctx: AgentContext,
    vms: VmManager,
    name: str,
    ram: str,
    ws: web.WebSocketResponse,
    proc: _Relayed,
    source: str | None,
) -> None:
    """The source's commands, vetted, to the receiver's stdin, until the websocket closes."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        parsed: Any = None
        try:
            parsed = json.loads(msg.data)
            creds = None
            if isinstance(parsed, dict) and (parsed.get("args") or {}).get("tls") is True:
                tls_dir = await asyncio.to_thread(vms.tls_dir, name)
                creds = NodeCredentials.from_qemu_dir(tls_dir, "server")
            line = vet(parsed, ram, vms.host, creds, source)
        except (ValueError, AttributeError) as exc:
            ctx.log.warning("VM %s: pagestream relay refused a command: %s", name, exc)
            request_id = parsed.get("id") if isinstance(parsed, dict) else None
            reply = {"id": request_id, "ok": False,
                     "error": {"type": "ConfigError", "message": str(exc)}}  # fmt: skip
            await ws.send_str(json.dumps(reply))
            continue
        try:
            await proc.send_raw(json.dumps(line) + "\n")
        except (BrokenPipeError, ConnectionResetError):
            return


# --- the source's side: the client -----------------------------------------------------


class AgentReceiver(AgentChannel):
    """The receiver a target node's agent runs, driven over its websocket relay.

    Made by the source's agent for the engine (``MigrationRequest.target_receiver``);
    ``ssl_context`` is the cluster client's (this node's certificate, the cluster CA).
    """

    def __init__(self, ssl_context: ssl.SSLContext, address: str, vm: str) -> None:
        super().__init__(AgentRole.RECEIVER)
        self.address = address
        self.url = parse_address(address).url + path(vm)
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    def factory(cls, client: AgentClient, address: str, vm: str) -> Any:
        """A ``target_receiver`` for the engine: a new channel per call."""
        return lambda: cls(client.ssl_context, address, vm)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=1),
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S),
        )
        try:
            self._ws = await within(
                self._session.ws_connect(
                    self.url, heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES
                ),
                CONNECT_TIMEOUT_S,
            )
        except aiohttp.WSServerHandshakeError as exc:
            reason = await self._refusal(self._session, exc.status)
            await self._session.close()
            raise StreamError(
                f"agent {self.address} did not start the receiver: {reason}",
                side="receiver", kind="agent",
            ) from exc  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._session.close()
            raise StreamError(
                f"cannot reach agent {self.address} for the receiver: {exc or 'timeout'}",
                side="receiver", kind="agent",
            ) from exc  # fmt: skip
        self._started = True
        self._reader = asyncio.create_task(self._read(self._ws), name="receiver relay")

    async def _refusal(self, session: aiohttp.ClientSession, status: int) -> str:
        """The agent's one-line refusal: the handshake error does not carry the body,
        so the same path is asked again without the upgrade (it refuses the same way,
        or answers 400 for the missing upgrade: nothing starts)."""
        try:
            async with session.get(
                self.url, timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        return str(error) if isinstance(error, str) else f"HTTP {status}"

    async def _send(self, line: str) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionResetError("the relay's websocket is closed")
        await ws.send_str(line.rstrip("\n"))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        error: StreamError | None = None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                exited = message.get("exited")
                if isinstance(exited, dict):
                    error = StreamError(
                        f"on node {self.address}: {exited.get('message')}",
                        side="receiver", kind="agent", detail=exited,
                    )  # fmt: skip
                    break
                await self._receive(message)
        finally:
            await self._ended(
                error
                or StreamError(
                    f"the receiver relay of agent {self.address} closed"
                    + (f" ({ws.exception()})" if ws.exception() else ""),
                    side="receiver",
                    kind="agent",
                )
            )

    async def close(self, timeout: float = 5.0) -> None:
        """Close the websocket (the target agent then ends the receiver) and wait for
        the relay's last word, at most ``timeout`` s."""
        try:
            if self._ws is not None and not self._ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                    await within(self._ws.close(), timeout)
            if self._reader is not None and not self._reader.done():
                with contextlib.suppress(TimeoutError):
                    await within(asyncio.shield(self._reader), timeout)
                if not self._reader.done():
                    self._reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reader
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
