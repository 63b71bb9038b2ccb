"""An unmodified Flower client as a device's trainer (``fedctl agent run --flower-client
MODULE:ATTRIBUTE``).

``ATTRIBUTE`` names one of:

* a ``flwr.client.NumPyClient`` (or ``flwr.client.Client``) instance: it serves one device
  (``--devices 1``), since devices run on threads of their own;
* a function ``client_fn(context)`` or ``client_fn()`` returning one (``NumPyClient`` or
  ``.to_client()``'s ``Client``), as Flower's quickstarts write it. It is called once per
  hosted device when the agent starts, with a ``flwr.common.Context`` whose ``node_config``
  is ``--flower-node-config`` (``partition-id`` grows by one per device with ``--devices M``),
  whose ``state`` persists for the agent's life, and whose ``run_config`` is empty (the
  round's settings arrive as the fit ``config`` instead).

A ``ClientApp`` is refused with a message: its message-based API is not mapped yet.

The mapping, per round (:class:`FlowerTrainer`):

* ``parameters``: the received model's tensors as numpy arrays, in the plan's tensor order
  (for our ``mlp`` and a ``torch.nn.Sequential`` of the same layers, the order of
  ``state_dict()``);
* ``config``: :func:`fit_config` (``server_round``, ``task_id``, ``epochs``, ``batch_size``,
  ``optimizer``, ``learning_rate``, ``momentum``, ``seed``);
* ``evaluate`` first, when the plan asks the device to evaluate: its loss and example count
  are ``eval_loss``/``eval_examples``, each numeric metric ``NAME`` is ``eval_NAME``;
* ``fit``: the returned arrays must match the plan's tensors in count and shapes (else the
  device declines the task, naming the first mismatch); ``num_examples`` is the update's
  FedAvg weight; the numeric fit metrics are ``train_NAME`` (``loss`` and ``train_loss`` are
  ``train_loss``).

The update (returned minus received), its clipping, secure aggregation and the plan's
metrics policy are the device's, as for every trainer (:mod:`device_agent.runtime.device`):
under secure aggregation or DP the client's metrics are masked or withheld like ours.

A Flower client owns its data, so the device reports no data schema at check-in, unless the
client object has a ``data_schema`` attribute holding a :class:`core.types.DataSchema`.

flwr is imported here only, and only when a Flower client is asked for; the rest of the agent
never needs it (``pip install 'fedcoord[flower]'``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from core.protocol import Participation, Plan
from core.tensors import numpy_dtype
from core.types import DataSchema
from device_agent.errors import Declined
from device_agent.runtime.device import MAX_APP_METRICS, LocalFit, app_metrics

log = logging.getLogger(__name__)

#: Flower's scalar values (``flwr.common.Scalar``).
Scalar = bool | bytes | float | int | str
#: Flower's config values (``flwr.common.typing.UserConfigValue``).
ConfigValue = bool | float | int | str


class FlowerClientError(ValueError):
    """``--flower-client`` or ``--flower-node-config`` cannot be used (the message says why);
    raised when the agent starts, before any device checks in."""


class _Calls(Protocol):
    """A Flower client as NumPy calls (a ``NumPyClient``, or a ``Client`` converted)."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]: ...

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]: ...


def fit_config(p: Participation, plan: Plan, *, seed: int) -> dict[str, Scalar]:
    """The ``config`` a Flower client's fit and evaluate receive: the plan's local training
    settings (``learning_rate`` and ``momentum`` for the optimizer named ``optimizer``,
    ``sgd`` or ``adam``), the round (``server_round``, 1-based) and this device's ``seed``."""
    local = plan.local
    return {
        "server_round": p.round_number,
        "task_id": p.task_id,
        "epochs": local.epochs,
        "batch_size": local.batch_size,
        "optimizer": local.optimizer.value,
        "learning_rate": local.learning_rate,
        "momentum": local.momentum,
        "seed": seed,
    }


