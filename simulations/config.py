"""Task files run in simulation: YAML -> :class:`SimulationConfig`, with errors that name the
file and the field as written in the file.

A simulation is a task file (:mod:`core.taskspec`, the same file ``fedctl task launch`` sends
to the coordinator) with a ``simulation:`` section the coordinator ignores::

    name: fedprox-synthetic
    seed: 0
    model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
    rounds: 200
    clients_per_round: 10
    over_selection: 1.0
    min_reports: 1
    round_deadline_s: 60          # wall clock, real devices only: simulations use the one below
    local: {epochs: 20, batch_size: 10, optimizer: sgd, learning_rate: 0.01}
    server: {kind: fedavg, learning_rate: 1.0}          # fedavg | fedavgm | fedadam | fedyogi
    evaluation: {server_data: "digits:split=test"}      # also the simulation's test data
    secure_aggregation: ...                             # as in any task file
    privacy: {mode: central, ...}                       # central DP is simulated (sync
                                                        # rounds and async FedBuff)
    simulation:
      population:                   # device i of N loads shard=i/N of `data`, as an agent
        devices: 30                 # started with --data "synthetic:alpha=1,beta=1,shard=i/30"
        data: "synthetic:alpha=1,beta=1"   # any data source, an app's included (no shard=)
        load: all                   # all | per_round: a device's data when a round admits
                                    # it (100,000 devices: simulations/population.py)
      test_data: ""                 # default: evaluation.server_data, else the union of the
                                    # devices' own test splits
      algorithm: {kind: fedprox, mu: 1.0}               # fedavg | fedprox | scaffold
      round_deadline_s: 0           # simulated seconds; 0: none
      keep_partial_work: false      # FedProx: a device that misses the deadline reports
      max_failed_attempts: 20
      heterogeneity:
        speed: {kind: lognormal, mu: 4.6, sigma: 0.5}     # training examples per simulated s
        availability: {kind: uniform, low: 0.5, high: 1}  # chance to be online in a round
        latency_s: {kind: constant, value: 2}             # download + upload, seconds
        dropout: 0.05                                     # chance to vanish mid-round
        straggler_fraction: 0.9                           # FedProx's systems heterogeneity
        trace: devices.csv                                # per-device overrides, devices.py
      evaluation: {every: 1, train_loss_samples: 20000}
      engine: {kind: auto, workers: 2, processes: 1, threads: 1}   # auto | bmm | vmap | loop
      experiment: ...               # an A/B test of model variants: simulations/experiment.py

The task part is built and checked by :func:`core.taskspec.spec_from_dict` (so a file that
simulates also launches), the ``simulation`` section by the same field builder
(:mod:`core.fields`). What a simulation does not use of the task: ``population`` (the name of
the real devices' population), ``eligibility``, ``round_deadline_s`` and
``selection_window_s`` (wall clock), ``evaluation.fraction``, ``max_update_bytes``,
``robustness`` and ``data_schema`` (checked against the simulated devices' data when given).

The file format of earlier versions (``data:`` and ``selection:`` sections) is refused with a
message that says where its keys went.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core import fields
from core.privacy.spec import PrivacySpec
from core.types import (
    Aggregation,
    DataSchema,
    LocalTraining,
    ModelSpec,
    SecureAggregation,
    ServerOptimizer,
    TaskKind,
)
from simulations.errors import SimulationConfigError


class AlgorithmKind(enum.Enum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"      # proximal term mu/2 ||w - w_global||^2 in the local objective
    SCAFFOLD = "scaffold"    # control variates (Karimireddy et al., 2020), option II


class PopulationLoad(enum.Enum):
    """When the devices' data are generated (``simulation.population.load``)."""

    ALL = "all"              # every device's data once, before the first round
    PER_ROUND = "per_round"  # a device's data when a round admits it, dropped after the round


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
class DataConfig:
    """The devices' data: device ``i`` of ``num_devices`` loads
    ``with_shard(spec, i, num_devices)`` (:mod:`core.data.spec`), exactly as an agent started
    with ``--data SPEC,shard=i/N`` does, and trains on its train split. ``test_data``: a data
    spec whose test split is the global test set; empty: the union of the devices' test
    splits (with ``load: per_round``, of the evaluation sample's devices:
    :mod:`simulations.population`)."""

    spec: str
    num_devices: int
    test_data: str = ""
    load: PopulationLoad = PopulationLoad.ALL


