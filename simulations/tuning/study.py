"""The study loop: Optuna asks for a configuration, a backend runs it as a federated task,
each evaluated round goes back to Optuna for pruning, the final value is told.

    spec = load_study_file("study.yaml")
    with SimulationTrials(parallel=spec.parallel) as backend:
        result = run_study(spec, backend)

**Waves, and why.** Trials run in waves of ``parallel``: a wave's trials are asked together,
run together, and told together in trial order. Optuna's TPE sampler reads only told trials
(running ones through its constant liar, which are the same asked trials whatever the
timing), and the median pruner compares a trial only with *completed* trials at the same
round, which are those of earlier waves. So the study's course (every sampled value, every
pruning decision) depends on the seed alone, never on which process finished first; the
price is that a wave waits for its slowest trial.

**Fair comparison.** Every trial keeps the base task's seed: the same population, the same
selections and the same initial model, so trials differ only in the sampled configuration
(common random numbers).

A backend (:class:`TrialBackend`) runs a wave: :class:`SimulationTrials` in this process
(``parallel`` 1) or in worker processes (:mod:`simulations.tuning.workers`); fedctl's
coordinator backend launches each trial as a task over the admin API.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import math
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from simulations.errors import SimulationConfigError, SimulationError
from simulations.tuning.spec import (
    Direction,
    Param,
    ParamKind,
    PrunerKind,
    SamplerKind,
    StudySpec,
)


class TrialState(enum.Enum):
    COMPLETE = "complete"
    PRUNED = "pruned"    # stopped by the pruner; its value is its last reported one
    FAILED = "failed"    # the task failed, was refused, or never reported the metric


@dataclass(frozen=True)
class TrialJob:
    """One trial to run: ``task`` is a task file's data (the base task with ``params``)."""

    number: int
    params: Mapping[str, Any]
    task: Mapping[str, Any]


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended. ``curve``: (round, objective metric) of each evaluated round that
    was reported; ``value``: the last one (None when there is none); ``rounds``: rounds the
    task ran; ``reason``: why it failed or was pruned."""

    number: int
    state: TrialState
    value: float | None
    rounds: int
    curve: tuple[tuple[int, float], ...] = ()
    reason: str = ""
    wall_s: float = 0.0
    #: The failure is the task's as written, not the trial's values (a field the study
    #: does not search): every trial would fail alike, so the study stops.
    fatal: bool = False


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the study reports it."""

    number: int
    params: Mapping[str, Any]
    outcome: TrialOutcome


@dataclass(frozen=True)
class StudyResult:
    """Every trial in order, and the best completed one (None when none completed)."""

    spec: StudySpec
    trials: tuple[TrialRecord, ...]
    best: TrialRecord | None
    wall_s: float = 0.0

    def counts(self) -> dict[str, int]:
        return {s.value: sum(t.outcome.state is s for t in self.trials) for s in TrialState}


class StudyAborted(SimulationError):
    """A trial failed for a fault of the base task that every trial shares (a data spec
    that cannot be loaded, a field the study does not search); the message is that fault's,
    naming the file and the field."""


#: ``report(trial number, round, value) -> stop?``: called by a backend in the thread that
#: called :meth:`TrialBackend.run_wave`, once per evaluated round; True stops the trial.
RoundReport = Callable[[int, int, float], bool]


class TrialBackend(Protocol):
    """Runs the trials of one wave (at most the backend's parallelism) to their ends."""

    def run_wave(self, jobs: Sequence[TrialJob], report: RoundReport,
                 *, metric: str) -> list[TrialOutcome]:
        """One outcome per job (any order). ``metric``: the objective's name; a trial whose
        task fails is a FAILED outcome with its reason, never an exception."""
        ...

    def close(self) -> None:
        ...


