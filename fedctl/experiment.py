"""``fedctl experiment launch|status|stop``: A/B experiments between model versions, run by the
coordinator as evaluation tasks with an ``evaluate.experiment`` section
(:mod:`core.experiments.versions`).

``status`` recomputes the arms' statistics from the committed rounds' released metrics with
the coordinator's own code (so the table is what the coordinator decided on), and prints
per arm: devices, the primary metric's mean +- standard error, the difference with the
control with its always-valid confidence sequence and p-value, Welch's fixed-horizon p-value
alongside (valid at the horizon only), the guardrails, the sample-ratio check and the
decision with its reason; ``--json`` prints that as one JSON document, ``--out FILE`` writes
it to a file.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import CliError

if TYPE_CHECKING:
    from rich.table import Table

    from core.experiments.spec import ExperimentSpec
    from core.experiments.versions import ExperimentState
    from fedctl.admin import AdminClient
    from protos.fedcoord.v1 import admin_pb2

AdminFactory = Callable[[argparse.Namespace], "AdminClient"]
_admin: AdminFactory


def register(sub: Any, add_coordinator: Callable[[argparse.ArgumentParser], None],
             admin: AdminFactory) -> None:
    """Adds ``experiment launch|status|stop`` to ``sub`` (the top-level subparsers);
    ``add_coordinator`` adds the coordinator and credential options, ``admin`` makes the
    admin client from the parsed arguments."""
    global _admin
    _admin = admin
    experiment = sub.add_parser("experiment", help="A/B experiments between model versions"
                                ).add_subparsers(dest="action", required=True)
    launch = experiment.add_parser(
        "launch", help="start an experiment from a task file with an evaluate.experiment "
                       "section; prints its task id")
    launch.add_argument("file", type=Path)
    launch.add_argument("--source-task", metavar="ID",
                        help="the training task whose versions the arms name "
                             "(evaluate.source_task)")
    launch.add_argument("--json", action="store_true",
                        help="print the created task as JSON on stdout, and nothing else there")
    add_coordinator(launch)
    launch.set_defaults(func=cmd_launch)
    status = experiment.add_parser("status", help="the arms, their comparison with the "
                                                  "control, and the decision")
    status.add_argument("task_id")
    status.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout, and nothing else there")
    status.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the results as JSON to FILE")
    add_coordinator(status)
    status.set_defaults(func=cmd_status)
    stop = experiment.add_parser("stop", help="stop an experiment now (its task is cancelled; "
                                              "the rounds so far stay)")
    stop.add_argument("task_id")
    stop.add_argument("--reason", default="", metavar="TEXT",
                      help="why, stored with the task (at most 500 characters)")
    add_coordinator(stop)
    stop.set_defaults(func=cmd_stop)


def cmd_launch(args: argparse.Namespace) -> int:
    from core.taskspec import TaskSpecError, load_task_file
    from fedctl.admin import AdminError

    overrides = {} if args.source_task is None else {"evaluate.source_task": args.source_task}
    try:
        spec = load_task_file(args.file, overrides=overrides)
    except TaskSpecError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if spec.evaluate.experiment is None:
        raise CliError(f"{args.file}: field 'evaluate.experiment': is required for an "
                       f"experiment (a task of kind 'evaluate' without it is launched with "
                       f"fedctl task launch)", exit_code=2)
    with _admin(args) as client:
        try:
            task = client.create_task(spec)
        except AdminError as exc:
            if exc.unreachable:
                raise CliError(str(exc)) from None
            raise CliError(f"{args.file}: coordinator refused the experiment: {exc}") from None
    if args.json:
        from fedctl.output import print_json, task_document

        print_json(task_document(task))
    else:
        print(task.task_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedctl.admin import AdminError

    with _admin(args) as client:
        try:
            task, rounds = client.get_task(args.task_id), client.list_rounds(args.task_id)
        except AdminError as exc:
            raise CliError(str(exc)) from None
    spec, state = experiment_state(task, rounds)
    document = results_document(task, spec, state)
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{args.out}: cannot write the results: "
                           f"{exc.strerror or exc}") from None
    if args.json:
        from fedctl.output import print_json

        print_json(document)
        return 0
    from fedctl.output import table_console

    console = table_console()
    console.print(f"experiment {task.task_id}: {task.state}, {task.rounds_committed} "
                  f"round(s) committed")
    if state is None:
        console.print("no committed round yet: no statistics")
    else:
        console.print(results_table(spec, state))
        srm = state.srm
        console.print(f"sample ratio: {srm.describe()}")
    console.print(f"decision: {document['decision']['action']}: "
                  f"{document['decision']['reason']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from fedctl.admin import AdminError

    with _admin(args) as client:
        try:
            task = client.cancel_task(args.task_id, args.reason)
        except AdminError as exc:
            raise CliError(str(exc)) from None
    print(f"{task.task_id}: {task.state}: {task.reason}")
    return 0


def experiment_state(task: admin_pb2.Task, rounds: Sequence[admin_pb2.Round]
                     ) -> tuple[ExperimentSpec, ExperimentState | None]:
    """The task's experiment and its state after the committed rounds (None before the
    first). Raises CliError when the task is not an experiment."""
    from core.experiments.versions import analyze
    from protos.convert import WireFormatError, task_spec_from_proto

    try:
        spec = task_spec_from_proto(task.spec)
    except WireFormatError as exc:
        raise CliError(f"task {task.task_id}: its spec does not validate here: {exc}") from None
    experiment = spec.evaluate.experiment
    if experiment is None:
        raise CliError(f"task {task.task_id} is not an experiment (its evaluate section has "
                       f"no experiment); see fedctl task status")
    committed = sorted((r for r in rounds if r.state == "committed"),
                       key=lambda r: r.round_number)
    if not committed:
        return experiment, None
    return experiment, analyze(experiment, [dict(r.metrics) for r in committed])


def results_document(task: admin_pb2.Task, spec: ExperimentSpec,
                     state: ExperimentState | None) -> dict[str, Any]:
    """The results as JSON-ready data: the task's state and stored reason, the arms, the
    comparisons, the sample-ratio check and the decision. A task that ended for another
    reason than a decision (stopped, failed) says so in ``decision``."""
    from core.experiments.versions import state_to_json

    doc: dict[str, Any] = {"task_id": task.task_id, "state": task.state,
                           "reason": task.reason, "rounds_committed": task.rounds_committed}
    if state is not None:
        doc.update(state_to_json(spec, state))
    else:
        doc["decision"] = {"action": "continue", "reason": "no committed round yet"}
    if task.state != "running" and not task.reason.startswith("experiment decision"):
        doc["decision"] = {"action": f"ended_{task.state}", "reason": task.reason or task.state}
    return doc


def results_table(spec: ExperimentSpec, state: ExperimentState) -> Table:
    """One row per arm and compared metric (the primary one, then the guardrails)."""
    from rich.table import Table

    table = Table(title=f"experiment after {state.rounds} round(s): device means ± standard "
                        f"error; differences vs {spec.control} with "
                        f"{1 - spec.comparison_alpha:.1%} always-valid confidence sequences")
    for col in ("arm", "version", "devices", "metric", "mean ± se", f"diff vs {spec.control}",
                "always-valid CI", "p (always valid)", "p (fixed horizon)", "limit"):
        table.add_column(col, overflow="fold")
    limits = {g.metric: f"{'+' if g.harmful.value == 'increase' else '-'}{g.limit:g} max"
              for g in spec.guardrails}
    comparisons = {(c.arm, c.metric): c for c in state.comparisons}
    for arm in state.arms:
        for name, stats in arm.metrics.items():
            se = (math.sqrt(stats.variance / stats.count) if stats.count > 1 else math.nan)
            mean = f"{stats.mean:.4g} ± {se:.2g}" if stats.count else "-"
            c = comparisons.get((arm.name, name))
            row = [arm.name, str(arm.version), str(arm.devices),
                   name + (" (primary)" if name == spec.primary.name else ""), mean]
            if c is None:
                row += ["-", "-", "-", "-"]
            else:
                av = c.always_valid
                row += [f"{av.estimate:+.4g}", f"[{av.lower:+.4g}, {av.upper:+.4g}]",
                        f"{av.p_value:.3g}",
                        "-" if c.fixed_horizon is None else f"{c.fixed_horizon.p_value:.3g}"]
            row.append(limits.get(name, "") if arm.name != spec.control else "")
            table.add_row(*row)
    return table
