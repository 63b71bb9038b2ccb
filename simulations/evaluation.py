"""Federated evaluation (a task of kind ``evaluate``) on simulated devices, with the code a
device agent and the coordinator run: each drawn device evaluates every version with
:func:`core.training.evaluate` (and the model's metrics hook, and
:func:`core.evaluation.per_example.per_example_values` where the plan sketches), builds its
report with :func:`core.evaluation.report.device_vector`, sends it as float32; the round checks
each report with :func:`core.evaluation.report.report_problem`, sums them, merges their KLL
sketches and releases :func:`core.evaluation.summary.round_metrics` of
:func:`core.evaluation.summary.summarize`: the coordinator's ``eval.v<version>.<metric>.<stat>``
names and values (the clear path: a simulation has no secure aggregation or DP here).

A task file of kind ``evaluate`` with a ``simulation:`` section (``fedctl simulate`` runs it
with :func:`run_evaluation`; ``fedctl task launch FILE --source-task TRAIN_ID`` runs the
same file on a coordinator, which ignores the ``simulation:`` section)::

    kind: evaluate
    model: ...; seed: 0               # the task's model, as on a coordinator
    rounds: 3                         # evaluation rounds: a fresh cohort each
    clients_per_round: 10             # devices per evaluation round (and training round)
    over_selection: 1.2
    min_reports: 5
    local: ...; server: ...           # the simulated source task's training (see below)
    evaluate: {versions: [0, 20], max_examples: 512, histograms: ..., quantiles: ...}
    simulation:
      population: {devices: 50, data: "digits:dirichlet=0.5"}
      heterogeneity: ...              # availability, dropout, latency, speed: as training

**The versions (there is no source task in a simulation).** Version N is the model of the
file's task trained for N simulated rounds: the file read as a training task (its ``model``,
``seed``, ``local``, ``server``, selection fields and ``simulation:`` section; ``kind`` and
``evaluate`` left out), trained once for the largest version's rounds, its global model kept
after each round a version names (0: the initial model), as :mod:`simulations.experiment`
trains its arms' models by ``trained_rounds``. ``evaluate.source_task``, when written, is the
coordinator's business and is ignored here.

**An evaluation round** draws its cohort as a training round does
(:func:`simulations.devices.plan_round`: online devices by availability, ``clients_per_round
x over_selection`` admitted, dropouts, the first ``clients_per_round`` reports in order of
arrival; fewer than ``min_reports`` fails the attempt, redone up to
``simulation.max_failed_attempts``), with its own seed (the same round numbers as training
would otherwise draw the same cohorts). A device holding no example of ``evaluate.split``
is never online (an agent declines such a task). Evaluation is priced as one pass over the
device's examples at its training speed (a forward pass counted as a training step: an
upper bound) plus its latency; ``simulation.keep_partial_work`` and stragglers do not apply.

**Refused** (naming the field): ``secure_aggregation`` and ``privacy`` (not simulated for
evaluation: the clear path only), ``evaluate.experiment`` and ``simulation.experiment`` (an
A/B test in simulation is a training file's ``simulation.experiment``,
:mod:`simulations.experiment`), an empty ``evaluate.versions`` (no source's latest version
to resolve), ``simulation.population.load: per_round`` (a device evaluates its own data,
held for every device).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.evaluation import kll
from core.evaluation.layout import EvaluationLayout
from core.evaluation.plan import EvaluationPlan, plan_for
from core.evaluation.report import DeviceResult, device_vector, report_problem
from core.evaluation.summary import results_table, round_metrics, summarize
from core.types import EvaluationSplit, TaskKind, TaskState
from simulations.config import (
    PopulationLoad,
    SimulationConfig,
    config_from_dict,
    read_task_file,
)
from simulations.errors import SimulationConfigError, SimulationError

#: ``evaluate.source_task`` while the file is checked as a task: in a simulation the source
#: is the simulated training, so versions other than 0 are allowed without one.
_SIMULATED_SOURCE = "simulated-training"


@dataclass(frozen=True)
class SimulatedEvaluation:
    """The file's evaluation: the plan devices are given (as the coordinator derives it for
    clear reports, :func:`core.evaluation.plan.plan_for` with sketches), the quantiles
    released and the number of evaluation rounds."""

    plan: EvaluationPlan
    quantiles: tuple[float, ...]
    rounds: int

    @property
    def trained_rounds(self) -> int:
        """The training rounds the largest version needs."""
        return max(self.plan.versions)


@dataclass(frozen=True)
class EvaluationRound:
    """One evaluation round (its last attempt): ``devices`` the reporting devices, ``metrics``
    the release (``eval.v<version>.<metric>.<stat>``; empty when the round failed). Times are
    simulated seconds but ``wall_s`` (real seconds since the runner was built: the training
    of the versions included)."""

    round: int
    committed: bool
    attempts: int
    available: int
    admitted: int
    devices: tuple[int, ...]
    round_time_s: float
    sim_time_s: float
    wall_s: float
    metrics: Mapping[str, float]

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["devices"] = len(self.devices)
        out["metrics"] = dict(self.metrics)
        return out


def is_evaluation_file(path: str | Path) -> bool:
    """Whether the file (read as YAML) is a task of kind ``evaluate``; False when it cannot
    be read (the normal loader then reports why)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, Mapping) and data.get("kind") == TaskKind.EVALUATE.value


