"""User code ("apps"): how an engineer's models, data sources, loss and metrics are found,
checked and used. No network: the registries, the training loop and the loader."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedcoord
from core import apps, entry_points, models
from core.data import spec as data_spec
from core.errors import AppError, DataSpecError, ModelSpecError
from core.models import build_model, model_hooks, model_names, state_to_numpy
from core.tensors import save_safetensors
from core.training import evaluate, evaluate_metrics, train_local
from core.types import LocalTraining, ModelSpec


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test registers into copies of the registries; entry points are rediscovered."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setattr(models, "_discovered", False)
    monkeypatch.setattr(models, "_refused", {})
    monkeypatch.setattr(data_spec, "_SOURCES", dict(data_spec._SOURCES))
    monkeypatch.setattr(data_spec, "_discovered", False)
    monkeypatch.setattr(data_spec, "_refused", {})
    monkeypatch.setattr(entry_points, "_found", None)
    monkeypatch.setattr(entry_points, "_broken", {})
    monkeypatch.setattr(apps, "_installed", {})
    yield


def wide_net(input_dim: int, num_classes: int, hidden: Sequence[int] = (8,),
             dropout: float = 0.0, activation: str = "relu", bias: bool = True) -> nn.Module:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    return nn.Sequential(nn.Linear(input_dim, hidden[0], bias=bias), act(),
                         nn.Dropout(dropout), nn.Linear(hidden[0], num_classes, bias=bias))


def blobs(params: fedcoord.DataParams) -> fedcoord.LocalDataset:
    shard, num_shards = params.shard()
    features = params.integer("features", default=5)
    rng = np.random.default_rng(shard)
    x = rng.normal(size=(40, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return fedcoord.split_local(x, y, test_fraction=0.25, rng=rng, classes=2)


calls: list[str] = []


def counting_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    calls.append("loss")
    return nn.functional.cross_entropy(model(x), y)


def positives(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"predicted_positive": float((model(x).argmax(1) == 1).float().mean())}


demo_app = fedcoord.App(models={"wide_net": wide_net}, data={"blobs": blobs},
                        loss=counting_loss, metrics=positives)


def make_app() -> fedcoord.App:
    return demo_app


not_an_app = 42


def test_an_app_named_module_colon_attribute_registers_its_models_and_data() -> None:
    app = fedcoord.load_app(f"{__name__}:demo_app")
    assert app is demo_app
    assert "wide_net" in model_names()
    data = fedcoord.load_dataset("blobs:shard=1/4,features=3")
    assert data.feature_shape == (3,) and data.num_classes == 2
    model = build_model(ModelSpec("wide_net", {"input_dim": 3, "num_classes": 2}))
    assert model(torch.zeros(1, 3)).shape == (1, 2)


def test_a_function_returning_an_app_is_an_app_too() -> None:
    assert fedcoord.load_app(f"{__name__}:make_app") is demo_app


def test_loading_the_same_app_twice_is_harmless() -> None:
    fedcoord.load_app(f"{__name__}:demo_app")
    fedcoord.load_app(f"{__name__}:demo_app")
    apps.install(demo_app, origin="the same app by another name")
    assert model_hooks("wide_net").loss is counting_loss


@pytest.mark.parametrize(("text", "message"), [
    ("no_colon", "expected MODULE:ATTRIBUTE"),
    ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    (f"{__name__}:missing", "has no attribute 'missing'"),
    (f"{__name__}:not_an_app", "expected a fedcoord App .* got int"),
])
def test_an_app_that_cannot_be_loaded_is_refused_with_what_was_wrong(text: str,
                                                                    message: str) -> None:
    with pytest.raises(AppError, match=message):
        fedcoord.load_app(text)


def test_an_app_cannot_take_a_name_that_is_already_registered() -> None:
    with pytest.raises(AppError, match="'mlp' is already registered \\(built-in\\)"):
        apps.install(fedcoord.App(models={"mlp": wide_net}), origin="app clash")
    with pytest.raises(AppError, match="'digits' is already registered"):
        apps.install(fedcoord.App(data={"digits": blobs}), origin="app clash")


@pytest.mark.parametrize(("arguments", "message"), [
    ({"input_dim": 3}, "model.arguments.num_classes: required by 'wide_net'"),
    ({"input_dim": 3, "num_classes": 2, "dropout": "lots"},
     "model.arguments.dropout: expected a finite number, got 'lots'"),
    ({"input_dim": 3, "num_classes": 2, "activation": 3},
     "model.arguments.activation: expected a string, got 3"),
    ({"input_dim": 3, "num_classes": 2, "bias": "yes"},
     "model.arguments.bias: expected true or false"),
    ({"input_dim": 3, "num_classes": 2, "colour": "red"},
     "model.arguments.colour: unknown argument for 'wide_net'"),
    ({"input_dim": 3, "num_classes": 2, "activation": "swish"},
     "'wide_net' \\(app .*\\) failed to build: KeyError"),
])
def test_a_user_models_arguments_are_checked_against_its_annotations(
        arguments: dict[str, object], message: str) -> None:
    fedcoord.load_app(f"{__name__}:demo_app")
    with pytest.raises(ModelSpecError, match=message):
        build_model(ModelSpec("wide_net", arguments))


def test_an_unknown_architecture_says_where_user_models_come_from() -> None:
    with pytest.raises(ModelSpecError, match="unknown architecture 'resnet9000'.*--app"):
        build_model(ModelSpec("resnet9000", {}))


def test_a_user_data_source_is_checked_like_a_built_in_one() -> None:
    fedcoord.load_app(f"{__name__}:demo_app")
    with pytest.raises(DataSpecError, match="unknown key 'colour' for blobs"):
        fedcoord.load_dataset("blobs:shard=0/2,colour=red")
    with pytest.raises(DataSpecError, match="features must be a non-negative integer"):
        fedcoord.load_dataset("blobs:shard=0/2,features=x")
    with pytest.raises(DataSpecError, match="shard=K/N is required"):
        fedcoord.load_dataset("blobs")


def test_a_data_source_that_returns_something_else_is_refused() -> None:
    apps.install(fedcoord.App(data={"broken": lambda params: [1, 2, 3]}), origin="app bad")
    with pytest.raises(DataSpecError, match="returned list, not a LocalDataset"):
        fedcoord.load_dataset("broken")


def test_the_apps_loss_is_the_training_objective_and_its_metrics_join_evaluation() -> None:
    fedcoord.load_app(f"{__name__}:demo_app")
    data = fedcoord.load_dataset("blobs:shard=0/1")
    model = build_model(ModelSpec("wide_net", {"input_dim": 5, "num_classes": 2}))
    hooks = model_hooks("wide_net")
    calls.clear()
    result = train_local(model, data.x_train, data.y_train,
                         LocalTraining(epochs=2, batch_size=10), seed=0, loss=hooks.loss)
    assert calls == ["loss"] * result.steps
    assert hooks.metrics is not None
    metrics = evaluate_metrics(model, data.x_test, data.y_test, hooks.metrics)
    assert set(metrics) == {"predicted_positive"} and 0 <= metrics["predicted_positive"] <= 1
    loss, accuracy = evaluate(model, data.x_test, data.y_test, loss=hooks.loss)
    assert np.isfinite(loss) and 0 <= accuracy <= 1


def test_built_in_models_have_no_hooks() -> None:
    assert model_hooks("mlp") == models.ModelHooks()


def test_a_pulled_model_loads_with_one_call(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(textwrap.dedent("""\
        name: t
        model: {architecture: mlp, arguments: {input_dim: 4, hidden: [3], num_classes: 2}}
        rounds: 1
        clients_per_round: 1
        min_reports: 1
    """))
    trained = build_model(ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2}))
    pulled = tmp_path / "model.safetensors"
    pulled.write_bytes(save_safetensors(state_to_numpy(trained)))
    model = fedcoord.load_model(task, pulled)
    x = torch.randn(5, 4)
    assert not model.training
    assert torch.equal(model(x), trained.eval()(x))


def test_installed_entry_points_are_found_without_any_flag(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "ep_demo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""\
        from torch import nn

        def tiny(input_dim: int, num_classes: int) -> nn.Module:
            return nn.Linear(input_dim, num_classes)
    """))
    dist = tmp_path / "ep_demo_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-demo-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [fedcoord.models]
        ep_tiny = ep_demo_pkg:tiny
        ep_broken = ep_demo_pkg:does_not_exist
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ep_demo_pkg", raising=False)
    model = build_model(ModelSpec("ep_tiny", {"input_dim": 3, "num_classes": 2}))
    assert isinstance(model, nn.Linear)
    with pytest.raises(ModelSpecError, match="entry point fedcoord.models:ep_broken .* failed "
                                             "to load: AttributeError"):
        build_model(ModelSpec("ep_broken", {}))
