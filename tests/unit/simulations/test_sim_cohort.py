"""The vectorized trainers do, per device, exactly what core.training.train_local does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.models import initial_state
from core.training import train_local
from core.types import LocalTraining, ModelSpec
from simulations.cohort import (
    CohortResult,
    DeviceJob,
    DeviceTable,
    LocalObjective,
    full_steps,
    make_trainer,
    mlp_layers,
)
from simulations.config import EngineKind

LINEAR = ModelSpec("logistic_regression", {"input_dim": 6, "num_classes": 3})
MLP = ModelSpec("mlp", {"input_dim": 6, "hidden": [5, 4], "num_classes": 3})
VECTORIZED = (EngineKind.BMM, EngineKind.VMAP)


def _globals(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(v) for n, v in initial_state(spec, 3).items()}


def _train(kind: EngineKind, spec: ModelSpec, table: DeviceTable, local: LocalTraining,
           jobs: list[DeviceJob], *, mu: float = 0.0,
           corrections: dict[str, torch.Tensor] | None = None) -> CohortResult:
    trainer = make_trainer(kind, spec, table, local, LocalObjective(prox_mu=mu))
    return trainer.train(_globals(spec), jobs, corrections)


def _assert_same(a: CohortResult, b: CohortResult) -> None:
    # Batched kernels sum in another order than the loop: float32 reassociation, amplified
    # over up to ~60 momentum steps with batch 1, reaches ~1e-3 relative. A wrong shuffle,
    # step count or correction moves the weights by O(1), far outside this tolerance.
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], rtol=5e-3, atol=5e-4)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.num_examples, b.num_examples)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5, equal_nan=True)


def test_loop_trainer_is_train_local_device_by_device(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation([7, 23])
    local = LocalTraining(epochs=3, batch_size=10, learning_rate=0.1)
    result = _train(EngineKind.LOOP, LINEAR, DeviceTable(data), local,
                    [DeviceJob(0, 5), DeviceJob(1, 6)])
    for i, seed in enumerate((5, 6)):
        model = make_trainer(EngineKind.LOOP, LINEAR, DeviceTable(data), local,
                             LocalObjective())._model  # type: ignore[attr-defined]
        model.load_state_dict(_globals(LINEAR))
        reference = train_local(model, data.x_train[i], data.y_train[i], local, seed=seed)
        for name, p in model.state_dict().items():
            torch.testing.assert_close(result.params[name][i], p, rtol=0, atol=0)
        assert result.loss[i] == pytest.approx(reference.loss, rel=1e-12)
        assert result.steps[i] == reference.steps


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=5),
       epochs=st.integers(1, 3), batch=st.sampled_from([1, 4, 10]),
       momentum=st.sampled_from([0.0, 0.9]), mu=st.sampled_from([0.0, 0.5]),
       budgets=st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=5, max_size=5),
       mlp=st.booleans(), scaffold=st.booleans())
def test_vectorized_trainers_equal_the_one_device_at_a_time_loop(
        make_federation, sizes: list[int], epochs: int, batch: int,  # type: ignore[no-untyped-def]
        momentum: float, mu: float, budgets: list[int | None], mlp: bool,
        scaffold: bool) -> None:
    """Same seeds, same shuffles: devices with fewer examples, smaller last batches, fewer
    steps (budgets), momentum, a proximal term and SCAFFOLD corrections all agree."""
    spec = MLP if mlp else LINEAR
    table = DeviceTable(make_federation(sizes))
    local = LocalTraining(epochs=epochs, batch_size=batch, learning_rate=0.05,
                          momentum=momentum)
    jobs = [DeviceJob(d, 100 + d, budgets[d]) for d in range(len(sizes))]
    generator = torch.Generator().manual_seed(len(sizes))
    corrections = ({n: 0.1 * torch.randn(len(jobs), *p.shape, generator=generator)
                    for n, p in _globals(spec).items()} if scaffold else None)
    reference = _train(EngineKind.LOOP, spec, table, local, jobs, mu=mu, corrections=corrections)
    for kind in VECTORIZED:
        _assert_same(_train(kind, spec, table, local, jobs, mu=mu, corrections=corrections),
                     reference)


def test_a_budget_cuts_a_device_short_and_its_loss_is_not_reported(make_federation) -> None:  # type: ignore[no-untyped-def]
    table = DeviceTable(make_federation([30, 30]))
    local = LocalTraining(epochs=2, batch_size=10, learning_rate=0.1)
    result = _train(EngineKind.BMM, LINEAR, table, local, [DeviceJob(0, 1, 4), DeviceJob(1, 2)])
    assert result.steps.tolist() == [4, full_steps(30, local)]
    assert np.isnan(result.loss[0]) and np.isfinite(result.loss[1])


def test_the_same_job_gives_the_same_model_whatever_else_is_in_the_cohort(make_federation) -> None:  # type: ignore[no-untyped-def]
    table = DeviceTable(make_federation([5, 30, 12]))
    local = LocalTraining(epochs=2, batch_size=4, learning_rate=0.1)
    alone = _train(EngineKind.BMM, MLP, table, local, [DeviceJob(2, 9)])
    together = _train(EngineKind.BMM, MLP, table, local,
                      [DeviceJob(1, 8), DeviceJob(2, 9), DeviceJob(0, 7)])
    for name in alone.params:
        torch.testing.assert_close(together.params[name][1], alone.params[name][0])


def test_auto_picks_bmm_for_linear_and_mlp_and_vmap_for_the_cnn() -> None:
    from core.models import build_model

    assert mlp_layers(build_model(LINEAR)) == [("linear.weight", "linear.bias")]
    assert mlp_layers(build_model(MLP)) is not None
    assert mlp_layers(build_model(ModelSpec("cnn", {}))) is None


def test_the_vmap_trainer_handles_the_cnn(make_federation) -> None:  # type: ignore[no-untyped-def]
    cnn = ModelSpec("cnn", {"input_dim": 16, "image_size": 4, "channels": [2, 3],
                            "num_classes": 3})
    table = DeviceTable(make_federation([9, 14], features=16))
    local = LocalTraining(epochs=1, batch_size=4, learning_rate=0.1)
    jobs = [DeviceJob(0, 1), DeviceJob(1, 2, 2)]
    _assert_same(_train(EngineKind.VMAP, cnn, table, local, jobs),
                 _train(EngineKind.LOOP, cnn, table, local, jobs))


def test_bmm_refuses_models_it_cannot_run(make_federation) -> None:  # type: ignore[no-untyped-def]
    table = DeviceTable(make_federation([4], features=64))
    with pytest.raises(ValueError, match="bmm"):
        make_trainer(EngineKind.BMM, ModelSpec("cnn", {}), table, LocalTraining(),
                     LocalObjective())
