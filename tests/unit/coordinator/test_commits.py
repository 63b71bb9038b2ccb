"""Commits run off the event loop: while the worker applies the server optimizer, writes the
model file and evaluates, devices' calls are answered at once, and the round is recorded as
committed only when the machine collects the finished work (on the next tick)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.commits import CommitOutcome, ThreadCommits
from coordinator.rounds.service import CoordinatorService
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import sha256_hex
from core.types import DeviceAttributes, ModelSpec, RoundState, TaskSpec

ATTRS = DeviceAttributes()


class GatedCommits:
    """The real worker thread, whose jobs wait for ``gate`` before they start."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._worker = ThreadCommits()

    def submit(self, work: Callable[[], CommitOutcome]) -> Future[CommitOutcome]:
        def gated() -> CommitOutcome:
            self.gate.wait(10)
            return work()
        return self._worker.submit(gated)

    def close(self) -> None:
        self.gate.set()
        self._worker.close()


def test_a_round_commits_on_the_worker_and_lands_on_the_next_tick(tmp_path: Path) -> None:
    clock = ManualClock()
    commits = GatedCommits()
    service = CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path), clock,
                                 rng=random.Random(1), commits=commits)
    spec = TaskSpec(name="bg", model=ModelSpec("logistic_regression",
                                               {"input_dim": 2, "num_classes": 2}),
                    rounds=2, clients_per_round=2, min_reports=2, over_selection=1.0)
    tid = service.create_task(spec).record.task_id
    for d in ("a", "b"):
        service.check_in(d, ATTRS, tid)
    clock.advance(1.1)
    seats = []
    for d in ("a", "b"):
        r = service.check_in(d, ATTRS, tid)
        seats.append(Participation(d, tid, r.round_number, r.token))
    for p in seats:
        plan = service.get_plan(p)
        payload = np.full(sum(t.numel for t in plan.update_tensors), 0.5, "<f4").tobytes()
        up = service.begin_upload(UpdateHeader(p, 5, list(plan.update_tensors), len(payload),
                                               sha256_hex(payload), {}))
        up.write(payload)
        service.finish_upload(up)  # returns while the commit waits on the worker
    first = service.list_rounds(tid)[0]
    assert first.state is RoundState.AGGREGATING
    answer = service.check_in("c", ATTRS, tid)
    assert answer.outcome is CheckInOutcome.RETRY_LATER and "no round is open" in answer.message
    service.tick()
    assert service.list_rounds(tid)[0].state is RoundState.AGGREGATING  # still working
    commits.gate.set()
    deadline = time.monotonic() + 60  # the worker's commit, however loaded the machine
    while time.monotonic() < deadline:
        service.tick()
        if service.list_rounds(tid)[0].state is RoundState.COMMITTED:
            break
        threading.Event().wait(0.01)
    rounds = service.list_rounds(tid)
    assert rounds[0].state is RoundState.COMMITTED and rounds[0].model_version == 1
    assert service.model_version(tid, None).version == 1
    assert rounds[1].round_number == 2 and rounds[1].state is RoundState.SELECTING
    service.close()


def test_a_task_cancelled_during_its_commit_records_nothing(tmp_path: Path) -> None:
    clock = ManualClock()
    commits = GatedCommits()
    service = CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path), clock,
                                 rng=random.Random(1), commits=commits)
    spec = TaskSpec(name="bg", model=ModelSpec("logistic_regression",
                                               {"input_dim": 2, "num_classes": 2}),
                    rounds=2, clients_per_round=1, min_reports=1, over_selection=1.0)
    tid = service.create_task(spec).record.task_id
    service.check_in("a", ATTRS, tid)
    clock.advance(1.1)
    r = service.check_in("a", ATTRS, tid)
    p = Participation("a", tid, r.round_number, r.token)
    plan = service.get_plan(p)
    payload = np.zeros(sum(t.numel for t in plan.update_tensors), "<f4").tobytes()
    up = service.begin_upload(UpdateHeader(p, 5, list(plan.update_tensors), len(payload),
                                           sha256_hex(payload), {}))
    up.write(payload)
    service.finish_upload(up)
    service.cancel_task(tid)
    commits.gate.set()
    commits.close()
    service.tick()
    rounds = service.list_rounds(tid)
    assert [r.state for r in rounds] == [RoundState.FAILED]
    assert service.model_version(tid, None).version == 0
