"""VM routes: this node's VMs (define, start, stop, adopt, list, show) and the target
side of a migration (incoming QEMU, its RAM's digests and page writes, commit, discard).

The target side is called by the source node's agent (see ``migrate.agent.migrations``)::

    POST /v1/vms/NAME/incoming   {definition, source}  → QEMU -incoming defer -S, QMP over
                                                         TCP+TLS on this node's address
    GET  /v1/vms/NAME/incoming/pagestream (websocket)  → pagestream's receiver, started and
                                                         relayed by this agent (streamlink)
    GET  /v1/vms/NAME/ram/digest                       → chunk digest of its RAM
    POST /v1/vms/NAME/ram/page-hashes {pages}          → one xxh3 per page
    POST /v1/vms/NAME/ram/pages {pages, data}          → write pages (only while paused)
    POST /v1/vms/NAME/incoming/commit                  → this node owns the VM now
    POST /v1/vms/NAME/incoming/discard                 → stop it, forget the definition
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from migrate.agent import streamlink
from migrate.agent.app import (
    AgentContext,
    Refusal,
    Router,
    context,
    json_response,
    peer,
    read_json,
)
from migrate.agent.vms import VmError, VmManager
from migrate.errors import ConfigError, LivemigError
from migrate.integrity import MAX_REPAIR_PAGES
from migrate.remoteram import RamOwner, encode_digest
from migrate.validate import PLAIN_NAME
from migrate.vmdef import VmDefinition

#: Largest page-write body: the repair bound's pages, base64, and room for the JSON.
MAX_PAGES_BODY = (MAX_REPAIR_PAGES * 4096 * 4) // 3 + (1 << 20)
#: Largest page list (all pages of a 64 GiB guest) in a page-hashes request.
MAX_HASH_BODY = 32 << 20


def register(router: Router) -> None:
    add = router.add
    add("GET", "/v1/vms", list_vms, summary="This node's VMs")
    add("POST", "/v1/vms", create_vm, summary="Define a VM on this node (and start it)")
    add(
        "POST", "/v1/vms/adopt", adopt_vm, summary="Adopt a QEMU started elsewhere (its QMP socket)"
    )
    add("GET", "/v1/vms/{name}", show_vm, summary="One VM: definition and state")
    add("POST", "/v1/vms/{name}/start", start_vm, summary="Start a defined VM")
    add("POST", "/v1/vms/{name}/stop", stop_vm, summary="Stop a VM (it stays defined)")
    add("POST", "/v1/vms/{name}/incoming", incoming, summary="Start a migration's target QEMU")
    add(
        "GET",
        streamlink.path("{name}"),
        streamlink.receiver_socket,
        summary="pagestream's receiver for an incoming VM (websocket relay)",
    )
    add("POST", "/v1/vms/{name}/incoming/commit", commit, summary="Own a VM migrated here")
    add("POST", "/v1/vms/{name}/incoming/discard", discard, summary="Drop a migration's target")
    add("GET", "/v1/vms/{name}/ram/digest", ram_digest, summary="Chunk digest of the VM's RAM")
    add("POST", "/v1/vms/{name}/ram/page-hashes", ram_page_hashes, summary="Hashes of RAM pages")
    add(
        "POST",
        "/v1/vms/{name}/ram/pages",
        ram_write_pages,
        summary="Write RAM pages (paused target)",
    )
    router.startup.append(_startup)


async def _startup(ctx: AgentContext) -> None:
    vms = manager(ctx)
    found = await asyncio.to_thread(vms.readopt)
    if found:
        ctx.log.info("re-adopted %d VM(s): %s", len(found), ", ".join(found))


def manager(ctx: AgentContext) -> VmManager:
    vms = ctx.services.get("vms")
    if not isinstance(vms, VmManager):
        vms = VmManager(ctx.state.path, ctx.identity.name, ctx.identity.address.host, ctx.log)
        ctx.services["vms"] = vms
    return vms


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not PLAIN_NAME.fullmatch(name) or len(name) > 64:
        raise Refusal(400, f"bad VM name {name!r}", "bad-request")
    return name


async def _guarded(coro: Any) -> Any:
    try:
        return await coro
    except VmError as exc:
        raise Refusal(exc.status, str(exc), "vm") from None
    except ConfigError as exc:
        raise Refusal(400, str(exc), "bad-request") from None


async def list_vms(request: web.Request) -> web.Response:
    vms = manager(context(request))
    return json_response({"node": vms.node, "vms": [await vms.describe(n) for n in vms.names()]})


async def show_vm(request: web.Request) -> web.Response:
    vms = manager(context(request))
    return json_response(await _guarded(vms.describe(_name(request))))


async def create_vm(request: web.Request) -> web.Response:
    body = await read_json(request)
    vms = manager(context(request))
    try:
        definition = VmDefinition.from_dict(body.get("definition"))
    except ConfigError as exc:
        raise Refusal(400, f"bad VM definition: {exc}", "bad-request") from None
    start = body.get("start", True)
    async with vms.lock(definition.name):
        await _guarded(_create(vms, definition))
        if start is True:
            try:
                await vms.launch(definition)
            except VmError as exc:
                await vms.forget(definition.name)
                raise Refusal(exc.status, str(exc), "vm") from None
    return json_response(await vms.describe(definition.name))


async def _create(vms: VmManager, definition: VmDefinition) -> None:
    vms.create(definition)


async def adopt_vm(request: web.Request) -> web.Response:
    body = await read_json(request)
    socket = body.get("qmp_socket")
    name = body.get("name")
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise Refusal(400, "qmp_socket must be an absolute path", "bad-request")
    if name is not None and (not isinstance(name, str) or not PLAIN_NAME.fullmatch(name)):
        raise Refusal(400, f"bad VM name {name!r}", "bad-request")
    vms = manager(context(request))
    definition = await _guarded(vms.adopt(Path(socket), name))
    return json_response(await vms.describe(definition.name))


async def start_vm(request: web.Request) -> web.Response:
    name = _name(request)
    vms = manager(context(request))
    async with vms.lock(name):
        await _guarded(vms.start(name))
    return json_response(await vms.describe(name))


async def stop_vm(request: web.Request) -> web.Response:
    name = _name(request)
    vms = manager(context(request))
    async with vms.lock(name):
        await _guarded(vms.stop(name))
    return json_response(await vms.describe(name))


# -- a migration's target ---------------------------------------------------------------


async def incoming(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _name(request)
    body = await read_json(request)
    try:
        definition = VmDefinition.from_dict(body.get("definition"))
    except ConfigError as exc:
        raise Refusal(400, f"bad VM definition: {exc}", "bad-request") from None
    if definition.name != name:
        raise Refusal(
            400, f"the definition is for {definition.name!r}, not {name!r}", "bad-request"
        )
    source = body.get("source")
    vms = manager(ctx)
    async with vms.lock(name):
        if vms.exists(name):
            raise Refusal(409, f"VM {name!r} already exists on node {vms.node!r}", "vm-exists")
        vms.save_definition(definition)
        vms.migrating[name] = "target"
        try:
            # The relayed QMP takes only the member that asked (its authenticated name).
            caller = peer(request)
            run = await vms.launch(
                definition, incoming=True, source=caller.name if caller is not None else None
            )
        except BaseException as exc:
            vms.migrating.pop(name, None)
            await vms.forget(name)
            if isinstance(exc, VmError):
                raise Refusal(exc.status, str(exc), "vm") from None
            raise
    ctx.log.info(
        "VM %s: incoming from %s (QMP tls:%s:%s)", name, source, vms.host, run.qmp_tcp_port
    )
    return json_response(
        {
            "qmp_host": vms.host,
            "qmp_port": run.qmp_tcp_port,
            "migration_uri": _uri(vms.host, run.migration_port),
            "tls_dir": str(vms.dir(name) / "tls"),
        }
    )


def _uri(host: str, port: int | None) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def _target(vms: VmManager, name: str) -> None:
    if vms.migrating.get(name) != "target":
        raise Refusal(409, f"VM {name!r} is not an incoming migration here", "not-incoming")


async def commit(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _name(request)
    vms = manager(ctx)
    _target(vms, name)
    run = vms.run(name)
    if run is None or vms.alive(name) is None:
        raise Refusal(409, f"VM {name!r}'s incoming QEMU is not running", "vm")
    run.incoming = False
    run.qmp_tcp_port = run.migration_port = None
    vms._save_run(name, run)
    await vms.close_proxy(name)
    vms.migrating.pop(name, None)
    body = await read_json(request)
    _record(ctx, body.get("report"))
    ctx.log.info("VM %s: migrated here, owned by %s now", name, vms.node)
    return json_response(await vms.describe(name))


async def discard(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _name(request)
    vms = manager(ctx)
    _target(vms, name)
    body = await read_json(request)
    await streamlink.end_receiver(ctx, name)
    async with vms.lock(name):
        await vms.forget(name)
        vms.migrating.pop(name, None)
    _record(ctx, body.get("report"))
    ctx.log.info("VM %s: incoming migration discarded (%s)", name, body.get("reason", "-"))
    return json_response({"name": name, "discarded": True})


def _record(ctx: AgentContext, report: Any) -> None:
    from migrate.report import MigrationReport

    if isinstance(report, dict):
        try:
            ctx.metrics.record_report(MigrationReport.from_dict(report))
        except (ValueError, TypeError, LivemigError) as exc:
            ctx.log.warning("a migration report that does not read: %s", exc)


def _ram_path(vms: VmManager, name: str) -> Path:
    run = vms.alive(name)
    if run is None or not run.ram_path:
        raise Refusal(409, f"VM {name!r} is not running here", "vm")
    return Path(run.ram_path)


def _pages(text: Any) -> np.ndarray[Any, np.dtype[np.intp]]:
    if not isinstance(text, str):
        raise Refusal(400, "pages must be base64 of little-endian int64s", "bad-request")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise Refusal(400, "pages are not base64", "bad-request") from None
    if len(raw) % 8:
        raise Refusal(400, "pages must be whole int64s", "bad-request")
    return np.frombuffer(raw, dtype="<i8").astype(np.intp)


def encode_pages(pages: np.ndarray[Any, Any]) -> str:
    return base64.b64encode(np.asarray(pages).astype("<i8").tobytes()).decode()


async def ram_digest(request: web.Request) -> web.Response:
    vms = manager(context(request))
    path = _ram_path(vms, _name(request))
    try:
        async with RamOwner(path) as owner:
            digest = await owner.digest()
    except LivemigError as exc:
        raise Refusal(409, f"cannot digest the VM's RAM: {exc}", "vm") from None
    return json_response(encode_digest(digest))


async def ram_page_hashes(request: web.Request) -> web.Response:
    vms = manager(context(request))
    path = _ram_path(vms, _name(request))
    pages = _pages((await read_json(request, MAX_HASH_BODY)).get("pages"))
    try:
        async with RamOwner(path) as owner:
            hashes = await owner.page_hashes(pages)
    except LivemigError as exc:
        raise Refusal(400, f"cannot hash the pages: {exc}", "vm") from None
    return json_response({"hashes": base64.b64encode(hashes.astype("<u8").tobytes()).decode()})


async def ram_write_pages(request: web.Request) -> web.Response:
    ctx = context(request)
    vms = manager(ctx)
    name = _name(request)
    _target(vms, name)
    path = _ram_path(vms, name)
    body = await read_json(request, MAX_PAGES_BODY)
    pages = _pages(body.get("pages"))
    try:
        data = base64.b64decode(str(body.get("data", "")), validate=True)
    except ValueError:
        raise Refusal(400, "data is not base64", "bad-request") from None
    run = vms.alive(name)
    status = await vms.qemu_status(run) if run is not None else None
    if status == "running":
        raise Refusal(409, f"VM {name!r} is running: pages are written only while paused", "vm")
    try:
        async with RamOwner(path) as owner:
            await owner.write_pages(pages, data)
    except LivemigError as exc:
        raise Refusal(400, f"cannot write the pages: {exc}", "vm") from None
    ctx.log.info("VM %s: %d page(s) repaired from the source", name, len(pages))
    return json_response({"written": len(pages)})
