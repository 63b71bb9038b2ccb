"""Encodings, the model registry and the data generators."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.data.digits import digits_test_set, dirichlet_partition
from core.data.spec import load_dataset, parse_data_spec
from core.errors import DataSpecError, ModelSpecError, TensorFormatError
from core.models import build_model, initial_state, load_numpy_state, model_names, state_to_numpy
from core.tensors import (
    from_raw_bytes,
    load_safetensors,
    save_safetensors,
    tensor_infos,
    to_raw_bytes,
)
from core.types import ModelSpec

arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64]),
                    hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))


@settings(max_examples=50, deadline=None)
@given(st.lists(arrays, min_size=1, max_size=4))
def test_raw_buffers_and_safetensors_round_trip_in_order(values: list[np.ndarray]) -> None:
    state = {f"t{len(values) - i}": v for i, v in enumerate(values)}  # not sorted order
    raw = from_raw_bytes(to_raw_bytes(state), tensor_infos(state))
    st_ = load_safetensors(save_safetensors(state))
    for decoded in (raw, st_):
        assert list(decoded) == list(state)
        for k in state:
            np.testing.assert_array_equal(decoded[k], state[k])


def test_a_buffer_one_byte_short_is_refused() -> None:
    state = {"a": np.zeros(3, np.float32)}
    with pytest.raises(TensorFormatError, match="11 bytes, tensors need 12"):
        from_raw_bytes(to_raw_bytes(state)[:-1], tensor_infos(state))


def test_garbage_is_not_a_safetensors_file() -> None:
    with pytest.raises(TensorFormatError):
        load_safetensors(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


@pytest.mark.parametrize("spec", [
    ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
    ModelSpec("mlp", {"input_dim": 64, "hidden": [32, 16], "num_classes": 10}),
    ModelSpec("cnn", {}),
])
def test_registered_models_map_features_to_logits(spec: ModelSpec) -> None:
    import torch

    model = build_model(spec)
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    a, b = initial_state(spec, seed=3), initial_state(spec, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    load_numpy_state(model, a)
    assert all(np.array_equal(state_to_numpy(model)[k], a[k]) for k in a)


def test_no_registered_model_uses_batchnorm() -> None:
    import torch

    for name in model_names():
        spec = ModelSpec(name, {} if name == "cnn" else
                         {"input_dim": 64, "num_classes": 10, **({"hidden": [8]}
                                                                 if name == "mlp" else {})})
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in build_model(spec).modules())


@pytest.mark.parametrize(("spec", "words"), [
    (ModelSpec("resnet", {}), "unknown architecture 'resnet'"),
    (ModelSpec("mlp", {"input_dim": 64, "num_classes": 10}), "model.arguments.hidden: required"),
    (ModelSpec("mlp", {"input_dim": 64, "hidden": "abc", "num_classes": 10}),
     "model.arguments.hidden: expected a list of positive integers"),
    (ModelSpec("logistic_regression", {"input_dim": 0, "num_classes": 10}),
     "model.arguments.input_dim: expected a positive integer"),
    (ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 2, "depth": 3}),
     "model.arguments.depth: unknown argument"),
])
def test_bad_model_specs_name_the_argument(spec: ModelSpec, words: str) -> None:
    with pytest.raises(ModelSpecError, match=words):
        build_model(spec)


def test_synthetic_shards_are_deterministic_and_independent_of_each_other() -> None:
    a = load_dataset("synthetic:alpha=1,beta=1,shard=3/30")
    b = load_dataset("synthetic:alpha=1,beta=1,shard=3/30")
    c = load_dataset("synthetic:alpha=1,beta=1,shard=4/30")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape[1] == 60 and a.num_classes == 10
    assert a.x_train.shape != c.x_train.shape or not np.array_equal(a.x_train, c.x_train)
    assert len(a.y_train) + len(a.y_test) >= 50


def test_the_dirichlet_split_covers_every_training_sample_once() -> None:
    shards = dirichlet_partition(20, 0.5, 0)
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == 1797 - len(digits_test_set().y_test)
    assert min(len(s) for s in shards) >= 2
    # Non-IID: most devices miss several classes.
    _, y, _, _ = __import__("core.data.digits", fromlist=["_digits"])._digits()
    assert np.median([len(np.unique(y[s])) for s in shards]) < 9


@pytest.mark.parametrize(("text", "words"), [
    ("mnist:shard=0/2", "unknown source 'mnist'"),
    ("digits:shard=5/4", "shard index 5 out of range for 4 shards"),
    ("digits:shard=a/4", "shard must look like K/N"),
    ("digits:shard=1/4,dirichlet=-1", "dirichlet must be positive"),
    ("synthetic:alpha=1,shard=0/3", "beta is required"),
    ("digits:shard=0/4,colour=red", "unknown key 'colour'"),
    ("digits:shard", "expected key=value"),
])
def test_bad_data_specs_name_the_field(text: str, words: str) -> None:
    with pytest.raises(DataSpecError, match=words):
        load_dataset(parse_data_spec(text))


def test_centralized_training_on_digits_learns() -> None:
    from core.training import evaluate, train_local
    from core.types import LocalTraining

    shards = [load_dataset(f"digits:shard={k}/5") for k in range(5)]
    x = np.concatenate([s.x_train for s in shards])
    y = np.concatenate([s.y_train for s in shards])
    model = build_model(ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10}))
    result = train_local(model, x, y, LocalTraining(epochs=5, batch_size=32, learning_rate=0.1,
                                                    momentum=0.9), seed=0)
    test = digits_test_set()
    _, acc = evaluate(model, test.x_test, test.y_test)
    assert result.num_examples == len(y) and acc > 0.9
