"""core.aggregation.server_optimizers: FedAvg/FedAvgM/FedAdam/FedYogi on the pseudo-gradient,
with optimizer state that survives being stored between rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.aggregation.server_optimizers import (
    Yogi,
    apply_server_optimizer,
    make_server_optimizer,
)
from core.tensors import load_safetensors, save_safetensors
from core.types import ServerOptimizer, ServerOptimizerKind

KINDS = list(ServerOptimizerKind)


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32)}


def deltas(rounds: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{k: rng.normal(scale=0.1, size=v.shape).astype(np.float32)
             for k, v in params().items()} for _ in range(rounds)]


floats32 = hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=5),
                      elements=st.floats(-1e6, 1e6, width=32))


@settings(max_examples=60, deadline=None)
@given(floats32.flatmap(lambda p: st.tuples(
    st.just(p), hnp.arrays(np.float32, p.shape, elements=st.floats(-1e6, 1e6, width=32)))))
def test_fedavg_with_learning_rate_1_adds_the_mean_delta_exactly(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    p, d = pair
    new, state = apply_server_optimizer({"x": p}, {"x": d}, ServerOptimizer(), None)
    np.testing.assert_array_equal(new["x"], p + d)
    assert new["x"].dtype == np.float32 and state == {}


@pytest.mark.parametrize("kind", KINDS)
def test_state_stored_as_safetensors_between_rounds_is_bit_identical_to_a_live_optimizer(
    kind: ServerOptimizerKind,
) -> None:
    config = ServerOptimizer(kind=kind, learning_rate=0.3)
    rounds = deltas(5)
    # Stored: a fresh optimizer each round, state through a safetensors file.
    stored, state = params(), None
    for delta in rounds:
        stored, flat = apply_server_optimizer(stored, delta, config, state)
        state = load_safetensors(save_safetensors(flat))
    # Live: one torch optimizer kept across the rounds.
    live = {k: torch.tensor(v, requires_grad=True) for k, v in params().items()}
    optimizer = make_server_optimizer(list(live.values()), config)
    for delta in rounds:
        for k, t in live.items():
            t.grad = -torch.from_numpy(delta[k])
        optimizer.step()
    for k in stored:
        np.testing.assert_array_equal(stored[k], live[k].detach().numpy())
    assert list(stored) == list(params())


@pytest.mark.parametrize(("kind", "keys"), [
    (ServerOptimizerKind.FEDAVG, set()),
    (ServerOptimizerKind.FEDAVGM, {"w/momentum_buffer", "b/momentum_buffer"}),
    (ServerOptimizerKind.FEDADAM, {f"{p}/{k}" for p in "wb" for k in
                                   ("step", "exp_avg", "exp_avg_sq")}),
    (ServerOptimizerKind.FEDYOGI, {f"{p}/{k}" for p in "wb" for k in
                                   ("step", "exp_avg", "exp_avg_sq")}),
])
def test_the_flat_state_is_keyed_by_parameter_and_state_key(kind: ServerOptimizerKind,
                                                            keys: set[str]) -> None:
    _, state = apply_server_optimizer(params(), deltas(1)[0], ServerOptimizer(kind=kind), None)
    assert set(state) == keys
    for key, value in state.items():
        expected = () if key.endswith("/step") else params()[key.split("/")[0]].shape
        assert value.shape == expected


def test_fedavgm_accumulates_momentum_across_rounds() -> None:
    config = ServerOptimizer(kind=ServerOptimizerKind.FEDAVGM, learning_rate=0.5, momentum=0.9)
    p = {"x": np.zeros(2, np.float32)}
    d1, d2 = {"x": np.array([1.0, -1.0], np.float32)}, {"x": np.array([0.5, 0.5], np.float32)}
    p, state = apply_server_optimizer(p, d1, config, None)
    p, state = apply_server_optimizer(p, d2, config, state)
    buffer = 0.9 * np.array([1.0, -1.0]) + np.array([0.5, 0.5])
    np.testing.assert_allclose(p["x"], 0.5 * np.array([1.0, -1.0]) + 0.5 * buffer, rtol=1e-6)
    np.testing.assert_allclose(state["x/momentum_buffer"], -buffer, rtol=1e-6)


def test_fedyogi_follows_the_yogi_update_rule() -> None:
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    config = ServerOptimizer(kind=ServerOptimizerKind.FEDYOGI, learning_rate=lr, beta1=b1,
                             beta2=b2, epsilon=eps)
    x = params()["w"].astype(np.float64)
    m, v = np.zeros_like(x), np.full_like(x, eps ** 2)
    current, state = {"w": params()["w"]}, None
    for delta in deltas(4):
        current, state = apply_server_optimizer(current, {"w": delta["w"]}, config, state)
        g = -delta["w"].astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * g * g * np.sign(v - g * g)
        x = x - lr * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(current["w"], x, rtol=1e-5, atol=1e-6)
    assert state is not None and float(state["w/step"]) == 4.0


def test_fedadam_and_fedyogi_move_the_model_along_the_mean_delta() -> None:
    for kind in (ServerOptimizerKind.FEDADAM, ServerOptimizerKind.FEDYOGI):
        config = ServerOptimizer(kind=kind, learning_rate=0.1)
        new, _ = apply_server_optimizer({"x": np.zeros(4, np.float32)},
                                        {"x": np.array([1, -1, 2, -2], np.float32)}, config,
                                        None)
        assert np.array_equal(np.sign(new["x"]), [1, -1, 1, -1])


@pytest.mark.parametrize("kind", KINDS)
def test_the_inputs_are_not_modified(kind: ServerOptimizerKind) -> None:
    p, d = params(), deltas(2)
    _, state = apply_server_optimizer(p, d[0], ServerOptimizer(kind=kind), None)
    saved = {k: v.copy() for k, v in state.items()}
    apply_server_optimizer(p, d[1], ServerOptimizer(kind=kind), state)
    assert all(np.array_equal(p[k], params()[k]) for k in p)
    assert all(np.array_equal(state[k], saved[k]) for k in state)


def test_a_mean_delta_missing_a_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        apply_server_optimizer(params(), {"w": params()["w"]}, ServerOptimizer(), None)


def test_a_mean_delta_of_the_wrong_shape_is_refused() -> None:
    delta = {**params(), "b": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"mean delta 'b' has shape \(4,\)"):
        apply_server_optimizer(params(), delta, ServerOptimizer(), None)


@pytest.mark.parametrize(("state", "message"), [
    ({"gone/exp_avg": np.zeros(3, np.float32)}, "'gone/exp_avg' names no parameter"),
    ({"w/momentum_buffer": np.zeros((3, 4), np.float32)}, "'momentum_buffer' is not kept"),
    ({"w/exp_avg": np.zeros(3, np.float32)}, r"'w/exp_avg' has shape \(3,\)"),
    ({"noslash": np.zeros(1, np.float32)}, "'noslash' names no parameter"),
])
def test_stored_state_that_does_not_fit_is_refused(state: dict[str, np.ndarray],
                                                   message: str) -> None:
    config = ServerOptimizer(kind=ServerOptimizerKind.FEDADAM)
    with pytest.raises(ValueError, match=message):
        apply_server_optimizer(params(), deltas(1)[0], config, state)


def test_yogi_returns_the_closures_loss() -> None:
    p = torch.zeros(2, requires_grad=True)
    optimizer = Yogi([p], lr=0.1)

    def closure() -> float:
        optimizer.zero_grad()
        loss = ((p - 1.0) ** 2).sum()
        torch.autograd.backward(loss)
        return float(loss.detach())

    assert optimizer.step(closure) == 2.0
    assert (p.detach() > 0).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"betas": (0.9, 1.0)}, "betas must be in"),
    ({"eps": 0.0}, "eps must be > 0"),
])
def test_yogi_refuses_bad_hyperparameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Yogi([torch.zeros(1, requires_grad=True)], **kwargs)  # type: ignore[arg-type]