class FlowerTrainer:
    """A :class:`~device_agent.runtime.device.LocalTrainer` that runs a Flower client's
    ``evaluate`` and ``fit`` (see the module docstring for the mapping). One per device;
    calls its client from that device's thread only."""

    def __init__(self, client: Any, *, schema: DataSchema | None = None) -> None:
        """``client``: a ``flwr.client.NumPyClient`` or ``flwr.client.Client``.

        Raises:
            FlowerClientError: ``client`` is neither.
        """
        self._calls = _as_calls(client)
        self._schema = schema

    @property
    def schema(self) -> DataSchema | None:
        return self._schema

    def fit(self, p: Participation, plan: Plan, received: Mapping[str, np.ndarray], *,
            seed: int) -> LocalFit:
        infos = plan.update_tensors
        config = fit_config(p, plan, seed=seed)
        metrics: dict[str, float] = {}
        if plan.evaluate:
            loss, examples, eval_metrics = self._calls.evaluate(
                [np.array(received[t.name]) for t in infos], dict(config))
            if examples > 0:
                metrics.update(eval_loss=float(loss), eval_examples=float(examples))
                for name, value in app_metrics(_numeric(eval_metrics)).items():
                    metrics.setdefault(name, value)
        returned, examples, train_metrics = self._calls.fit(
            [np.array(received[t.name]) for t in infos], dict(config))
        if not isinstance(returned, (list, tuple)) or len(returned) != len(infos):
            count = len(returned) if isinstance(returned, (list, tuple)) else type(returned)
            raise Declined(
                f"the Flower client's fit returned {count} arrays; the task's model has "
                f"{len(infos)} tensors ({', '.join(t.name for t in infos)}), in that order")
        trained: dict[str, np.ndarray] = {}
        for i, (info, array) in enumerate(zip(infos, returned, strict=True)):
            shape = tuple(np.shape(array))
            if shape != tuple(info.shape):
                raise Declined(
                    f"the Flower client's fit returned array {i} of shape {list(shape)}; the "
                    f"task's tensor {info.name!r} has shape {list(info.shape)} (arrays follow "
                    f"the order of the parameters fit received)")
            trained[info.name] = np.asarray(array, dtype=numpy_dtype(info.dtype))
        if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)) \
                or examples < 1:
            raise Declined(f"the Flower client's fit reported {examples!r} training examples; "
                           "an update needs a positive integer (its FedAvg weight)")
        metrics.update(_train_metrics(_numeric(train_metrics)))
        return LocalFit(trained, int(examples), metrics)


