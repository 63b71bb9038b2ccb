"""Small federations built directly from arrays, so the tests need no data generation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from simulations.data import FederatedData

FederationFactory = Callable[..., FederatedData]


def _tiny_federation(sizes: list[int], *, features: int = 6, classes: int = 3, seed: int = 0
                     ) -> FederatedData:
    """Devices with ``sizes`` examples of one shared linear labelling (learnable)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes))
    xs = [rng.normal(size=(n, features)).astype(np.float32) for n in sizes]
    x_test = rng.normal(size=(200, features)).astype(np.float32)
    return FederatedData(x_train=xs, y_train=[np.argmax(x @ w, axis=1) for x in xs],
                         x_test=x_test, y_test=np.argmax(x_test @ w, axis=1), num_classes=classes)


@pytest.fixture
def make_federation() -> FederationFactory:
    return _tiny_federation
