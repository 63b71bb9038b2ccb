"""``fedctl tune STUDY.yaml [--out DIR] [--trials N] [--parallel N] [--app MODULE:ATTR]...
[--json] [--coordinator HOST:PORT [--ca FILE] [--cert FILE --key FILE] [--token T]]``: an
Optuna search over a task file's training configuration (:mod:`simulations.tuning`), each
trial a federated task: a simulation in this machine's processes by default, a task on a
coordinator with ``--coordinator``.

One line per trial goes to stderr as it ends; ``trials.csv``, ``best.yaml`` (a runnable task
file), ``study.json`` and ``trials.png`` to the output directory (default
``runs/STUDY-NAME``); a summary to stdout (with ``--json``, one JSON line and nothing else).

**On a coordinator** each trial is a task launched over the admin API (the base task with
the trial's values; name ``TASK-trial-N``). The curve the pruner reads, polled every
``--poll-s`` seconds, is each committed round's federated evaluation where the task has one
(``evaluation.fraction`` > 0: the selected devices evaluate the round's starting model on
their own held-out data before training; round metric ``eval_METRIC``, weighted by their
examples), else the coordinator's evaluation of the committed model on
``evaluation.server_data`` (``server_eval_METRIC``); a task with neither is refused. The
federated curve trails the model by one round: round r evaluates version r-1. A pruned
trial's task is cancelled. ``parallel``
tasks run at once: the population's devices must be able to serve that many (a device runs
one task at a time). Parameters under ``simulation.`` (FedProx's ``mu``) are refused there:
the coordinator does not run them. Ctrl-C or a lost coordinator cancels the study's running
tasks.

A bad study file, task file or ``--app`` exits with code 2 and one line naming the file
and the field (so does a fault of the base task found only when a trial loads its data:
every trial would fail alike, so the study stops). A study in which no trial completed
exits with code 1 (``trials.csv`` says why each failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedctl.admin import AdminClient
    from simulations.tuning import RoundReport, StudyResult, StudySpec, TrialOutcome, TrialRecord


def register(subparsers: Any) -> None:
    """Adds the ``tune`` subcommand to ``fedctl``'s subparsers (imports nothing heavy)."""
    p = subparsers.add_parser(
        "tune", help="search a task's training configuration with Optuna (simulated trials, "
                     "or tasks on a coordinator)",
        description="Runs an Optuna study (TPE sampler, median pruning by each trial's "
                    "evaluation curve) over the fields of a task file; see "
                    "simulations/examples/studies/tune_digits.yaml.")
    p.add_argument("file", type=Path, help="study YAML (a base task and a search space)")
    p.add_argument("--out", type=Path, help="output directory (default runs/STUDY-NAME)")
    p.add_argument("--trials", type=int, metavar="N", help="override the study's trials")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="override the study's parallel trials")
    p.add_argument("--app", action="append", default=[], metavar="MODULE:ATTRIBUTE",
                   help="user code (models, data sources, loss, metrics) to register before "
                        "the files are read; repeatable")
    p.add_argument("--json", action="store_true",
                   help="print only one JSON line of results on stdout")
    coordinator = p.add_argument_group(
        "coordinator", "run each trial as a task on a coordinator instead of simulating it")
    coordinator.add_argument("--coordinator", metavar="HOST:PORT",
                             help="the coordinator's address (without it: simulation)")
    coordinator.add_argument("--ca", type=Path, metavar="FILE",
                             help="TLS: the CA certificate the coordinator's certificate must "
                                  "chain to (without it: plaintext)")
    coordinator.add_argument("--cert", type=Path, metavar="FILE",
                             help="mutual TLS: this client's certificate (with --key and --ca)")
    coordinator.add_argument("--key", type=Path, metavar="FILE",
                             help="mutual TLS: this client's key")
    coordinator.add_argument("--token", metavar="TOKEN",
                             help="admin API token (else $FEDCOORD_TOKEN, else the token "
                                  "file ~/.config/fedcoord/token)")
    coordinator.add_argument("--poll-s", type=float, default=1.0, metavar="SECONDS",
                             help="how often the trials' rounds are read (default 1)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from core.errors import AppError
    from fedctl.errors import CliError
    from simulations.config import load_apps
    from simulations.errors import SimulationConfigError, SimulationError
    from simulations.tuning import SimulationTrials, StudyAborted, run_study, write_results

    for flag, value in (("--trials", args.trials), ("--parallel", args.parallel)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}", exit_code=2)
    if args.coordinator is None:
        for flag in ("ca", "cert", "key", "token"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag} needs --coordinator HOST:PORT (without it, trials "
                               "are simulated)", exit_code=2)
    if not args.poll_s > 0:
        raise CliError(f"--poll-s must be positive, got {args.poll_s}", exit_code=2)
    apps = tuple(args.app)
    # With --json, whatever runs (an app's code included) prints to stderr: stdout carries
    # the one JSON line only.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        try:
            load_apps(apps)
        except AppError as exc:
            raise CliError(str(exc), exit_code=2) from None
        try:
            spec = _load(args, apps)
        except SimulationConfigError as exc:
            raise CliError(str(exc), exit_code=2) from None
        out: Path = args.out or Path("runs") / spec.name
        if args.coordinator is None:
            _warn_oversubscribed(spec)
        progress = _progress(spec)
        try:
            if args.coordinator is None:
                with SimulationTrials(parallel=spec.parallel, source=spec.task_source,
                                      base_dir=spec.base_dir, apps=apps) as backend:
                    result = run_study(spec, backend, on_trial=progress)
            else:
                result = _run_on_coordinator(args, spec, progress)
        except StudyAborted as exc:
            raise CliError(f"{exc} (every trial would fail alike; the study stopped)",
                           exit_code=2) from None
        except SimulationError as exc:
            raise CliError(f"{args.file}: {exc}") from None
        write_results(result, out)
    summary = _summary(result, out)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(_human(result, out), flush=True)
    return 0 if result.best is not None else 1


def _load(args: argparse.Namespace, apps: tuple[str, ...]) -> StudySpec:
    """The study file, checked for the mode it runs in, with the command line's overrides."""
    from simulations.tuning import load_study_file, simulation_check

    if args.coordinator is None:
        spec = load_study_file(args.file, check=simulation_check(apps))
    else:
        spec = load_study_file(args.file, check=_coordinator_check)
        _check_for_coordinator(spec)
    if args.trials is not None:
        spec = dataclasses.replace(spec, trials=args.trials)
    if args.parallel is not None:
        spec = dataclasses.replace(spec, parallel=args.parallel)
    return spec


def _coordinator_check(task: Mapping[str, Any], source: str, base_dir: str) -> object:
    """A trial's task as the coordinator will check it (:func:`core.taskspec.spec_from_dict`)."""
    from core.taskspec import TaskSpecError, spec_from_dict
    from simulations.errors import SimulationConfigError

    try:
        return spec_from_dict(task, source=source)
    except TaskSpecError as exc:
        raise SimulationConfigError(source, exc.field, exc.message) from None


def _check_for_coordinator(spec: StudySpec) -> None:
    """What a coordinator cannot tune or measure, refused naming the field."""
    from simulations.errors import SimulationConfigError

    for param in spec.space:
        if param.path.split(".")[0] == "simulation":
            raise SimulationConfigError(
                spec.source, f"space.{param.path}", "is a simulation setting: a coordinator "
                "ignores the simulation: section (FedProx's mu is simulated only); tune it "
                "without --coordinator, or remove it")
    try:
        curve_metric(spec.trial_task({}), spec.objective.metric)
    except ValueError as exc:
        raise SimulationConfigError(spec.task_source, "evaluation", str(exc)) from None


def _warn_oversubscribed(spec: StudySpec) -> None:
    """A note on stderr when ``parallel`` trials of ``simulation.engine.threads`` torch threads
    each ask for more cores than this machine has (they would slow each other down)."""
    import os

    from simulations.tuning.spec import get_path

    searched = {p.path: p for p in spec.space}
    threads_param = searched.get("simulation.engine.threads")
    threads = int(threads_param.high) if threads_param is not None else int(
        get_path(spec.trial_task({}), "simulation.engine.threads") or 1)
    cores = os.cpu_count() or 1
    if spec.parallel * threads > cores:
        print(f"note: {spec.parallel} parallel trials x {threads} torch thread(s) each on "
              f"{cores} cores: trials will wait for each other (lower parallel: or "
              "simulation.engine.threads)", file=sys.stderr)


def curve_metric(task: Mapping[str, Any], name: str) -> str:
    """The round metric a trial's task reports for the objective ``name`` on a coordinator:
    its devices' federated evaluation (``eval_NAME``) where ``evaluation.fraction`` > 0, else
    the coordinator's own on ``evaluation.server_data`` (``server_eval_NAME``,
    :meth:`coordinator.rounds.evaluation.ServerEvaluator.evaluate`).

    Raises:
        ValueError: the task evaluates neither way.
    """
    evaluation = task.get("evaluation")
    evaluation = evaluation if isinstance(evaluation, Mapping) else {}
    fraction = evaluation.get("fraction", 0)
    if isinstance(fraction, int | float) and fraction > 0:
        return f"eval_{name}"
    if evaluation.get("server_data"):
        return f"server_eval_{name}"
    raise ValueError(f"a trial on a coordinator needs an evaluation curve for {name}: "
                     "evaluation.fraction > 0 (the devices' federated evaluation) or "
                     "evaluation.server_data (the coordinator's)")


def _run_on_coordinator(args: argparse.Namespace, spec: StudySpec,
                        progress: Callable[[TrialRecord], None]) -> StudyResult:
    from core.tls import TlsError, load_client_tls
    from fedctl.admin import AdminClient, AdminError
    from fedctl.credentials import resolve_token
    from fedctl.errors import CliError
    from simulations.tuning import run_study

    if args.ca is None and (args.cert is not None or args.key is not None):
        raise CliError("--cert and --key need --ca FILE (the CA of the coordinator)",
                       exit_code=2)
    try:
        tls = None if args.ca is None else load_client_tls(args.ca, args.cert, args.key)
    except TlsError as exc:
        raise CliError(str(exc), exit_code=2) from None
    with AdminClient(args.coordinator, tls=tls, token=resolve_token(args.token)) as client:
        backend = CoordinatorTrials(client, source=spec.task_source, poll_s=args.poll_s)
        try:
            return run_study(spec, backend, on_trial=progress)
        except AdminError as exc:
            raise CliError(f"{args.file}: {exc}") from None
        except KeyboardInterrupt:
            print("\nstopped: the study's running tasks were cancelled", file=sys.stderr)
            raise
        finally:
            backend.close()


@dataclass
class _Running:
    task_id: str
    started: float
    #: The round metric that is this trial's curve (:func:`curve_metric`).
    key: str
    seen_round: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)


