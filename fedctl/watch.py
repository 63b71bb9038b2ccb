"""Live view of a task's rounds (rich progress bars, or JSON lines for scripts), and the
status table of a task: every round with its start, duration and every metric the
coordinator recorded, and any counters of the task (such as declines by reason)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import IO, Any

from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from fedctl.admin import AdminClient
from fedctl.output import counts_line, print_json, round_document, round_duration_s, task_document
from protos.fedcoord.v1 import admin_pb2

FINAL_STATES = {"completed", "failed", "cancelled", "budget_exhausted"}


def accuracy_of(r: admin_pb2.Round) -> float | None:
    for key in ("server_eval_accuracy", "eval_accuracy"):
        if key in r.metrics:
            return float(r.metrics[key])
    return None


def epsilon_of(rounds: list[admin_pb2.Round]) -> tuple[float, float] | None:
    """(epsilon, delta) of a DP task after its last committed round; None without DP."""
    committed = [r for r in rounds if r.state == "committed" and "dp_epsilon" in r.metrics]
    if not committed:
        return None
    last = committed[-1].metrics
    return float(last["dp_epsilon"]), float(last.get("dp_delta", 0.0))


def privacy_line(task: admin_pb2.Task) -> str:
    """The task's privacy spending and what it releases of devices' metrics, in one line."""
    parts = []
    if task.HasField("privacy"):
        p = task.privacy
        parts.append(f"epsilon {p.epsilon:.3f} of budget {p.budget:g} at delta {p.delta:g}, "
                     f"{p.sampling} sampling")
        if p.last_cohort:
            parts.append(f"last round drew {p.last_cohort} of {p.last_eligible} seen "
                         f"(q = {p.last_sampling_rate:.4g} over n = {p.last_population})")
    if task.metrics_release:
        parts.append(f"device metrics: {task.metrics_release}")
    return "; ".join(parts)


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000)) if unix_ms else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _metric(value: float) -> str:
    return f"{value:.4g}"


def _map_fields(msg: Message, skip: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The message's non-empty map fields (e.g. declines by reason), whatever their names:
    a newer coordinator's counters show without a new fedctl."""
    out = []
    for field in msg.DESCRIPTOR.fields:
        if field.name in skip or field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = dict(getattr(msg, field.name))
            if values:
                out.append((field.name, values))
    return out


def status_table(task: admin_pb2.Task, rounds: list[admin_pb2.Round]) -> Table:
    """The task and every round: state, reports, start, duration, and every metric the
    coordinator recorded (secure aggregation, DP epsilon, evaluation, ...), one column each."""
    spent = epsilon_of(rounds)
    privacy = "" if spent is None else f" - epsilon {spent[0]:.3f} at delta {spent[1]:g}"
    caption = [f"created {_when(task.created_unix_ms)}, model version {task.model_version}, "
               f"{task.rounds_committed}/{task.spec.rounds} rounds committed"]
    if line := privacy_line(task):
        caption.append(line)
    caption += [counts_line(name, values) for name, values in _map_fields(task)]
    table = Table(title=f"task {task.task_id} ({task.spec.name}): {task.state}"
                  + (f" - {task.reason}" if task.reason else "") + privacy,
                  caption="\n".join(caption))
    metric_names = sorted({name for r in rounds for name in r.metrics})
    round_maps = sorted({name for r in rounds for name, _ in _map_fields(r, skip=("metrics",))})
    columns = ["round", "attempt", "state", "admitted", "reports/goal", "started", "duration",
               "model version", *metric_names, *round_maps, "note"]
    for col in columns:
        table.add_column(col, overflow="fold")
    now_ms = time.time() * 1000
    for r in rounds:
        maps = dict(_map_fields(r, skip=("metrics",)))
        cells = [
            str(r.round_number), str(r.attempt), r.state, str(r.selected),
            f"{r.reports}/{r.goal}", _when(r.started_unix_ms),
            _seconds(round_duration_s(r, now_ms)),
            str(r.model_version) if r.model_version else "-",
            *("-" if name not in r.metrics else _metric(r.metrics[name])
              for name in metric_names),
            *(counts_line(name, maps[name]).partition(": ")[2] if name in maps else "-"
              for name in round_maps),
        ]
        table.add_row(*cells, r.failure_reason)
    return table


def snapshots(client: AdminClient, task_id: str, *, poll_s: float = 0.3,
              timeout_s: float | None = None
              ) -> Iterator[tuple[admin_pb2.Task, list[admin_pb2.Round]]]:
    """The task and its rounds every ``poll_s`` seconds, until the task ends (the last
    snapshot shows it ended) or ``timeout_s`` passes."""
    started = time.monotonic()
    while True:
        task = client.get_task(task_id)
        rounds = client.list_rounds(task_id)
        yield task, rounds
        if task.state in FINAL_STATES:
            return
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return
        time.sleep(poll_s)


def watch_json(client: AdminClient, task_id: str, *, out: IO[str], poll_s: float = 0.3,
               timeout_s: float | None = None) -> admin_pb2.Task:
    """JSON lines on ``out``: ``{"event": "task", "task": ...}`` when the task changes,
    ``{"event": "round", "task_id": ..., "round": ...}`` when a round appears or changes
    (state, admitted, reports, metrics), and last ``{"event": "end", "task": ...}``. Returns
    the final task."""
    seen_task: tuple[object, ...] | None = None
    seen_rounds: dict[tuple[int, int], bytes] = {}
    task = None
    for task, rounds in snapshots(client, task_id, poll_s=poll_s, timeout_s=timeout_s):
        key = (task.state, task.rounds_committed, task.model_version, task.reason)
        if key != seen_task:
            seen_task = key
            print_json({"event": "task", "task": task_document(task)}, file=out)
        for r in rounds:
            wire = r.SerializeToString(deterministic=True)
            if seen_rounds.get((r.round_number, r.attempt)) != wire:
                seen_rounds[(r.round_number, r.attempt)] = wire
                print_json({"event": "round", "task_id": task.task_id,
                            "round": round_document(r)}, file=out)
    assert task is not None
    print_json({"event": "end", "task": task_document(task)}, file=out)
    return task


def watch(client: AdminClient, task_id: str, *, console: Console, poll_s: float = 0.3,
          timeout_s: float | None = None) -> admin_pb2.Task:
    """Shows one progress bar per round until the task ends; returns the final task."""
    bars: dict[tuple[int, int], TaskID] = {}
    last_acc = "-"
    task = None
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as progress:
        for task, rounds in snapshots(client, task_id, poll_s=poll_s, timeout_s=timeout_s):
            now_ms = time.time() * 1000
            for r in rounds:
                key = (r.round_number, r.attempt)
                acc = accuracy_of(r)
                if acc is not None:
                    last_acc = f"{acc:.3f}"
                if r.state in ("committed", "failed"):
                    info = r.state if r.state == "committed" else f"failed: {r.failure_reason}"
                else:
                    left = max(0.0, (r.deadline_unix_ms - now_ms) / 1000)
                    info = f"{r.state}, {left:4.1f}s to deadline"
                info += f"  acc {last_acc}"
                desc = f"round {r.round_number}/{task.spec.rounds}" + (
                    f" (attempt {r.attempt})" if r.attempt > 1 else "")
                if key not in bars:
                    bars[key] = progress.add_task(desc, total=max(1, r.goal), info=info)
                progress.update(bars[key], completed=min(r.reports, r.goal), info=info,
                                description=desc)
    assert task is not None
    return task
