"""The EventLog contract (each task's events by seq), checked against every implementation:
in memory, SQLite, and PostgreSQL where FEDCOORD_TEST_POSTGRES_URL names a scratch
database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.storage import Conflict, InMemoryStore, SqlStore
from coordinator.storage.event_log import EventLog, InMemoryEventLog, open_event_log
from coordinator.storage.records import EventRecord
from tests.contract.test_store_contract import _POSTGRES, _fresh_postgres


@pytest.fixture(params=["memory", "sqlite", _POSTGRES])
def events(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    if request.param == "memory":
        yield InMemoryEventLog()
        return
    url = (f"sqlite:///{tmp_path / 'coordinator.db'}" if request.param == "sqlite"
           else _fresh_postgres())
    store = SqlStore(url)
    yield store.event_log()
    store.close()


def event(seq: int, task_id: str = "t1", kind: str = "round_committed") -> EventRecord:
    return EventRecord(task_id=task_id, seq=seq, kind=kind, at=1_700_000_000.5 + seq,
                       round_number=2, device_id="dev-1", reason="late", detail="it came late",
                       values={"loss": 0.25, "version": 3.0}, schema=1)


def test_appended_events_read_back_whole_by_seq(events: EventLog) -> None:
    events.append_events([event(2), event(1), event(1, "t2")])
    assert events.list_events("t1") == [event(1), event(2)]
    assert events.list_events("t2") == [event(1, "t2")]
    assert dict(events.list_events("t1")[0].values) == {"loss": 0.25, "version": 3.0}


def test_a_task_without_events_has_none_and_last_seq_zero(events: EventLog) -> None:
    assert events.list_events("nobody") == [] and events.last_event_seq("nobody") == 0
    events.append_events([])
    assert events.list_events("nobody") == []


def test_after_seq_and_limit_page_through_a_task(events: EventLog) -> None:
    events.append_events([event(s) for s in range(1, 11)])
    assert [e.seq for e in events.list_events("t1", after_seq=3, limit=4)] == [4, 5, 6, 7]
    assert [e.seq for e in events.list_events("t1", after_seq=8)] == [9, 10]
    assert events.list_events("t1", after_seq=10) == []
    with pytest.raises(ValueError, match="limit"):
        events.list_events("t1", limit=0)


def test_last_event_seq_is_the_highest_of_the_task(events: EventLog) -> None:
    events.append_events([event(1), event(7), event(3), event(9, "t2")])
    assert events.last_event_seq("t1") == 7 and events.last_event_seq("t2") == 9


def test_a_stored_seq_is_refused_and_nothing_of_its_batch_is_stored(events: EventLog) -> None:
    events.append_events([event(1)])
    with pytest.raises(Conflict):
        events.append_events([event(2), event(1)])
    with pytest.raises(Conflict):
        events.append_events([event(3), event(3)])
    assert [e.seq for e in events.list_events("t1")] == [1]


def test_concurrent_appends_of_different_seqs_all_land(events: EventLog) -> None:
    def append(start: int) -> None:
        for s in range(start, start + 20):
            events.append_events([event(s)])

    threads = [threading.Thread(target=append, args=(1 + 20 * i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in events.list_events("t1")] == list(range(1, 61))


def test_sql_events_survive_a_restart_and_sit_beside_the_rounds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store = SqlStore(url)
    open_event_log(store).append_events([event(1), event(2)])
    store.close()
    again = SqlStore(url)
    try:
        assert open_event_log(again).last_event_seq("t1") == 2
        assert [e.seq for e in open_event_log(again).list_events("t1")] == [1, 2]
    finally:
        again.close()
    assert isinstance(open_event_log(InMemoryStore()), InMemoryEventLog)
