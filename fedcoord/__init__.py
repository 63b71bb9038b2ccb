"""fedcoord's public Python API for engineers' own code.

Bring a model, a data source and (optionally) a loss and metrics as an :class:`App`; load a
model ``fedctl model pull`` wrote with :func:`load_model`::

    import fedcoord
    model = fedcoord.load_model("task.yaml", "model.safetensors")

See :mod:`core.apps` for how apps are found (``--app module:attribute`` or entry points).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from core.apps import App, load_app
from core.data.dataset import LocalDataset, split_local
from core.data.params import DataParams
from core.data.spec import load_dataset
from core.models import ModelHooks, build_model, load_model
from core.types import DataSchema, ModelSpec, TaskSpec

try:
    __version__ = version("fedcoord")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "App",
    "DataParams",
    "DataSchema",
    "LocalDataset",
    "ModelHooks",
    "ModelSpec",
    "TaskSpec",
    "__version__",
    "build_model",
    "load_app",
    "load_dataset",
    "load_model",
    "split_local",
]
