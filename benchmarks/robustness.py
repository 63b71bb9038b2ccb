"""Robust aggregation against poisoned updates, in simulation: for each attack, fraction of
malicious devices and defence, the final clean test accuracy and the attack's success.

Workload: scikit-learn digits split over 100 devices (Dirichlet 10, close to IID), an MLP
64-64-10, 20 devices a round, 2 local epochs (batch 10, SGD lr 0.1), FedAvg server
(lr 1), 40 rounds; the same seed for every run, so the rows differ only in attack and
defence. Attacks (:mod:`simulations.attacks`): a fixed ``fraction`` of the devices is
malicious; selection picks them like any other device.

* ``sign_flip``: the honest delta reversed; ``scaling``: the honest delta x10;
* ``backdoor``: model replacement (Bagdasaryan et al. 2020): attackers add triggered copies
  of their data (bottom-right pixels at the maximum) labelled 0 and scale their delta by the
  cohort size (20).

Defences (``aggregation.robust``; :mod:`core.aggregation.robust`): mean, median,
trimmed_mean (trim 0.2), krum and multi_krum (f = 4, i.e. 20% of the cohort; multi-Krum
averages n - f), norm_bound (adaptive: 2 x the round's median norm).

Each line: ``attack``, ``fraction``, ``attackers`` (devices), ``defence``, ``accuracy``
(clean test accuracy after the last round), ``baseline_accuracy`` (the same defence, no
attack), ``accuracy_drop`` (points against the mean without attack), ``attack_success``
(backdoor: the fraction of triggered test digits that are not 0 classified as 0; other
attacks: the accuracy drop in points, the same as accuracy_drop), ``poisoned_updates``
(attacker updates aggregated over the run) and ``wall_s``.

    python benchmarks/robustness.py [--quick] [--table] [--out FILE]
        [--attacks sign_flip,scaling,backdoor] [--fractions 0.01,0.05,0.1,0.2]
        [--defences mean,median,trimmed_mean,krum,multi_krum,norm_bound] [--rounds 30]

``--quick``: 5 rounds, one fraction (0.1), for a smoke run. ``--table`` prints a table on
stderr after the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.models import build_model, load_numpy_state  # noqa: E402
from core.types import (  # noqa: E402
    LocalTraining,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    ServerOptimizer,
)
from simulations.aggregation import CohortAggregator  # noqa: E402
from simulations.attacks import (  # noqa: E402
    Attack,
    AttackingTrainer,
    AttackKind,
    add_trigger,
    backdoor_success,
    choose_attackers,
    poison_data,
    trigger_value,
)
from simulations.config import (  # noqa: E402
    DataConfig,
    EvaluationConfig,
    SelectionConfig,
    SimulationConfig,
)
from simulations.data import FederatedData, load_federated_data  # noqa: E402
from simulations.engine import Simulation  # noqa: E402

DEVICES = 100
CLIENTS_PER_ROUND = 20
ASSUMED_BYZANTINE = 4

DEFENCES: dict[str, RobustAggregation] = {
    "mean": RobustAggregation(kind=RobustKind.MEAN),
    "median": RobustAggregation(kind=RobustKind.MEDIAN),
    "trimmed_mean": RobustAggregation(kind=RobustKind.TRIMMED_MEAN, trim_fraction=0.2),
    "krum": RobustAggregation(kind=RobustKind.KRUM, byzantine=ASSUMED_BYZANTINE),
    "multi_krum": RobustAggregation(kind=RobustKind.MULTI_KRUM, byzantine=ASSUMED_BYZANTINE),
    "norm_bound": RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=None,
                                    norm_multiplier=2.0),
}


def config(rounds: int) -> SimulationConfig:
    return SimulationConfig(
        name="robustness",
        model=ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10}),
        data=DataConfig(spec="digits:dirichlet=10", num_devices=DEVICES,
                        test_data="digits:split=test"),
        rounds=rounds,
        selection=SelectionConfig(clients_per_round=CLIENTS_PER_ROUND),
        local=LocalTraining(epochs=2, batch_size=10, learning_rate=0.1),
        server=ServerOptimizer(learning_rate=1.0),
        evaluation=EvaluationConfig(every=rounds, train_loss_samples=0),
        seed=0)


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    backdoor: float
    poisoned_updates: int
    wall_s: float


def run(cfg: SimulationConfig, clean: FederatedData, attack: Attack, defence: str) -> Outcome:
    start = time.perf_counter()
    attackers = choose_attackers(attack, clean.num_devices)
    sim = Simulation(cfg, data=poison_data(clean, attackers, attack))
    trainer = AttackingTrainer(sim.trainer, attack, attackers,
                               clients_per_round=cfg.selection.clients_per_round,
                               server_learning_rate=cfg.server.learning_rate)
    sim.trainer = trainer
    aggregator = CohortAggregator(model=cfg.model, rounds=cfg.rounds,
                                  clients_per_round=cfg.selection.clients_per_round,
                                  seed=cfg.seed, robust=DEFENCES[defence])
    sim.aggregator = aggregator
    sim.algorithm.aggregator = aggregator
    last = list(sim.rounds())[-1]
    assert last.test_accuracy is not None
    model = build_model(cfg.model)
    load_numpy_state(model, sim.params)
    triggered = add_trigger(clean.x_test, trigger_size=attack.trigger_size,
                            value=trigger_value(clean))
    with torch.no_grad():
        predicted = model(torch.from_numpy(triggered)).argmax(dim=1).numpy()
    success = backdoor_success(predicted, clean.y_test, target_class=attack.target_class)
    return Outcome(float(last.test_accuracy), success, trainer.poisoned_updates,
                   time.perf_counter() - start)


def table(rows: list[dict[str, Any]]) -> str:
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    keys = list(dict.fromkeys((r["attack"], r["fraction"]) for r in rows))
    by = {(r["attack"], r["fraction"], r["defence"]): r for r in rows}
    head = f"{'attack':<10} {'frac':>5}  " + "  ".join(f"{d:>13}" for d in defences)
    lines = ["accuracy % (backdoor: accuracy % / attack success %)", head]
    for attack, fraction in keys:
        cells = []
        for d in defences:
            r = by.get((attack, fraction, d))
            if r is None:
                cells.append(f"{'-':>13}")
            elif attack == "backdoor":
                cells.append(f"{100 * r['accuracy']:>6.1f}/{100 * r['attack_success']:>5.1f}")
            else:
                cells.append(f"{100 * r['accuracy']:>13.1f}")
        lines.append(f"{attack:<10} {fraction:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", default="")
    parser.add_argument("--attacks", default="sign_flip,scaling,backdoor")
    parser.add_argument("--fractions", default="0.01,0.05,0.1,0.2")
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    fractions = [0.1] if args.quick else [float(f) for f in args.fractions.split(",")]
    attacks = [AttackKind(a) for a in args.attacks.split(",")]
    defences = args.defences.split(",")
    torch.manual_seed(0)
    cfg = config(rounds)
    clean = load_federated_data(cfg.data)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - closed below
    rows: list[dict[str, Any]] = []
    try:
        baseline: dict[str, float] = {}
        for defence in defences:
            o = run(cfg, clean, Attack(), defence)
            baseline[defence] = o.accuracy
            rows.append(emit(out, "none", 0.0, 0, defence, o, baseline, 0.0))
        for kind in attacks:
            for fraction in fractions:
                attack = Attack(kind=kind, fraction=fraction)
                count = len(choose_attackers(attack, clean.num_devices))
                for defence in defences:
                    o = run(cfg, clean, attack, defence)
                    success = (o.backdoor if kind is AttackKind.BACKDOOR else
                               max(0.0, baseline.get("mean", o.accuracy) - o.accuracy))
                    rows.append(emit(out, kind.value, fraction, count, defence, o, baseline,
                                     success))
    finally:
        if out is not None:
            out.close()
    if args.table:
        print(table(rows), file=sys.stderr)
    return 0


def emit(out: Any, attack: str, fraction: float, attackers: int, defence: str, o: Outcome,
         baseline: dict[str, float], success: float) -> dict[str, Any]:
    reference = baseline.get("mean", o.accuracy)
    row = {"benchmark": "robustness", "attack": attack, "fraction": fraction,
           "attackers": attackers, "defence": defence, "accuracy": round(o.accuracy, 4),
           "baseline_accuracy": round(baseline.get(defence, o.accuracy), 4),
           "accuracy_drop": round(reference - o.accuracy, 4),
           "attack_success": round(success, 4),
           "backdoor_success": round(o.backdoor, 4),
           "poisoned_updates": o.poisoned_updates, "wall_s": round(o.wall_s, 2)}
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()
    return row


if __name__ == "__main__":
    raise SystemExit(main())
