"""A/B experiments of model variants on simulated devices, with the statistics of
:mod:`core.experiments` (the same code the coordinator's experiments use). The section is
read by :func:`core.experiments.training.parse_training_arms`, as ``fedctl experiment
launch`` reads it for a coordinator, so the same file means the same experiment in both.

A task file whose ``simulation:`` section has an ``experiment:`` section (``fedctl simulate``
runs it with :func:`run_experiment`; the coordinator ignores the ``simulation:`` section, so
the file still launches as the training task)::

    simulation:
      population: ...
      experiment:                    # core.experiments.spec's fields, and per arm:
        arms:                        # the task's global model after 3 and after 30 rounds
          - {name: short, weight: 0.5, trained_rounds: 3}
          - {name: long, weight: 0.5, trained_rounds: 30}
        primary_metric: {name: accuracy, direction: increase}   # accuracy | loss
        guardrails: [{metric: loss, max_increase: 0.05}]
        mde: 0.05
        alpha: 0.05
        horizon_rounds: 20
        salt: ab-digits-1
        devices_per_round: 20        # optional; default: clients_per_round
        partition_training: false    # optional: true trains each arm's model on its
                                     # arm's devices only (core.experiments.training)
        strata:                      # optional: per-stratum splits (core.experiments.spec)
          low_end: {short: 1.0}
        device_strata:               # with strata: the share of the simulated devices in
          low_end: 0.3               # each stratum (drawn per device with the task's seed;
                                     # the rest declare none: the default split)
    # or arms that differ by training configuration (core.experiments.training):
    #     - {name: control, weight: 0.5}                 # the task as written
    #     - {name: fast, weight: 0.5, training: {local.learning_rate: 0.2}}

**The arms' models (the design, and why it is honest).** Arms with the same ``training``
(none: the task as written) share one training run of the file's task, as ``fedctl
simulate`` would train it, for the largest ``trained_rounds`` among them; arm ``i``
evaluates that run's global model as it stood after its ``trained_rounds`` rounds (0: the
initial model; default with ``training``: the task's rounds). Runs share the seed, so arms
of one run differ only by the training they received, arms of different runs only by their
configuration; an A/A test is two arms with the same ``trained_rounds`` and ``training``.

**Partitioned training** (``partition_training: true``): every arm has a run of its own, and
in it only the arm's devices are ever online (the others' availability is 0, so the round's
draw, its central-DP accounting of the eligible devices and its stragglers see the arm's
devices only): :func:`core.experiments.training.arm_members` under the experiment's salt
and weights, the filter a coordinator's check-in applies to the arm's training task, and
the assignment the experiment rounds below evaluate by, so a device trains and evaluates
the same arm.

**An experiment round.** ``devices_per_round`` devices are drawn uniformly (seeded by the
task's seed and the round) among the devices that hold held-out data; each gets its arm from
:func:`core.experiments.assignment.assign_arms` (HMAC of ``device-K`` under the salt:
sticky, nothing stored) and evaluates its arm's model on its own held-out split (the test
split an agent with the same data spec holds; never its training data), without training.
Per the statistics' unit (:mod:`core.experiments.sequential`), each device contributes one
value per metric per arm: the mean of its reports so far. Then SRM is checked on the
distinct devices seen per arm, each treatment is compared with the control by an
always-valid look (``alpha = spec.comparison_alpha``; ``tau = spec.tau`` for the primary
metric, a guardrail's own limit, or ``tau`` for a zero limit, for guardrails), and
:func:`core.experiments.decision.decide` runs. The run stops on success, harm, invalid or
the horizon.

**CUPED** with a ``<metric>@<arm>`` covariate, as on a coordinator
(:mod:`core.experiments.versions`): every drawn device also evaluates that arm's model, its
cumulative mean there is its covariate, and the primary comparison is made on the
:func:`~core.experiments.sequential.cuped_arms`-adjusted device values.

**Strata** (``strata`` with ``device_strata``): each simulated device declares a stratum, as
an agent does with ``fedctl agent run --stratum``: device K's is drawn once from the shares
``device_strata`` gives (a uniform seeded by the task's seed and K; a device outside every
share declares none). Its arm is its stratum's split's (:func:`core.experiments.assignment.
assign_arms` with the strata), and the SRM is the stratified check
(:func:`core.experiments.srm.stratified_srm_check`) on the distinct devices seen per stratum
and arm, as a coordinator runs it. The comparisons are pooled over strata: see
:mod:`core.experiments.versions` for what that means when the splits differ.

What is refused (naming ``simulation.experiment.FIELD``): ``strata`` without
``device_strata`` (a simulated device declares a stratum only when told which), a
pre-period ``covariate`` (no pre-period is simulated), metrics other than
``accuracy`` and ``loss``, ``trained_rounds`` beyond the task's ``rounds``, a ``training``
field an arm may not change (:data:`core.experiments.training.TRAINING_FIELDS`) or a value
that makes the task invalid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from core.evaluation import kll
from core.evaluation.summary import quantile_key
from core.experiments import (
    Action,
    AlwaysValidResult,
    ArmStats,
    Decision,
    ExperimentSpec,
    ExperimentSpecError,
    SrmResult,
    always_valid_look,
    assign_arms,
    cuped_arms,
    decide,
    difference_in_means,
    srm_check,
    stratified_srm_check,
)
from core.experiments.training import (
    Overrides,
    TrainingArms,
    apply_training,
    arm_members,
    parse_training_arms,
    training_groups,
)
from core.experiments.versions import DEFAULT_STRATUM, stratum_label
from core.types import ArmFilter
from simulations.config import SimulationConfig, config_from_dict, read_task_file
from simulations.errors import SimulationConfigError

if TYPE_CHECKING:
    from simulations.engine import Simulation

#: Metrics a simulated device reports for the model it evaluates.
METRICS = ("accuracy", "loss")
#: Quantiles of the examples' losses released per arm, from merged KLL sketches.
EXAMPLE_QUANTILES = (0.1, 0.5, 0.9)
_FIELD = "simulation.experiment"


@dataclass(frozen=True)
class SimulatedExperiment:
    """The ``experiment:`` section: the spec, and per arm (in ``spec.arms`` order) the
    training rounds of the model it evaluates and the configuration it is trained under
    (``configs[i]``: the task with arm ``i``'s ``training`` applied; the task's own config
    for an arm without)."""

    spec: ExperimentSpec
    trained_rounds: tuple[int, ...]
    devices_per_round: int
    training: tuple[Overrides, ...] = ()
    configs: tuple[SimulationConfig, ...] = ()
    partition_training: bool = False
    #: The share of the devices declaring each stratum (``device_strata``), in file order.
    device_strata: tuple[tuple[str, float], ...] = ()

    @property
    def arms(self) -> TrainingArms:
        return TrainingArms(self.spec, self.training or ((),) * len(self.spec.arms),
                            self.trained_rounds, self.devices_per_round,
                            self.partition_training)


@dataclass(frozen=True)
class ExperimentRound:
    """One experiment round. ``devices``: drawn this round; ``seen``: distinct devices per
    arm so far (SRM counts these); ``means``: per arm, the mean over its devices of each
    metric; ``primary``: per treatment, the always-valid comparison (None before each arm
    has two devices); ``example_quantiles``: per arm, the quantiles of the losses of its
    devices' examples so far (``example_q10``, ...) and their ``example_rank_error``, from
    the devices' KLL sketches merged as a coordinator merges clear reports'
    (:mod:`core.evaluation.kll`)."""

    round: int
    devices: int
    seen: Mapping[str, int]
    means: Mapping[str, Mapping[str, float]]
    primary: Mapping[str, AlwaysValidResult]
    srm: SrmResult
    decision: Decision
    example_quantiles: Mapping[str, Mapping[str, float]] = dataclasses.field(
        default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round, "devices": self.devices, "seen": dict(self.seen),
            "means": {a: dict(m) for a, m in self.means.items()},
            "primary": {a: dataclasses.asdict(r) for a, r in self.primary.items()},
            "srm_p_value": self.srm.p_value,
            "action": self.decision.action.value, "reason": self.decision.reason,
            "example_quantiles": {"loss": {a: dict(q)
                                           for a, q in self.example_quantiles.items()}},
        }


def load_experiment_file(path: str | Path, *, population: str | None = None,
                         devices: int | None = None, apps: tuple[str, ...] = ()
                         ) -> tuple[SimulationConfig, SimulatedExperiment]:
    """Reads a task file with a ``simulation.experiment`` section (``population`` and
    ``devices`` as in :func:`simulations.config.load_simulation_file`).

    Raises:
        SimulationConfigError: the file, a task field or an experiment field is wrong;
            names the file and the field (``simulation.experiment.arms[1].weight``).
    """
    source = str(path)
    text = read_task_file(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SimulationConfigError(source, "", "not valid YAML") from None
    raw = _experiment_section(data)
    if raw is None:
        raise SimulationConfigError(source, _FIELD, "is required for an experiment")
    eligibility = data.get("eligibility")
    if isinstance(eligibility, Mapping) and eligibility.get("arm") is not None:
        # As fedctl experiment launch refuses it: the arms' runs get theirs from the section.
        raise SimulationConfigError(source, "eligibility.arm", "the training runs of an "
                                    f"experiment get their arm filter from the experiment "
                                    f"({_FIELD}.partition_training: true); remove it from "
                                    f"the task")
    base_dir = str(Path(path).parent)
    config = config_from_dict(data, source=source, base_dir=base_dir,
                              population=population, devices=devices, apps=apps)
    experiment = parse_simulated_experiment(raw, config, source=source)

    def arm_config(i: int, overrides: Overrides) -> SimulationConfig:
        if not overrides:
            return config
        try:
            arm_data = apply_training(data, overrides)
        except ExperimentSpecError as exc:
            raise SimulationConfigError(source, f"{_FIELD}.arms[{i}].training.{exc.field}",
                                        exc.message) from None
        try:
            return config_from_dict(arm_data, source=source, base_dir=base_dir,
                                    population=population, devices=devices, apps=apps)
        except SimulationConfigError as exc:
            raise SimulationConfigError(
                source, f"{_FIELD}.arms[{i}].training",
                f"makes the task invalid: {exc.field}: {exc.message}") from None

    configs = tuple(arm_config(i, o) for i, o in enumerate(experiment.training))
    return config, dataclasses.replace(experiment, configs=configs)


def _experiment_section(data: Any) -> Any:
    """``simulation.experiment`` of parsed YAML, or None."""
    if not isinstance(data, Mapping):
        return None
    section = data.get("simulation")
    return section.get("experiment") if isinstance(section, Mapping) else None


def has_experiment(path: str | Path) -> bool:
    """Whether the file (read as YAML) has a ``simulation.experiment`` section; False when it
    cannot be read (the normal loader then reports why)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return _experiment_section(data) is not None