def load_evaluation_file(path: str | Path, *, population: str | None = None,
                         devices: int | None = None, apps: tuple[str, ...] = ()
                         ) -> tuple[SimulationConfig, SimulatedEvaluation]:
    """Reads a task file of kind ``evaluate`` with a ``simulation:`` section: the training
    config that makes its versions (``rounds``: the largest version's, at least 1) and the
    evaluation. ``population``/``devices`` as in
    :func:`simulations.config.load_simulation_file`; apps must be loaded before.

    Raises:
        SimulationConfigError: the file or a field is wrong or not simulated; names the
            file and the field as written in the file.
    """
    source = str(path)
    try:
        data = yaml.safe_load(read_task_file(path))
    except yaml.YAMLError:
        raise SimulationConfigError(source, "", "not valid YAML") from None
    if not isinstance(data, Mapping):
        raise SimulationConfigError(source, "", "expected a mapping of task fields")
    evaluation = _evaluation(data, source)
    section = data.get("simulation")
    if isinstance(section, Mapping) and "experiment" in section:
        raise SimulationConfigError(source, "simulation.experiment", "does not apply to a "
                                    "task of kind 'evaluate'; an A/B test in simulation is a "
                                    "training task file's simulation.experiment")
    training = {k: v for k, v in data.items() if k not in ("kind", "evaluate")}
    training["rounds"] = max(1, evaluation.trained_rounds)
    config = config_from_dict(training, source=source, base_dir=str(Path(path).parent),
                              population=population, devices=devices, apps=apps)
    if config.data.load is PopulationLoad.PER_ROUND:
        raise SimulationConfigError(source, "simulation.population.load", "per_round does "
                                    "not run an evaluation: its devices evaluate their own "
                                    "data, held for every device; use load: all")
    if evaluation.plan.declared:
        from core.models import model_hooks

        if model_hooks(config.model.architecture).metrics is None:
            raise SimulationConfigError(
                source, f"evaluate.metrics.{evaluation.plan.declared[0]}",
                f"model {config.model.architecture!r} has no metrics hook to compute it")
    return config, evaluation


