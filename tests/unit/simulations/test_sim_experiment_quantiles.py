"""A simulated experiment releases, per arm, quantiles of its devices' examples' losses from
KLL sketches merged with the coordinator's code (core.evaluation.kll): within their
rank-error bound of the pooled losses, with each device's examples counted once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from core.evaluation.per_example import per_example_values
from core.models import load_numpy_state
from core.training import evaluate
from simulations.experiment import ExperimentRunner, load_experiment_file

TASK = {
    "name": "ab-quantiles", "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 64, "num_classes": 10}},
    "rounds": 2, "clients_per_round": 10, "over_selection": 1.0, "min_reports": 5,
    "local": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.05},
}
EXPERIMENT = {
    "arms": [{"name": "initial", "weight": 0.5, "trained_rounds": 0},
             {"name": "trained", "weight": 0.5, "trained_rounds": 2}],
    "primary_metric": {"name": "loss", "direction": "decrease"},
    "mde": 0.1, "alpha": 0.05, "horizon_rounds": 3, "salt": "q-salt", "devices_per_round": 8,
}


def test_each_arm_releases_the_quantiles_of_its_devices_examples_within_the_bound(
        tmp_path: Path) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump({**TASK, "simulation": {
        "population": {"devices": 12, "data": "digits:dirichlet=100"},
        "experiment": EXPERIMENT}}), encoding="utf-8")
    runner = ExperimentRunner(*load_experiment_file(path))
    history = list(runner.rounds())
    last = history[-1]
    assert set(last.example_quantiles) == {"initial", "trained"}
    assert last.as_dict()["example_quantiles"]["loss"] == {
        a: dict(q) for a, q in last.example_quantiles.items()}
    model = runner._model
    for arm, name in enumerate(("initial", "trained")):
        devices = [d for d, a in runner.assigned.items() if a == arm]
        load_numpy_state(model, runner._models[arm])
        losses = []
        for d in devices:
            x, y = runner.data.x_device_test[d], runner.data.y_device_test[d]
            values = per_example_values(model, x, y, ["loss", "accuracy"])
            mean_loss, accuracy = evaluate(model, x, y)  # the per-example values add up
            assert np.mean(values["loss"]) == pytest.approx(mean_loss, rel=1e-5)
            assert np.mean(values["accuracy"]) == pytest.approx(accuracy)
            losses.append(values["loss"])
        pooled = np.sort(np.concatenate(losses))
        released = last.example_quantiles[name]
        bound = released["example_rank_error"]
        assert 0.0 <= bound < 0.05
        for q, key in ((0.1, "example_q10"), (0.5, "example_q50"), (0.9, "example_q90")):
            low = np.searchsorted(pooled, released[key], side="left") / pooled.size
            high = np.searchsorted(pooled, released[key], side="right") / pooled.size
            assert low - bound - 1e-6 <= q <= high + bound + 1e-6, (name, q)
    # The trained model's losses sit lower than the initial one's.
    assert (last.example_quantiles["trained"]["example_q50"]
            < last.example_quantiles["initial"]["example_q50"])
