"""Aggregation runs off the event loop: an accepted upload is folded into the aggregate by the
aggregation worker (the caller may remove its spool file at once), the release waits for
every fold, and a fold that fails refuses the round instead of releasing a mean that
silently misses a recorded report. In a server, the wrapped aggregator's folds run on the
aggregation thread and its release on the commit thread, never on the loop's."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds import round_machine
from coordinator.rounds.aggregators import Aggregate, PlainAggregator, ReleaseRefused
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.commits import BackgroundAggregator, InlineExecutor
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import Participation, UpdateHeader
from core.sampling import CohortDraw
from core.tensors import sha256_hex
from core.types import DeviceAttributes, ModelSpec, RoundState, TaskSpec


def spool(tmp_path: Path, name: str, values: list[float]) -> Path:
    path = tmp_path / name
    np.asarray(values, dtype="<f4").tofile(path)
    return path


def test_folds_wait_on_the_worker_and_the_release_waits_for_every_fold(tmp_path: Path) -> None:
    gate = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(gate.wait, 10)  # the worker is busy until the gate opens
    agg = BackgroundAggregator(PlainAggregator(2, weight_cap=1000), pool)
    for name, values, examples in (("a", [1.0, 2.0], 1), ("b", [3.0, 6.0], 3)):
        path = spool(tmp_path, name, values)
        agg.add_upload(path, examples, {"loss": float(examples)})
        path.unlink()  # as the upload path does once add_upload returns
    assert agg.queued == 2
    gate.set()
    released = agg.release(None)
    assert agg.queued == 0
    np.testing.assert_allclose(released.mean, [2.5, 5.0])  # (1*[1,2] + 3*[3,6]) / 4
    assert released.metrics["examples"] == 4.0 and released.metrics["loss"] == 2.5
    assert list(tmp_path.iterdir()) == []  # the held links are gone after their folds
    pool.shutdown()


class Exploding(PlainAggregator):
    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        raise ValueError("disk read failed")


def test_a_fold_that_fails_refuses_the_release_with_its_reason(tmp_path: Path) -> None:
    agg = BackgroundAggregator(Exploding(2, weight_cap=1000), InlineExecutor())
    agg.add_upload(spool(tmp_path, "a", [1.0, 2.0]), 1, {})
    with pytest.raises(ReleaseRefused, match=r"could not be folded in \(ValueError: disk read"):
        agg.release(None)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # only the caller's own file


def test_checks_and_the_metrics_policy_are_the_wrapped_aggregators(tmp_path: Path) -> None:
    inner = PlainAggregator(2, weight_cap=1000, withhold_metrics=True)
    agg = BackgroundAggregator(inner, InlineExecutor())
    assert agg.metrics_policy is inner.metrics_policy
    with pytest.raises(Exception, match="withholds per-device metrics"):
        agg.check_upload({"loss": 1.0})


class ThreadRecording(PlainAggregator):
    """Records the thread each call runs on."""

    threads: list[tuple[str, str]] = []

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        self.threads.append(("add_upload", threading.current_thread().name))
        super().add_upload(path, num_examples, metrics, scale=scale)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        self.threads.append(("release", threading.current_thread().name))
        return super().release(draw)


def test_in_a_server_folds_and_the_release_never_run_on_the_callers_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def recording(spec: TaskSpec, size: int, **_: object) -> PlainAggregator:
        return ThreadRecording(size, weight_cap=spec.robustness.weight_cap)

    monkeypatch.setattr(round_machine, "begin_aggregation", recording)
    ThreadRecording.threads = []
    clock = ManualClock()
    service = CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path), clock,
                                 rng=random.Random(1),
                                 settings=CoordinatorSettings(commit_in_background=True))
    spec = TaskSpec(name="bg", model=ModelSpec("logistic_regression",
                                               {"input_dim": 2, "num_classes": 2}),
                    rounds=1, clients_per_round=2, min_reports=2, over_selection=1.0)
    tid = service.create_task(spec).record.task_id
    attrs = DeviceAttributes()
    for d in ("a", "b"):
        service.check_in(d, attrs, tid)
    clock.advance(1.1)
    for d in ("a", "b"):
        r = service.check_in(d, attrs, tid)
        p = Participation(d, tid, r.round_number, r.token)
        plan = service.get_plan(p)
        payload = np.full(sum(t.numel for t in plan.update_tensors), 0.5, "<f4").tobytes()
        up = service.begin_upload(UpdateHeader(p, 5, list(plan.update_tensors), len(payload),
                                               sha256_hex(payload), {}))
        up.write(payload)
        service.finish_upload(up)
    deadline = time.monotonic() + 60  # the workers, however loaded the machine
    while service.list_rounds(tid)[0].state is not RoundState.COMMITTED:
        assert time.monotonic() < deadline
        service.tick()
        time.sleep(0.01)
    service.close()
    caller = threading.current_thread().name
    assert [call for call, _ in ThreadRecording.threads] == ["add_upload", "add_upload",
                                                             "release"]
    assert all(name != caller for _, name in ThreadRecording.threads)
    assert {name.split("_")[0] for call, name in ThreadRecording.threads
            if call == "add_upload"} == {"fedcoord-aggregate"}
    assert ThreadRecording.threads[-1][1].startswith("fedcoord-commit")
