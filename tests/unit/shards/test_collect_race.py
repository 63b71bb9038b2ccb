"""A collect that waits for an update being added hands back a sum that names the device
whenever it holds its update (found in review: the device left ``folding`` in one locked step
and joined ``reported`` in the next, and a collect in between took a sum holding the update
without the device, which then escaped DP's count of devices)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from test_shard_state import KEY_OF_ROUND, clock, shard, upload, vec  # noqa: F401

from coordinator.aggregator_shard import accumulator


class DelayingLock:
    """Same underlying lock (the Condition keeps using it); the uploading thread's second
    `with self._lock` after the fold is delayed."""

    def __init__(self, real):
        self.real = real
        self.thread = None
        self.armed = 0

    def __enter__(self):
        if threading.current_thread() is self.thread and self.armed:
            self.armed -= 1
            if self.armed == 0:
                time.sleep(0.3)
        return self.real.__enter__()

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)


def test_a_collect_during_an_add_names_every_device_whose_update_it_holds(
        shard, monkeypatch) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    lock = DelayingLock(shard._lock)
    shard._lock = lock
    folding, release = threading.Event(), threading.Event()
    real = accumulator.iter_float32

    def slow(path: Path):
        folding.set()
        release.wait(10)
        yield from real(path)
        lock.thread, lock.armed = threading.current_thread(), 2

    monkeypatch.setattr(accumulator, "iter_float32", slow)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(upload(shard, vec(5))))
    worker.start()
    assert folding.wait(10)
    collected = []
    collector = threading.Thread(target=lambda: collected.append(shard.collect(KEY_OF_ROUND)))
    collector.start()
    time.sleep(0.1)
    release.set()
    worker.join(10)
    collector.join(10)
    (part,) = collected
    assert answers == ["update accepted"]
    assert part.reported == ["dev-1"] and part.weight == 10.0 and part.total[0] == 50.0
