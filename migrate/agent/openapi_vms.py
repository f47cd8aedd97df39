"""The VM and migration part of the agent's OpenAPI document (merged by ``openapi``)."""

from __future__ import annotations

from typing import Any

from migrate.schema import vm_definition_schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _definition_schemas() -> dict[str, Any]:
    """``VmDefinition`` and its parts, from docs/schema/vm-definition.json's source
    (:func:`migrate.schema.vm_definition_schema`), refs pointed at the components."""
    schema = vm_definition_schema()
    parts = schema.pop("$defs", {})
    for key in ("$schema", "$id"):
        schema.pop(key, None)
    schema["description"] = (
        "docs/schema/vm-definition.json (migrate.vmdef). Paths are read on the host that "
        "starts the VM; agents take a file RAM backend and NICs on bridges only."
    )

    def relink(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else relink(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [relink(v) for v in value]
        return value

    return {"VmDefinition": relink(schema), **{k: relink(v) for k, v in parts.items()}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ERRORS = {
    "400": _json(_ref("Error"), "Malformed request or definition"),
    "403": _json(_ref("Error"), "No cluster client certificate"),
    "404": _json(_ref("Error"), "No such VM or migration on this node"),
    "409": _json(_ref("Error"), "The VM's state does not allow it"),
}
_B64 = {"type": "string", "contentEncoding": "base64"}

SCHEMAS: dict[str, Any] = {
    **_definition_schemas(),
    "Vm": {
        "type": "object",
        "required": ["name", "node", "definition", "state", "pid", "adopted"],
        "properties": {
            "name": {"type": "string"},
            "node": {"type": "string"},
            "definition": _ref("VmDefinition"),
            "state": {
                "type": "string",
                "description": "stopped, running, incoming, migrating (source|target)",
            },
            "pid": {"type": ["integer", "null"]},
            "qemu_status": {"type": ["string", "null"], "description": "QMP query-status"},
            "adopted": {"type": "boolean"},
            "ram_path": {"type": "string"},
        },
    },
    "Incoming": {
        "type": "object",
        "required": ["qmp_host", "qmp_port", "migration_uri", "tls_dir"],
        "properties": {
            "qmp_host": {"type": "string"},
            "qmp_port": {"type": "integer", "description": "QMP over TCP with mutual TLS"},
            "migration_uri": {"type": "string"},
            "tls_dir": {"type": "string", "description": "the target QEMU's tls-creds-x509 dir"},
            "ram_path": {"type": "string"},
        },
    },
    "MigrateRequest": {
        "type": "object",
        "required": ["to"],
        "properties": {
            "to": {"type": "string", "description": "target node name"},
            "strategy": {"enum": ["native", "pagestream"]},
            "policy": {"type": "object", "description": "migrate.policy.Policy as JSON"},
            "tls": {"type": "boolean", "default": True},
            "verify": {"type": "boolean"},
            "repair": {"type": "boolean"},
            "force": {"type": "boolean"},
            "predict": {"type": "boolean"},
            "offline": {"type": "boolean"},
        },
    },
}

_VM = _json(_ref("Vm"), "The VM")


def _op(op_id: str, summary: str, ok: dict[str, Any], body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {"operationId": op_id, "summary": summary,
                          "responses": {"200": ok, **_ERRORS}}  # fmt: skip
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body, "Request")}
    return op


PATHS: dict[str, Any] = {
    "/v1/vms": {
        "get": _op(
            "listVms",
            "This node's VMs",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "node": {"type": "string"},
                        "vms": {"type": "array", "items": _ref("Vm")},
                    },
                },
                "VMs",
            ),
        ),
        "post": _op(
            "createVm",
            "Define a VM on this node (and start it unless start is false)",
            _VM,
            {
                "type": "object",
                "required": ["definition"],
                "properties": {"definition": _ref("VmDefinition"), "start": {"type": "boolean"}},
            },
        ),
    },
    "/v1/vms/adopt": {
        "post": _op(
            "adoptVm",
            "Adopt a QEMU started elsewhere: definition from its command line",
            _VM,
            {
                "type": "object",
                "required": ["qmp_socket"],
                "properties": {
                    "qmp_socket": {"type": "string"},
                    "name": {"type": ["string", "null"]},
                },
            },
        ),
    },
    "/v1/vms/{name}": {"get": _op("getVm", "One VM: definition and state", _VM, params=[_NAME])},
    "/v1/vms/{name}/start": {"post": _op("startVm", "Start a defined VM", _VM, params=[_NAME])},
    "/v1/vms/{name}/stop": {
        "post": _op("stopVm", "Stop a VM (it stays defined)", _VM, params=[_NAME])
    },
    "/v1/vms/{name}/migrate": {
        "post": _op(
            "migrateVm",
            "Migrate a VM of this node to another node (runs in the background)",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "migration_id": {"type": "string"},
                        "vm": {"type": "string"},
                        "to": {"type": "string"},
                    },
                },
                "Started",
            ),
            _ref("MigrateRequest"),
            [_NAME],
        ),
    },
    "/v1/vms/{name}/incoming": {
        "post": _op(
            "incomingVm",
            "Start a migration's target QEMU (-incoming defer -S, QMP over TLS)",
            _json(_ref("Incoming"), "The target's endpoints"),
            {
                "type": "object",
                "required": ["definition"],
                "properties": {"definition": _ref("VmDefinition"), "source": {"type": "string"}},
            },
            [_NAME],
        ),
    },
    "/v1/vms/{name}/incoming/pagestream": {
        "get": {
            "operationId": "incomingPagestream",
            "summary": "pagestream's receiver for an incoming VM: a websocket relay",
            "description": (
                "Upgrades to a websocket (mutual TLS like every route). The agent starts "
                "`python -m migrate.pagestream.agent --role receiver` as its child and relays "
                "its JSON-lines control channel, one text message per line. The client may "
                "send only `listen` (args: `session` base64, `tls` boolean, optional "
                "`accept_timeout_s`; the agent adds the VM's RAM file, its address and its "
                "node credentials) and `close`. When the receiver exits the agent sends "
                '`{"exited": {"message", "exit_code", "stderr"}}` and closes; when the '
                "websocket closes first (heartbeat 10 s) the agent ends the receiver. "
                "409 when the VM is not incoming here or already has a receiver."
            ),
            "parameters": [_NAME],
            "responses": {
                "101": {"description": "Switching protocols: the relay runs"},
                "409": _json(_ref("Error"), "Not an incoming VM, or a receiver runs"),
                **_ERRORS,
            },
        },
    },
    "/v1/vms/{name}/incoming/commit": {
        "post": _op(
            "commitIncoming",
            "The migration completed: this node owns the VM",
            _VM,
            {"type": "object", "properties": {"report": {"type": ["object", "null"]}}},
            [_NAME],
        ),
    },
    "/v1/vms/{name}/incoming/discard": {
        "post": _op(
            "discardIncoming",
            "The migration did not complete: stop the target, forget it",
            _json({"type": "object"}, "Discarded"),
            {
                "type": "object",
                "properties": {
                    "report": {"type": ["object", "null"]},
                    "reason": {"type": "string"},
                },
            },
            [_NAME],
        ),
    },
    "/v1/vms/{name}/ram/digest": {
        "get": _op(
            "ramDigest",
            "Chunk digest (xxh3, 2 MiB chunks) of the VM's RAM",
            _json(
                {
                    "type": "object",
                    "required": ["size", "chunk_size", "hashes"],
                    "properties": {
                        "size": {"type": "integer"},
                        "chunk_size": {"type": "integer"},
                        "hashes": _B64,
                    },
                },
                "Digest",
            ),
            params=[_NAME],
        ),
    },
    "/v1/vms/{name}/ram/page-hashes": {
        "post": _op(
            "ramPageHashes",
            "One xxh3-64 per listed page",
            _json({"type": "object", "properties": {"hashes": _B64}}, "Little-endian uint64s"),
            {"type": "object", "properties": {"pages": _B64}},
            [_NAME],
        ),
    },
    "/v1/vms/{name}/ram/pages": {
        "post": _op(
            "ramWritePages",
            "Write pages into a paused incoming VM's RAM (repair)",
            _json({"type": "object", "properties": {"written": {"type": "integer"}}}, "Written"),
            {"type": "object", "properties": {"pages": _B64, "data": _B64}},
            [_NAME],
        ),
    },
    "/v1/migrations/{id}/events": {
        "get": {
            "operationId": "migrationEvents",
            "summary": "A migration's events, streamed as JSON lines; the last is finished "
            "(with the report) or error; keepalive lines every 5 s of silence",
            "parameters": [_ID],
            "responses": {
                "200": {
                    "description": "Events",
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                },
                **_ERRORS,
            },
        }
    },
    "/v1/migrations/{id}/abort": {
        "post": _op(
            "abortMigration",
            "Abort (the VM stays on the source)",
            _json({"type": "object"}, "Asked"),
            {"type": "object", "properties": {"reason": {"type": "string"}}},
            [_ID],
        ),
    },
}
