"""DP-SGD noise for many steps per draw, optionally drawn ahead by a worker.

Each step of DP-SGD adds a fresh N(0, std^2) vector as long as the model. Drawing it costs
about as much as a non-private step of a 54k-parameter MLP at batch 10, and more on the 199k
one (torch's Mersenne-Twister Gaussian is ~5 ns a coordinate on this 2-core machine, our
secure AES-CTR one ~12 ns hardened: ``benchmarks/privacy.py --only noise``).
:class:`StepNoise` draws the vectors of several steps in one call, in blocks that double in
size (1 step, 2, 4, ...) up to 4 MiB, and with ``background=True`` a worker draws the next
block while training uses the current one: the noise worker process
(:mod:`device_agent.training.noise_worker`) when the fill is one it can copy
(:class:`SeededGaussian`, :class:`SecureGaussian`) and it is free, else a thread.

The noise does not depend on the data or the model, so drawing ahead changes nothing: the
same generator gives the same vectors in the same order either way (one worker, the same
block sizes, blocks handed over in order). Blocks are large because every hand-over between
the threads costs the training thread a wait for the GIL: with one-step hand-overs a worker
drawing 54k-coordinate vectors slowed a non-private training step by 6-10%; with 100-step
draws, by nothing measurable (measured with an ad-hoc script). Doubling from one step keeps
the wait for the first block short. The CPU work is the same; only the wall time shrinks,
where a second core is idle.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from device_agent.training.noise_worker import NoiseWorker

#: ``fill(buffer, std)`` overwrites ``buffer`` with N(0, std^2) noise.
Fill = Callable[[torch.Tensor, float], None]

#: Largest draw, in coordinates: 4 MiB of float32. Of 1, 4 and 8 MiB with doubling, 4 MiB
#: gave the best 54k and 199k MLP epochs at batch 10 (ad-hoc runs); 8 MiB blocks no longer
#: stay in a core's cache.
DRAW_COORDINATES = 1 << 20

_STOP = object()


class SeededGaussian:
    """``fill`` from a torch generator seeded with ``seed`` (simulations and tests). Picklable
    until first used, so a noise worker process can draw the same stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __call__(self, buffer: torch.Tensor, std: float) -> None:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        buffer.normal_(0.0, std, generator=self._generator)

    def __getstate__(self) -> dict[str, int]:
        if self._generator is not None:
            raise TypeError("a SeededGaussian already drawn from cannot be copied")
        return {"seed": self.seed}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self._generator = None


class SecureGaussian:
    """``fill`` from :meth:`core.privacy.noise.NoiseSource.secure` (AES-CTR keyed from
    ``os.urandom`` on every call, hardened): what production devices draw. Picklable: the
    source keeps no state, so wherever it runs the key comes from that machine's CSPRNG."""

    def __call__(self, buffer: torch.Tensor, std: float) -> None:
        from core.privacy.noise import NoiseSource, fill_gaussian_

        fill_gaussian_(buffer, stddev=std, source=NoiseSource.secure())


def _copyable(fill: Fill) -> bool:
    """Whether the noise worker process can draw with ``fill``: one of our fills (exact
    types: the worker must be able to import it), not yet drawn from."""
    if type(fill) is SeededGaussian:
        return fill._generator is None
    return type(fill) is SecureGaussian


