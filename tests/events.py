"""The JSON event stream (`rfs build --events`) checked against docs/events.schema.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "events.schema.json").read_text())


def validate_events(events: list[dict[str, Any]]) -> None:
    """Every event valid against docs/events.schema.json, with no field the schema lacks."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    defs = SCHEMA["$defs"]
    documented = {
        "plan": "plan",
        "step_cached": "reused",
        "step_skipped": "reused",
        "step_started": "started",
        "step_output": "output",
        "step_progress": "progress",
        "step_finished": "finished",
        "step_failed": "failed",
        "step_waiting": "waiting",
        "step_fetched": "waited",
        "step_deadline": "waited",
        "message": "message",
        "build_finished": "build_finished",
    }
    for event in events:
        validator.validate(event)
        part = defs[documented[event["event"]]]
        allowed = set(SCHEMA["properties"]) | set(part.get("properties", {}))
        if part.get("allOf"):
            allowed |= set(defs["step"]["properties"])
        assert set(event) <= allowed, f"undocumented fields in {event}"