def parse_simulated_experiment(raw: Any, config: SimulationConfig, *,
                               source: str = "<simulation>") -> SimulatedExperiment:
    """Validates the ``simulation.experiment`` section against ``config``.

    Raises:
        SimulationConfigError: naming ``source`` and ``simulation.experiment.FIELD``.
    """

    def fail(field: str, message: str) -> SimulationConfigError:
        return SimulationConfigError(source, f"{_FIELD}.{field}" if field else _FIELD, message)

    try:
        arms = parse_training_arms(raw, task_rounds=config.rounds,
                                   default_devices_per_round=config.selection.clients_per_round,
                                   max_devices=config.data.num_devices)
    except ExperimentSpecError as exc:
        raise fail(exc.field, exc.message) from None
    spec = arms.spec
    if spec.strata and not arms.device_strata:
        raise fail("strata", "needs device_strata: the share of the simulated devices in "
                             "each stratum (they declare none otherwise)")
    if spec.primary.covariate is not None and spec.primary.covariate_arm is None:
        raise fail("primary_metric.covariate", "is not simulated: there is no pre-period "
                   f"(a covariate under an arm's model, {spec.primary.name}@ARM, is)")
    if spec.primary.name not in METRICS:
        raise fail("primary_metric.name", f"must be one of {', '.join(METRICS)} (what a "
                   f"simulated device reports), got {spec.primary.name!r}")
    for i, rail in enumerate(spec.guardrails):
        if rail.metric not in METRICS:
            raise fail(f"guardrails[{i}].metric", f"must be one of {', '.join(METRICS)}, got "
                       f"{rail.metric!r}")
    return SimulatedExperiment(spec, arms.trained_rounds, arms.devices_per_round,
                               arms.training, (config,) * len(spec.arms),
                               arms.partition_training, arms.device_strata)


