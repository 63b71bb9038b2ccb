"""``fedctl simulate sim.yaml [--ray ADDRESS] [--out DIR] [--rounds N]``: runs an in-process
simulated federation (:mod:`simulations`) with a progress bar on stderr, writes
``metrics.jsonl``, ``metrics.csv`` and ``metrics.png`` to the output directory, and prints one
JSON line of results on stdout.

A bad simulation file exits with code 2 and one line naming the file and the field.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Adds the ``simulate`` subcommand to ``fedctl``'s subparsers (imports nothing heavy)."""
    p = subparsers.add_parser("simulate", help="run a simulated federation in this process")
    p.add_argument("file", type=Path, help="simulation YAML (see simulations/examples/)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="split cohorts across Ray workers at ADDRESS ('local' starts one)")
    p.add_argument("--out", type=Path, help="output directory (default runs/NAME)")
    p.add_argument("--rounds", type=int, help="override the file's number of rounds")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedctl.errors import CliError
    from simulations.config import load_simulation_file
    from simulations.errors import SimulationConfigError, SimulationError

    try:
        config = load_simulation_file(args.file)
    except SimulationConfigError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if args.rounds is not None and args.rounds < 1:
        raise CliError(f"--rounds must be at least 1, got {args.rounds}", exit_code=2)
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
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                        console=console, transient=False)
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
    print(json.dumps({
        "name": config.name, "rounds": len(history),
        "committed": sum(m.committed for m in history),
        "final_accuracy": None if final is None else final.test_accuracy,
        "final_test_loss": None if final is None else final.test_loss,
        "sim_time_s": history[-1].sim_time_s if history else 0.0,
        "wall_s": history[-1].wall_s if history else 0.0,
        "out": str(out),
    }))
    return 0


def _build(config: Any, ray_address: str | None) -> tuple[Any, Callable[[], None]]:
    from simulations.engine import Simulation

    if ray_address is None and config.engine.processes > 1:
        from simulations.cohort import DeviceTable
        from simulations.data import load_federated_data
        from simulations.process_backend import ProcessCohortTrainer

        data = load_federated_data(config.data)
        pool = ProcessCohortTrainer.from_config(config, DeviceTable(data))
        try:
            return Simulation(config, data=data, trainer=pool), pool.shutdown
        except BaseException:
            pool.shutdown()
            raise
    if ray_address is None:
        return Simulation(config), lambda: None
    from simulations.data import load_federated_data
    from simulations.ray_backend import RayCohortTrainer

    data = load_federated_data(config.data)
    trainer = RayCohortTrainer(ray_address, config, data)
    return Simulation(config, data=data, trainer=trainer), trainer.shutdown
