"""Migration routes: start one (``POST /v1/vms/NAME/migrate``), follow its events
(``GET /v1/migrations/ID/events``: JSON lines, streamed; the last is ``finished``
with the report, or ``error``), abort it (``POST /v1/migrations/ID/abort``)."""

from __future__ import annotations

from aiohttp import web

from migrate.agent.app import Refusal, Router, context, json_response, read_json
from migrate.agent.migrations import MigrateOptions, MigrationRun, migrations, start_migration
from migrate.agent.vms import VmError
from migrate.errors import ConfigError
from migrate.validate import PLAIN_NAME


def register(router: Router) -> None:
    router.add("POST", "/v1/vms/{name}/migrate", migrate_vm,
               summary="Migrate a VM of this node to another node")  # fmt: skip
    router.add("GET", "/v1/migrations/{id}/events", events,
               summary="A migration's events as JSON lines (streamed), the report last")  # fmt: skip
    router.add("POST", "/v1/migrations/{id}/abort", abort, summary="Abort a migration")


async def migrate_vm(request: web.Request) -> web.Response:
    ctx = context(request)
    name = request.match_info["name"]
    if not PLAIN_NAME.fullmatch(name):
        raise Refusal(400, f"bad VM name {name!r}", "bad-request")
    try:
        options = MigrateOptions.from_json(await read_json(request))
        run = start_migration(ctx, name, options)
    except VmError as exc:
        raise Refusal(exc.status, str(exc), "vm") from None
    except ConfigError as exc:
        raise Refusal(400, str(exc), "bad-request") from None
    ctx.log.info("migration %s: VM %s to %s (%s)", run.id, name, options.to, options.strategy)
    return json_response({"migration_id": run.id, "vm": name, "to": options.to})


def _run(request: web.Request) -> MigrationRun:
    runs = migrations(context(request))
    run = runs.get(request.match_info["id"])
    if run is None:
        raise Refusal(404, f"no migration {request.match_info['id']!r} on this node", "unknown")
    return run


async def events(request: web.Request) -> web.StreamResponse:
    run = _run(request)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for line in run.follow():
        text = line if line is not None else '{"event": "keepalive"}'
        await response.write(text.encode() + b"\n")
    await response.write_eof()
    return response


async def abort(request: web.Request) -> web.Response:
    run = _run(request)
    body = await read_json(request)
    reason = body.get("reason")
    reason = reason if isinstance(reason, str) and reason.strip() else "aborted by the operator"
    running = run.abort(reason[:200])
    context(request).log.info("migration %s: abort asked (%s)", run.id, reason[:200])
    return json_response({"migration_id": run.id, "aborting": running})
