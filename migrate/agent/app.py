"""The agent's aiohttp application: routes, the mutual-TLS rule, one log line per request.

Routes come from *route modules*: functions ``register(router: Router)`` that add
their handlers with :meth:`Router.add`. :func:`create_app` installs the default ones
(cluster, node, metrics, OpenAPI) and any extra modules handed to it — that is
where VM endpoints plug in::

    def register(router: Router) -> None:
        router.add("GET", "/v1/vms", list_vms, summary="List VMs")

    app = create_app(context, extra=[register])

Every route requires a client certificate signed by the cluster CA, of a node in
this agent's member list (the very certificate recorded when it joined), unless it was
added with ``public=True`` (only ``GET /v1/cluster/ca`` and ``POST /v1/cluster/join``
are). The TLS layer already refuses a certificate from another CA; the middleware
refuses a request without one (403) and records who called (:class:`Peer`, in
``request[PEER]``). Handlers refuse with :class:`Refusal`; every request and every
refusal is one line in the agent's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from migrate.agent.metrics import AgentMetrics
from migrate.agent.tlsgate import peer_text
from migrate.cluster import pki
from migrate.cluster.errors import TrustError
from migrate.cluster.state import NodeIdentity, StateDir
from migrate.errors import LivemigError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteModule = Callable[["Router"], None]

#: Largest JSON body a route reads (a CSR and a token fit many times over).
MAX_BODY_BYTES = 256 * 1024


@dataclass(frozen=True)
class Peer:
    """Who is calling: the CN of a cluster certificate and its fingerprint."""

    name: str
    cert_sha256: str


@dataclass
class AgentContext:
    """What every handler may use: the state directory, this node, metrics, the log.

    ``tasks`` holds background work (member pushes) that the agent awaits on shutdown.
    """

    state: StateDir
    identity: NodeIdentity
    metrics: AgentMetrics
    log: logging.Logger
    started_at: float = field(default_factory=time.monotonic)
    cpu: dict[str, Any] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: What route modules keep for the agent's lifetime (e.g. ``"vms"``: the VM manager).
    services: dict[str, Any] = field(default_factory=dict)

    def spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


CONTEXT = web.AppKey("livemig_agent_context", AgentContext)
ROUTES = web.AppKey("livemig_agent_routes", list)  # list[RouteSpec]
PUBLIC = web.AppKey("livemig_agent_public", set)  # set[tuple[method, path]]
PEER = web.RequestKey("livemig_peer", Peer)


class Refusal(Exception):
    """A handler's refusal: HTTP ``status`` with a one-line ``message``; ``reason`` is
    the short label counted in the refusal metric."""

    def __init__(self, status: int, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    public: bool
    summary: str


class Router:
    """Collects the routes route modules add."""

    def __init__(self) -> None:
        self.specs: list[RouteSpec] = []
        #: Called with the context when the application starts, and when it shuts down.
        self.startup: list[Callable[[AgentContext], Awaitable[None]]] = []
        self.shutdown: list[Callable[[AgentContext], Awaitable[None]]] = []

    def add(
        self, method: str, path: str, handler: Handler, *, summary: str, public: bool = False
    ) -> None:
        """Add a route; ``public`` routes are reachable without a client certificate."""
        if any(s.method == method and s.path == path for s in self.specs):
            raise ValueError(f"route {method} {path} added twice")
        self.specs.append(RouteSpec(method, path, handler, public, summary))


def context(request: web.Request) -> AgentContext:
    return request.app[CONTEXT]


def peer(request: web.Request) -> Peer | None:
    """The calling member (None on a public route called without a certificate)."""
    value = request.get(PEER)
    return value if isinstance(value, Peer) else None


async def read_json(request: web.Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object body, at most ``limit`` bytes; raises
    :class:`Refusal` (400/413)."""
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(413, f"body larger than {limit} bytes", "bad-request")
    raw = bytearray()  # read() returns what has arrived, not the whole body
    while len(raw) <= limit and (chunk := await request.content.read(1 << 16)):
        raw += chunk
    if len(raw) > limit:
        raise Refusal(413, f"body larger than {limit} bytes", "bad-request")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "body is not JSON", "bad-request") from None
    if not isinstance(body, dict):
        raise Refusal(400, "body is not a JSON object", "bad-request")
    return body


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, sort_keys=False))


