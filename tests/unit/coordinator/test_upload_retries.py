"""Uploads are idempotent: the same upload retried (same upload id and hash) gets its first
answer instead of ALREADY_EXISTS, and counts once; another upload of a device that reported
is still a duplicate. An upload that never finished leaves nothing behind."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late
from coordinator.rounds.service import CoordinatorService
from coordinator.rounds.uploads import Upload
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import TensorInfo, sha256_hex, to_raw_bytes
from core.types import DeviceAttributes, ModelSpec, RoundState, TaskSpec

ATTRS = DeviceAttributes()
ID_A = "a" * 16
ID_B = "upload-B_0123456789"
#: The update tensors of the task's model (read off the plan once: a closed round has none).
TENSORS: list[TensorInfo] = []


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(5), settings=CoordinatorSettings())


def seats(service: CoordinatorService, clock: ManualClock, n: int = 3, min_reports: int = 2
          ) -> dict[str, Participation]:
    task_id = service.create_task(TaskSpec(
        name="retries", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=2, clients_per_round=n, min_reports=min_reports, over_selection=1.0)).record.task_id
    devices = [f"d{i}" for i in range(n)]
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    out = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        assert r.outcome is CheckInOutcome.ACCEPTED
        out[d] = Participation(d, task_id, r.round_number, r.token)
    TENSORS[:] = service.get_plan(out[devices[0]]).update_tensors
    return out


def begin(service: CoordinatorService, p: Participation, upload_id: str, value: float = 1.0
          ) -> tuple[Upload, bytes]:
    tensors = TENSORS
    payload = to_raw_bytes({t.name: np.full(t.shape, value, np.float32) for t in tensors})
    header = UpdateHeader(p, 10, list(tensors), len(payload), sha256_hex(payload), {},
                          upload_id=upload_id)
    return service.begin_upload(header), payload


def send(service: CoordinatorService, p: Participation, upload_id: str, value: float = 1.0
         ) -> str:
    up, payload = begin(service, p, upload_id, value)
    try:
        if up.takes_data:
            up.write(payload)
        return service.finish_upload(up)
    finally:
        service.abort_upload(up)


def reports(service: CoordinatorService, p: Participation) -> int:
    return service.list_rounds(p.task_id)[-1].reports


def test_the_same_upload_retried_gets_its_first_answer_and_counts_once(
    service: CoordinatorService, clock: ManualClock
) -> None:
    s = seats(service, clock)
    assert send(service, s["d0"], ID_A) == "update accepted"
    assert "a retry of an upload that was accepted" in send(service, s["d0"], ID_A)
    assert reports(service, s["d0"]) == 1
    with pytest.raises(Duplicate, match="already reported"):
        send(service, s["d0"], ID_B)
    with pytest.raises(Duplicate, match="sha256 differs"):
        send(service, s["d0"], ID_A, value=2.0)
    with pytest.raises(Duplicate, match="already reported"):
        send(service, s["d0"], "")  # an old client: no idempotency


def test_a_retry_after_the_round_closed_still_gets_accepted(
    service: CoordinatorService, clock: ManualClock
) -> None:
    s = seats(service, clock, n=2, min_reports=2)
    send(service, s["d0"], ID_A)
    send(service, s["d1"], ID_B)
    first = service.list_rounds(s["d0"].task_id)[0]
    assert first.state is RoundState.COMMITTED
    assert "accepted" in send(service, s["d0"], ID_A)
    with pytest.raises(Late):
        send(service, s["d0"], "another-upload-id-0")


def test_a_refused_update_retried_gets_the_same_refusal(
    service: CoordinatorService, clock: ManualClock
) -> None:
    s = seats(service, clock)
    with pytest.raises(InvalidRequest, match="NaN") as first:
        send(service, s["d0"], ID_A, value=float("nan"))
    with pytest.raises(InvalidRequest) as again:
        send(service, s["d0"], ID_A, value=float("nan"))
    assert str(again.value) == str(first.value)


@pytest.mark.parametrize("bad", ["short", "x" * 65, "has space in it!!", "ünïcode-ünïcode-ü"])
def test_a_malformed_upload_id_is_refused_without_echoing_it(
    service: CoordinatorService, clock: ManualClock, bad: str
) -> None:
    s = seats(service, clock)
    with pytest.raises(InvalidRequest, match="upload_id must be 16-64 characters") as info:
        begin(service, s["d0"], bad)
    assert len(str(info.value)) < 200


def test_an_upload_that_never_finished_leaves_no_trace(
    service: CoordinatorService, clock: ManualClock
) -> None:
    s = seats(service, clock)
    up, payload = begin(service, s["d0"], ID_A)
    up.write(payload)  # every byte arrived, but the call was cancelled before it ended
    service.abort_upload(up)
    assert up.spool is not None and not up.spool.path.exists()
    assert send(service, s["d0"], ID_B) == "update accepted"
    assert reports(service, s["d0"]) == 1


def test_a_retry_while_the_first_attempt_looks_open_replaces_it(
    service: CoordinatorService, clock: ManualClock
) -> None:
    s = seats(service, clock)
    stale, payload = begin(service, s["d0"], ID_A)
    stale.write(payload)
    with pytest.raises(Duplicate, match="upload in progress"):
        begin(service, s["d0"], ID_B)  # another upload: refused while one is open
    assert send(service, s["d0"], ID_A) == "update accepted"  # the retry replaces it
    with pytest.raises((Late, Duplicate)):
        service.finish_upload(stale)
    assert reports(service, s["d0"]) == 1
