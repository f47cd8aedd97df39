"""Running the agent (``livemig agent``): load the state, serve until SIGINT/SIGTERM.

The log goes to stderr and to ``DIR/agent.log``, one line per request, refusal
(``REFUSED ...``, TLS handshakes included) or cluster change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from migrate.agent import nodeinfo
from migrate.agent.app import AgentContext, RouteModule, create_app
from migrate.agent.metrics import AgentMetrics
from migrate.agent.tlsgate import GatedTLSSite
from migrate.cluster import tls
from migrate.cluster.address import Address
from migrate.cluster.errors import StateError
from migrate.cluster.state import AGENT_LOG, StateDir

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def agent_logger(state: StateDir, name: str) -> logging.Logger:
    """The agent's logger: stderr and ``agent.log`` in the state directory."""
    log = logging.getLogger(f"livemig.agent.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(state.file(AGENT_LOG))):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def load_context(state: StateDir) -> AgentContext:
    """The agent's context from ``state``; raises :class:`StateError` without a cluster."""
    identity = state.require_member()
    state.node_cert()
    state.ca_cert()
    ctx = AgentContext(state, identity, AgentMetrics(), agent_logger(state, identity.name))
    ctx.cpu = nodeinfo.probe_cpu_summary(identity.name)
    return ctx


async def serve(
    state: StateDir,
    listen: Address | None = None,
    extra: Sequence[RouteModule] = (),
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the agent of ``state`` on ``listen`` (default: the node's address) until
    ``stop`` is set or SIGINT/SIGTERM arrives."""
    ctx = load_context(state)
    where = listen or ctx.identity.address
    try:
        server_tls = tls.server_context(state)
    except OSError as exc:
        raise StateError(f"cannot load the node certificate: {exc}") from None
    app = create_app(ctx, extra)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def refused(peer: str, exc: BaseException) -> None:
        ctx.metrics.refusals.labels(reason="tls-handshake").inc()
        ctx.log.warning("REFUSED %s TLS handshake: %s", peer, _tls_reason(exc))

    try:
        site = GatedTLSSite(runner, where.host, where.port, server_tls, refused)
        try:
            await site.start()
        except OSError as exc:
            raise StateError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        ctx.log.info(
            "agent %s listening on %s (state %s)", ctx.identity.name, site.name, state.path
        )
        await stop.wait()
        ctx.log.info("agent %s stopping", ctx.identity.name)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
        for handler in list(ctx.log.handlers):
            handler.close()


def _tls_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        detail = getattr(exc, "verify_message", None)
        text = reason.lower().replace("_", " ")
        return f"{text} ({detail})" if isinstance(detail, str) and detail else text
    return str(exc) or type(exc).__name__


def run_agent(state: StateDir, listen: Address | None = None) -> int:
    """The foreground agent; returns an exit code (0 after SIGINT/SIGTERM)."""
    asyncio.run(serve(state, listen))
    return 0