def draw_strata(shares: tuple[tuple[str, float], ...], devices: int, seed: int
                ) -> list[str | None]:
    """Each simulated device's declared stratum: device K's is the stratum whose slice of
    the cumulative ``shares`` holds a uniform drawn for it from ``seed``; None past the
    last slice (no stratum). Deterministic in ``seed``; one draw per device, so a device's
    stratum does not depend on the population's size."""
    if not shares:
        return [None] * devices
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57A7]))
    u = rng.random(devices)
    edges = np.cumsum([share for _, share in shares])
    index = np.searchsorted(edges, u, side="right")
    names = [name for name, _ in shares]
    return [names[i] if i < len(names) else None for i in index.tolist()]


def device_id(device: int) -> str:
    """The id a simulated device is assigned by (the unit of the HMAC)."""
    return f"device-{device}"


def train_only(sim: Simulation, arm_filter: ArmFilter) -> np.ndarray:
    """Restricts ``sim``'s training to the devices ``arm_filter`` admits: the others are
    never online (availability 0), as a coordinator's check-in never offers them the arm's
    task. Returns the admitted devices' indices."""
    members = arm_members(arm_filter, [device_id(d) for d in range(sim.data.num_devices)])
    profiles = sim.profiles
    sim.profiles = dataclasses.replace(
        profiles, availability=np.where(members, profiles.availability, 0.0))
    return np.flatnonzero(members)


