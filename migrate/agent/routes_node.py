"""This node's routes: what it is (``/v1/node``), its metrics, the API document."""

from __future__ import annotations

import time

from aiohttp import web

from migrate.agent import nodeinfo
from migrate.agent.app import Router, context, json_response
from migrate.agent.metrics import CONTENT_TYPE_LATEST


def register(router: Router) -> None:
    router.add("GET", "/v1/node", get_node, summary="This node: name, address, CPU, memory")
    router.add("GET", "/metrics", get_metrics, summary="Prometheus metrics")
    router.add("GET", "/v1/openapi.json", get_openapi, summary="This API's OpenAPI document")


async def get_node(request: web.Request) -> web.Response:
    ctx = context(request)
    return json_response(
        {
            "name": ctx.identity.name,
            "address": str(ctx.identity.address),
            "ca": ctx.state.holds_ca,
            "cpu": ctx.cpu,
            "memory": nodeinfo.memory(),
            "agent": {"uptime_s": round(time.monotonic() - ctx.started_at, 3)},
        }
    )


async def get_metrics(request: web.Request) -> web.Response:
    body = context(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_openapi(_request: web.Request) -> web.Response:
    from migrate.agent.openapi import document

    return json_response(document())
