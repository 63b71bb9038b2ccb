"""Simulation files: YAML -> :class:`SimulationConfig`, with errors that name file and field.

A simulation file looks like (every section but ``name``, ``model``, ``data``, ``rounds`` and
``selection`` is optional)::

    name: fedprox-synthetic
    seed: 0
    rounds: 200
    model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
    data: {source: synthetic, num_devices: 30, alpha: 1, beta: 1}
    selection: {clients_per_round: 10, over_selection: 1.0, min_reports: 1,
                round_deadline_s: 0, keep_partial_work: false}
    local: {epochs: 20, batch_size: 10, optimizer: sgd, learning_rate: 0.01}
    server: {kind: fedavg, learning_rate: 1.0}          # fedavg | fedavgm | fedadam | fedyogi
    algorithm: {kind: fedprox, mu: 1.0}                 # fedavg | fedprox | scaffold
    heterogeneity:
      speed: {kind: lognormal, mu: 4.6, sigma: 0.5}     # training examples per simulated second
      availability: {kind: uniform, low: 0.5, high: 1}  # chance to be online in a round
      latency_s: {kind: constant, value: 2}             # download + upload, seconds
      dropout: 0.05                                     # chance to vanish mid-round
      straggler_fraction: 0.9                           # FedProx's systems heterogeneity
      trace: devices.csv                                # per-device overrides, see devices.py
    evaluation: {every: 1, train_loss_samples: 20000}
    engine: {kind: auto, workers: 2}                    # auto | bmm | vmap | loop

The parser is driven by the dataclass fields below (unknown keys are errors). ``local`` and
``server`` are the coordinator's own :class:`~core.types.LocalTraining` and
:class:`~core.types.ServerOptimizer`, so a task file's sections can be pasted in.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core import fields
from core.privacy.spec import PrivacySpec
from core.taskspec import privacy_field
from core.types import LocalTraining, ModelSpec, SecureAggregation, ServerOptimizer
from simulations.errors import SimulationConfigError


class DataSource(enum.Enum):
    SYNTHETIC = "synthetic"  # FedProx Synthetic(alpha, beta), core.data.synthetic
    DIGITS = "digits"        # scikit-learn digits, Dirichlet non-IID, core.data.digits
    TORCH = "torch"          # any torch Dataset from ``factory``, split by ``partition``


class PartitionKind(enum.Enum):
    IID = "iid"
    DIRICHLET = "dirichlet"


class AlgorithmKind(enum.Enum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"      # proximal term mu/2 ||w - w_global||^2 in the local objective
    SCAFFOLD = "scaffold"    # control variates (Karimireddy et al., 2020), option II


class DistributionKind(enum.Enum):
    CONSTANT = "constant"    # value
    UNIFORM = "uniform"      # U[low, high)
    LOGNORMAL = "lognormal"  # exp(N(mu, sigma^2))


class EngineKind(enum.Enum):
    AUTO = "auto"  # bmm for logistic_regression/mlp with SGD, vmap for other SGD, else loop
    BMM = "bmm"    # hand-written batched forward/backward (linear and MLP models)
    VMAP = "vmap"  # torch.func: vmap(grad(functional_call)) over stacked device parameters
    LOOP = "loop"  # one device after another with core.training.train_local


@dataclass(frozen=True)
class Distribution:
    """A per-device quantity drawn once per device from the simulation seed."""

    kind: DistributionKind = DistributionKind.CONSTANT
    value: float = 1.0
    low: float = 0.0
    high: float = 1.0
    mu: float = 0.0
    sigma: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """``alpha``, ``beta``, ``iid``: synthetic. ``dirichlet``: digits and torch (the
    concentration of the per-class split). ``factory``: torch, ``"package.module:function"``
    returning ``(train_dataset, test_dataset)`` of ``(features, label)`` items."""

    source: DataSource
    num_devices: int
    alpha: float = 1.0
    beta: float = 1.0
    iid: bool = False
    dirichlet: float = 0.5
    partition: PartitionKind = PartitionKind.DIRICHLET
    factory: str = ""
    seed: int = 0


@dataclass(frozen=True)
class SelectionConfig:
    """As in the coordinator: ``clients_per_round x over_selection`` devices are admitted,
    the first ``clients_per_round`` reports are aggregated (later ones are late), and a round
    with fewer than ``min_reports`` fails and is redone as a new attempt (fresh selection);
    after ``max_failed_attempts`` failed attempts in a row the simulation stops, as the
    coordinator fails the task. ``round_deadline_s`` 0 means no deadline. With
    ``keep_partial_work`` (FedProx) a device that misses the deadline reports the steps it
    finished; otherwise it is dropped as a straggler."""

    clients_per_round: int
    over_selection: float = 1.0
    min_reports: int = 1
    round_deadline_s: float = 0.0
    keep_partial_work: bool = False
    max_failed_attempts: int = 20

    @property
    def admitted(self) -> int:
        """Devices admitted per round (the same rounding as ``TaskSpec.selection_target``)."""
        return max(self.clients_per_round, int(round(self.clients_per_round * self.over_selection)))


@dataclass(frozen=True)
class AlgorithmConfig:
    kind: AlgorithmKind = AlgorithmKind.FEDAVG
    mu: float = 0.0


@dataclass(frozen=True)
class HeterogeneityConfig:
    """Speeds are training examples per simulated second; ``trace`` is a CSV path (relative
    to the simulation file) whose rows override the drawn values of the devices they name."""

    speed: Distribution = field(
        default_factory=lambda: Distribution(DistributionKind.CONSTANT, value=1000.0))
    availability: Distribution = field(
        default_factory=lambda: Distribution(DistributionKind.CONSTANT, value=1.0))
    latency_s: Distribution = field(
        default_factory=lambda: Distribution(DistributionKind.CONSTANT, value=0.0))
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    trace: str = ""


@dataclass(frozen=True)
class EvaluationConfig:
    """The global model is evaluated every ``every`` rounds (and after the last) on the test
    data, and on a fixed sample of at most ``train_loss_samples`` training examples."""

    every: int = 1
    train_loss_samples: int = 20000


@dataclass(frozen=True)
class EngineConfig:
    """``workers``: Ray actors the cohort is split across when run with ``--ray``.
    ``processes``: worker processes on this machine the cohort is split across (1: train
    in this process); one per core is the fast setting for small models.
    ``threads``: torch intra-op threads while the simulation runs (per worker); small
    per-step kernels run fastest on one."""

    kind: EngineKind = EngineKind.AUTO
    workers: int = 2
    processes: int = 1
    threads: int = 1


@dataclass(frozen=True)
class SimulationConfig:
    name: str
    model: ModelSpec
    data: DataConfig
    rounds: int
    selection: SelectionConfig
    local: LocalTraining = field(default_factory=LocalTraining)
    server: ServerOptimizer = field(default_factory=ServerOptimizer)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    heterogeneity: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    seed: int = 0
    #: Secure aggregation (SecAgg+ run in process) and central DP, as in task files.
    secure_aggregation: SecureAggregation | None = None
    privacy: PrivacySpec | None = None
    #: Directory of the file the config came from; relative paths (trace) resolve here.
    base_dir: str = "."


def load_simulation_file(path: str | Path) -> SimulationConfig:
    """Reads and validates a YAML simulation file (model arguments included).

    Raises:
        SimulationConfigError: the file is missing, not YAML, or a field is wrong; the
            message names the file and the field.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SimulationConfigError(source, "", f"cannot read the file: {exc.strerror or exc}"
                                    ) from None
    return parse_simulation_yaml(text, source=source, base_dir=str(Path(path).parent))


