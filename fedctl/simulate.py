"""``fedctl simulate TASK.yaml [--app MODULE:ATTR]... [--population SPEC --devices N]
[--rounds N] [--out DIR] [--ray ADDRESS] [--json]``: runs a task file as an in-process
simulated federation (:mod:`simulations`), the same file ``fedctl task launch`` sends to a
coordinator, with its ``simulation:`` section (the population's data, heterogeneity,
engine). A progress bar goes to stderr; ``metrics.jsonl``, ``metrics.csv`` and
``metrics.png`` to the output directory; a summary to stdout (with ``--json``, only one JSON
line: anything user code prints goes to stderr). The summary says how the run ended, in
the coordinator's task states: ``completed``, ``failed`` or, under central DP,
``budget_exhausted`` (the next round would have passed ``privacy.max_epsilon``), with the
epsilon spent and the budget.

A file with a ``simulation.experiment`` section runs an A/B experiment of model variants
on the simulated devices instead (:mod:`simulations.experiment`): a per-round table, then
the decision and its reason (``--json``: one JSON object). A task file of kind
``evaluate`` runs a federated evaluation of the task's model after N simulated training
rounds (:mod:`simulations.evaluation`): a per-round table of the released metrics
(``--json``: one JSON object).

A bad task file or ``--app`` exits with code 2 and one line naming the file and the field.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Adds the ``simulate`` subcommand to ``fedctl``'s subparsers (imports nothing heavy)."""
    p = subparsers.add_parser(
        "simulate", help="run a task file as a simulated federation in this process",
        description="Runs a task file (the one `fedctl task launch` takes) as a simulated "
                    "federation; its `simulation:` section says which devices and data to "
                    "simulate (see simulations/examples/ and examples/).")
    p.add_argument("file", type=Path, help="task YAML with a simulation: section")
    p.add_argument("--app", action="append", default=[], metavar="MODULE:ATTRIBUTE",
                   help="user code (models, data sources, loss, metrics) to register before "
                        "the file is read; repeatable")
    p.add_argument("--population", metavar="SPEC",
                   help="the devices' data spec, without shard (replaces "
                        "simulation.population.data), e.g. 'digits:dirichlet=0.5'")
    p.add_argument("--devices", type=int, metavar="N",
                   help="simulated devices (replaces simulation.population.devices); device i "
                        "loads shard=i/N of the population's spec")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="split cohorts across Ray workers at ADDRESS ('local' starts one)")
    p.add_argument("--out", type=Path, help="output directory (default runs/NAME)")
    p.add_argument("--rounds", type=int, help="override the file's number of rounds")
    p.add_argument("--json", action="store_true",
                   help="print only one JSON line of results on stdout")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.errors import AppError
    from fedctl.errors import CliError
    from simulations.config import load_apps, load_simulation_file
    from simulations.errors import SimulationConfigError, SimulationError

    if args.devices is not None and args.devices < 1:
        raise CliError(f"--devices must be at least 1, got {args.devices}", exit_code=2)
    if args.rounds is not None and args.rounds < 1:
        raise CliError(f"--rounds must be at least 1, got {args.rounds}", exit_code=2)
    apps = tuple(args.app)
    from simulations.evaluation import is_evaluation_file
    from simulations.experiment import has_experiment

    if is_evaluation_file(args.file):
        return _evaluation(args, apps)
    if has_experiment(args.file):
        return _experiment(args, apps)
    with _stdout_to_stderr(args.json):
        try:
            load_apps(apps)
        except AppError as exc:
            raise CliError(str(exc), exit_code=2) from None
        try:
            config = load_simulation_file(args.file, population=args.population,
                                          devices=args.devices, apps=apps)
        except SimulationConfigError as exc:
            raise CliError(str(exc), exit_code=2) from None
        rounds = args.rounds or config.rounds
        out: Path = args.out or Path("runs") / config.name
        console = Console(stderr=True)
        try:
            sim, closer = _build(config, args.ray)
        except SimulationConfigError as exc:
            raise CliError(str(exc), exit_code=2) from None
        except (SimulationError, ValueError) as exc:
            raise CliError(f"{args.file}: {exc}") from None
        from simulations.outputs import MetricsWriter, plot_runs

        history = []
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                            TimeElapsedColumn(), console=console, transient=False)
        try:
            with MetricsWriter(out) as writer, progress:
                task = progress.add_task(config.name, total=rounds, status="")
                for metrics in sim.rounds(rounds):
                    writer.write(metrics)
                    history.append(metrics)
                    acc = metrics.test_accuracy
                    status = (f"acc {acc:.3f}" if acc is not None else "") + \
                        f"  used {metrics.used}/{metrics.admitted}"
                    progress.update(task, advance=1, status=status)
        except SimulationError as exc:
            raise CliError(f"{args.file}: {exc}") from None
        finally:
            closer()
        plot_runs({config.name: history}, out / "metrics.png", title=config.name)
    final = next((m for m in reversed(history) if m.test_accuracy is not None), None)
    privacy = sim.privacy
    summary = {
        "name": config.name, "rounds": len(history),
        "committed": sum(m.committed for m in history),
        # The coordinator's task state: completed, failed, budget_exhausted.
        "state": sim.outcome.state.value, "stop_reason": sim.outcome.reason,
        "final_accuracy": None if final is None else final.test_accuracy,
        "final_test_loss": None if final is None else final.test_loss,
        "final_metrics": {} if final is None else dict(final.metrics),
        "epsilon": None if privacy is None else privacy.epsilon(),
        "epsilon_budget": None if privacy is None else privacy.budget,
        "delta": None if privacy is None else privacy.delta,
        "sim_time_s": history[-1].sim_time_s if history else 0.0,
        "wall_s": history[-1].wall_s if history else 0.0,
        "out": str(out),
    }
    if config.compare is not None:
        summary["compare"] = _compare(config, rounds, args.json)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(_human(summary), flush=True)
    return 0


