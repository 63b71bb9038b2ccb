"""``fedctl experiment launch|status|stop``: A/B experiments between model versions, run by the
coordinator as evaluation tasks with an ``evaluate.experiment`` section
(:mod:`core.experiments.versions`).

``launch`` takes either file:

* an evaluation task with ``evaluate.experiment`` (arms name versions of ``--source-task``):
  the experiment is that task;
* a *training* task with ``simulation.experiment`` (the file ``fedctl simulate`` runs, arms
  by training configuration or training rounds: :mod:`core.experiments.training`): one
  training task per distinct configuration is launched, then (once they completed) the
  comparison, an evaluation task whose arms name their training task and version; its id is
  the experiment's. ``--no-wait`` launches the training tasks only and prints the command
  that launches the comparison later (``--arm-tasks``, one task id per training run). With
  ``partition_training: true`` there is one training task per arm, each admitting only its
  arm's devices (``eligibility.arm``, the comparison's assignment), so a device trains and
  evaluates the same arm.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import CliError

if TYPE_CHECKING:
    from rich.table import Table

    from core.experiments.spec import ExperimentSpec
    from core.experiments.training import TrainingArms, TrainingGroup
    from core.experiments.versions import ExperimentState
    from core.types import TaskSpec
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
                       "section, or from a training task file with a simulation.experiment "
                       "section (arms by training configuration); prints its task id")
    launch.add_argument("file", type=Path)
    launch.add_argument("--source-task", metavar="ID",
                        help="the training task whose versions the arms name "
                             "(evaluate.source_task)")
    launch.add_argument("--arm-tasks", metavar="ID,ID",
                        help="simulation.experiment files: the training tasks already "
                             "launched for the arms (one per training run, in the order "
                             "launch printed them); only the comparison is launched")
    launch.add_argument("--no-wait", action="store_true",
                        help="simulation.experiment files: launch the training tasks and "
                             "print the command that launches the comparison once they "
                             "completed")
    launch.add_argument("--poll-s", type=float, default=5.0, metavar="S",
                        help="seconds between looks at the training tasks while waiting")
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
    from fedctl.admin import launch_task, load_launch_file, print_launched

    data = _read_yaml(args.file)
    simulation = data.get("simulation")
    evaluate = data.get("evaluate")
    if (isinstance(simulation, dict) and "experiment" in simulation
            and not (isinstance(evaluate, dict) and "experiment" in evaluate)):
        return _launch_training_experiment(args, data)
    if args.arm_tasks is not None or args.no_wait:
        raise CliError(f"{args.file}: --arm-tasks and --no-wait apply to a training task file "
                       f"with a simulation.experiment section", exit_code=2)
    spec = load_launch_file(args.file, source_task=args.source_task)
    if spec.evaluate.experiment is None:
        raise CliError(f"{args.file}: field 'evaluate.experiment': is required for an "
                       f"experiment (a task of kind 'evaluate' without it is launched with "
                       f"fedctl task launch; arms by training configuration are a training "
                       f"task's simulation.experiment section)", exit_code=2)
    with _admin(args) as client:
        task = launch_task(client, spec, source=args.file, what="experiment")
    print_launched(task, as_json=args.json)
    return 0


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (the full checks come after)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"{path}: top level: cannot read the file: {exc.strerror or exc}",
                       exit_code=2) from None
    except yaml.YAMLError:
        raise CliError(f"{path}: top level: not valid YAML", exit_code=2) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: top level: expected a mapping of task fields", exit_code=2)
    return data


@dataclass(frozen=True)
class TrainingExperimentPlan:
    """What a ``simulation.experiment`` file launches: the training tasks (one per training
    run, :func:`core.experiments.training.training_groups`) and the comparison's builder."""

    task: dict[str, Any]
    arms: TrainingArms
    groups: tuple[TrainingGroup, ...]
    group_specs: tuple[TaskSpec, ...]

    def comparison(self, group_tasks: Sequence[str]) -> TaskSpec:
        """The comparison task, each arm naming its run's task id (``group_tasks[g]``)."""
        from core.experiments.training import comparison_task
        from core.taskspec import spec_from_dict

        arm_tasks = [""] * len(self.arms.spec.arms)
        for group, task_id in zip(self.groups, group_tasks, strict=True):
            for i in group.arms:
                arm_tasks[i] = task_id
        return spec_from_dict(comparison_task(self.task, self.arms, arm_tasks))


