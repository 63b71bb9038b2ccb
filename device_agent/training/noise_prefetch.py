"""DP-SGD noise for many steps per draw, optionally drawn ahead on a worker thread.

Each step of DP-SGD adds a fresh N(0, std^2) vector as long as the model. Drawing it costs
about as much as a non-private step of a small model (torch's Mersenne-Twister Gaussian is
~3.5 ns a coordinate on this machine, our AES-CTR one ~12 ns hardened), plus a call's
overhead. :class:`StepNoise` draws ``steps_per_draw`` steps' vectors in one call (about
4 MiB), and with ``background=True`` a worker thread draws the next block while training
uses the current one. The noise does not depend on the data or the model, so drawing ahead
changes nothing: the same generator gives the same vectors in the same order either way
(one worker, blocks handed over in order). Blocks, not single steps, are handed over
because every hand-over needs the GIL: per-step hand-overs made the training thread wait
for the GIL more than the drawing saved (measured). The CPU work is the same; only the wall
time shrinks, where a second core is idle.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

#: ``fill(buffer, std)`` overwrites ``buffer`` with N(0, std^2) noise.
Fill = Callable[[torch.Tensor, float], None]

#: Coordinates per draw: 1 MiB of float32.
DRAW_COORDINATES = 1 << 18


class StepNoise:
    """``steps`` noise vectors of ``numel`` float32 coordinates with std ``std``, drawn by
    ``fill`` in blocks of ``steps_per_draw`` (default: ~4 MiB), on a worker thread when
    ``background``. Use as a context manager, or call :meth:`close`."""

    def __init__(self, numel: int, std: float, fill: Fill, *, steps: int,
                 background: bool, steps_per_draw: int | None = None) -> None:
        if numel < 1 or steps < 0:
            raise ValueError(f"need numel >= 1 and steps >= 0, got {numel} and {steps}")
        per_draw = steps_per_draw or max(1, DRAW_COORDINATES // numel)
        self._per_draw = max(1, min(per_draw, steps))
        self._numel = numel
        self._std = std
        self._fill = fill
        self._draws_left = -(-steps // self._per_draw)
        self._steps_left = steps
        self._block: torch.Tensor | None = None
        self._used = self._per_draw
        self._thread: threading.Thread | None = None
        if background and self._draws_left:
            self._free: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()
            self._ready: queue.SimpleQueue[torch.Tensor | BaseException] = queue.SimpleQueue()
            for _ in range(min(2, self._draws_left)):
                self._free.put(self._new_block())
            self._thread = threading.Thread(target=self._work, args=(self._draws_left,),
                                            name="dp-noise", daemon=True)
            self._thread.start()

    @property
    def std(self) -> float:
        """The standard deviation every coordinate is drawn with."""
        return self._std

    def _new_block(self) -> torch.Tensor:
        return torch.empty(self._per_draw, self._numel, dtype=torch.float32)

    def _work(self, draws: int) -> None:
        for _ in range(draws):
            block = self._free.get()
            if block is None:
                return
            try:
                self._fill(block, self._std)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._ready.put(exc)
                return
            self._ready.put(block)

    def _next_block(self) -> torch.Tensor:
        self._draws_left -= 1
        if self._thread is None:
            block = self._block if self._block is not None else self._new_block()
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
        if self._used == self._per_draw:
            self._block = self._next_block()
            self._used = 0
        assert self._block is not None
        row = self._block[self._used]
        self._used += 1
        return row

    def close(self) -> None:
        """Stops the worker, if any (it finishes the block it is drawing)."""
        if self._thread is not None:
            self._free.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> StepNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
