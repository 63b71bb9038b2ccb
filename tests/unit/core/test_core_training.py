"""core.training: the local training loop and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.digits import digits_test_set
from core.data.spec import load_dataset
from core.models import build_model, initial_state, load_numpy_state, state_to_numpy
from core.training import TrainResult, evaluate, train_local
from core.types import LocalOptimizerKind, LocalTraining, ModelSpec

MLP = ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10})
LOGREG = ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10})


def model_at(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    model = build_model(spec)
    load_numpy_state(model, initial_state(spec, seed=seed))
    return model


def test_centralized_mlp_on_all_digits_shards_reaches_90_percent_test_accuracy() -> None:
    shards = [load_dataset(f"digits:shard={k}/5") for k in range(5)]
    x = np.concatenate([s.x_train for s in shards])
    y = np.concatenate([s.y_train for s in shards])
    model = model_at(MLP)
    config = LocalTraining(epochs=5, batch_size=32, learning_rate=0.1, momentum=0.9)
    result = train_local(model, x, y, config, seed=0)
    test = digits_test_set()
    loss, accuracy = evaluate(model, test.x_test, test.y_test)
    assert result.num_examples == len(y)
    assert accuracy > 0.9 and loss < 0.5


def test_training_reports_examples_steps_and_last_epoch_loss() -> None:
    data = load_dataset("synthetic:alpha=1,beta=1,shard=0/4")
    n = len(data.y_train)
    config = LocalTraining(epochs=3, batch_size=16, learning_rate=0.05)
    result = train_local(model_at(LOGREG), data.x_train, data.y_train, config, seed=1)
    assert result.num_examples == n
    assert result.steps == 3 * -(-n // 16)
    assert np.isfinite(result.loss) and result.loss > 0


def test_the_reported_loss_is_the_mean_over_the_last_epoch() -> None:
    # With lr=0 nothing changes, so the last epoch's mean loss is the model's loss.
    data = load_dataset("digits:shard=0/3")
    model = model_at(MLP)
    before, _ = evaluate(model, data.x_train, data.y_train)
    config = LocalTraining(epochs=2, batch_size=7, learning_rate=0.0)
    result = train_local(model, data.x_train, data.y_train, config, seed=0)
    assert result.loss == pytest.approx(before, rel=1e-5)


@pytest.mark.parametrize("optimizer", list(LocalOptimizerKind))
def test_training_is_deterministic_in_the_seed(optimizer: LocalOptimizerKind) -> None:
    data = load_dataset("digits:shard=1/3")
    config = LocalTraining(epochs=2, batch_size=8, optimizer=optimizer, learning_rate=0.01,
                           momentum=0.5)
    runs = []
    for seed in (5, 5, 6):
        model = model_at(MLP)
        train_local(model, data.x_train, data.y_train, config, seed=seed)
        runs.append(state_to_numpy(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("optimizer", list(LocalOptimizerKind))
def test_each_optimizer_lowers_the_training_loss(optimizer: LocalOptimizerKind) -> None:
    data = load_dataset("digits:shard=0/2")
    model = model_at(MLP)
    before, _ = evaluate(model, data.x_train, data.y_train)
    rate = 0.1 if optimizer is LocalOptimizerKind.SGD else 0.01
    config = LocalTraining(epochs=3, batch_size=16, optimizer=optimizer, learning_rate=rate)
    train_local(model, data.x_train, data.y_train, config, seed=0)
    after, _ = evaluate(model, data.x_train, data.y_train)
    assert after < before / 2


def test_training_leaves_the_global_rng_and_the_models_mode_as_they_were() -> None:
    data = load_dataset("digits:shard=0/4")
    model = model_at(MLP)
    model.eval()
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    train_local(model, data.x_train, data.y_train, LocalTraining(), seed=3)
    evaluate(model, data.x_test, data.y_test)
    assert torch.equal(torch.rand(2), expected)
    assert not model.training


def test_a_final_partial_batch_is_trained_on() -> None:
    x = np.zeros((5, 60), np.float32)
    y = np.zeros(5, np.int64)
    result = train_local(model_at(LOGREG), x, y, LocalTraining(batch_size=4), seed=0)
    assert result == TrainResult(num_examples=5, loss=result.loss, steps=2)


def test_evaluate_returns_mean_loss_and_accuracy() -> None:
    model = build_model(ModelSpec("logistic_regression", {"input_dim": 2, "num_classes": 2}))
    load_numpy_state(model, {"linear.weight": np.eye(2, dtype=np.float32),
                             "linear.bias": np.zeros(2, np.float32)})
    x = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], np.float32)
    y = np.array([0, 1, 1], np.int64)
    loss, accuracy = evaluate(model, x, y, batch_size=2)
    right = float(np.log1p(np.exp(-2.0)))
    wrong = float(np.log1p(np.exp(2.0)))
    assert accuracy == pytest.approx(2 / 3)
    assert loss == pytest.approx((2 * right + wrong) / 3, rel=1e-6)


def test_evaluate_accepts_read_only_arrays() -> None:
    x = np.zeros((3, 60), np.float32)
    x.setflags(write=False)
    evaluate(model_at(LOGREG), x, np.zeros(3, np.int64))


@pytest.mark.parametrize("call", ["train", "evaluate"])
def test_empty_data_is_refused(call: str) -> None:
    x, y = np.zeros((0, 60), np.float32), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="no .* data"):
        if call == "train":
            train_local(model_at(LOGREG), x, y, LocalTraining(), seed=0)
        else:
            evaluate(model_at(LOGREG), x, y)


def test_features_and_labels_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        train_local(model_at(LOGREG), np.zeros((3, 60), np.float32), np.zeros(2, np.int64),
                    LocalTraining(), seed=0)


def test_zero_epochs_are_refused() -> None:
    with pytest.raises(ValueError, match="epochs and batch_size must be at least 1"):
        train_local(model_at(LOGREG), np.zeros((3, 60), np.float32), np.zeros(3, np.int64),
                    LocalTraining(epochs=0), seed=0)