class ExperimentRunner:
    """Trains the arms' models once, then runs experiment rounds (:meth:`rounds`). Not
    thread-safe. Deterministic in the config's seed and the experiment's salt."""

    def __init__(self, config: SimulationConfig, experiment: SimulatedExperiment) -> None:
        from simulations.engine import Simulation
        from simulations.evaluation import snapshot_rounds

        self.config = config
        self.experiment = experiment
        models: dict[int, dict[str, np.ndarray]] = {}
        configs = experiment.configs or (config,) * len(experiment.spec.arms)
        data = None
        #: Per arm, the devices its model was trained on (None: every device).
        self.trained_on: list[np.ndarray | None] = [None] * len(experiment.spec.arms)
        for group in training_groups(experiment.arms):
            sim = Simulation(configs[group.arms[0]])
            data = sim.data if data is None else data
            if group.arm_filter is not None:
                members = train_only(sim, group.arm_filter)
                for i in group.arms:
                    self.trained_on[i] = members
            snapshots = snapshot_rounds(
                sim, {experiment.trained_rounds[i] for i in group.arms},
                source=config.source, field=f"{_FIELD}.arms[{group.arms[0]}]")
            for i in group.arms:
                models[i] = snapshots[experiment.trained_rounds[i]]
        assert data is not None
        #: The devices' data (the same for every run: one population spec and seed).
        self.data = data
        self._models = [models[i] for i in range(len(experiment.spec.arms))]
        sizes = np.array([len(y) for y in self.data.y_device_test], dtype=np.int64)
        #: Devices with held-out data: the ones that can evaluate.
        self.eligible = np.flatnonzero(sizes > 0)
        if len(self.eligible) < experiment.devices_per_round:
            raise SimulationConfigError(
                config.source, f"{_FIELD}.devices_per_round",
                f"only {len(self.eligible)} devices hold held-out data, fewer than "
                f"{experiment.devices_per_round}")
        spec = experiment.spec
        self._split = spec.split()
        #: Each device's declared stratum (None: none), :func:`draw_strata`.
        self.strata = draw_strata(experiment.device_strata, len(sizes), config.seed)
        self._arm_of_device: dict[int, int] = {}
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._sketches: dict[tuple[int, int], kll.KllSketch] = {}
        self._build_model()

    def _build_model(self) -> None:
        from core.models import build_model, model_hooks

        self._model = build_model(self.config.model)
        self._loss = model_hooks(self.config.model.architecture).loss

    @property
    def assigned(self) -> Mapping[int, int]:
        """The arm index of each device that has evaluated so far."""
        return dict(self._arm_of_device)

    def assign(self, devices: np.ndarray) -> np.ndarray:
        """The arm index of each device (:func:`core.experiments.assignment.assign_arms`)."""
        return assign_arms([device_id(int(d)) for d in devices],
                           salt=self.experiment.spec.salt, split=self._split,
                           strata=[self.strata[int(d)] for d in devices])

    def evaluate(self, arm: int, device: int) -> tuple[float, float]:
        """(accuracy, loss) of arm ``arm``'s model on ``device``'s held-out data."""
        key = (arm, device)
        if key not in self._cache:
            from core.models import load_numpy_state
            from core.training import evaluate

            load_numpy_state(self._model, self._models[arm])
            loss, accuracy = evaluate(self._model, self.data.x_device_test[device],
                                      self.data.y_device_test[device], loss=self._loss)
            self._cache[key] = (accuracy, loss)
        return self._cache[key]

    def example_sketch(self, arm: int, device: int) -> kll.KllSketch:
        """The KLL sketch of the losses of ``device``'s held-out examples under arm
        ``arm``'s model, as a device builds it for a clear report (coins seeded by the
        config's seed, the arm and the device)."""
        key = (arm, device)
        if key not in self._sketches:
            from core.evaluation.per_example import per_example_values
            from core.models import load_numpy_state

            load_numpy_state(self._model, self._models[arm])
            losses = per_example_values(self._model, self.data.x_device_test[device],
                                        self.data.y_device_test[device], ["loss"],
                                        loss=self._loss)["loss"]
            self._sketches[key] = kll.build(losses, rng=np.random.default_rng(
                np.random.SeedSequence([self.config.seed, arm, device, 0x5E7C])))
        return self._sketches[key]

    def rounds(self) -> Iterator[ExperimentRound]:
        """Experiment rounds until a stop rule fires (the last yielded round's decision
        stops) or the horizon."""
        spec = self.experiment.spec
        names = spec.arm_names
        control = names.index(spec.control)
        sums: dict[int, np.ndarray] = {}  # device -> per-metric sums of its reports
        counts: dict[int, int] = {}
        covariate_arm = spec.primary.covariate_arm
        covariate = None if covariate_arm is None else names.index(covariate_arm)
        primary_index = METRICS.index(spec.primary.name)
        cov_sums: dict[int, float] = {}  # device -> sum of its covariate values
        primary: dict[str, AlwaysValidResult] = {}
        rails: dict[str, dict[str, AlwaysValidResult]] = {}
        pooled: dict[int, kll.KllSketch] = {}  # arm -> its devices' examples' losses
        merge_rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x5E7D]))
        for r in range(1, spec.horizon_rounds + 1):
            rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, r, 0xAB7E]))
            drawn = np.sort(rng.choice(self.eligible, size=self.experiment.devices_per_round,
                                       replace=False))
            for device, arm in zip(drawn.tolist(), self.assign(drawn).tolist(), strict=True):
                if self._arm_of_device.setdefault(device, arm) != arm:
                    raise AssertionError(f"device {device} changed arm")  # sticky by design
                if device not in counts:  # each device's examples count once
                    sketch = self.example_sketch(arm, device)
                    pooled[arm] = (sketch if arm not in pooled
                                   else kll.merge([pooled[arm], sketch], rng=merge_rng))
                sums[device] = sums.get(device, np.zeros(len(METRICS))) + np.array(
                    self.evaluate(arm, device))
                counts[device] = counts.get(device, 0) + 1
                if covariate is not None:
                    cov_sums[device] = cov_sums.get(device, 0.0) + self.evaluate(
                        covariate, device)[primary_index]
            stats = self._arm_stats(sums, counts, len(names))
            if covariate is not None:
                stats = self._cuped(stats, sums, counts, cov_sums, primary_index)
            seen = [stats[a][METRICS[0]].count for a in range(len(names))]
            srm = self._srm(seen)
            for t, name in enumerate(names):
                if t == control or min(seen[t], seen[control]) < 2:
                    continue
                compared = (spec.primary.name if covariate is None
                            else f"{spec.primary.name}@cuped")
                primary[name] = self._look(stats, control, t, compared, spec.tau,
                                           primary.get(name))
                for rail in spec.guardrails:
                    tau = rail.limit if rail.limit > 0 else spec.tau
                    per_arm = rails.setdefault(rail.metric, {})
                    per_arm[name] = self._look(stats, control, t, rail.metric, tau,
                                               per_arm.get(name))
            decision = decide(spec, round_number=r, primary=primary, guardrails=rails,
                              srm=srm)
            yield ExperimentRound(
                round=r, devices=len(drawn),
                seen={n: seen[a] for a, n in enumerate(names)},
                means={n: {m: s.mean for m, s in stats[a].items() if "@" not in m}
                       for a, n in enumerate(names)},
                primary=dict(primary), srm=srm, decision=decision,
                example_quantiles={names[a]: _example_quantiles(sketch)
                                   for a, sketch in sorted(pooled.items())})
            if decision.stops:
                return

    def _srm(self, seen: list[int]) -> SrmResult:
        """The sample-ratio check of the distinct devices seen so far: per stratum and arm
        when the experiment has strata, else per arm."""
        spec = self.experiment.spec
        if not spec.strata:
            return srm_check(seen, [a.weight for a in spec.arms],
                             threshold=spec.srm_threshold)
        weights = {DEFAULT_STRATUM: tuple(a.weight for a in spec.arms), **spec.strata}
        counts = {label: [0] * len(spec.arms) for label in weights}
        for device, arm in self._arm_of_device.items():
            counts[stratum_label(spec, self.strata[device])][arm] += 1
        return stratified_srm_check(counts, weights, threshold=spec.srm_threshold)

    def _arm_stats(self, sums: Mapping[int, np.ndarray], counts: Mapping[int, int],
                   arms: int) -> list[dict[str, ArmStats]]:
        """Per arm, per metric: the stats of its devices' cumulative means."""
        out: list[dict[str, ArmStats]] = []
        for a in range(arms):
            devices = [d for d in sums if self._arm_of_device[d] == a]
            values = (np.array([sums[d] / counts[d] for d in devices]) if devices
                      else np.zeros((0, len(METRICS))))
            out.append({m: ArmStats.from_values(values[:, i]) for i, m in enumerate(METRICS)})
        return out

    def _cuped(self, stats: list[dict[str, ArmStats]], sums: Mapping[int, np.ndarray],
               counts: Mapping[int, int], cov_sums: Mapping[int, float], primary: int
               ) -> list[dict[str, ArmStats]]:
        """``stats`` with the primary metric's replaced by the CUPED-adjusted device values'
        (key ``"<metric>@cuped"``; the unadjusted stay for the table)."""
        name = METRICS[primary]
        ys, xs = [], []
        for a in range(len(stats)):
            devices = [d for d in sums if self._arm_of_device[d] == a]
            ys.append(np.array([sums[d][primary] / counts[d] for d in devices]))
            xs.append(np.array([cov_sums[d] / counts[d] for d in devices]))
        if sum(y.size for y in ys) < 2:
            return stats
        adjusted = cuped_arms(ys, xs).adjusted
        return [{**arm, f"{name}@cuped": ArmStats.from_values(adj)}
                for arm, adj in zip(stats, adjusted, strict=True)]

    def _look(self, stats: list[dict[str, ArmStats]], control: int, treatment: int,
              metric: str, tau: float, previous: AlwaysValidResult | None
              ) -> AlwaysValidResult:
        diff = difference_in_means(stats[control][metric], stats[treatment][metric])
        return always_valid_look(diff, tau=tau, alpha=self.experiment.spec.comparison_alpha,
                                 previous=previous)


