"""The committed JSON Schemas match the types, and what we print matches them."""

from __future__ import annotations

import dataclasses
import io
import json

import jsonschema
import pytest

from migrate.control.intents import Abort
from migrate.events import DecisionMade, EventBus, Finished, Notice, PhaseChanged, Progress
from migrate.phase import Phase
from migrate.progress import JsonLines
from migrate.report import Decision, MigrationReport
from migrate.schema import SCHEMAS, render
from tests.jsonschemas import SCHEMA_DIR, validate_event_stream, validate_report
from tests.unit.test_report import _report


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_the_generated_one(name: str) -> None:
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render(SCHEMAS[name]()), (
        f"docs/schema/{name} is stale: run `python -m migrate.schema docs/schema` "
        "(and bump the schema version if readers would notice)"
    )
    jsonschema.Draft202012Validator.check_schema(json.loads(committed))


def test_a_report_validates_and_carries_version_and_id() -> None:
    report = dataclasses.replace(_report(), migration_id="abc")
    data = json.loads(json.dumps(report.to_dict()))
    validate_report(data)
    assert data["schema_version"] == 1 and data["migration_id"] == "abc"
    assert MigrationReport.from_dict(data) == report
    validate_report({**data, "environment": {"machine": "x"}})


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("status"),  # a field removed
        lambda d: d.update(state=d.pop("status")),  # renamed
        lambda d: d.update(total_time_ms="fast"),  # retyped
        lambda d: d.update(schema_version=2),  # another version
        lambda d: d["timeline"].update(bogus=1),  # unknown nested field
    ],
)
def test_a_changed_report_is_refused(change: object) -> None:
    data = json.loads(json.dumps(_report().to_dict()))
    change(data)  # type: ignore[operator]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(data)


def test_event_lines_validate_with_increasing_sequence_numbers() -> None:
    stream = io.StringIO()
    lines = JsonLines(stream)
    bus = EventBus("mig-1")
    bus.add_callback(lines.handle)
    report = _report()
    bus.emit(PhaseChanged(1.0, Phase.SETUP, Phase.PRECOPY))
    bus.emit(Progress(report.samples[0]))
    bus.emit(DecisionMade(report.decisions[0]))
    bus.notice("hello")
    bus.emit(Finished(dataclasses.replace(report, migration_id="mig-1")))
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    validate_event_stream(records)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["event"] for r in records] == ["phase", "progress", "decision", "notice", "finished"]
    assert {r["migration_id"] for r in records} == {"mig-1"}


def test_caller_written_finish_line_keeps_the_engine_sequence_number() -> None:
    stream = io.StringIO()
    lines = JsonLines(stream, final_by_caller=True)
    bus = EventBus("m")
    bus.add_callback(lines.handle)
    bus.emit(DecisionMade(Decision(1.0, "because", (Abort(),))))
    bus.emit(Finished(_report()))
    lines.finish({**_report().to_dict(), "environment": {}})
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    validate_event_stream(records)
    assert records[-1]["seq"] == 2 and records[-1]["event"] == "finished"


def test_a_bad_event_line_is_refused() -> None:
    bus = EventBus("m")
    stream = io.StringIO()
    bus.add_callback(JsonLines(stream).handle)
    bus.emit(Notice(1.0, "x"))
    record = json.loads(stream.getvalue())
    record["surprise"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate_event_stream([record])
