"""A model's initial weights depend on (spec, seed) alone, also while other threads build
models: a coordinator builds a launch's model off its event loop while its commit thread may
build one for server-side evaluation, both drawing from torch's global RNG."""

from __future__ import annotations

import threading

import numpy as np

from core.models import build_model, initial_state
from core.types import ModelSpec

SPEC = ModelSpec("mlp", {"input_dim": 64, "hidden": [256, 256], "num_classes": 10})


def test_initial_weights_are_the_seeds_while_another_thread_builds_models() -> None:
    reference = initial_state(SPEC, seed=7)
    stop = threading.Event()

    def build_meanwhile() -> None:
        while not stop.is_set():
            build_model(SPEC)

    others = [threading.Thread(target=build_meanwhile) for _ in range(2)]
    for t in others:
        t.start()
    try:
        for _ in range(30):
            state = initial_state(SPEC, seed=7)
            assert all(np.array_equal(state[k], reference[k]) for k in reference)
    finally:
        stop.set()
        for t in others:
            t.join()
