"""JSON Schemas of the report and the event stream, generated from the types.

The same type hints drive :mod:`migrate.codec` (what is written) and this module
(what it must look like), so the schemas cannot drift from the code. The committed
copies under ``docs/schema/`` are compared with freshly generated ones by a unit
test: a renamed or retyped field fails that test until the schemas are written
again (``python -m migrate.schema docs/schema``) and, if readers would notice,
``REPORT_SCHEMA_VERSION`` / ``EVENT_SCHEMA_VERSION`` are bumped.

Every field the codec writes is required (it always writes all of them) and no
other field is allowed, except ``environment`` on a report, which the lab's demo
adds (what it ran on).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from migrate.events import EVENT_SCHEMA_VERSION
from migrate.phase import Phase
from migrate.progress import ProgressView
from migrate.report import (
    REPORT_SCHEMA_VERSION,
    Decision,
    MigrationReport,
    Predicted,
    Sample,
)
from migrate.vmdef import VM_DEFINITION_SCHEMA_VERSION, VmDefinition

DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://livemig.invalid/schema/"


class _Builder:
    """Turns type hints into JSON Schema, collecting dataclasses under ``$defs``."""

    def __init__(self, defaults_optional: bool = False) -> None:
        self.defs: dict[str, Any] = {}
        # Documents people write (a VM definition) may leave out fields with defaults;
        # what the codec writes always has every field.
        self.defaults_optional = defaults_optional

    def of(self, tp: Any) -> dict[str, Any]:
        origin = get_origin(tp)
        if tp is Any:
            return {}
        if origin in (typing.Union, types.UnionType):
            options = [self.of(arg) for arg in get_args(tp)]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return {"$ref": f"#/$defs/{self.dataclass(tp)}"}
        if isinstance(tp, type) and issubclass(tp, Enum):
            return {"type": "string", "enum": [member.value for member in tp]}
        if origin is tuple:
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return {"type": "array", "items": self.of(args[0])}
            return {
                "type": "array",
                "prefixItems": [self.of(a) for a in args],
                "minItems": len(args),
                "maxItems": len(args),
            }
        if origin is list:
            return {"type": "array", "items": self.of(get_args(tp)[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.of(get_args(tp)[1])}
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        if tp is type(None):
            return {"type": "null"}
        raise TypeError(f"no JSON Schema for {tp!r}")

    def dataclass(self, cls: type) -> str:
        name = cls.__name__
        if name in self.defs:
            return name
        self.defs[name] = {}  # placeholder: recursion stops here
        self.defs[name] = self.object_of(cls)
        return name

    def _field(self, f: dataclasses.Field[Any], tp: Any) -> dict[str, Any]:
        # A ``kind`` tag with a fixed default tells union members apart.
        if f.name == "kind" and isinstance(f.default, str):
            return {"const": f.default}
        return self.of(tp)

    def object_of(self, cls: type, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        hints = get_type_hints(cls)
        fields = dataclasses.fields(cls)
        schema: dict[str, Any] = {"type": "object"}
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        if doc and not doc.startswith(cls.__name__ + "("):
            schema["description"] = " ".join(doc.split())
        schema["properties"] = {f.name: self._field(f, hints[f.name]) for f in fields}
        schema["properties"].update(extra or {})
        schema["required"] = [
            f.name
            for f in fields
            if not self.defaults_optional
            or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        ]
        schema["additionalProperties"] = False
        return schema


def _report(builder: _Builder) -> dict[str, Any]:
    """A report object: every field, plus the demo's optional ``environment``."""
    root = builder.object_of(
        MigrationReport,
        {"environment": {"type": "object", "description": "added by the lab's demo"}},
    )
    root["properties"]["schema_version"] = {"const": REPORT_SCHEMA_VERSION}
    return root


def report_schema() -> dict[str, Any]:
    """The schema of a migration report (``--json``; ``report`` of ``finished``)."""
    builder = _Builder()
    root = _report(builder)
    return {
        "$schema": DIALECT,
        "$id": BASE_ID + "report.json",
        "title": "livemig migration report",
        **root,
        "$defs": dict(sorted(builder.defs.items())),
    }


def events_schema() -> dict[str, Any]:
    """The schema of one ``--events`` line (JSON lines: one record per event)."""
    builder = _Builder()
    envelope = {
        "schema_version": {"const": EVENT_SCHEMA_VERSION},
        "migration_id": {"type": "string"},
        "seq": {"type": "integer", "minimum": 0},
        "time": {"type": "number"},
    }
    phase = builder.of(Phase)
    kinds: dict[str, tuple[dict[str, Any], list[str]]] = {
        "planned": ({"predicted": builder.of(Predicted)}, ["predicted"]),
        "phase": ({"previous": phase, "phase": phase}, ["previous", "phase"]),
        "progress": (
            {"sample": builder.of(Sample), "view": builder.of(ProgressView)},
            ["sample"],
        ),
        "decision": ({"decision": builder.of(Decision)}, ["decision"]),
        "notice": ({"message": {"type": "string"}}, ["message"]),
        "finished": ({"report": {"$ref": "#/$defs/Report"}}, ["report"]),
    }
    builder.defs["Report"] = _report(builder)
    variants = []
    for kind, (props, required) in kinds.items():
        variants.append(
            {
                "title": kind,
                "type": "object",
                "properties": {**envelope, "event": {"const": kind}, **props},
                "required": [*envelope, "event", *required],
                "additionalProperties": False,
            }
        )
    return {
        "$schema": DIALECT,
        "$id": BASE_ID + "events.json",
        "title": "livemig migration event (one JSON line of --events)",
        "oneOf": variants,
        "$defs": dict(sorted(builder.defs.items())),
    }


def vm_definition_schema() -> dict[str, Any]:
    """The schema of a VM definition file (:mod:`migrate.vmdef`)."""
    builder = _Builder(defaults_optional=True)
    root = builder.object_of(VmDefinition)
    root["properties"]["schema_version"] = {"const": VM_DEFINITION_SCHEMA_VERSION}
    return {
        "$schema": DIALECT,
        "$id": BASE_ID + "vm-definition.json",
        "title": "livemig VM definition",
        **root,
        "$defs": dict(sorted(builder.defs.items())),
    }


SCHEMAS = {
    "report.json": report_schema,
    "events.json": events_schema,
    "vm-definition.json": vm_definition_schema,
}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in SCHEMAS.items():
        path = directory / name
        path.write_text(render(make()))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m migrate.schema DIRECTORY", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
