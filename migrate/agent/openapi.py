"""The agent's OpenAPI 3.1 document, written by hand; served at ``/v1/openapi.json``.

``docs/agent-openapi.json`` is a copy; a unit test compares the two and checks that
every route the application registers is documented and nothing else is. After a
change here, write the copy again: ``python -m migrate.agent.openapi docs/agent-openapi.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

API_VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Malformed request"),
    "403": _json(_ref("Error"), "Refused: no cluster certificate, or a token refused"),
}

_PEM = {"type": "string", "description": "PEM text"}
_SHA256 = {
    "type": "string",
    "pattern": "^[0-9a-f]{64}$",
    "description": "SHA-256 of the DER form, hex",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "reason"],
        "properties": {
            "error": {"type": "string", "description": "One line for the operator"},
            "reason": {
                "type": "string",
                "description": "Short label, e.g. token-expired, no-client-cert",
            },
        },
    },
    "ClusterCA": {
        "type": "object",
        "required": ["ca_pem", "ca_sha256"],
        "properties": {"ca_pem": _PEM, "ca_sha256": _SHA256},
    },
    "JoinRequest": {
        "type": "object",
        "required": ["token", "name", "address", "csr_pem"],
        "properties": {
            "token": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
            "name": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"},
            "address": {"type": "string", "description": "HOST:PORT of the new node's agent"},
            "csr_pem": _PEM,
        },
    },
    "JoinReply": {
        "type": "object",
        "required": ["node_cert_pem", "ca_pem", "members"],
        "properties": {"node_cert_pem": _PEM, "ca_pem": _PEM, "members": _ref("Members")},
    },
    "Member": {
        "type": "object",
        "required": ["name", "address", "ca", "cert_sha256", "joined_at"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "ca": {"type": "boolean", "description": "Holds the cluster CA key"},
            "cert_sha256": _SHA256,
            "joined_at": {"type": "number", "description": "Unix time, seconds"},
        },
    },
    "Members": {
        "type": "object",
        "required": ["version", "members"],
        "properties": {
            "version": {"const": 1},
            "members": {"type": "array", "items": _ref("Member"), "minItems": 1},
        },
    },
    "Node": {
        "type": "object",
        "required": ["name", "address", "ca", "cpu", "memory", "agent"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "ca": {"type": "boolean"},
            "cpu": {
                "type": "object",
                "description": "cpumodel's probe: vendor, model_name, signature, psabi_level, "
                "flag_count, logical_cpus, host (cpumodel's host JSON); error if the probe failed",
            },
            "memory": {
                "type": "object",
                "required": ["total_bytes", "available_bytes"],
                "properties": {
                    "total_bytes": {"type": "integer"},
                    "available_bytes": {"type": "integer"},
                },
            },
            "agent": {"type": "object", "properties": {"uptime_s": {"type": "number"}}},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/v1/cluster/ca": {
        "get": {
            "operationId": "getClusterCA",
            "summary": "The cluster CA certificate, to compare with a join key's fingerprint",
            "security": [],
            "parameters": [
                {
                    "name": "expect",
                    "in": "query",
                    "required": False,
                    "description": "The fingerprint a join key carries: refused (409, logged) "
                    "when it is not this cluster's CA",
                    "schema": _SHA256,
                }
            ],
            "responses": {
                "200": _json(_ref("ClusterCA"), "The CA"),
                "409": _json(_ref("Error"), "Not this cluster's CA fingerprint"),
            },
        }
    },
    "/v1/cluster/join": {
        "post": {
            "operationId": "joinCluster",
            "summary": "Join with a one-time token and a CSR made on the new node",
            "description": "Public: the token authenticates. Only the node holding the CA "
            "accepts joins. The token is consumed only if the join succeeds.",
            "security": [],
            "requestBody": {"required": True, **_json(_ref("JoinRequest"), "The join")},
            "responses": {
                "200": _json(_ref("JoinReply"), "Joined"),
                **_ERRORS,
                "409": _json(_ref("Error"), "Name or address taken, or this node has no CA"),
            },
        }
    },
    "/v1/cluster/members": {
        "get": {
            "operationId": "getMembers",
            "summary": "The cluster's members",
            "responses": {"200": _json(_ref("Members"), "Members"), **_ERRORS},
        },
        "post": {
            "operationId": "putMembers",
            "summary": "Replace the member list (only from the node holding the CA)",
            "requestBody": {"required": True, **_json(_ref("Members"), "The new list")},
            "responses": {"200": _json(_ref("Members"), "Stored"), **_ERRORS},
        },
    },
    "/v1/node": {
        "get": {
            "operationId": "getNode",
            "summary": "This node: name, address, CPU, memory",
            "responses": {"200": _json(_ref("Node"), "This node"), **_ERRORS},
        }
    },
    "/metrics": {
        "get": {
            "operationId": "getMetrics",
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_ERRORS,
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "getOpenAPI",
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_ERRORS},
        }
    },
}


def document() -> dict[str, Any]:
    """The agent's OpenAPI document (a fresh copy)."""
    from migrate.agent import openapi_vms

    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "livemig node agent",
            "version": API_VERSION,
            "description": "One agent per host. Every operation needs a client certificate "
            "signed by the cluster CA (mutual TLS) unless its `security` is empty.",
        },
        "security": [{"clusterMTLS": []}],
        "paths": {**_PATHS, **openapi_vms.PATHS},
        "components": {
            "securitySchemes": {
                "clusterMTLS": {
                    "type": "mutualTLS",
                    "description": "A node certificate signed by the cluster CA",
                }
            },
            "schemas": {**_SCHEMAS, **openapi_vms.SCHEMAS},
        },
    }
    copied: dict[str, Any] = json.loads(json.dumps(doc))
    return copied


def render() -> str:
    return json.dumps(document(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        Path(args[0]).write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
