"""The simulator's cohort aggregator with ``aggregation.robust``, and the attacks the
robustness benchmark injects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.aggregation.robust import RobustAggregationError
from core.privacy.accounting import Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.types import ModelSpec, RobustAggregation, RobustKind, SecAggProtocol, SecureAggregation
from simulations.aggregation import CohortAggregator
from simulations.attacks import (
    Attack,
    AttackingTrainer,
    AttackKind,
    backdoor_success,
    choose_attackers,
    poison_data,
)
from simulations.cohort import CohortResult, DeviceJob
from simulations.data import FederatedData

MODEL = ModelSpec("logistic_regression", {"input_dim": 2, "num_classes": 2})


def aggregator(rule: RobustAggregation, **kw: object) -> CohortAggregator:
    return CohortAggregator(model=MODEL, rounds=1, clients_per_round=5, seed=0, robust=rule,
                            **kw)  # type: ignore[arg-type]


def cohort(values: list[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    global_params = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    trained = {n: np.stack([np.full_like(v, x) for x in values]) for n, v in
               global_params.items()}
    return global_params, trained


def test_plain_rounds_apply_the_robust_rule() -> None:
    g, trained = cohort([1.0, 2.0, 3.0, 4.0, 500.0])
    agg = aggregator(RobustAggregation(kind=RobustKind.MEDIAN))
    out = agg.mean_delta(g, trained, [10] * 5)
    np.testing.assert_allclose(out["w"], 3.0)
    assert agg.metrics["robust_kept"] == 5.0


def test_norm_bound_under_secure_aggregation_clips_before_masking() -> None:
    g, trained = cohort([0.01, 0.01, 0.01, 0.01, 0.02])
    sa = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                           clip=0.5)
    bound = 0.02  # each delta has 6 coordinates: norms 0.0245 and 0.049
    agg = aggregator(RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=bound),
                     secure_aggregation=sa)
    out = agg.mean_delta(g, trained, [1] * 5)
    flat = np.concatenate([out["w"].ravel(), out["b"]])
    assert np.linalg.norm(flat) == pytest.approx(bound, rel=0.05)


@pytest.mark.parametrize("kind", [RobustKind.MEDIAN, RobustKind.KRUM])
def test_rules_that_need_every_update_are_refused_under_secure_aggregation(
        kind: RobustKind) -> None:
    sa = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001)
    with pytest.raises(RobustAggregationError, match="aggregation.robust.kind.*masked sum"):
        aggregator(RobustAggregation(kind=kind), secure_aggregation=sa)


def test_central_dp_refuses_data_dependent_rules() -> None:
    dp = PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                     clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE, population=100,
                     max_epsilon=1000.0)
    with pytest.raises(RobustAggregationError, match="central DP"):
        aggregator(RobustAggregation(kind=RobustKind.TRIMMED_MEAN), privacy=dp)
    with pytest.raises(RobustAggregationError, match="adaptive"):
        aggregator(RobustAggregation(kind=RobustKind.NORM_BOUND), privacy=dp)
    aggregator(RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=0.3), privacy=dp)


class _Fixed:
    def train(self, global_params: dict[str, torch.Tensor], jobs: list[DeviceJob],
              corrections: object = None) -> CohortResult:
        n = len(jobs)
        return CohortResult({k: v.unsqueeze(0).repeat(n, *[1] * v.dim()) + 1.0
                             for k, v in global_params.items()},
                            np.ones(n), np.ones(n), np.zeros(n))


def test_attackers_replace_only_their_own_updates() -> None:
    attack = Attack(kind=AttackKind.SCALING, fraction=0.2)
    attackers = choose_attackers(attack, 10)
    assert len(attackers) == 2
    trainer = AttackingTrainer(_Fixed(), attack, attackers, clients_per_round=5,
                               server_learning_rate=1.0)
    jobs = [DeviceJob(d, 0) for d in range(10)]
    out = trainer.train({"w": torch.zeros(3)}, jobs)
    for d in range(10):
        assert float(out.params["w"][d][0]) == (10.0 if d in attackers else 1.0)
    flip = AttackingTrainer(_Fixed(), Attack(kind=AttackKind.SIGN_FLIP, fraction=0.2),
                            attackers, clients_per_round=5, server_learning_rate=1.0)
    row = min(attackers)
    assert float(flip.train({"w": torch.zeros(3)}, jobs).params["w"][row][0]) == -1.0


def test_backdoor_poisons_only_the_attackers_data() -> None:
    x = [np.zeros((4, 8), np.float32) for _ in range(3)]
    y = [np.full(4, 5, np.int64) for _ in range(3)]
    data = FederatedData(x, y, np.ones((2, 8), np.float32), np.array([1, 2]), 10)
    poisoned = poison_data(data, frozenset({1}), Attack(kind=AttackKind.BACKDOOR, fraction=0.3))
    assert len(poisoned.y_train[0]) == 4 and len(poisoned.y_train[1]) == 8
    assert (poisoned.y_train[1][4:] == 0).all()
    assert (poisoned.x_train[1][4:, -4:] == 1.0).all()
    assert backdoor_success(np.array([0, 0, 3]), np.array([0, 1, 2]), target_class=0) == 0.5


def test_a_task_with_a_robust_rule_simulates_with_it() -> None:
    import dataclasses

    from core.types import Aggregation, LocalTraining
    from simulations.config import DataConfig, SelectionConfig, SimulationConfig
    from simulations.engine import Simulation

    config = SimulationConfig(
        name="robust", model=ModelSpec("logistic_regression", {"input_dim": 64,
                                                               "num_classes": 10}),
        data=DataConfig(spec="digits", num_devices=10, test_data="digits:split=test"),
        rounds=1, selection=SelectionConfig(clients_per_round=5),
        local=LocalTraining(epochs=1, batch_size=10, learning_rate=0.05))
    rule = RobustAggregation(kind=RobustKind.MULTI_KRUM, byzantine=1)
    sim = Simulation(dataclasses.replace(config, aggregation=Aggregation(robust=rule)))
    list(sim.rounds())
    assert sim.aggregator is not None and sim.aggregator.metrics["robust_kept"] == 4.0


def test_a_task_file_asking_for_a_rule_secure_aggregation_cannot_run_names_the_field() -> None:
    from simulations.config import parse_simulation_yaml
    from simulations.errors import SimulationConfigError

    text = """\
name: t
model: {architecture: mlp, arguments: {input_dim: 64, hidden: [16], num_classes: 10}}
rounds: 2
clients_per_round: 20
min_reports: 10
over_selection: 1.0
secure_aggregation: {clip: 1.0, dropout: 0.01, corrupt_fraction: 0.01}
aggregation: {robust: {kind: median}}
simulation:
  population: {devices: 40, data: "digits:dirichlet=0.5"}
"""
    with pytest.raises(SimulationConfigError) as refused:
        parse_simulation_yaml(text, source="t.yaml")
    assert str(refused.value).startswith("t.yaml: field 'aggregation.robust.kind': 'median' "
                                         "cannot run under secure aggregation")
