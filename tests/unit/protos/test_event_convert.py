"""Events on the wire (coordinator.transport.event_convert): every field survives the trip,
and fedctl's JSON record of the wire message is the record the Kafka sink sends."""

from __future__ import annotations

import pytest

from coordinator.observability.events import Event, EventKind
from coordinator.transport.event_convert import event_from_proto, event_to_proto
from fedctl.admin import event_record
from protos.convert import WireFormatError
from protos.fedcoord.v1 import events_pb2


@pytest.mark.parametrize("kind", list(EventKind))
def test_an_event_of_every_kind_round_trips(kind: EventKind) -> None:
    event = Event(kind, "task-7", 1_765_000_000.125, round_number=3, device_id="dev-2",
                  reason="late", detail="arrived after round 3", values={"loss": 0.5, "n": 2.0},
                  seq=41)
    wire = events_pb2.Event.FromString(event_to_proto(event).SerializeToString())
    assert event_from_proto(wire) == event
    assert event_record(wire) == event.to_json()


def test_a_default_event_round_trips() -> None:
    event = Event(EventKind.TASK_CREATED, "t", 0.0, seq=1)
    assert event_from_proto(event_to_proto(event)) == event


def test_an_unknown_kind_or_schema_is_refused_by_name() -> None:
    msg = event_to_proto(Event(EventKind.TASK_CREATED, "t", 1.0, seq=5))
    msg.kind = "from_the_future"
    with pytest.raises(WireFormatError, match="from_the_future"):
        event_from_proto(msg)
    msg.kind, msg.schema = "task_created", 2
    with pytest.raises(WireFormatError, match="schema 2"):
        event_from_proto(msg)
