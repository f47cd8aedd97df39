"""Validate what the CLI prints against the committed JSON Schemas (docs/schema/)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_report(data: Any) -> Any:
    """``data`` if it is a report the schema accepts (raises ValidationError otherwise)."""
    _validator("report.json").validate(data)
    return data


def validate_vm_definition(data: Any) -> Any:
    """``data`` if it is a VM definition the schema accepts."""
    _validator("vm-definition.json").validate(data)
    return data


def validate_event(record: Any) -> Any:
    """``record`` if it is an ``--events`` line the schema accepts."""
    _validator("events.json").validate(record)
    return record


def validate_event_stream(records: list[Any]) -> list[Any]:
    """Every record valid, one migration id, sequence numbers strictly increasing."""
    for record in records:
        validate_event(record)
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs)), f"sequence numbers not increasing: {seqs}"
    ids = {r["migration_id"] for r in records}
    assert len(ids) == 1, f"more than one migration id: {ids}"
    return records