def _evaluation(data: Mapping[str, Any], source: str) -> SimulatedEvaluation:
    """The ``evaluate`` section, checked as the coordinator checks the task (with the
    simulated training as its source), and what a simulation does not run refused."""
    from core.taskspec import TaskSpecError, spec_from_dict

    raw = data.get("evaluate")
    # Refused before the task's own checks: whatever their fields, they are not simulated.
    written = {"secure_aggregation": data.get("secure_aggregation"),
               "privacy": data.get("privacy"),
               "evaluate.experiment": raw.get("experiment") if isinstance(raw, Mapping)
               else None}
    for name, value in written.items():
        if value not in (None, "off", "auto"):
            raise SimulationConfigError(source, name, "is not simulated for a task of kind "
                                        "'evaluate' (simulations evaluate in the clear); "
                                        "launch it on a coordinator, or remove it")
    checked = dict(data)
    if isinstance(raw, Mapping):
        checked["evaluate"] = {**raw, "source_task": _SIMULATED_SOURCE}
    checked.pop("simulation", None)  # the simulation loader checks it
    try:
        task = spec_from_dict(checked, source=source)
    except TaskSpecError as exc:
        raise SimulationConfigError(source, exc.field, exc.message) from None
    assert task.secure_aggregation is None and task.privacy is None  # refused above
    if not task.evaluate.versions:
        raise SimulationConfigError(source, "evaluate.versions", "is required to simulate: "
                                    "version N is the task's model after N simulated "
                                    "training rounds, e.g. [0, 20]")
    plan = plan_for(task.evaluate, task.evaluate.versions,
                    sketches=task.evaluate.sketch)
    return SimulatedEvaluation(plan, task.evaluate.quantiles, task.rounds)


def trained_versions(config: SimulationConfig, versions: tuple[int, ...]
                     ) -> tuple[Any, dict[int, dict[str, np.ndarray]]]:
    """(the training simulation, each version's global model): ``config`` trained once for
    the largest version's rounds, its global model kept after each round a version names
    (0: the initial model).

    Raises:
        SimulationConfigError: training stopped before a version's round (naming
            ``evaluate.versions``).
    """
    from simulations.engine import Simulation

    sim = Simulation(config)
    return sim, snapshot_rounds(sim, set(versions), source=config.source,
                                field="evaluate.versions")


def snapshot_rounds(sim: Any, wanted: set[int], *, source: str, field: str
                    ) -> dict[int, dict[str, np.ndarray]]:
    """Runs ``sim`` to the largest round in ``wanted`` and returns a copy of its global
    model after each round in ``wanted`` (0: before the first round).

    Raises:
        SimulationConfigError: training stopped before one of them (naming ``field``).
    """
    models: dict[int, dict[str, np.ndarray]] = {}
    if 0 in wanted:
        models[0] = {k: v.copy() for k, v in sim.params.items()}
    last = max(wanted, default=0)
    if last:
        for metrics in sim.rounds(last):
            if metrics.round in wanted:
                models[metrics.round] = {k: v.copy() for k, v in sim.params.items()}
    missing = wanted - models.keys()
    if missing:
        raise SimulationConfigError(
            source, field,
            f"training stopped ({sim.outcome.state.value}: {sim.outcome.reason}) before "
            f"round {min(missing)}")
    return models