def _peer_from_tls(request: web.Request, ctx: AgentContext) -> Peer | None:
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = pki.load_cert_der(der)
    except TrustError:
        return None
    # The handshake verified the chain already; this is the same rule, said again
    # where the identity is taken (a server context loaded with more CAs would not
    # silently let their certificates in).
    if not pki.issued_by(cert, ctx.state.ca_cert()):
        return None
    return Peer(pki.common_name(cert), pki.fingerprint_der(der))


def _is_member(ctx: AgentContext, who: Peer) -> bool:
    """Whether ``who`` is in this node's member list with this very certificate (a
    CA-signed certificate of a removed node, or an older one of a member, is not)."""
    return any(m.name == who.name and m.cert_sha256 == who.cert_sha256 for m in ctx.state.members())


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    start = time.monotonic()
    route = _route_label(request)
    who = _peer_from_tls(request, ctx)
    if who is not None:
        request[PEER] = who
    remote = peer_text(request.transport.get_extra_info("peername") if request.transport else None)
    caller = who.name if who is not None else "-"
    line = f"{remote} {caller} {request.method} {request.path}"
    status = 500
    try:
        public = (request.method, route) in request.app[PUBLIC]
        if who is None and not public:
            raise Refusal(403, "a cluster client certificate is required", "no-client-cert")
        if who is not None and not public and not _is_member(ctx, who):
            raise Refusal(
                403,
                f"node {who.name!r} (certificate {who.cert_sha256[:16]}...) is not a member "
                "of this cluster",
                "not-member",
            )
        response = await handler(request)
        status = response.status
        return response
    except Refusal as exc:
        status = exc.status
        ctx.metrics.refusals.labels(reason=exc.reason).inc()
        ctx.log.warning("REFUSED %s -> %d: %s", line, exc.status, exc)
        return json_response({"error": str(exc), "reason": exc.reason}, status=exc.status)
    except web.HTTPException as exc:
        status = exc.status
        ctx.log.warning("%s -> %d: %s", line, exc.status, exc.reason)
        raise
    except LivemigError as exc:  # e.g. a state file that cannot be read
        ctx.log.error("%s -> 500: %s", line, exc)
        return json_response({"error": str(exc), "reason": "internal"}, status=500)
    finally:
        ctx.metrics.requests.labels(method=request.method, route=route, code=str(status)).inc()
        if status < 400:
            ctx.log.info("%s -> %d (%.1f ms)", line, status, (time.monotonic() - start) * 1000)


def default_modules() -> list[RouteModule]:
    from migrate.agent import routes_cluster, routes_migrate, routes_node, routes_vm

    return [
        routes_cluster.register,
        routes_node.register,
        routes_vm.register,
        routes_migrate.register,
    ]


def create_app(ctx: AgentContext, extra: Sequence[RouteModule] = ()) -> web.Application:
    """The agent's application for ``ctx``, with the default routes and ``extra``'s."""
    router = Router()
    for register in (*default_modules(), *extra):
        register(router)
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = ctx
    app[ROUTES] = list(router.specs)
    app[PUBLIC] = {(s.method, s.path) for s in router.specs if s.public}
    for spec in router.specs:
        app.router.add_route(spec.method, spec.path, spec.handler)

    async def drain(_app: web.Application) -> None:
        for hook in router.shutdown:
            await hook(ctx)
        if ctx.tasks:
            await asyncio.wait(set(ctx.tasks), timeout=10.0)

    async def start(_app: web.Application) -> None:
        for hook in router.startup:
            await hook(ctx)

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    return app