def _experiment(args: argparse.Namespace, apps: tuple[str, ...]) -> int:
    """A file with a ``simulation.experiment`` section: an A/B test of model variants evaluated on
    the simulated devices (:mod:`simulations.experiment`); prints the per-round table and
    the decision with its reason (``--json``: one JSON object)."""
    from simulations.experiment import (
        format_table,
        load_experiment_file,
        run_experiment,
        summary,
    )

    _refuse_flags(args, ("ray", "rounds", "out"), "an experiment file",
                  "its rounds are simulation.experiment.horizon_rounds")
    with _stdout_to_stderr(args.json), _run_errors(args.file, apps):
        config, experiment = load_experiment_file(args.file, population=args.population,
                                                  devices=args.devices, apps=apps)
        history = run_experiment(config, experiment)
    result = summary(config, experiment, history)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    decision = result["decision"]
    print(format_table(experiment.spec, history))
    print(f"{config.name}: {decision['action']} after {decision['round']} rounds: "
          f"{decision['reason']}", flush=True)
    return 0


def _evaluation(args: argparse.Namespace, apps: tuple[str, ...]) -> int:
    """A task file of kind ``evaluate``: its versions (the task's model after N simulated
    training rounds) evaluated by simulated devices round by round, released as the
    coordinator releases them (:mod:`simulations.evaluation`); prints the per-round table
    (``--json``: one JSON object). ``--rounds`` replaces the evaluation rounds."""
    import dataclasses

    from simulations.evaluation import (
        format_table,
        load_evaluation_file,
        run_evaluation,
        summary,
    )

    _refuse_flags(args, ("ray", "out"), "an evaluation file",
                  "it runs in this process and prints its results")
    with _stdout_to_stderr(args.json), _run_errors(args.file, apps):
        config, evaluation = load_evaluation_file(args.file, population=args.population,
                                                  devices=args.devices, apps=apps)
        if args.rounds is not None:
            evaluation = dataclasses.replace(evaluation, rounds=args.rounds)
        runner, history = run_evaluation(config, evaluation)
    result = summary(config, evaluation, runner, history)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    print(format_table(history))
    ended = f"{result['state']}" + (f" ({result['stop_reason']})" if result["stop_reason"]
                                    else "")
    print(f"{config.name}: versions {', '.join(map(str, result['versions']))} evaluated in "
          f"{len(history)} rounds, {ended}, {result['wall_s']:.1f} s", flush=True)
    return 0


def _refuse_flags(args: argparse.Namespace, names: tuple[str, ...], kind: str, why: str) -> None:
    """Refuses (exit 2) the first of the ``--NAME`` flags given that a file of ``kind`` has
    no use for, saying ``why``."""
    from fedctl.errors import CliError

    for name in names:
        if getattr(args, name) is not None:
            raise CliError(f"--{name} does not apply to {kind} ({args.file}): {why}",
                           exit_code=2)


@contextlib.contextmanager
def _run_errors(file: str, apps: tuple[str, ...]) -> Iterator[None]:
    """Loads ``apps``, then runs the block with what a simulated run refuses turned into
    fedctl's one-line errors: a bad app or file, exit code 2 (the field named); a run that
    failed, exit code 1, naming ``file``."""
    from core.errors import AppError
    from fedctl.errors import CliError
    from simulations.config import load_apps
    from simulations.errors import SimulationConfigError, SimulationError

    try:
        load_apps(apps)
    except AppError as exc:
        raise CliError(str(exc), exit_code=2) from None
    try:
        yield
    except SimulationConfigError as exc:
        raise CliError(str(exc), exit_code=2) from None
    except (SimulationError, ValueError) as exc:
        raise CliError(f"{file}: {exc}") from None


def _compare(config: Any, rounds: int, quiet: bool) -> dict[str, Any]:
    """``simulation.compare``: both aggregation modes on the same population, each until the
    target accuracy; the table goes to stdout (stderr with ``--json``)."""
    from simulations.modes import compare_modes, format_comparison

    with _stdout_to_stderr(quiet):
        result = compare_modes(config, config.compare.target_accuracy, rounds=rounds)
        print(format_comparison(result), flush=True)
    return {k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in result.items()}


def _human(summary: dict[str, Any]) -> str:
    acc, loss = summary["final_accuracy"], summary["final_test_loss"]
    parts = [f"{summary['name']}: {summary['committed']}/{summary['rounds']} rounds committed"]
    if acc is not None:
        parts.append(f"test accuracy {acc:.4f}, test loss {loss:.4f}")
    parts += [f"{k} {v:.4g}" for k, v in summary["final_metrics"].items()]
    if summary["epsilon"] is not None:
        parts.append(f"epsilon {summary['epsilon']:.3g} of {summary['epsilon_budget']:.3g} "
                     f"(delta {summary['delta']:g})")
    parts.append(f"{summary['sim_time_s']:.0f} simulated s, {summary['wall_s']:.1f} s")
    text = ", ".join(parts)
    if summary["state"] != "completed":
        text += f"\nstopped ({summary['state']}): {summary['stop_reason']}"
    return text + f"\nmetrics in {summary['out']}/ (metrics.jsonl, .csv, .png)"


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``, whatever runs (an app's code included) prints to stderr, so stdout
    carries the one JSON line only."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _build(config: Any, ray_address: str | None) -> tuple[Any, Callable[[], None]]:
    from simulations.modes import build_simulation

    return build_simulation(config, ray_address=ray_address)