def load_target(spec: str) -> Any:
    """The object ``MODULE:ATTRIBUTE`` names (the working directory is importable, as for
    ``flwr run``).

    Raises:
        FlowerClientError: the spec is malformed, the module does not import, or it has no
            such attribute.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise FlowerClientError(f"--flower-client {spec!r}: expected MODULE:ATTRIBUTE, e.g. "
                                "my_client:client_fn")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowerClientError(f"--flower-client {spec!r}: cannot import {module_name!r}: "
                                f"{exc}") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FlowerClientError(f"--flower-client {spec!r}: module {module_name!r} has no "
                                    f"attribute {attribute!r}")
        target = getattr(target, part)
    return target


def parse_node_config(text: str) -> dict[str, ConfigValue]:
    """``--flower-node-config``: ``key=value`` pairs separated by spaces or commas, as
    ``flower-supernode --node-config`` takes them; values are ints, floats, true/false or
    strings (quotes optional).

    Raises:
        FlowerClientError: a pair without ``=``.
    """
    out: dict[str, ConfigValue] = {}
    for pair in text.replace(",", " ").split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FlowerClientError(f"--flower-node-config: {pair!r} is not KEY=VALUE")
        out[key] = _scalar(value)
    return out


def flower_trainers(spec: str, names: Sequence[str], *, node_config: str = ""
                    ) -> list[FlowerTrainer]:
    """One trainer per device name, from ``--flower-client spec`` (see the module docstring).

    Raises:
        FlowerClientError: flwr is not installed, the spec does not name a client or client
            function, an instance would serve several devices, or what a client function
            returned is not a client.
    """
    try:
        from flwr.client import ClientApp
    except ImportError as exc:
        raise FlowerClientError(f"--flower-client needs flwr: pip install 'fedcoord[flower]' "
                                f"({exc})") from None
    target = load_target(spec)
    if isinstance(target, ClientApp):
        raise FlowerClientError(
            f"--flower-client {spec!r} is a ClientApp, which the agent does not run yet: "
            "point it at the NumPyClient or the client_fn(context) the ClientApp wraps")
    base = parse_node_config(node_config)
    if _is_client(target):
        if len(names) > 1:
            raise FlowerClientError(
                f"--flower-client {spec!r} is one client instance, which serves one device; "
                f"for --devices {len(names)} point it at a function that returns a client")
        return [FlowerTrainer(target, schema=_schema_of(target))]
    if not callable(target):
        raise FlowerClientError(
            f"--flower-client {spec!r} is a {type(target).__name__}: expected a NumPyClient "
            "instance or a function client_fn(context) returning one")
    trainers = []
    for i, name in enumerate(names):
        config = dict(base)
        if isinstance(config.get("partition-id"), int):
            config["partition-id"] = int(config["partition-id"]) + i
        client = _call_client_fn(target, _context(name, config))
        if not _is_client(client):
            raise FlowerClientError(
                f"--flower-client {spec!r} returned a {type(client).__name__}: expected a "
                "NumPyClient (or its .to_client())")
        trainers.append(FlowerTrainer(client, schema=_schema_of(client)))
    return trainers


def _is_client(obj: object) -> bool:
    from flwr.client import Client, NumPyClient

    return isinstance(obj, (Client, NumPyClient))


def _as_calls(client: Any) -> _Calls:
    from flwr.client import Client, NumPyClient

    if isinstance(client, NumPyClient):
        calls: _Calls = client
        return calls
    if isinstance(client, Client):
        return _ClientCalls(client)
    raise FlowerClientError(f"expected a flwr NumPyClient or Client, got "
                            f"{type(client).__name__}")


class _ClientCalls:
    """A ``flwr.client.Client`` (``NumPyClient.to_client()``) through its Ins/Res API."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        res = self._client.fit(FitIns(ndarrays_to_parameters(parameters), config))
        _check_status(res, "fit")
        return parameters_to_ndarrays(res.parameters), res.num_examples, dict(res.metrics)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]:
        from flwr.common import EvaluateIns, ndarrays_to_parameters

        res = self._client.evaluate(EvaluateIns(ndarrays_to_parameters(parameters), config))
        _check_status(res, "evaluate")
        return float(res.loss), res.num_examples, dict(res.metrics)


def _check_status(res: Any, call: str) -> None:
    from flwr.common import Code

    if res.status.code != Code.OK:
        raise RuntimeError(f"the Flower client's {call} answered {res.status.code.name}: "
                           f"{res.status.message}")


def _context(name: str, node_config: dict[str, ConfigValue]) -> Any:
    from flwr.common import Context, RecordDict

    # Flower's node ids are 64-bit integers; ours are names: a stable hash of the name.
    node_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1
    return Context(run_id=0, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={})


def _call_client_fn(fn: Callable[..., Any], context: Any) -> Any:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(context)
    required = [p for p in params.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return fn(context) if params and (required or len(params) == 1) else fn()


def _schema_of(client: object) -> DataSchema | None:
    schema = getattr(client, "data_schema", None)
    return schema if isinstance(schema, DataSchema) else None


def _numeric(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """Flower's numeric metrics as floats (strings and bytes are not reported)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (bool, int, float, np.integer, np.floating)) \
                and math.isfinite(float(value)):
            out[str(name)] = float(value)
    return out


def _train_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """Fit metrics as ``train_NAME`` (``loss`` is ``train_loss``), checked like evaluation
    metrics (valid names and values, at most ``MAX_APP_METRICS``)."""
    renamed = {}
    for name, value in values.items():
        short = name.removeprefix("train_")
        renamed[short] = value
    if "train_loss" in values:
        renamed["loss"] = values["train_loss"]
    checked = app_metrics(dict(list(renamed.items())[:MAX_APP_METRICS]))
    return {"train_" + k.removeprefix("eval_"): v for k, v in checked.items()}


def _scalar(text: str) -> ConfigValue:
    stripped = text.strip().strip("'\"")
    if text.strip()[:1] in ("'", '"'):
        return stripped
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(stripped)
        except ValueError:
            pass
    return stripped
