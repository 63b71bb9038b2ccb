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
* installed entry points, discovered by the registries the first time a name is not found
  (:mod:`core.entry_points`): ``[project.entry-points."fedcoord.models"]`` (name -> model
  factory), ``"fedcoord.data"`` (name -> data source) and ``"fedcoord.apps"`` (name ->
  :class:`App`).

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
import threading

from core.app_types import App, DataSource, LossFn, MetricsFn, ModelFactory
from core.data.spec import register_data_source
from core.entry_points import as_app
from core.errors import AppError
from core.models import register_model

__all__ = ["App", "DataSource", "LossFn", "MetricsFn", "ModelFactory", "install", "load_app"]

_lock = threading.Lock()
#: Apps installed so far, by the text that named them (loading the same app twice is a no-op).
_installed: dict[str, App] = {}


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
    try:
        app = as_app(value, f"--app {text!r}")
    except TypeError as exc:
        raise AppError(str(exc)) from None
    except Exception as exc:
        raise AppError(f"--app {text!r}: calling it to get the app failed: "
                       f"{type(exc).__name__}: {exc}") from exc
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
