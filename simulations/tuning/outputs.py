"""A study's files, in its output directory:

- ``trials.csv``: one row per trial: number, state (complete, pruned, failed), value (the
  objective at the trial's last evaluated round), rounds run, each parameter
  (``params.PATH``), wall seconds, and why it was pruned or failed;
- ``best.yaml``: the best trial's task file (the base task with its parameters written in),
  runnable as it is by ``fedctl simulate`` or ``fedctl task launch``; a comment on top says
  which trial it is and its value;
- ``study.json``: the summary (:func:`simulations.tuning.study.as_summary`) and every
  trial's evaluation curve;
- ``trials.png``: left, the objective per trial (pruned trials at their last value) and the
  best so far; right, every trial's evaluation curve against rounds (pruned ones end early).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from simulations.tuning.study import StudyResult, TrialState, as_summary, trial_rows

FILES = ("trials.csv", "best.yaml", "study.json", "trials.png")


def write_results(result: StudyResult, out: Path) -> None:
    """Writes the study's files into ``out`` (created; earlier files replaced). Without a
    completed trial there is no ``best.yaml`` (an earlier one is removed)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / "trials.csv")
    best_path = out / "best.yaml"
    if result.best is None:
        best_path.unlink(missing_ok=True)
    else:
        best = result.best
        spec = result.spec
        task = spec.trial_task(best.params)
        header = (f"# {spec.name}: trial {best.number} of {len(result.trials)}, "
                  f"{spec.objective.metric} {best.outcome.value:.6g} "
                  f"({spec.objective.direction.value}) after {best.outcome.rounds} rounds\n"
                  f"# the base task ({spec.task_source}) with: "
                  + ", ".join(f"{k}={v!r}" for k, v in best.params.items()) + "\n")
        best_path.write_text(header + yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    summary = as_summary(result)
    summary["curves"] = {str(t.number): [list(p) for p in t.outcome.curve]
                         for t in result.trials}
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot_study(result, out / "trials.png")


def write_csv(result: StudyResult, path: Path) -> None:
    rows = list(trial_rows(result))
    names = ["number", "state", "value", "rounds",
             *[f"params.{p.path}" for p in result.spec.space], "wall_s", "reason"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def best_so_far(result: StudyResult) -> list[float | None]:
    """After each trial (in order), the best completed value so far (None before any)."""
    sign = 1.0 if result.spec.objective.direction.value == "maximize" else -1.0
    best: float | None = None
    out: list[float | None] = []
    for t in result.trials:
        v = t.outcome.value
        if t.outcome.state is TrialState.COMPLETE and v is not None and (
                best is None or sign * v > sign * best):
            best = v
        out.append(best)
    return out


def plot_study(result: StudyResult, path: Path) -> None:
    """The PNG described in the module docstring (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result.spec
    metric = spec.objective.metric
    fig, (trials_ax, curves_ax) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {TrialState.COMPLETE: ("o", "tab:blue"), TrialState.PRUNED: ("x", "tab:orange"),
              TrialState.FAILED: ("s", "tab:red")}
    for state, (marker, colour) in styles.items():
        points = [(t.number, t.outcome.value) for t in result.trials
                  if t.outcome.state is state and t.outcome.value is not None]
        if points:
            trials_ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker,
                              color=colour, label=state.value)
    best = best_so_far(result)
    steps = [(t.number, b) for t, b in zip(result.trials, best, strict=True) if b is not None]
    if steps:
        trials_ax.step([s[0] for s in steps], [s[1] for s in steps], where="post",
                       color="black", alpha=0.6, label="best so far")
    trials_ax.set(xlabel="trial", ylabel=f"{metric} (last evaluated round)",
                  title=f"{spec.objective.direction.value} {metric}")
    for t in result.trials:
        if not t.outcome.curve:
            continue
        rounds = [p[0] for p in t.outcome.curve]
        values = [p[1] for p in t.outcome.curve]
        is_best = result.best is not None and t.number == result.best.number
        curves_ax.plot(rounds, values, linestyle="--" if t.outcome.state is
                       TrialState.PRUNED else "-", linewidth=2.2 if is_best else 1.0,
                       color="black" if is_best else styles[t.outcome.state][1],
                       alpha=1.0 if is_best else 0.6,
                       label=f"best (trial {t.number})" if is_best else None)
    curves_ax.set(xlabel="round", ylabel=metric,
                  title="evaluation curves (dashed: pruned)")
    for ax in (trials_ax, curves_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(spec.name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
