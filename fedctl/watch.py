"""Live view of a task's rounds (rich progress bars), and one-shot status tables."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from fedctl.admin import AdminClient
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


def status_table(task: admin_pb2.Task, rounds: list[admin_pb2.Round]) -> Table:
    spent = epsilon_of(rounds)
    privacy = "" if spent is None else f" - epsilon {spent[0]:.3f} at delta {spent[1]:g}"
    table = Table(title=f"task {task.task_id} ({task.spec.name}): {task.state}"
                  + (f" - {task.reason}" if task.reason else "") + privacy,
                  caption=privacy_line(task) or None)
    dp = any("dp_epsilon" in r.metrics for r in rounds)
    columns = ["round", "attempt", "state", "admitted", "reports/goal", "accuracy", "loss"]
    for col in columns + (["epsilon", "clip"] if dp else []) + ["note"]:
        table.add_column(col)
    for r in rounds:
        acc = accuracy_of(r)
        loss = r.metrics.get("server_eval_loss", r.metrics.get("train_loss"))
        cells = [
            str(r.round_number), str(r.attempt), r.state, str(r.selected),
            f"{r.reports}/{r.goal}", "-" if acc is None else f"{acc:.3f}",
            "-" if loss is None else f"{loss:.3f}",
        ]
        if dp:
            eps, clip = r.metrics.get("dp_epsilon"), r.metrics.get("dp_clip")
            cells += ["-" if eps is None else f"{eps:.3f}", "-" if clip is None else f"{clip:.3g}"]
        table.add_row(*cells, r.failure_reason[:60])
    return table


def watch(client: AdminClient, task_id: str, *, console: Console, poll_s: float = 0.3,
          timeout_s: float | None = None) -> admin_pb2.Task:
    """Shows one progress bar per round until the task ends; returns the final task."""
    started = time.monotonic()
    bars: dict[tuple[int, int], TaskID] = {}
    last_acc = "-"
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as progress:
        while True:
            task = client.get_task(task_id)
            rounds = client.list_rounds(task_id)
            now_ms = time.time() * 1000
            for r in rounds:
                key = (r.round_number, r.attempt)
                acc = accuracy_of(r)
                if acc is not None:
                    last_acc = f"{acc:.3f}"
                if r.state in ("committed", "failed"):
                    info = r.state if r.state == "committed" else f"failed: {r.failure_reason[:50]}"
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
            if task.state in FINAL_STATES:
                return task
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                return task
            time.sleep(poll_s)