def training_experiment_plan(path: Path, data: dict[str, Any]) -> TrainingExperimentPlan:
    """Reads a training task file's ``simulation.experiment`` section for a coordinator and
    validates every task it will launch before any is (the comparison with placeholder ids).

    Raises:
        CliError: exit code 2, naming the file and the field.
    """
    from core.experiments import ExperimentSpecError
    from core.experiments.training import (
        group_name,
        group_task,
        parse_training_arms,
        simulation_only,
        training_groups,
    )
    from core.taskspec import TaskSpecError, spec_from_dict
    from core.types import TaskKind

    field = "simulation.experiment"
    try:
        base = spec_from_dict(data, source=str(path))
    except TaskSpecError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if base.kind is not TaskKind.TRAIN:
        raise CliError(f"{path}: field '{field}': an experiment by training configuration is "
                       f"a training task's section (this task is of kind "
                       f"'{base.kind.value}')", exit_code=2)
    if base.eligibility.arm is not None:
        raise CliError(f"{path}: field 'eligibility.arm': the training tasks of a "
                       f"simulation.experiment get their arm filter from the experiment "
                       f"({field}.partition_training: true); remove it from the task",
                       exit_code=2)
    try:
        arms = parse_training_arms(data["simulation"]["experiment"], task_rounds=base.rounds,
                                   default_devices_per_round=base.clients_per_round)
    except ExperimentSpecError as exc:
        raise CliError(f"{path}: field '{field}.{exc.field}': {exc.message}"
                       if exc.field else f"{path}: field '{field}': {exc.message}",
                       exit_code=2) from None
    sim_only = simulation_only(arms)
    if sim_only is not None:
        i, key = sim_only
        raise CliError(f"{path}: field '{field}.arms[{i}].training.{key}': runs only in "
                       f"fedctl simulate (a coordinator's devices do not run it); drop it to "
                       f"run this experiment on a coordinator", exit_code=2)
    groups = training_groups(arms)
    specs = []
    for group in groups:
        try:
            specs.append(spec_from_dict(group_task(data, group, name=group_name(
                base.name, arms, group)), source=str(path)))
        except TaskSpecError as exc:
            raise CliError(f"{path}: field '{field}.arms[{group.arms[0]}].training': makes "
                           f"the task invalid: {exc.field}: {exc.message}",
                           exit_code=2) from None
        except ExperimentSpecError as exc:
            raise CliError(f"{path}: field '{field}.arms[{group.arms[0]}].training."
                           f"{exc.field}': {exc.message}", exit_code=2) from None
    plan = TrainingExperimentPlan(data, arms, groups, tuple(specs))
    try:
        plan.comparison(["placeholder"] * len(groups))
    except TaskSpecError as exc:
        raise CliError(f"{path}: field '{field}': the comparison task it makes is invalid: "
                       f"{exc.field}: {exc.message}", exit_code=2) from None
    return plan


def _launch_training_experiment(args: argparse.Namespace, data: dict[str, Any]) -> int:
    from fedctl.admin import launch_task, print_launched

    if args.source_task is not None:
        raise CliError(f"{args.file}: --source-task applies to an evaluate.experiment file; "
                       f"a simulation.experiment file's arms are trained by its own tasks "
                       f"(--arm-tasks names tasks already launched)", exit_code=2)
    if not 0 <= args.poll_s <= 3600:
        raise CliError(f"--poll-s {args.poll_s:g}: expected seconds from 0 to 3600",
                       exit_code=2)
    plan = training_experiment_plan(args.file, data)
    with _admin(args) as client:
        if args.arm_tasks is not None:
            group_tasks = [t.strip() for t in args.arm_tasks.split(",")]
            if len(group_tasks) != len(plan.groups) or not all(group_tasks):
                raise CliError(f"--arm-tasks: {args.file} trains {len(plan.groups)} run(s) "
                               f"({_describe_groups(plan)}); name one task id each, in that "
                               f"order", exit_code=2)
            _check_arm_tasks(client, plan, group_tasks)
        else:
            group_tasks = []
            for group, spec in zip(plan.groups, plan.group_specs, strict=True):
                task = launch_task(client, spec, source=args.file, what="arm's training task")
                group_tasks.append(task.task_id)
                only = "" if group.arm_filter is None else ", on its arm's devices only"
                _say(args, f"arm(s) {_arm_names(plan, group)}: training task {task.task_id} "
                           f"({spec.rounds} rounds{only})")
            if args.no_wait:
                _say(args, f"when they completed: fedctl experiment launch {args.file} "
                           f"--arm-tasks {','.join(group_tasks)}")
                if args.json:
                    from fedctl.output import print_json

                    print_json({"arm_tasks": group_tasks})
                return 0
            _wait_for_training(client, plan, group_tasks, args)
        task = launch_task(client, plan.comparison(group_tasks), source=args.file,
                           what="experiment's comparison")
    print_launched(task, as_json=args.json)
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    """Progress: on stderr under --json (stdout is the document), else on stdout."""
    import sys

    print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def _arm_names(plan: TrainingExperimentPlan, group: TrainingGroup) -> str:
    return ", ".join(plan.arms.spec.arms[i].name for i in group.arms)


