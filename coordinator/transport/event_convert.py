"""Events on the wire: :class:`~coordinator.observability.events.Event` to
``fedcoord.v1.Event`` and back. Here rather than in :mod:`protos.convert`, which converts
only core types (the event record is the coordinator's)."""

from __future__ import annotations

from coordinator.observability.events import EVENT_SCHEMA_VERSION, Event, EventKind
from protos.convert import WireFormatError
from protos.fedcoord.v1 import events_pb2


def event_to_proto(event: Event) -> events_pb2.Event:
    return events_pb2.Event(
        schema=event.schema, seq=event.seq, kind=event.kind.value, task_id=event.task_id,
        at_unix_s=event.at, round_number=event.round_number, device_id=event.device_id,
        reason=event.reason, detail=event.detail, values=dict(event.values))


def event_from_proto(msg: events_pb2.Event) -> Event:
    """Raises WireFormatError (a ValueError) for a schema or kind this version does not
    know, naming it."""
    if msg.schema != EVENT_SCHEMA_VERSION:
        raise WireFormatError(f"event {msg.seq}: schema {msg.schema} is not "
                              f"{EVENT_SCHEMA_VERSION}")
    try:
        kind = EventKind(msg.kind)
    except ValueError:
        raise WireFormatError(f"event {msg.seq}: unknown kind {msg.kind[:40]!r}") from None
    return Event(kind=kind, task_id=msg.task_id, at=msg.at_unix_s,
                 round_number=msg.round_number, device_id=msg.device_id, reason=msg.reason,
                 detail=msg.detail, values=dict(msg.values), seq=msg.seq, schema=msg.schema)