def run_study(spec: StudySpec, backend: TrialBackend, *,
              on_trial: Callable[[TrialRecord], None] | None = None) -> StudyResult:
    """Runs ``spec.trials`` trials in waves of ``spec.parallel`` on ``backend``.
    ``on_trial`` is called as each wave's trials are told (progress).

    Raises:
        StudyAborted: a trial failed for a fault of the task that no trial's values change.
        SimulationError: optuna is not installed.
    """
    optuna = _optuna()
    study = optuna.create_study(
        study_name=spec.name,
        direction="maximize" if spec.objective.direction is Direction.MAXIMIZE else "minimize",
        sampler=_sampler(optuna, spec), pruner=_pruner(optuna, spec))
    if spec.baseline is not None:
        study.enqueue_trial(dict(spec.baseline))
    start = time.perf_counter()
    records: list[TrialRecord] = []
    while len(records) < spec.trials:
        wave = [study.ask() for _ in range(min(spec.parallel, spec.trials - len(records)))]
        by_number = {t.number: t for t in wave}
        jobs = []
        for t in wave:
            params = {p.path: _suggest(t, p) for p in spec.space}
            jobs.append(TrialJob(t.number, params, spec.trial_task(
                params, name=f"{spec.task.get('name', spec.name)}-trial-{t.number}")))
        report = functools.partial(_report, by_number)
        outcomes = {o.number: o for o in backend.run_wave(jobs, report,
                                                          metric=spec.objective.metric)}
        fatal = next((o for o in outcomes.values() if o.fatal), None)
        if fatal is not None:
            raise StudyAborted(fatal.reason)
        for job in jobs:
            outcome = outcomes.get(job.number) or TrialOutcome(
                job.number, TrialState.FAILED, None, 0, reason="the backend returned nothing")
            _tell(optuna, study, by_number[job.number], outcome)
            record = TrialRecord(job.number, job.params, outcome)
            records.append(record)
            if on_trial is not None:
                on_trial(record)
    return StudyResult(spec, tuple(records), best_trial(records, spec.objective.direction),
                       time.perf_counter() - start)


def _report(trials: Mapping[int, Any], number: int, round_number: int, value: float) -> bool:
    """Gives the pruner a trial's value at a round; True: stop the trial."""
    trial = trials[number]
    trial.report(value, round_number)
    return bool(trial.should_prune())


def best_trial(records: Sequence[TrialRecord], direction: Direction) -> TrialRecord | None:
    """The completed trial with the best value; the earliest among equals."""
    done = [r for r in records
            if r.outcome.state is TrialState.COMPLETE and r.outcome.value is not None]
    if not done:
        return None
    sign = 1.0 if direction is Direction.MAXIMIZE else -1.0
    return max(done, key=lambda r: (sign * (r.outcome.value or 0.0), -r.number))


def _tell(optuna: Any, study: Any, trial: Any, outcome: TrialOutcome) -> None:
    states = optuna.trial.TrialState
    if outcome.state is TrialState.COMPLETE and outcome.value is not None:
        study.tell(trial, outcome.value)
    elif outcome.state is TrialState.PRUNED:
        study.tell(trial, state=states.PRUNED)
    else:
        study.tell(trial, state=states.FAIL)


def _suggest(trial: Any, p: Param) -> Any:
    if p.kind is ParamKind.CATEGORICAL:
        return trial.suggest_categorical(p.path, list(p.choices))
    if p.kind is ParamKind.INT:
        return trial.suggest_int(p.path, int(p.low), int(p.high), log=p.log,
                                 step=int(p.step or 1))
    return trial.suggest_float(p.path, p.low, p.high, log=p.log, step=p.step)


def _sampler(optuna: Any, spec: StudySpec) -> Any:
    if spec.sampler.kind is SamplerKind.RANDOM:
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed,
                                      n_startup_trials=spec.sampler.startup_trials)


def _pruner(optuna: Any, spec: StudySpec) -> Any:
    if spec.pruner.kind is PrunerKind.NONE:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.startup_trials,
                                       n_warmup_steps=spec.pruner.warmup_rounds)


def _optuna() -> types.ModuleType:
    try:
        import optuna
    except ImportError:
        raise SimulationError("tuning needs optuna: pip install 'fedcoord[tune]'") from None
    optuna.logging.set_verbosity(logging.WARNING)
    # Ask-and-tell with fixed-step floats warns per trial; the study file chose the step.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# --- running a trial as a simulation (in this process or in a worker) -----------------------


@dataclass
class TrialContext:
    """What a simulated trial needs besides its job: the file its task came from (errors
    name it), where its relative paths resolve, and the apps to register."""

    source: str
    base_dir: str
    apps: tuple[str, ...] = ()
    #: Loaded populations by data config: trials that share a population load it once.
    data_cache: dict[Any, Any] = field(default_factory=dict)


def metric_value(metrics: Any, name: str) -> float | None:
    """The objective ``name`` of a simulated round (``accuracy``: test accuracy, ``loss``:
    test loss, else the app's metric); None on a round that was not evaluated."""
    if metrics.test_accuracy is None:
        return None
    if name == "accuracy":
        return float(metrics.test_accuracy)
    if name == "loss":
        return float(metrics.test_loss)
    value = metrics.metrics.get(name)
    return None if value is None else float(value)


