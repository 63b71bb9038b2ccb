"""The device transport answers a call only once the participant writes it made are in the
database, and the writes of calls answered together share one flush (group commit)."""

from __future__ import annotations

import asyncio
import threading

from coordinator.storage import StorageError
from coordinator.transport.device_servicer import _GroupCommit


class Writes:
    """The four calls _GroupCommit makes of the service, over a counter of queued writes;
    a flush blocks until the test lets it finish (as a commit waits for the disk)."""

    def __init__(self) -> None:
        self.queued = 0
        self.written = 0
        self.flushes: list[int] = []
        self.deferred = False
        self.go = threading.Event()
        self.fail = False

    def defer_participant_writes(self) -> None:
        self.deferred = True

    def participant_writes_queued(self) -> int:
        return self.queued

    def participant_writes_durable(self, seq: int) -> bool:
        return self.written >= seq

    def flush_participant_writes(self) -> None:
        self.go.wait(10)
        if self.fail:
            raise StorageError("database is locked")
        batch = self.queued - self.written
        self.written = self.queued
        self.flushes.append(batch)


def test_calls_answered_together_share_one_flush_and_wait_for_it() -> None:
    async def scenario() -> tuple[Writes, list[str]]:
        writes = Writes()
        group = _GroupCommit(writes)  # type: ignore[arg-type]
        answered: list[str] = []

        async def call(name: str) -> None:
            writes.queued += 1  # the service call's write
            await group.durable()
            answered.append(name)

        calls = [asyncio.create_task(call(f"device-{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        assert answered == []  # nobody hears before the write is in
        writes.go.set()
        await asyncio.gather(*calls)
        return writes, answered

    writes, answered = asyncio.run(scenario())
    assert writes.deferred
    assert sorted(answered) == [f"device-{i}" for i in range(5)]
    assert writes.flushes == [5]


def test_a_call_without_writes_waits_for_nothing() -> None:
    async def scenario() -> Writes:
        writes = Writes()
        await asyncio.wait_for(_GroupCommit(writes).durable(), 1)  # type: ignore[arg-type]
        return writes

    assert asyncio.run(scenario()).flushes == []


def test_a_failed_flush_reaches_every_waiting_call_and_the_next_call_flushes_again() -> None:
    async def scenario() -> Writes:
        writes = Writes()
        group = _GroupCommit(writes)  # type: ignore[arg-type]
        writes.fail = True
        writes.go.set()
        writes.queued = 2
        results = await asyncio.gather(group.durable(), group.durable(), return_exceptions=True)
        assert [type(r) for r in results] == [StorageError, StorageError]
        writes.fail = False
        await group.durable()
        return writes

    assert asyncio.run(scenario()).flushes == [2]