def parse_simulation_yaml(text: str, *, source: str = "<simulation>", base_dir: str = "."
                          ) -> SimulationConfig:
    """As :func:`load_simulation_file`, from text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SimulationConfigError(source, "", f"not valid YAML{where}") from None
    if not isinstance(data, Mapping):
        raise SimulationConfigError(source, "", "expected a mapping of simulation fields")
    if "base_dir" in data:
        raise SimulationConfigError(source, "base_dir", "is set from the file's location")
    config = _build(SimulationConfig, data, source, "")
    assert isinstance(config, SimulationConfig)
    config = dataclasses.replace(config, base_dir=base_dir)
    validate_simulation_config(config, source=source)
    return config


def validate_simulation_config(config: SimulationConfig, *, source: str = "<simulation>"
                               ) -> None:
    """Checks ranges and relations between fields, and builds the model once to check its
    arguments (imports torch).

    Raises:
        SimulationConfigError: naming ``source`` and the field.
    """

    def fail(name: str, message: str) -> typing.NoReturn:
        raise SimulationConfigError(source, name, message)

    def at_least(name: str, value: float, low: float) -> None:
        if value < low:
            fail(name, f"must be at least {low:g}, got {value}")

    if config.secure_aggregation is not None:
        from core.secagg.params import SecAggParamError, derive

        try:
            derive(config.secure_aggregation, config.selection.clients_per_round)
        except SecAggParamError as exc:
            fail("secure_aggregation", f"with {config.selection.clients_per_round} devices per "
                 f"round: {exc}")
    if config.privacy is not None:
        from core.privacy.spec import PrivacyMode

        if config.privacy.mode is not PrivacyMode.CENTRAL:
            fail("privacy.mode", "simulations run central DP (or none); "
                 f"'{config.privacy.mode.value}' is not simulated")
        if config.selection.over_selection != 1.0:
            fail("selection.over_selection", "must be 1.0 under privacy: the release sums "
                 "every report of the sampled cohort, so a cohort is never cut by report order")
        from core.privacy.accounting import Sampling

        if config.privacy.sampling is not Sampling.FIXED_SIZE:
            fail("privacy.sampling", "simulations draw fixed-size cohorts; use 'fixed'")
        population = config.privacy.population
        if population is not None and population < config.selection.clients_per_round:
            fail("privacy.population", f"{population} is below clients_per_round "
                 f"({config.selection.clients_per_round})")
    if not config.name.strip():
        fail("name", "must not be empty")
    at_least("rounds", config.rounds, 1)
    at_least("seed", config.seed, 0)
    data = config.data
    at_least("data.num_devices", data.num_devices, 1)
    at_least("data.seed", data.seed, 0)
    if data.source is DataSource.SYNTHETIC:
        at_least("data.alpha", data.alpha, 0)
        at_least("data.beta", data.beta, 0)
    if data.source is DataSource.DIGITS:
        from core.data.digits import MAX_SHARDS

        if data.num_devices > MAX_SHARDS:
            fail("data.num_devices", f"digits has at most {MAX_SHARDS} devices, "
                                     f"got {data.num_devices}")
    if not data.dirichlet > 0:
        fail("data.dirichlet", f"must be positive, got {data.dirichlet}")
    if data.source is DataSource.TORCH and ":" not in data.factory:
        fail("data.factory", f"must look like 'package.module:function', got {data.factory!r}")
    sel = config.selection
    at_least("selection.clients_per_round", sel.clients_per_round, 1)
    if sel.clients_per_round > data.num_devices:
        fail("selection.clients_per_round",
             f"must be at most data.num_devices ({data.num_devices}), got {sel.clients_per_round}")
    if not 1 <= sel.min_reports <= sel.clients_per_round:
        fail("selection.min_reports", f"must be between 1 and clients_per_round "
                                      f"({sel.clients_per_round}), got {sel.min_reports}")
    if not 1.0 <= sel.over_selection <= 10.0:
        fail("selection.over_selection", f"must be between 1.0 and 10.0, got {sel.over_selection}")
    at_least("selection.round_deadline_s", sel.round_deadline_s, 0)
    at_least("local.epochs", config.local.epochs, 1)
    at_least("local.batch_size", config.local.batch_size, 1)
    if not config.local.learning_rate > 0:
        fail("local.learning_rate", f"must be positive, got {config.local.learning_rate}")
    if not 0 <= config.local.momentum < 1:
        fail("local.momentum", f"must be in [0, 1), got {config.local.momentum}")
    if not config.server.learning_rate > 0:
        fail("server.learning_rate", f"must be positive, got {config.server.learning_rate}")
    for name in ("momentum", "beta1", "beta2"):
        if not 0 <= getattr(config.server, name) < 1:
            fail(f"server.{name}", f"must be in [0, 1), got {getattr(config.server, name)}")
    if not config.server.epsilon > 0:
        fail("server.epsilon", f"must be positive, got {config.server.epsilon}")
    at_least("algorithm.mu", config.algorithm.mu, 0)
    if config.algorithm.mu > 0 and config.algorithm.kind is not AlgorithmKind.FEDPROX:
        fail("algorithm.mu", f"only fedprox uses mu, got mu={config.algorithm.mu} with "
                             f"{config.algorithm.kind.value}")
    het = config.heterogeneity
    for name in ("speed", "availability", "latency_s"):
        _check_distribution(getattr(het, name), f"heterogeneity.{name}", fail)
    for name in ("dropout", "straggler_fraction"):
        if not 0 <= getattr(het, name) <= 1:
            fail(f"heterogeneity.{name}", f"must be in [0, 1], got {getattr(het, name)}")
    if het.trace and not (Path(config.base_dir) / het.trace).is_file():
        fail("heterogeneity.trace", f"no such file: {Path(config.base_dir) / het.trace}")
    at_least("evaluation.every", config.evaluation.every, 1)
    at_least("evaluation.train_loss_samples", config.evaluation.train_loss_samples, 0)
    at_least("engine.workers", config.engine.workers, 1)
    at_least("engine.threads", config.engine.threads, 1)
    at_least("engine.processes", config.engine.processes, 1)
    at_least("selection.max_failed_attempts", config.selection.max_failed_attempts, 1)
    _check_model(config, fail)


def _check_distribution(d: Distribution, name: str,
                        fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    if d.kind is DistributionKind.CONSTANT and d.value < 0:
        fail(f"{name}.value", f"must be >= 0, got {d.value}")
    if d.kind is DistributionKind.UNIFORM and not 0 <= d.low <= d.high:
        fail(f"{name}.low", f"need 0 <= low <= high, got low={d.low}, high={d.high}")
    if d.kind is DistributionKind.LOGNORMAL and d.sigma < 0:
        fail(f"{name}.sigma", f"must be >= 0, got {d.sigma}")


def _check_model(config: SimulationConfig,
                 fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    from core.errors import ModelSpecError
    from core.models import build_model

    try:
        build_model(config.model)
    except ModelSpecError as exc:
        field_name, _, message = str(exc).partition(": ")
        fail(field_name if field_name.startswith("model.") else "model", message or str(exc))


# -- dataclass-driven parsing: the task files' builder (core.fields) ----------------------

def _build(tp: Any, value: Any, source: str, path: str) -> Any:
    """Converts plain data to ``tp``; raises SimulationConfigError at the field on a mismatch."""
    try:
        return fields.build(tp, value, path, skip=frozenset({"base_dir"}),
                            hooks={PrivacySpec: privacy_field})
    except fields.FieldError as exc:
        raise SimulationConfigError(source, exc.path, exc.message) from None