@dataclass(frozen=True)
class PopulationSection:
    """``simulation.population``: how many devices, holding which data (a data spec without
    ``shard``), and when their data are generated: ``all`` before the first round (memory
    O(population's data)), ``per_round`` when a round admits a device (memory O(devices per
    round); :mod:`simulations.population`)."""

    devices: int
    data: str
    load: PopulationLoad = PopulationLoad.ALL


@dataclass(frozen=True)
class SimulationSection:
    """The ``simulation:`` section of a task file, as written."""

    population: PopulationSection | None = None
    test_data: str = ""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    heterogeneity: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)
    round_deadline_s: float = 0.0
    keep_partial_work: bool = False
    max_failed_attempts: int = 20
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    compare: CompareConfig | None = None


@dataclass(frozen=True)
class CompareConfig:
    """``simulation.compare``: ``fedctl simulate`` also runs the task in the other
    aggregation mode on the same population (``with_mode``, a mode name), each until
    ``target_accuracy``, and prints both modes' simulated time and device compute to it."""

    target_accuracy: float
    with_mode: str = "sync"


@dataclass(frozen=True)
class SimulationConfig:
    """What the engine runs: a task file's task and ``simulation`` section together (built by
    :func:`parse_simulation_yaml`; tests may build one directly)."""

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
    #: The task's ``data_schema``: the devices' data must fit it.
    data_schema: DataSchema | None = None
    #: Directory of the file the config came from; relative paths (trace) resolve here.
    base_dir: str = "."
    #: The file the config came from, for errors found later (loading data).
    source: str = "<simulation>"
    #: ``module:attribute`` apps to load (:func:`core.apps.load_app`) in worker processes.
    apps: tuple[str, ...] = ()
    #: The task's ``aggregation``: synchronous rounds or FedBuff
    #: (:mod:`simulations.asynchronous`).
    aggregation: Aggregation = field(default_factory=Aggregation)
    #: ``simulation.compare``: run the other mode too (``fedctl simulate``).
    compare: CompareConfig | None = None


#: Keys of the old simulation file format -> where they are now.
_OLD_FORMAT = {
    "data": "simulation.population: {devices: N, data: SPEC} (SPEC: a data spec without "
            "shard, e.g. \"digits:dirichlet=0.5\")",
    "selection": "clients_per_round, over_selection and min_reports at the top level; "
                 "round_deadline_s, keep_partial_work and max_failed_attempts under "
                 "simulation:",
    "algorithm": "simulation.algorithm", "heterogeneity": "simulation.heterogeneity",
    "engine": "simulation.engine",
}


def load_apps(apps: tuple[str, ...]) -> None:
    """Registers the models and data sources of ``apps`` (``module:attribute`` each) in this
    process (:func:`core.apps.load_app`; loading one twice does nothing).

    Raises:
        core.errors.AppError: an app cannot be imported or registered.
    """
    if apps:
        from core.apps import load_app

        for app in apps:
            load_app(app)


