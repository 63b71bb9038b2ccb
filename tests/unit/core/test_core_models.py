"""core.models: the architecture registry, argument checking and numpy weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from core.errors import ModelSpecError
from core.models import (
    build_model,
    initial_state,
    load_numpy_state,
    model_names,
    register_model,
    state_to_numpy,
)
from core.types import ModelSpec

SPECS = {
    "logistic_regression": ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
    "mlp": ModelSpec("mlp", {"input_dim": 64, "hidden": [32, 16], "num_classes": 10}),
    "cnn": ModelSpec("cnn", {}),
}


def test_the_three_architectures_are_registered() -> None:
    assert {"cnn", "logistic_regression", "mlp"} <= set(model_names())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_model_maps_flat_features_to_logits(name: str) -> None:
    model = build_model(SPECS[name])
    assert model(torch.zeros(5, 64)).shape == (5, 10)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_model_uses_batchnorm(name: str) -> None:
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in build_model(SPECS[name]).modules())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_initial_state_is_deterministic_in_the_seed(name: str) -> None:
    a, b = initial_state(SPECS[name], seed=3), initial_state(SPECS[name], seed=3)
    c = initial_state(SPECS[name], seed=4)
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())


def test_initial_state_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    initial_state(SPECS["mlp"], seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_construction_is_deterministic_given_torch_manual_seed() -> None:
    torch.manual_seed(5)
    a = state_to_numpy(build_model(SPECS["cnn"]))
    torch.manual_seed(5)
    b = state_to_numpy(build_model(SPECS["cnn"]))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mlp_hidden_widths_define_the_layers() -> None:
    state = initial_state(SPECS["mlp"], seed=0)
    assert [v.shape for v in state.values()] == [(32, 64), (32,), (16, 32), (16,), (10, 16), (10,)]


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = build_model(ModelSpec("mlp", {"input_dim": 4, "hidden": [], "num_classes": 3}))
    assert [tuple(p.shape) for p in model.parameters()] == [(3, 4), (3,)]


def test_cnn_defaults_fit_8x8_digits_and_other_sizes_fit_their_input() -> None:
    spec = ModelSpec("cnn", {"input_dim": 3 * 6 * 6, "image_size": 6, "in_channels": 3,
                             "channels": [4, 8], "num_classes": 5})
    assert build_model(spec)(torch.zeros(2, 108)).shape == (2, 5)


def test_state_to_numpy_returns_independent_float32_copies_in_state_dict_order() -> None:
    model = build_model(SPECS["mlp"])
    state = state_to_numpy(model)
    assert list(state) == list(model.state_dict())
    state["0.weight"][:] = 0.0
    assert model.state_dict()["0.weight"].abs().sum() > 0


def test_load_numpy_state_copies_weights_in_any_key_order() -> None:
    source = initial_state(SPECS["mlp"], seed=1)
    model = build_model(SPECS["mlp"])
    load_numpy_state(model, dict(reversed(list(source.items()))))
    loaded = state_to_numpy(model)
    assert all(np.array_equal(loaded[k], source[k]) for k in source)


def test_load_numpy_state_rejects_a_missing_tensor() -> None:
    state = initial_state(SPECS["mlp"], seed=1)
    del state["2.bias"]
    with pytest.raises(ModelSpecError, match=r"missing \['2.bias'\]"):
        load_numpy_state(build_model(SPECS["mlp"]), state)


def test_load_numpy_state_rejects_an_unexpected_tensor() -> None:
    state = {**initial_state(SPECS["mlp"], seed=1), "extra": np.zeros(1, np.float32)}
    with pytest.raises(ModelSpecError, match=r"unexpected \['extra'\]"):
        load_numpy_state(build_model(SPECS["mlp"]), state)


def test_load_numpy_state_rejects_a_wrong_shape_and_loads_nothing() -> None:
    model = build_model(SPECS["mlp"])
    before = state_to_numpy(model)
    state = {k: np.zeros_like(v) for k, v in before.items()}
    state["4.weight"] = np.zeros((10, 17), np.float32)
    with pytest.raises(ModelSpecError, match=r"'4.weight' has shape \(10, 17\)"):
        load_numpy_state(model, state)
    assert all(np.array_equal(state_to_numpy(model)[k], before[k]) for k in before)


@pytest.mark.parametrize(("architecture", "arguments", "message"), [
    ("resnet", {}, "model.architecture: unknown architecture 'resnet'"),
    ("mlp", {"input_dim": 64, "num_classes": 10},
     "model.arguments.hidden: required by 'mlp'"),
    ("mlp", {"input_dim": 64, "hidden": "abc", "num_classes": 10},
     "model.arguments.hidden: expected a list of positive integers, got 'abc'"),
    ("mlp", {"input_dim": 64, "hidden": [8, 0], "num_classes": 10},
     "model.arguments.hidden: expected a list of positive integers, got \\[8, 0\\]"),
    ("mlp", {"input_dim": 64, "hidden": [8.0], "num_classes": 10},
     "model.arguments.hidden: expected a list of positive integers"),
    ("logistic_regression", {"input_dim": 0, "num_classes": 10},
     "model.arguments.input_dim: expected a positive integer"),
    ("logistic_regression", {"input_dim": "64", "num_classes": 10},
     "model.arguments.input_dim: expected a positive integer"),
    ("logistic_regression", {"input_dim": True, "num_classes": 10},
     "model.arguments.input_dim: expected a positive integer"),
    ("logistic_regression", {"input_dim": 64, "num_classes": 2.5},
     "model.arguments.num_classes: expected a positive integer"),
    ("logistic_regression", {"input_dim": 1 << 30, "num_classes": 2},
     "model.arguments.input_dim: expected a positive integer \\(at most"),
    ("logistic_regression", {"input_dim": 4, "num_classes": 2, "depth": 3},
     "model.arguments.depth: unknown argument for 'logistic_regression'"),
    ("cnn", {"input_dim": 60}, "model.arguments.input_dim: 60 must equal"),
    ("cnn", {"channels": [8]}, "model.arguments.channels: expected two conv widths"),
    ("cnn", {"input_dim": 1, "image_size": 1}, "model.arguments.image_size: at least 2"),
])
def test_bad_model_specs_fail_naming_the_field(architecture: str, arguments: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        build_model(ModelSpec(architecture, arguments))


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda input_dim: torch.nn.Identity())


def test_a_factory_with_an_unknown_annotation_is_refused() -> None:
    def factory(rate: complex) -> torch.nn.Module:
        return torch.nn.Identity()

    with pytest.raises(TypeError, match="'rate' needs an annotation of int, float, bool, str"):
        register_model("test_only_complex_model")(factory)
    assert "test_only_complex_model" not in model_names()