def _describe_groups(plan: TrainingExperimentPlan) -> str:
    return "; ".join(f"{_arm_names(plan, g)}" for g in plan.groups)


def _check_arm_tasks(client: AdminClient, plan: TrainingExperimentPlan,
                     group_tasks: Sequence[str]) -> None:
    """Refuses a task whose training configuration is not its run's (the comparison would
    compare other arms than the file names)."""
    from core.experiments.training import training_mismatch
    from core.taskspec import spec_to_dict
    from fedctl.admin import AdminError
    from protos.convert import WireFormatError, task_spec_from_proto

    for group, spec, task_id in zip(plan.groups, plan.group_specs, group_tasks, strict=True):
        try:
            actual = task_spec_from_proto(client.get_task(task_id).spec)
        except AdminError as exc:
            raise CliError(f"--arm-tasks: task {task_id}: {exc}") from None
        except WireFormatError as exc:
            raise CliError(f"--arm-tasks: task {task_id}: its spec does not validate here: "
                           f"{exc}") from None
        problems = training_mismatch(spec_to_dict(spec), spec_to_dict(actual))
        if problems:
            raise CliError(f"--arm-tasks: task {task_id} is not the training of arm(s) "
                           f"{_arm_names(plan, group)}: {'; '.join(problems)}", exit_code=2)


def _wait_for_training(client: AdminClient, plan: TrainingExperimentPlan,
                       group_tasks: Sequence[str], args: argparse.Namespace) -> None:
    import time

    from fedctl.admin import AdminError

    resume = (f"fedctl experiment launch {args.file} --arm-tasks {','.join(group_tasks)}")
    pending = dict(zip(group_tasks, plan.groups, strict=True))
    try:
        while pending:
            for task_id, group in list(pending.items()):
                try:
                    task = client.get_task(task_id)
                except AdminError as exc:
                    raise CliError(f"{exc}; once the training tasks completed: {resume}"
                                   ) from None
                if task.state == "running":
                    continue
                del pending[task_id]
                if task.state != "completed":
                    raise CliError(f"training task {task_id} of arm(s) "
                                   f"{_arm_names(plan, group)} ended {task.state}: "
                                   f"{task.reason or 'no reason given'}; the comparison was "
                                   f"not launched")
                _say(args, f"training task {task_id} completed ({task.rounds_committed} "
                           f"rounds)")
            if pending:
                time.sleep(args.poll_s)
    except KeyboardInterrupt:
        raise CliError(f"interrupted; the training tasks keep running; once they completed: "
                       f"{resume}", exit_code=130) from None


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
    for col in ("arm", "model version", "devices", "metric", "mean ± se", f"diff vs {spec.control}",
                "always-valid CI", "p (always valid)", "p (fixed horizon)", "limit"):
        table.add_column(col, overflow="fold")
    limits = {g.metric: f"{'+' if g.harmful.value == 'increase' else '-'}{g.limit:g} max"
              for g in spec.guardrails}
    comparisons = {(c.arm, c.metric): c for c in state.comparisons}
    # An arm's model: a version of the source task, or its own training task's version.
    models = {a.name: str(a.version) if a.task is None else f"{a.task} v{a.task_version}"
              for a in spec.arms}
    for arm in state.arms:
        for name, stats in arm.metrics.items():
            se = (math.sqrt(stats.variance / stats.count) if stats.count > 1 else math.nan)
            mean = f"{stats.mean:.4g} ± {se:.2g}" if stats.count else "-"
            c = comparisons.get((arm.name, name))
            row = [arm.name, models[arm.name], str(arm.devices),
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
