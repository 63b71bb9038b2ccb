"""Noise drawn ahead on a worker thread is the noise drawn in line, in the same order."""

from __future__ import annotations

import threading

import pytest
import torch

from device_agent.training.noise_prefetch import StepNoise


def seeded_fill(seed: int):  # noqa: ANN201 - a Fill
    generator = torch.Generator().manual_seed(seed)

    def fill(buffer: torch.Tensor, std: float) -> None:
        buffer.normal_(0.0, std, generator=generator)

    return fill


def vectors(background: bool, steps: int = 23, per_draw: int = 5) -> list[torch.Tensor]:
    with StepNoise(7, 0.5, seeded_fill(1), steps=steps, background=background,
                   steps_per_draw=per_draw) as noise:
        return [noise.next().clone() for _ in range(steps)]


def test_background_and_inline_draws_give_the_same_vectors_in_the_same_order() -> None:
    inline, ahead = vectors(False), vectors(True)
    assert len({tuple(v.tolist()) for v in inline}) == len(inline), "fresh noise each step"
    for a, b in zip(inline, ahead, strict=True):
        assert torch.equal(a, b)
    assert torch.cat(inline).std().item() == pytest.approx(0.5, rel=0.25)


def test_asking_past_the_planned_steps_is_an_error_and_the_worker_stops() -> None:
    before = threading.active_count()
    noise = StepNoise(3, 1.0, seeded_fill(0), steps=4, background=True, steps_per_draw=3)
    for _ in range(4):
        noise.next()
    with pytest.raises(RuntimeError, match="more noise vectors"):
        noise.next()
    noise.close()
    assert threading.active_count() == before


def test_a_failing_fill_surfaces_in_the_training_thread() -> None:
    def broken(buffer: torch.Tensor, std: float) -> None:
        raise OSError("entropy source gone")

    with StepNoise(3, 1.0, broken, steps=2, background=True) as noise, \
            pytest.raises(OSError, match="entropy"):
        noise.next()


def test_blocks_double_from_one_step_up_to_the_largest_draw_and_cover_every_step() -> None:
    from device_agent.training.noise_prefetch import DRAW_COORDINATES, block_plan

    numel = DRAW_COORDINATES // 8  # 8 steps fit in the largest draw
    assert block_plan(numel, 30) == [1, 2, 4, 8, 8, 7]
    assert block_plan(numel, 0) == []
    assert block_plan(DRAW_COORDINATES * 3, 3) == [1, 1, 1]
    assert block_plan(5, 10, steps_per_draw=4) == [4, 4, 2]


def test_default_growing_blocks_give_the_same_vectors_ahead_and_in_line() -> None:
    def draw(background: bool) -> list[torch.Tensor]:
        with StepNoise(50_000, 1.0, seeded_fill(4), steps=40, background=background) as noise:
            return [noise.next().clone() for _ in range(40)]

    for a, b in zip(draw(False), draw(True), strict=True):
        assert torch.equal(a, b)