class CoordinatorTrials:
    """Runs a wave of trials as tasks on a coordinator (a
    :class:`simulations.tuning.TrialBackend`): launches them, reads each committed round's
    curve (:func:`curve_metric`) every ``poll_s`` seconds, cancels a pruned trial's task, waits
    for the others to end. ``sleep`` is injectable for tests. Not thread-safe.

    Raises (from :meth:`run_wave`):
        fedctl.admin.AdminError: the coordinator could not be reached or refused a call
            other than the launch (a refused launch is a FAILED trial); the wave's running
            tasks are cancelled first (best effort).
    """

    def __init__(self, client: AdminClient, *, source: str = "<task>", poll_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.source = source
        self.poll_s = poll_s
        self._sleep = sleep
        self._running: dict[int, _Running] = {}

    def run_wave(self, jobs: Sequence[Any], report: RoundReport, *,
                 metric: str) -> list[TrialOutcome]:
        from core.taskspec import TaskSpecError, spec_from_dict
        from fedctl.admin import AdminError
        from simulations.tuning import TrialOutcome, TrialState

        outcomes: list[TrialOutcome] = []
        self._running = {}
        try:
            for job in jobs:
                try:
                    key = curve_metric(job.task, metric)
                    task = self.client.create_task(spec_from_dict(job.task, source=self.source))
                except (TaskSpecError, ValueError) as exc:
                    outcomes.append(TrialOutcome(job.number, TrialState.FAILED, None, 0,
                                                 reason=str(exc)))
                    continue
                except AdminError as exc:
                    if exc.unreachable:
                        raise
                    outcomes.append(TrialOutcome(job.number, TrialState.FAILED, None, 0,
                                                 reason=f"the coordinator refused the task: "
                                                        f"{exc}"))
                    continue
                self._running[job.number] = _Running(task.task_id, time.perf_counter(), key)
            while self._running:
                for number in sorted(self._running):
                    outcome = self._poll(number, metric, report)
                    if outcome is not None:
                        outcomes.append(outcome)
                        del self._running[number]
                if self._running:
                    self._sleep(self.poll_s)
        except BaseException:
            self.close()
            raise
        return outcomes

    def _poll(self, number: int, metric: str, report: RoundReport
              ) -> TrialOutcome | None:
        """Reads the trial's task and rounds; its outcome once it has ended (or was stopped
        here), else None."""
        from simulations.tuning import TrialOutcome, TrialState

        run = self._running[number]
        key = run.key
        # The task before its rounds: a task seen ended has no round left to see.
        task = self.client.get_task(run.task_id)
        rounds = sorted((r for r in self.client.list_rounds(run.task_id)
                         if r.state == "committed" and key in r.metrics),
                        key=lambda r: r.round_number)

        def ended(state: TrialState, reason: str = "") -> TrialOutcome:
            return TrialOutcome(number, state, run.curve[-1][1] if run.curve else None,
                                max(int(task.rounds_committed), run.seen_round),
                                tuple(run.curve), reason, time.perf_counter() - run.started)

        for r in rounds:
            if r.round_number <= run.seen_round:
                continue
            run.seen_round = int(r.round_number)
            value = float(r.metrics[key])
            if not math.isfinite(value):
                self._cancel(run.task_id)
                return ended(TrialState.FAILED, f"{metric} is {value} at round "
                                                f"{r.round_number} (the model diverged)")
            run.curve.append((run.seen_round, value))
            if report(number, run.seen_round, value):
                self._cancel(run.task_id)
                return ended(TrialState.PRUNED, f"pruned at round {run.seen_round} ({metric} "
                                                f"{value:.4g}); task {run.task_id} cancelled")
        if task.state == "running":
            return None
        if task.state in ("completed", "budget_exhausted") and run.curve:
            return ended(TrialState.COMPLETE)
        why = task.reason or (f"no committed round reported {key}" if task.state in (
            "completed", "budget_exhausted") else "")
        return ended(TrialState.FAILED, f"task {run.task_id} {task.state}"
                                        + (f": {why}" if why else ""))

    def _cancel(self, task_id: str) -> None:
        from fedctl.admin import AdminError

        try:
            self.client.cancel_task(task_id)
        except AdminError:
            pass  # it ended meanwhile, or the coordinator is gone: nothing left to stop

    def close(self) -> None:
        """Cancels the tasks of trials still running (best effort)."""
        for run in self._running.values():
            self._cancel(run.task_id)
        self._running = {}


def _progress(spec: StudySpec) -> Callable[[TrialRecord], None]:
    metric = spec.objective.metric

    done = 0

    def show(record: TrialRecord) -> None:
        nonlocal done
        done += 1
        o = record.outcome
        value = "" if o.value is None else f" {metric} {o.value:.4f}"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in record.params.items())
        line = (f"[{done}/{spec.trials}] trial {record.number}: {o.state.value}{value} after "
                f"{o.rounds} rounds ({o.wall_s:.1f} s)  {params}")
        if o.state.value == "failed":
            line += f"\n  {o.reason}"
        print(line, file=sys.stderr, flush=True)

    return show


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _summary(result: StudyResult, out: Path) -> dict[str, Any]:
    from simulations.tuning import as_summary

    return as_summary(result, str(out))


def _human(result: StudyResult, out: Path) -> str:
    counts = result.counts()
    spec = result.spec
    head = (f"{spec.name}: {len(result.trials)} trials ({counts['complete']} complete, "
            f"{counts['pruned']} pruned, {counts['failed']} failed) in {result.wall_s:.1f} s")
    best = result.best
    if best is None:
        body = "no trial completed: no best configuration (see trials.csv for the reasons)"
    else:
        body = (f"best: trial {best.number} with {spec.objective.metric} "
                f"{best.outcome.value:.4f} after {best.outcome.rounds} rounds: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
    return f"{head}\n{body}\nresults in {out}/ (trials.csv, best.yaml, study.json, trials.png)"
