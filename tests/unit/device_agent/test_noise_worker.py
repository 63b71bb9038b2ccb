"""The noise worker process draws what the trainer would draw in line, in the same order,
drops a job the trainer gives up on, and reports a failing fill to the trainer."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
import torch

from device_agent.training.noise_prefetch import SecureGaussian, SeededGaussian, StepNoise
from device_agent.training.noise_worker import NoiseWorker

NUMEL = 30_000  # 34 steps a block at most: the plan is 1, 2, 4, 8, 16, 34, ...
STEPS = 80


@pytest.fixture(scope="module", autouse=True)
def started_worker() -> Iterator[None]:
    worker = NoiseWorker.claim(wait=60.0)  # importing torch in the worker takes a while
    assert worker is not None, "the noise worker process did not start"
    worker.finish()
    yield


def draws(background: bool, fill: SeededGaussian | SecureGaussian | None = None,
          steps: int = STEPS) -> tuple[str, torch.Tensor]:
    with StepNoise(NUMEL, 0.5, fill or SeededGaussian(3), steps=steps,
                   background=background) as noise:
        return noise.drawer, torch.stack([noise.next().clone() for _ in range(steps)])


def test_the_process_draws_the_inline_vectors_in_the_same_order() -> None:
    (inline_by, inline), (ahead_by, ahead) = draws(False), draws(True)
    assert (inline_by, ahead_by) == ("inline", "process")
    assert torch.equal(inline, ahead)
    assert len({row[:4].tolist().__repr__() for row in ahead}) == STEPS, "fresh each step"


def test_a_job_given_up_on_leaves_the_next_job_its_own_vectors() -> None:
    with StepNoise(NUMEL, 0.5, SeededGaussian(3), steps=STEPS, background=True) as noise:
        for _ in range(5):  # into the third block, with the worker drawing the fourth
            noise.next()
    assert torch.equal(draws(True)[1], draws(False)[1])


def test_a_failing_fill_surfaces_in_the_trainer_and_the_worker_serves_on() -> None:
    with StepNoise(NUMEL, -1.0, SeededGaussian(3), steps=4, background=True) as noise, \
            pytest.raises(RuntimeError, match="std"):
        assert noise.drawer == "process"
        noise.next()
    assert draws(True)[0] == "process"


def test_one_job_at_a_time_a_second_draws_on_a_thread() -> None:
    with StepNoise(NUMEL, 0.5, SeededGaussian(3), steps=STEPS, background=True) as first:
        by, second = draws(True)
        assert (first.drawer, by) == ("process", "thread")
        assert torch.equal(second, draws(False)[1])


def test_secure_noise_is_drawn_by_the_process_with_the_planned_std() -> None:
    by, vectors = draws(True, SecureGaussian(), steps=40)
    assert by == "process"
    assert vectors.std().item() == pytest.approx(0.5, rel=0.01)  # 1.2M coordinates
    assert not torch.equal(vectors, draws(True, SecureGaussian(), steps=40)[1])


def test_fills_the_process_cannot_copy_draw_on_a_thread() -> None:
    def fill(buffer: torch.Tensor, std: float) -> None:
        buffer.normal_(0.0, std)

    with StepNoise(NUMEL, 0.5, fill, steps=3, background=True) as noise:
        assert noise.drawer == "thread"
    used = SeededGaussian(1)
    used(torch.empty(2), 1.0)
    with pytest.raises(TypeError, match="already drawn"):
        pickle.dumps(used)


def test_fills_the_worker_could_not_import_or_continue_draw_on_a_thread() -> None:
    class Local(SeededGaussian):
        pass

    used = SeededGaussian(3)
    used(torch.empty(2), 1.0)
    for fill in (Local(3), used):
        with StepNoise(NUMEL, 0.5, fill, steps=3, background=True) as noise:
            assert noise.drawer == "thread"
    assert draws(True)[0] == "process", "the worker is still free"


def test_a_worker_that_died_is_an_error_for_its_job_then_never_claimed() -> None:
    worker = NoiseWorker()  # a private one: the shared worker serves the other tests
    try:
        assert worker._ready(60.0)
        worker._process.kill()
        worker._process.wait()
        with pytest.raises(RuntimeError, match="gone"):
            worker.start(NUMEL, 0.5, [1, 2], SeededGaussian(3))
            worker.next_block()
        worker.finish()  # no error: nothing to cancel
        assert not worker._ready(0.0)
    finally:
        worker.stop()