def read_task_file(path: str | Path) -> str:
    """The file's text. Raises SimulationConfigError (naming the file) where it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SimulationConfigError(str(path), "", f"cannot read the file: "
                                    f"{exc.strerror or exc}") from None


def load_simulation_file(path: str | Path, *, population: str | None = None,
                         devices: int | None = None, apps: tuple[str, ...] = ()
                         ) -> SimulationConfig:
    """Reads and validates a task file for simulation (model arguments included).
    ``population`` and ``devices`` replace ``simulation.population``'s ``data`` and
    ``devices`` (``fedctl simulate --population SPEC --devices N``); a file without that
    section needs both. Apps (user models and data sources) must be loaded before.

    Raises:
        SimulationConfigError: the file is missing, not YAML, or a field is wrong; the
            message names the file and the field as written in the file.
    """
    source = str(path)
    text = read_task_file(path)
    return parse_simulation_yaml(text, source=source, base_dir=str(Path(path).parent),
                                 population=population, devices=devices, apps=apps)


def parse_simulation_yaml(text: str, *, source: str = "<simulation>", base_dir: str = ".",
                          population: str | None = None, devices: int | None = None,
                          apps: tuple[str, ...] = ()) -> SimulationConfig:
    """As :func:`load_simulation_file`, from text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SimulationConfigError(source, "", f"not valid YAML{where}") from None
    if not isinstance(data, Mapping):
        raise SimulationConfigError(source, "", "expected a mapping of task fields")
    return config_from_dict(data, source=source, base_dir=base_dir, population=population,
                            devices=devices, apps=apps)


def config_from_dict(data: Mapping[str, Any], *, source: str = "<simulation>",
                     base_dir: str = ".", population: str | None = None,
                     devices: int | None = None, apps: tuple[str, ...] = ()
                     ) -> SimulationConfig:
    """As :func:`parse_simulation_yaml`, from parsed YAML."""
    from core.taskspec import TaskSpecError, spec_from_dict

    for key, where in _OLD_FORMAT.items():
        if key in data:
            raise SimulationConfigError(
                source, key, f"simulations are task files now (the old simulation format "
                f"is gone): move it to {where}; see simulations/examples/")
    raw_section = data.get("simulation", {})
    if raw_section is None or raw_section == "off":
        raw_section = {}
    if not isinstance(raw_section, Mapping):
        raise SimulationConfigError(source, "simulation",
                                    f"expected a mapping, got {fields.describe(raw_section)}")
    raw_section = _with_population(raw_section, population, devices, source)
    try:
        task = spec_from_dict({**data, "simulation": raw_section}, source=source)
    except TaskSpecError as exc:
        raise SimulationConfigError(source, exc.field, exc.message) from None
    if task.kind is TaskKind.EVALUATE:
        # Simulating it as written would train: refused rather than silently different
        # (simulations.evaluation reads it, with its training config from this loader).
        raise SimulationConfigError(source, "kind", "'evaluate' is not simulated as a "
                                    "training task: fedctl simulate runs it as an evaluation "
                                    "(simulations.evaluation.load_evaluation_file)")
    # simulation.experiment (an A/B test of model variants) is read by
    # simulations.experiment; the training it evaluates is this section's.
    has_experiment = "experiment" in raw_section
    raw_section = {k: v for k, v in raw_section.items() if k != "experiment"}
    try:
        section = fields.build(SimulationSection, raw_section, "simulation")
    except fields.FieldError as exc:
        raise SimulationConfigError(source, exc.path, exc.message) from None
    assert isinstance(section, SimulationSection)
    if section.population is None:
        raise SimulationConfigError(
            source, "simulation.population",
            "is required to simulate: add `simulation: {population: {devices: N, data: SPEC}}` "
            "or pass --population SPEC --devices N")
    if has_experiment and section.population.load is PopulationLoad.PER_ROUND:
        raise SimulationConfigError(
            source, "simulation.population.load", "per_round does not run "
            "simulation.experiment: its drawn devices evaluate on their own held-out data, "
            "held for every device of the population; use load: all")
    config = SimulationConfig(
        name=task.name, model=task.model,
        data=DataConfig(spec=section.population.data, num_devices=section.population.devices,
                        test_data=section.test_data or task.evaluation.server_data,
                        load=section.population.load),
        rounds=task.rounds,
        selection=SelectionConfig(
            clients_per_round=task.clients_per_round, over_selection=task.over_selection,
            min_reports=task.min_reports, round_deadline_s=section.round_deadline_s,
            keep_partial_work=section.keep_partial_work,
            max_failed_attempts=section.max_failed_attempts),
        local=task.local, server=task.server, algorithm=section.algorithm,
        heterogeneity=section.heterogeneity, evaluation=section.evaluation,
        engine=section.engine, seed=task.seed, secure_aggregation=task.secure_aggregation,
        privacy=task.privacy, data_schema=task.data_schema, base_dir=base_dir, source=source,
        apps=apps, aggregation=task.aggregation, compare=section.compare)
    test_field = "simulation.test_data" if section.test_data else "evaluation.server_data"
    validate_simulation_config(config, source=source, test_data_field=test_field)
    return config


