"""The Kafka sink's record value: the fast encoder writes exactly what ``json.dumps`` of
:meth:`Event.to_json` writes, whatever the strings and numbers hold."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from coordinator.observability.events import Event, EventKind
from coordinator.observability.kafka_sink import json_bytes


def reference(event: Event) -> bytes:
    return json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode()


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70))


@given(kind=st.sampled_from(list(EventKind)), task_id=st.text(), at=st.floats(),
       round_number=st.integers(0, 2**40), device_id=st.text(), reason=st.text(),
       detail=st.text(), values=st.dictionaries(st.text(max_size=8), numbers, max_size=4),
       seq=st.integers(0, 2**40))
def test_the_record_is_byte_for_byte_what_json_dumps_writes(
        kind: EventKind, task_id: str, at: float, round_number: int, device_id: str,
        reason: str, detail: str, values: dict[str, float], seq: int) -> None:
    event = Event(kind, task_id, at, round_number, device_id, reason, detail, values, seq)
    assert json_bytes(event) == reference(event)


def test_quotes_control_characters_and_non_ascii_text_are_escaped_as_json_does() -> None:
    event = Event(EventKind.DEVICE_TOLD_TO_COME_BACK, 'task "a"\\', 1.5, 2,
                  "dev\u00fc\n\x00", "", "retry \u2028 later", {"retry_after_s": 2.5}, 9)
    assert json_bytes(event) == reference(event)
    assert Event.from_json(json.loads(json_bytes(event))) == event


def test_a_non_finite_time_or_value_falls_back_to_what_json_dumps_writes() -> None:
    for at, values in ((math.inf, {}), (1.0, {"x": math.nan}), (1.0, {"x": -math.inf})):
        event = Event(EventKind.ROUND_COMMITTED, "t", at, 1, values=values, seq=1)
        assert json_bytes(event) == reference(event)
