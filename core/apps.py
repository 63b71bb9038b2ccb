"""User code ("apps"): the models, data sources, loss and metrics an engineer brings.

An app is a plain object an engineer's package exposes::

    from fedcoord import App, DataParams, LocalDataset

    def tabular_net(input_dim: int, num_classes: int, hidden: int = 32) -> nn.Module: ...
    def csv_rows(params: DataParams) -> LocalDataset: ...

    app = App(models={"tabular_net": tabular_net}, data={"csv_rows": csv_rows})

and fedcoord finds it in one of two ways:

* ``--app package.module:app`` on ``fedctl agent run``, ``fedctl simulate`` and
  ``fedctl coordinator serve`` (the coordinator builds the model at launch to check it, and
  evaluates on server data), or :func:`load_app` from Python;
* installed entry points, discovered the first time a name is not found:
  ``[project.entry-points."fedcoord.models"]`` (name -> model factory),
  ``"fedcoord.data"`` (name -> data source) and ``"fedcoord.apps"`` (name -> :class:`App`).

The pieces, each small and typed:

* a **model factory** returns an ``nn.Module`` from the task's ``model.arguments`` (its
  annotated keyword parameters are the schema the task file is checked against; see
  :mod:`core.models`);
* a **data source** returns one device's :class:`~core.data.dataset.LocalDataset` (train
  and eval splits) from the agent's data spec ``NAME:key=value,...``; it reads its fields
  through :class:`~core.data.spec.DataParams`, which checks them and names the spec in
  errors (``params.shard()`` gives this device's ``K/N`` share);
* optionally a **loss** ``(model, x_batch, y_batch) -> scalar tensor``: the objective of the
  local training step (fedcoord runs the step around it: optimizer, clipping, DP);
* optionally **metrics** ``(model, x, y) -> {name: value}``, added to every evaluation of
  the app's models (on devices, in simulation, on the coordinator's server data).

The built-in models (mlp, cnn, logistic_regression) and data sources (digits, synthetic) are
registered through the same registries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.data.spec import DataSource, register_data_source
from core.errors import AppError
from core.models import LossFn, MetricsFn, ModelFactory, register_model

#: Entry-point groups scanned for user code.
MODELS_GROUP = "fedcoord.models"
DATA_GROUP = "fedcoord.data"
APPS_GROUP = "fedcoord.apps"


@dataclass(frozen=True)
class App:
    """One engineer's package of user code. ``loss`` and ``metrics`` apply to the app's own
    models."""

    models: Mapping[str, ModelFactory] = field(default_factory=dict)
    data: Mapping[str, DataSource] = field(default_factory=dict)
    loss: LossFn | None = None
    metrics: MetricsFn | None = None


_lock = threading.Lock()
#: Apps installed so far, by the text that named them (loading the same app twice is a no-op).
_installed: dict[str, App] = {}
_discovered = False


def load_app(text: str) -> App:
    """Imports ``module:attribute`` (an :class:`App`, or a function returning one) and
    registers its models and data sources. Loading the same app again does nothing.

    Raises:
        AppError: the text is not ``module:attribute``, the module does not import (the
            message carries the import error), the attribute is missing or not an App, or
            one of its names is already registered by other code.
    """
    module_name, colon, attribute = text.strip().partition(":")
    if not colon or not module_name or not attribute:
        raise AppError(f"--app {text!r}: expected MODULE:ATTRIBUTE, e.g. custom_app:app")
    with _lock:
        if text in _installed:
            return _installed[text]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AppError(f"--app {text!r}: cannot import {module_name!r}: "
                       f"{type(exc).__name__}: {exc} (is the package installed, or on "
                       f"PYTHONPATH?)") from exc
    try:
        value = getattr(module, attribute)
    except AttributeError:
        raise AppError(f"--app {text!r}: module {module_name!r} has no attribute "
                       f"{attribute!r}") from None
    app = _as_app(value, f"--app {text!r}")
    install(app, origin=f"app {text}")
    with _lock:
        _installed[text] = app
    return app


def install(app: App, *, origin: str) -> None:
    """Registers ``app``'s models (with its hooks) and data sources; ``origin`` names it in
    messages.

    Raises:
        AppError: a name is already registered (by the built-ins or another app).
    """
    try:
        for name, factory in app.models.items():
            register_model(name, loss=app.loss, metrics=app.metrics, origin=origin)(factory)
        for name, source in app.data.items():
            register_data_source(name, source, origin=origin)
    except (ValueError, TypeError) as exc:
        raise AppError(f"{origin}: {exc}") from None


def discover_entry_points() -> None:
    """Registers every installed ``fedcoord.apps``/``fedcoord.models``/``fedcoord.data``
    entry point, once per process. A broken entry point is skipped here (so one bad package
    cannot hide the others) and reported when its name is asked for."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
    for group, register in ((APPS_GROUP, _register_app_entry),
                            (MODELS_GROUP, _register_model_entry),
                            (DATA_GROUP, _register_data_entry)):
        for entry in importlib.metadata.entry_points(group=group):
            origin = f"entry point {group}:{entry.name} = {entry.value}"
            try:
                register(entry.name, entry.load(), origin)
            except Exception as exc:  # noqa: BLE001 - any import error of user code
                _broken[entry.name] = f"{origin} failed to load: {type(exc).__name__}: {exc}"


#: Names whose entry point failed to load -> why (see :func:`broken_entry_point`).
_broken: dict[str, str] = {}


def broken_entry_point(name: str) -> str | None:
    """Why the entry point named ``name`` could not be registered, if it could not."""
    return _broken.get(name)


def _register_app_entry(name: str, value: object, origin: str) -> None:
    install(_as_app(value, origin), origin=origin)


def _register_model_entry(name: str, value: object, origin: str) -> None:
    if not callable(value):
        raise AppError(f"{origin}: expected a model factory, got {type(value).__name__}")
    install(App(models={name: value}), origin=origin)


def _register_data_entry(name: str, value: object, origin: str) -> None:
    if not callable(value):
        raise AppError(f"{origin}: expected a data source function, got {type(value).__name__}")
    install(App(data={name: value}), origin=origin)


def _as_app(value: object, where: str) -> App:
    if isinstance(value, App):
        return value
    if callable(value) and not isinstance(value, type):
        factory: Callable[[], object] = value
        try:
            made = factory()
        except Exception as exc:
            raise AppError(f"{where}: calling it to get the app failed: "
                           f"{type(exc).__name__}: {exc}") from exc
        if isinstance(made, App):
            return made
        value = made
    raise AppError(f"{where}: expected a fedcoord App (or a function returning one), got "
                   f"{type(value).__name__}")