def _example_quantiles(sketch: kll.KllSketch) -> dict[str, float]:
    values = kll.quantiles(sketch, EXAMPLE_QUANTILES)
    out = {f"example_{quantile_key(q)}": v for q, v in zip(EXAMPLE_QUANTILES, values,
                                                           strict=True)}
    out["example_rank_error"] = kll.rank_error_bound(sketch)
    return out


def run_experiment(config: SimulationConfig, experiment: SimulatedExperiment
                   ) -> list[ExperimentRound]:
    """Every round of the experiment, the last one's decision the final one."""
    return list(ExperimentRunner(config, experiment).rounds())


def format_table(spec: ExperimentSpec, history: list[ExperimentRound]) -> str:
    """The per-round table: devices seen per arm, the primary metric's arm means, and each
    treatment's estimate, confidence sequence and always-valid p-value."""
    names = spec.arm_names
    metric = spec.primary.name
    head = (["round", "devices"] + [f"n[{n}]" for n in names]
            + [f"{metric}[{n}]" for n in names])
    for t in spec.treatments:
        head += [f"diff[{t}]", "confidence sequence", "p"]
    head += ["srm p", "action"]
    rows = [head]
    for h in history:
        row = [str(h.round), str(h.devices)] + [str(h.seen[n]) for n in names]
        row += [f"{h.means[n][metric]:.4f}" if h.seen[n] else "-" for n in names]
        for t in spec.treatments:
            res = h.primary.get(t)
            row += (["-", "-", "-"] if res is None else
                    [f"{res.estimate:+.4f}", f"[{res.lower:+.4f}, {res.upper:+.4f}]",
                     f"{res.p_value:.3g}"])
        row += [f"{h.srm.p_value:.3g}", h.decision.action.value]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)


def summary(config: SimulationConfig, experiment: SimulatedExperiment,
            history: list[ExperimentRound]) -> dict[str, Any]:
    """The run as one JSON-ready object."""
    last = history[-1].decision
    return {
        "name": config.name,
        "arms": {a.name: {"weight": a.weight, "trained_rounds": n,
                          **({"training": dict(t)} if t else {})}
                 for a, n, t in zip(experiment.spec.arms, experiment.trained_rounds,
                                    experiment.arms.training, strict=True)},
        "control": experiment.spec.control,
        "partition_training": experiment.partition_training,
        "primary_metric": experiment.spec.primary.name,
        "decision": {"action": last.action.value, "reason": last.reason,
                     "round": last.round_number, "arm": last.arm, "metric": last.metric},
        "stopped": last.action is not Action.CONTINUE,
        "rounds": [h.as_dict() for h in history],
    }
