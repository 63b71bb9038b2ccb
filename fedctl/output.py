"""What fedctl prints: JSON documents for scripts (``--json``) and rich tables for people.

JSON keeps the protobuf field names and every field of the coordinator's messages, including
fields this version of fedctl does not know by name (a newer coordinator's), with 64-bit
integers as JSON numbers (the proto3 JSON mapping would make them strings, which ``jq``
cannot compare). Each ``*_unix_ms`` timestamp of a task or round gets an ISO 8601 UTC twin
(``*_at``), and each round its ``duration_s``.

Tables never cut an id: when stdout is not a terminal they are laid out at their natural
width, and id columns fold instead of ending in an ellipsis on a narrow terminal.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from rich.console import Console

    from protos.fedcoord.v1 import admin_pb2

#: The console width when stdout is not a terminal: wide enough that no table is cut.
PIPE_WIDTH = 100_000


def message_to_dict(msg: Message) -> dict[str, Any]:
    """Every field of ``msg`` (scalars with their zero values, unset sub-messages as None),
    by protobuf field name; enums by name, bytes as base64, maps as objects."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    from google.protobuf.descriptor import FieldDescriptor

    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def iso_utc(unix_ms: int) -> str | None:
    """``2026-12-07T10:31:02.120Z``; None for 0 (not yet)."""
    if not unix_ms:
        return None
    at = datetime.fromtimestamp(unix_ms / 1000, tz=UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_times(doc: dict[str, Any]) -> dict[str, Any]:
    for key in [k for k in doc if k.endswith("_unix_ms")]:
        doc[key.removesuffix("_unix_ms") + "_at"] = iso_utc(int(doc[key] or 0))
    return doc


def round_duration_s(r: admin_pb2.Round, now_ms: float | None = None) -> float | None:
    """Seconds from a round's start to its end, or to now while it is open; None before it
    started."""
    if not r.started_unix_ms:
        return None
    end = r.ended_unix_ms or (time.time() * 1000 if now_ms is None else now_ms)
    return max(0.0, (end - r.started_unix_ms) / 1000)


def task_document(task: admin_pb2.Task) -> dict[str, Any]:
    doc = _with_times(message_to_dict(task))
    if doc.get("current_round") is not None:
        doc["current_round"] = round_document(task.current_round)
    return doc


def round_document(r: admin_pb2.Round) -> dict[str, Any]:
    doc = _with_times(message_to_dict(r))
    duration = round_duration_s(r)
    doc["duration_s"] = None if duration is None else round(duration, 3)
    return doc


def status_document(task: admin_pb2.Task, rounds: list[admin_pb2.Round]) -> dict[str, Any]:
    return {"task": task_document(task), "rounds": [round_document(r) for r in rounds]}


def print_json(doc: Any, *, file: IO[str] | None = None) -> None:
    """One JSON document on one line, flushed (a pipe sees it at once)."""
    out = file or sys.stdout
    out.write(json.dumps(doc, sort_keys=False, default=str) + "\n")
    out.flush()


def table_console(file: IO[str] | None = None) -> Console:
    """A console for tables: the terminal's width on a terminal, else wide enough that rich
    neither wraps nor ellipsizes (a pipe, a file, ``grep``)."""
    from rich.console import Console

    out = file or sys.stdout
    if out.isatty():
        return Console(file=out)
    return Console(file=out, width=PIPE_WIDTH, soft_wrap=False)


def counts_line(name: str, counts: Mapping[str, Any]) -> str:
    """``declines_by_reason: busy 3, metered 1`` (largest first)."""
    items = sorted(counts.items(), key=lambda kv: (-float(kv[1]), str(kv[0])))
    return f"{name}: " + ", ".join(f"{k} {_number(v)}" for k, v in items)


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