def block_plan(numel: int, steps: int, steps_per_draw: int | None = None) -> list[int]:
    """Steps per draw, in order, summing to ``steps``: ``steps_per_draw`` each when given,
    else 1, 2, 4, ... up to ``DRAW_COORDINATES // numel`` (at least 1)."""
    largest = steps_per_draw or max(1, DRAW_COORDINATES // numel)
    size = largest if steps_per_draw else 1
    plan: list[int] = []
    left = steps
    while left > 0:
        plan.append(min(size, left))
        left -= plan[-1]
        size = min(size * 2, largest)
    return plan


class StepNoise:
    """``steps`` noise vectors of ``numel`` float32 coordinates with std ``std``, drawn by
    ``fill`` in the blocks of :func:`block_plan`, on a worker thread when ``background``. Use
    as a context manager, or call :meth:`close`."""

    def __init__(self, numel: int, std: float, fill: Fill, *, steps: int,
                 background: bool, steps_per_draw: int | None = None) -> None:
        if numel < 1 or steps < 0:
            raise ValueError(f"need numel >= 1 and steps >= 0, got {numel} and {steps}")
        self._plan = block_plan(numel, steps, steps_per_draw)
        self._draw = 0
        self._numel = numel
        self._std = std
        self._fill = fill
        self._steps_left = steps
        self._block: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, ...] = ()
        self._used = 0
        self._thread: threading.Thread | None = None
        self._worker: NoiseWorker | None = None
        if background and self._plan and _copyable(fill) \
                and numel * max(self._plan) <= DRAW_COORDINATES:
            from device_agent.training.noise_worker import NoiseWorker

            self._worker = NoiseWorker.claim()
            if self._worker is not None:
                try:
                    self._worker.start(numel, std, self._plan, fill)
                except Exception:  # noqa: BLE001 - e.g. the worker is gone: a thread draws
                    self._worker.finish()
                    self._worker = None
        if background and self._plan and self._worker is None:
            # Two blocks in flight at most: the one training uses and the next.
            self._free: queue.SimpleQueue[object] = queue.SimpleQueue()
            self._ready: queue.SimpleQueue[torch.Tensor | BaseException] = queue.SimpleQueue()
            for _ in range(2):
                self._free.put(None)
            self._thread = threading.Thread(target=self._work, args=(list(self._plan),),
                                            name="dp-noise", daemon=True)
            self._thread.start()

    @property
    def drawer(self) -> str:
        """Who draws: ``"process"`` (the noise worker process), ``"thread"`` or ``"inline"``."""
        if self._worker is not None:
            return "process"
        return "thread" if self._thread is not None else "inline"

    @property
    def remaining(self) -> int:
        """Vectors still to come (``steps`` minus those handed out)."""
        return self._steps_left

    @property
    def std(self) -> float:
        """The standard deviation every coordinate is drawn with."""
        return self._std

    def _block_for(self, size: int, spare: object) -> torch.Tensor:
        if isinstance(spare, torch.Tensor) and spare.shape[0] == size:
            return spare
        return torch.empty(size, self._numel, dtype=torch.float32)

    def _work(self, plan: list[int]) -> None:
        for size in plan:
            spare = self._free.get()
            if spare is _STOP:
                return
            block = self._block_for(size, spare)
            try:
                self._fill(block, self._std)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._ready.put(exc)
                return
            self._ready.put(block)

    def _next_block(self) -> torch.Tensor:
        size = self._plan[self._draw]
        self._draw += 1
        if self._worker is not None:
            return self._worker.next_block()
        if self._thread is None:
            block = self._block_for(size, self._block)
            self._fill(block, self._std)
            return block
        if self._block is not None:
            self._free.put(self._block)
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def next(self) -> torch.Tensor:
        """The next step's vector: a view, valid until the following call.

        Raises:
            RuntimeError: more vectors asked for than ``steps``.
            whatever ``fill`` raised.
        """
        if self._steps_left == 0:
            raise RuntimeError("more noise vectors asked for than the steps planned")
        self._steps_left -= 1
        if self._used == len(self._rows):
            self._block = self._next_block()
            self._rows = self._block.unbind(0)  # one op for the block's row views
            self._used = 0
        row = self._rows[self._used]
        self._used += 1
        return row

    def close(self) -> None:
        """Stops the worker, if any (a thread finishes the block it is drawing; the process
        drops the rest of the job)."""
        if self._worker is not None:
            self._worker.finish()
            self._worker = None
        if self._thread is not None:
            self._free.put(_STOP)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> StepNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
