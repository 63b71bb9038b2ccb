"""FedAvg and the server optimizers, as pure math over arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.aggregation.fedavg import StreamingWeightedMean, weighted_mean
from core.aggregation.server_optimizers import apply_server_optimizer
from core.tensors import load_safetensors, save_safetensors
from core.types import ServerOptimizer, ServerOptimizerKind


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n), min_size=1, max_size=6),
    st.lists(st.integers(1, 1000), min_size=6, max_size=6),
    st.integers(1, n))))
def test_chunked_streaming_mean_equals_numpy_average(data: tuple) -> None:  # type: ignore[type-arg]
    rows, weights, chunk = data
    updates = [np.array(r, dtype=np.float32) for r in rows]
    w = [float(x) for x in weights[:len(updates)]]
    acc = StreamingWeightedMean(updates[0].size)
    for u, wi in zip(updates, w, strict=True):
        for start in range(0, u.size, chunk):
            acc.add_chunk(start, u[start:start + chunk], wi)
        acc.finish_update(wi)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=w)
    np.testing.assert_allclose(acc.mean(), expected.astype(np.float32), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(weighted_mean(updates, w), acc.mean())


def test_an_empty_aggregate_has_no_mean() -> None:
    with pytest.raises(ValueError, match="no update"):
        StreamingWeightedMean(3).mean()


def test_a_chunk_outside_the_update_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        StreamingWeightedMean(3).add_chunk(2, np.ones(2, np.float32), 1.0)


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32)}


def test_fedavg_with_unit_learning_rate_adds_the_mean_delta_exactly() -> None:
    p = params()
    delta = {k: np.full_like(v, 0.25) for k, v in p.items()}
    new, _ = apply_server_optimizer(p, delta, ServerOptimizer(), None)
    for k in p:
        np.testing.assert_array_equal(new[k], p[k] + np.float32(0.25))
    assert list(new) == list(p)


@pytest.mark.parametrize("kind", list(ServerOptimizerKind))
def test_optimizer_state_stored_between_rounds_gives_the_same_result(
    kind: ServerOptimizerKind,
) -> None:
    import torch

    config = ServerOptimizer(kind=kind, learning_rate=0.1)
    rng = np.random.default_rng(1)
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params().items()}
              for _ in range(4)]
    # Across "restarts": state goes through a safetensors file each round.
    p, state = params(), None
    for d in deltas:
        p, flat = apply_server_optimizer(p, d, config, state)
        state = load_safetensors(save_safetensors(flat)) if flat else None
    # One live torch optimizer over the same pseudo-gradients.
    from core.aggregation.server_optimizers import _FACTORIES

    live = {k: torch.tensor(v, requires_grad=True) for k, v in params().items()}
    opt = _FACTORIES[kind](list(live.values()), config)
    for d in deltas:
        for k, t in live.items():
            t.grad = -torch.from_numpy(d[k])
        opt.step()
    for k in p:
        np.testing.assert_array_equal(p[k], live[k].detach().numpy())


def test_fedyogi_moves_against_the_pseudo_gradient() -> None:
    p = {"w": np.zeros(4, np.float32)}
    new, state = apply_server_optimizer(p, {"w": np.ones(4, np.float32)},
                                        ServerOptimizer(kind=ServerOptimizerKind.FEDYOGI,
                                                        learning_rate=0.1), None)
    assert (new["w"] > 0).all() and {"w/exp_avg", "w/exp_avg_sq", "w/step"} <= set(state)