def _with_population(section: Mapping[str, Any], population: str | None, devices: int | None,
                     source: str) -> Mapping[str, Any]:
    """``section`` with the command line's ``--population``/``--devices`` in it."""
    if population is None and devices is None:
        return section
    written = section.get("population")
    if written is None or written == "off":
        written = {}
    if not isinstance(written, Mapping):
        raise SimulationConfigError(source, "simulation.population",
                                    f"expected a mapping, got {fields.describe(written)}")
    merged = dict(written)
    if population is not None:
        merged["data"] = population
    if devices is not None:
        merged["devices"] = devices
    for key, flag in (("data", "--population SPEC"), ("devices", "--devices N")):
        if key not in merged:
            raise SimulationConfigError(source, f"simulation.population.{key}",
                                        f"is required: the file has none, pass {flag}")
    return {**section, "population": merged}


def validate_simulation_config(config: SimulationConfig, *, source: str = "<simulation>",
                               test_data_field: str = "simulation.test_data") -> None:
    """Checks ranges and relations between fields, the data specs (no data is generated),
    and builds the model once to check its arguments (imports torch). Fields are named as
    in a task file.

    Raises:
        SimulationConfigError: naming ``source`` and the field.
    """

    def fail(name: str, message: str) -> typing.NoReturn:
        raise SimulationConfigError(source, name, message)

    def at_least(name: str, value: float, low: float) -> None:
        if value < low:
            fail(name, f"must be at least {low:g}, got {value}")

    sel = config.selection
    _check_async(config, fail)
    from core.aggregation.robust import RobustAggregationError, check_rule_applies

    try:
        check_rule_applies(config.aggregation.robust,
                           secure=config.secure_aggregation is not None,
                           central_dp=config.privacy is not None)
    except RobustAggregationError as exc:
        field_name, _, message = str(exc).partition(": ")
        fail(field_name, message)
    if config.secure_aggregation is not None:
        from core.secagg.params import SecAggParamError, derive

        try:
            derive(config.secure_aggregation, sel.clients_per_round)
        except SecAggParamError as exc:
            fail("secure_aggregation", f"with {sel.clients_per_round} devices per round: {exc}")
    if config.privacy is not None:
        from core.privacy.spec import PrivacyMode

        if config.privacy.mode is not PrivacyMode.CENTRAL:
            fail("privacy.mode", "simulations run central DP (or none); "
                 f"'{config.privacy.mode.value}' is not simulated yet")
        if sel.over_selection != 1.0:
            fail("over_selection", "must be 1.0 under privacy: the release sums every report "
                 "of the sampled cohort, so a cohort is never cut by report order")
        from core.privacy.accounting import Sampling

        if config.privacy.sampling is not Sampling.FIXED_SIZE:
            fail("privacy.sampling", "simulations draw fixed-size cohorts; use 'fixed'")
        population = config.privacy.population
        if population is not None and population < sel.clients_per_round:
            fail("privacy.population", f"{population} is below clients_per_round "
                 f"({sel.clients_per_round})")
    if not config.name.strip():
        fail("name", "must not be empty")
    at_least("rounds", config.rounds, 1)
    at_least("seed", config.seed, 0)
    data = config.data
    at_least("simulation.population.devices", data.num_devices, 1)
    _check_data_specs(data, fail, test_data_field)
    _check_per_round_load(config, fail)
    at_least("clients_per_round", sel.clients_per_round, 1)
    if sel.clients_per_round > data.num_devices:
        fail("clients_per_round", f"must be at most simulation.population.devices "
                                  f"({data.num_devices}), got {sel.clients_per_round}")
    if not 1 <= sel.min_reports <= sel.clients_per_round:
        fail("min_reports", f"must be between 1 and clients_per_round "
                            f"({sel.clients_per_round}), got {sel.min_reports}")
    if not 1.0 <= sel.over_selection <= 10.0:
        fail("over_selection", f"must be between 1.0 and 10.0, got {sel.over_selection}")
    at_least("simulation.round_deadline_s", sel.round_deadline_s, 0)
    at_least("simulation.max_failed_attempts", sel.max_failed_attempts, 1)
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
    at_least("simulation.algorithm.mu", config.algorithm.mu, 0)
    if config.algorithm.mu > 0 and config.algorithm.kind is not AlgorithmKind.FEDPROX:
        fail("simulation.algorithm.mu", f"only fedprox uses mu, got mu={config.algorithm.mu} "
                                        f"with {config.algorithm.kind.value}")
    het = config.heterogeneity
    for name in ("speed", "availability", "latency_s"):
        _check_distribution(getattr(het, name), f"simulation.heterogeneity.{name}", fail)
    for name in ("dropout", "straggler_fraction"):
        if not 0 <= getattr(het, name) <= 1:
            fail(f"simulation.heterogeneity.{name}", f"must be in [0, 1], got "
                                                     f"{getattr(het, name)}")
    if het.trace and not (Path(config.base_dir) / het.trace).is_file():
        fail("simulation.heterogeneity.trace", f"no such file: {Path(config.base_dir) / het.trace}")
    at_least("simulation.evaluation.every", config.evaluation.every, 1)
    at_least("simulation.evaluation.train_loss_samples", config.evaluation.train_loss_samples, 0)
    at_least("simulation.engine.workers", config.engine.workers, 1)
    at_least("simulation.engine.threads", config.engine.threads, 1)
    at_least("simulation.engine.processes", config.engine.processes, 1)
    _check_model(config, fail)