def run_simulated_trial(job: TrialJob, context: TrialContext, report: RoundReport, *,
                        metric: str) -> TrialOutcome:
    """Runs ``job`` as a simulation (:func:`simulations.modes.make_simulation`), reporting
    each evaluated round's ``metric``; stops when ``report`` says so (PRUNED). A task that
    is refused, fails, never reports the metric or reports a non-finite value is FAILED."""
    start = time.perf_counter()
    rounds = 0
    curve: list[tuple[int, float]] = []

    def ended(state: TrialState, reason: str = "") -> TrialOutcome:
        return TrialOutcome(job.number, state, curve[-1][1] if curve else None, rounds,
                            tuple(curve), reason, time.perf_counter() - start)

    try:
        sim = _simulation(job, context)
        for m in sim.rounds():
            rounds = m.round
            value = metric_value(m, metric)
            if value is None:
                continue
            if not math.isfinite(value):
                return ended(TrialState.FAILED, f"{metric} is {value} at round {m.round} "
                                                "(the model diverged)")
            curve.append((m.round, value))
            if report(job.number, m.round, value):
                return ended(TrialState.PRUNED, f"pruned at round {m.round} ({metric} "
                                                f"{value:.4g})")
    except SimulationConfigError as exc:
        searched = any(exc.field == p or exc.field.startswith(f"{p}.") for p in job.params)
        return dataclasses.replace(ended(TrialState.FAILED, str(exc)), fatal=not searched)
    except (SimulationError, ValueError) as exc:
        return ended(TrialState.FAILED, str(exc))
    if not curve:
        return ended(TrialState.FAILED, f"no evaluated round reported {metric!r}")
    state = sim.outcome.state.value
    if state not in ("completed", "budget_exhausted"):
        return ended(TrialState.FAILED, f"the task {state}: {sim.outcome.reason}")
    return ended(TrialState.COMPLETE)


def _simulation(job: TrialJob, context: TrialContext) -> Any:
    """The job's task as a simulation, on the cached population when it is the same."""
    from simulations.config import config_from_dict
    from simulations.data import load_federated_data
    from simulations.modes import make_simulation

    config = config_from_dict(job.task, source=context.source, base_dir=context.base_dir,
                              apps=context.apps)
    data = context.data_cache.get(config.data)
    if data is None:
        context.data_cache.clear()  # one population at a time: bounded memory
        data = context.data_cache[config.data] = load_federated_data(config.data,
                                                                     source=config.source)
    return make_simulation(config, data=data)


class SimulationTrials:
    """Runs trials as simulations: in this process with ``parallel`` 1, else in
    ``parallel`` worker processes (:class:`simulations.tuning.workers.ProcessTrials`,
    started on first use). Use as a context manager (closes the workers)."""

    def __init__(self, *, parallel: int = 1, source: str = "<task>", base_dir: str = ".",
                 apps: tuple[str, ...] = ()) -> None:
        self.parallel = parallel
        self.context = TrialContext(source, base_dir, apps)
        self._pool: Any = None

    def run_wave(self, jobs: Sequence[TrialJob], report: RoundReport,
                 *, metric: str) -> list[TrialOutcome]:
        if self.parallel == 1:
            return [run_simulated_trial(job, self.context, report, metric=metric)
                    for job in jobs]
        if self._pool is None:
            from simulations.tuning.workers import ProcessTrials

            self._pool = ProcessTrials(self.parallel, self.context)
        outcomes: list[TrialOutcome] = self._pool.run_wave(jobs, report, metric=metric)
        return outcomes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> SimulationTrials:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trial_rows(result: StudyResult) -> Iterator[dict[str, Any]]:
    """One plain row per trial (the CSV's and the JSON summary's)."""
    for r in result.trials:
        o = r.outcome
        yield {"number": r.number, "state": o.state.value, "value": o.value,
               "rounds": o.rounds, **{f"params.{k}": v for k, v in r.params.items()},
               "wall_s": round(o.wall_s, 3), "reason": o.reason}


def as_summary(result: StudyResult, out: str | None = None) -> dict[str, Any]:
    """The study as one JSON-ready mapping (``fedctl tune --json``)."""
    best = result.best
    spec = result.spec
    summary: dict[str, Any] = {
        "name": spec.name, "metric": spec.objective.metric,
        "direction": spec.objective.direction.value, "trials": len(result.trials),
        **result.counts(),
        "best": None if best is None else {
            "number": best.number, "value": best.outcome.value, "params": dict(best.params),
            "rounds": best.outcome.rounds},
        "wall_s": round(result.wall_s, 3),
    }
    if out is not None:
        summary["out"] = out
    return summary