class EvaluationRunner:
    """Trains the versions' models once, then runs evaluation rounds (:meth:`rounds`). Not
    thread-safe. Deterministic in the config's seed."""

    def __init__(self, config: SimulationConfig, evaluation: SimulatedEvaluation) -> None:
        from core.models import build_model, load_numpy_state, model_hooks

        self._start = time.perf_counter()
        self.config = config
        self.evaluation = evaluation
        self.layout = EvaluationLayout(evaluation.plan)
        sim, params = trained_versions(config, evaluation.plan.versions)
        self.data = sim.data
        self._models = {}
        for version, state in params.items():
            model = build_model(config.model)
            load_numpy_state(model, state)
            self._models[version] = model
        self._hooks = model_hooks(config.model.architecture)
        #: Examples each device evaluates on (``evaluate.split``).
        self.sizes = np.array([len(self._split(d)[1]) for d in range(self.data.num_devices)],
                              dtype=np.int64)
        # A device with nothing to evaluate would decline: it is never online.
        self.profiles = dataclasses.replace(
            sim.profiles, availability=np.where(self.sizes > 0, sim.profiles.availability, 0.0))
        self._seed = int(np.random.SeedSequence([config.seed, 0xE7A1]).generate_state(1)[0])
        self._results: dict[tuple[int, int], DeviceResult] = {}
        #: How the rounds ended, in the coordinator's task states.
        self.state = TaskState.RUNNING
        self.stop_reason = ""

    def _split(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        split = self.evaluation.plan.split
        if split is EvaluationSplit.TEST:
            return d.x_device_test[device], d.y_device_test[device]
        if split is EvaluationSplit.TRAIN:
            return d.x_train[device], d.y_train[device]
        return (np.concatenate([d.x_train[device], d.x_device_test[device]]),
                np.concatenate([d.y_train[device], d.y_device_test[device]]))

    def result(self, device: int, version: int) -> DeviceResult:
        """``device``'s evaluation of ``version``, as an agent's trainer computes it
        (``TorchTrainer.evaluate_versions``): loss, accuracy, the declared metrics, and the
        per-example values of the sketched metrics."""
        key = (device, version)
        if key not in self._results:
            from core.evaluation.per_example import device_result

            x, y = self._split(device)
            try:
                self._results[key] = device_result(
                    self._models[version], x, y, self.evaluation.plan,
                    loss=self._hooks.loss, metrics=self._hooks.metrics)
            except ValueError as exc:
                raise SimulationError(f"device {device} cannot evaluate version {version}: "
                                      f"{exc}") from None
        return self._results[key]

    def report(self, device: int, round_index: int) -> np.ndarray:
        """``device``'s report in ``round_index``, as it reaches the coordinator (float32
        values, widened): :func:`core.evaluation.report.device_vector` of its results, the
        sketches' coins seeded by the config's seed, the round and the device.

        Raises:
            SimulationError: the report cannot be built (a metric missing or NaN).
        """
        results = {v: self.result(device, v) for v in self.evaluation.plan.versions}
        rng = np.random.default_rng(np.random.SeedSequence(
            [self.config.seed, round_index, device, 0xE7A2]))
        try:
            vector = device_vector(self.layout, results, rng=rng)
        except ValueError as exc:
            raise SimulationError(f"device {device}: cannot report the evaluation: "
                                  f"{exc}") from None
        return vector.astype("<f4").astype(np.float64)

    def release(self, reports: list[np.ndarray], round_index: int) -> dict[str, float]:
        """The round's metrics from its reports, as the coordinator's clear path releases
        them: each report checked, the sums exact, the sketches merged per version and
        metric."""
        layout = self.layout
        plan = layout.plan
        total = np.zeros(layout.length, dtype=np.float64)
        sketches: dict[tuple[int, str], kll.KllSketch] = {}
        rng = np.random.default_rng(np.random.SeedSequence(
            [self.config.seed, round_index, 0xE7A3]))
        for report in reports:
            problem = report_problem(layout, report)
            if problem is not None:  # the coordinator would refuse it: a bug here
                raise SimulationError(f"a simulated evaluation report was refused: {problem}")
            for version in plan.versions:
                n = int(report[layout.index(version, "", "examples")])
                for m in layout.sketched:
                    assert plan.sketch is not None
                    sketch = kll.parse_items(report[layout.sketch_slice(version, m)], n,
                                             k=plan.sketch.k)
                    held = sketches.get((version, m.name))
                    sketches[(version, m.name)] = (
                        sketch if held is None else kll.merge([held, sketch], rng=rng))
            total += np.where(layout.sketch_mask, 0.0, report)
        return round_metrics(summarize(layout, total, self.evaluation.quantiles,
                                       sketches=sketches))

    def rounds(self) -> Iterator[EvaluationRound]:
        """The evaluation rounds; stops after a round whose every attempt failed
        (:attr:`state` FAILED, :attr:`stop_reason` says why)."""
        from simulations.devices import plan_round

        config = self.config
        selection = dataclasses.replace(config.selection, keep_partial_work=False)
        one_pass = dataclasses.replace(config.local, epochs=1)
        sim_time = 0.0
        for r in range(1, self.evaluation.rounds + 1):
            round_time = 0.0
            for attempt in range(1, selection.max_failed_attempts + 1):
                plan = plan_round(r, profiles=self.profiles, sizes=self.sizes,
                                  selection=selection, local=one_pass, straggler_fraction=0.0,
                                  seed=self._seed, attempt=attempt)
                round_time += plan.duration_s
                if plan.committed:
                    break
            sim_time += round_time
            devices = tuple(w.device for w in plan.used)
            metrics = (self.release([self.report(d, r) for d in devices], r)
                       if plan.committed else {})
            yield EvaluationRound(r, plan.committed, attempt, plan.available,
                                  len(plan.admitted), devices, round_time, sim_time,
                                  time.perf_counter() - self._start, metrics)
            if not plan.committed:
                self.state = TaskState.FAILED
                self.stop_reason = (f"round {r}: {selection.max_failed_attempts} attempts had "
                                    f"fewer than min_reports ({selection.min_reports}) "
                                    f"reports")
                return
        self.state = TaskState.COMPLETED


def run_evaluation(config: SimulationConfig, evaluation: SimulatedEvaluation
                   ) -> tuple[EvaluationRunner, list[EvaluationRound]]:
    """Every evaluation round, and the runner (its :attr:`~EvaluationRunner.state`)."""
    runner = EvaluationRunner(config, evaluation)
    return runner, list(runner.rounds())


def summary(config: SimulationConfig, evaluation: SimulatedEvaluation,
            runner: EvaluationRunner, history: list[EvaluationRound]) -> dict[str, Any]:
    """The run as one JSON-ready object; ``results``: the last committed round's release
    as ``{version: {metric or "": {stat: value}}}`` (``fedctl task status --json``'s shape)."""
    final = next((h for h in reversed(history) if h.committed), None)
    return {
        "name": config.name, "kind": TaskKind.EVALUATE.value,
        "versions": list(evaluation.plan.versions),
        "trained_rounds": evaluation.trained_rounds,
        "state": runner.state.value, "stop_reason": runner.stop_reason,
        "rounds": [h.as_dict() for h in history],
        "results": {} if final is None else {
            str(v): stats for v, stats in results_table(final.metrics).items()},
        "sim_time_s": history[-1].sim_time_s if history else 0.0,
        "wall_s": history[-1].wall_s if history else 0.0,
    }


def format_table(history: list[EvaluationRound]) -> str:
    """Per committed round, version and metric: devices, the example-weighted and
    device-weighted means +- standard errors, the quantiles of the examples' values (KLL,
    with the rank-error bound) and of the devices' values (histograms)."""
    head = ["round", "version", "metric", "devices", "mean (examples)", "mean (devices)",
            "quantiles of examples", "quantiles of device values"]
    rows = [head]

    def pm(stats: Mapping[str, float], mean: str, se: str) -> str:
        if mean not in stats:
            return "-"
        return f"{stats[mean]:.4f}" + (f" ± {stats[se]:.4f}" if se in stats else "")

    def qs(stats: Mapping[str, float], prefix: str) -> str:
        found = sorted(((k.removeprefix(prefix), v) for k, v in stats.items()
                        if k.startswith(prefix + "q")), key=lambda kv: float(kv[0][1:]))
        text = " ".join(f"{k[1:]}%:{v:.3g}" for k, v in found) or "-"
        if prefix and found and "example_rank_error" in stats:
            text += f" (±{stats['example_rank_error']:.1%})"
        return text

    for h in history:
        if not h.committed:
            rows.append([str(h.round), "-", "-", "0", "failed", "", "", ""])
            continue
        for version, metrics in sorted(results_table(h.metrics).items()):
            devices = f"{metrics.get('', {}).get('devices', 0.0):g}"
            for name, stats in metrics.items():
                if name:
                    rows.append([str(h.round), str(version), name, devices,
                                 pm(stats, "mean", "se"), pm(stats, "device_mean", "device_se"),
                                 qs(stats, "example_"), qs(stats, "")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
