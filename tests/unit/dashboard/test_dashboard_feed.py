"""The dashboard's event sink: it counts, and wakes the streams watching a task from whatever
thread the hub publishes on."""

from __future__ import annotations

import asyncio
import threading

from coordinator.dashboard.feed import DashboardFeed
from coordinator.observability.events import EventHub, EventKind


def test_a_publish_from_another_thread_wakes_the_watchers_of_that_task_only() -> None:
    feed = DashboardFeed()
    hub = EventHub([feed])

    async def scenario() -> tuple[bool, bool]:
        with feed.watch("t1") as t1, feed.watch("t2") as t2:
            assert feed.watching("t1") == 1
            thread = threading.Thread(target=lambda: hub.emit(
                EventKind.ROUND_OPENED, "t1", 1.0, round_number=1, values={"attempt": 1}))
            thread.start()
            thread.join()
            await asyncio.wait_for(t1.wait(), timeout=5)
            return t1.is_set(), t2.is_set()

    assert asyncio.run(scenario()) == (True, False)
    assert feed.watching("t1") == 0, "a stream that ended stops watching"
    assert feed.last_seq("t1") == 1 and (1, 1) in feed.activity("t1")


def test_closing_the_hub_closes_the_feed_and_wakes_every_stream() -> None:
    feed = DashboardFeed()
    hub = EventHub([feed])

    async def scenario() -> bool:
        with feed.watch("t1") as changed:
            hub.close()
            await asyncio.wait_for(changed.wait(), timeout=5)
            return feed.closed

    assert asyncio.run(scenario()) is True
