"""The device transport answers a call only once the participant writes it made are in the
database, and the writes of calls answered together share one flush (group commit)."""

from __future__ import annotations

import asyncio
import threading

from coordinator.storage import StorageError
from coordinator.transport.device_servicer import DeviceServicer, _GroupCommit
from core.protocol import CheckInOutcome, CheckInResult
from core.types import API_VERSION
from protos.fedcoord.v1 import device_pb2


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


class CheckIns(Writes):
    """A service whose check-ins answer ``outcome``; another device's write is queued and
    its flush waits for the test (a slow disk)."""

    def __init__(self, outcome: CheckInOutcome, *, queues: bool = False) -> None:
        super().__init__()
        self.outcome = outcome
        self.queues = queues
        self.queued = 1  # another device's admission, not yet in the database

    def add_progress_listener(self, listener: object) -> None:
        pass

    def check_in(self, device_id: str, *args: object, **kwargs: object) -> CheckInResult:
        if self.queues:
            self.queued += 1
        return CheckInResult(self.outcome, task_id="t", round_number=1,
                             token="tok" if self.outcome is CheckInOutcome.ACCEPTED else "",
                             retry_after_s=2.0)


def _check_in(service: CheckIns) -> tuple[bool, device_pb2.CheckInResponse | None]:
    """Whether the check-in was answered before the queued flush was let through."""

    async def scenario() -> tuple[bool, device_pb2.CheckInResponse | None]:
        servicer = DeviceServicer(service, security=None)  # type: ignore[arg-type]
        call = asyncio.create_task(servicer.CheckIn(device_pb2.CheckInRequest(
            api_version=API_VERSION, device_id="d1", task_id="t"), None))  # type: ignore[arg-type]
        done, _ = await asyncio.wait({call}, timeout=0.3)
        answered_first = bool(done)
        service.go.set()
        return answered_first, await call

    return asyncio.run(scenario())


def test_a_come_back_later_is_not_held_behind_other_devices_writes() -> None:
    answered_first, response = _check_in(CheckIns(CheckInOutcome.RETRY_LATER))
    assert answered_first
    assert response is not None and response.retry_after_ms == 2000


def test_a_seat_is_answered_only_once_the_writes_before_it_are_in() -> None:
    # Its own admission may be the queued write (or an earlier call of the same device's).
    service = CheckIns(CheckInOutcome.ACCEPTED)
    answered_first, response = _check_in(service)
    assert not answered_first and service.flushes == [1]
    assert response is not None and response.participation_token == "tok"


def test_a_check_in_that_queued_a_write_waits_for_it_whatever_its_answer() -> None:
    service = CheckIns(CheckInOutcome.RETRY_LATER, queues=True)
    answered_first, _ = _check_in(service)
    assert not answered_first and service.flushes == [2]