def _check_async(config: SimulationConfig,
                 fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """What the asynchronous engine (:mod:`simulations.asynchronous`) does not simulate."""
    from core.types import AggregationMode

    if config.compare is not None:
        if config.compare.with_mode not in ("sync", "async"):
            fail("simulation.compare.with_mode",
                 f"must be sync or async, got {config.compare.with_mode!r}")
        if config.compare.with_mode == config.aggregation.mode.value:
            fail("simulation.compare.with_mode", f"is the task's own aggregation.mode "
                 f"({config.aggregation.mode.value}); compare with the other one")
        if not 0 < config.compare.target_accuracy <= 1:
            fail("simulation.compare.target_accuracy",
                 f"must be in (0, 1], got {config.compare.target_accuracy}")
    asynchronous = config.aggregation.mode is AggregationMode.ASYNC or (
        config.compare is not None and config.compare.with_mode == "async")
    if not asynchronous:
        return
    if config.secure_aggregation is not None:
        fail("aggregation.mode", "async is not simulated with secure_aggregation: SecAgg+ "
             "masks cancel only over a cohort that reports together, and a FedBuff buffer "
             "mixes devices that started on different versions; use mode: sync")
    _check_async_privacy(config, fail)
    from core.types import RobustKind

    if config.aggregation.robust.kind is not RobustKind.MEAN:
        fail("aggregation.mode", f"async is not simulated with aggregation.robust.kind "
             f"{config.aggregation.robust.kind.value}: the robust rules score a round's "
             "cohort together, and a FedBuff buffer weighs each upload by its staleness; "
             "use kind: mean, or mode: sync")
    if config.algorithm.kind is AlgorithmKind.SCAFFOLD:
        fail("aggregation.mode", "async is not simulated with scaffold: its control "
             "variates assume every update was trained on the current model")
    if config.selection.round_deadline_s > 0:
        fail("simulation.round_deadline_s", "must be 0 with aggregation.mode async: a "
             "device trains until it is done, there is no round to cut short")
    if config.heterogeneity.straggler_fraction > 0:
        fail("simulation.heterogeneity.straggler_fraction", "must be 0 with "
             "aggregation.mode async: slow devices are the speeds' business there")
    if config.aggregation.max_concurrency > config.data.num_devices:
        fail("aggregation.max_concurrency", f"must be at most simulation.population.devices "
             f"({config.data.num_devices}), got {config.aggregation.max_concurrency}")


def _check_async_privacy(config: SimulationConfig,
                         fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """Central DP runs asynchronously as on the coordinator (each version one noised
    release, accounted as a draw of the whole population); what that analysis or this
    simulator does not cover is refused, naming the field."""
    from core.privacy.accounting import Sampling
    from core.privacy.spec import PrivacyMode

    privacy = config.privacy
    if privacy is None:
        return
    if privacy.mode is PrivacyMode.DISTRIBUTED:
        fail("privacy.mode", "'distributed' needs secure aggregation, which aggregation.mode "
             "async cannot run; use mode: central (the server noises each buffer) or "
             "aggregation.mode: sync")
    if privacy.mode is not PrivacyMode.CENTRAL:
        fail("privacy.mode", f"'{privacy.mode.value}' is not simulated (simulations run "
             "central DP or none), with aggregation.mode async or sync")
    if privacy.sampling is not Sampling.FIXED_SIZE:
        fail("privacy.sampling", f"'{privacy.sampling.value}' does not apply to "
             "aggregation.mode async: nobody is sampled, every version is accounted as if "
             "every device of the population took part (no amplification, replace-one); "
             "use sampling: fixed")


def _check_per_round_load(config: SimulationConfig,
                          fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """What a population whose data are generated round by round does not run (yet)."""
    from core.types import AggregationMode

    if config.data.load is not PopulationLoad.PER_ROUND:
        return
    field_name = "simulation.population.load"
    if config.aggregation.mode is AggregationMode.ASYNC or config.compare is not None:
        fail(field_name, "per_round runs synchronous rounds only (aggregation.mode sync, no "
             "simulation.compare): FedBuff's devices start and finish at any time; use "
             "load: all")
    if config.engine.processes > 1:
        fail(field_name, f"per_round trains in this process or on Ray (--ray), not in "
             f"simulation.engine.processes ({config.engine.processes}) worker processes: "
             "set processes: 1, or load: all")


def _check_data_specs(data: DataConfig, fail: typing.Callable[[str, str], typing.NoReturn],
                      test_data_field: str) -> None:
    """The population's spec parses and takes a shard (device 0's and the last device's);
    the test spec parses. Sources check their own fields when data is loaded."""
    from core.data.spec import parse_data_spec, with_shard
    from core.errors import CoreError

    try:
        spec = parse_data_spec(data.spec)
    except CoreError as exc:
        fail("simulation.population.data", str(exc))
    if "shard" in spec.params:
        fail("simulation.population.data", f"{data.spec!r} names a shard: device i of "
             f"{data.num_devices} loads shard=i/{data.num_devices}; leave shard out")
    if data.num_devices >= 1:
        try:
            with_shard(spec, data.num_devices - 1, data.num_devices)
        except CoreError as exc:
            fail("simulation.population", str(exc))
    if data.test_data:
        try:
            parse_data_spec(data.test_data)
        except CoreError as exc:
            fail(test_data_field, str(exc))


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
