"""Simulation throughput: devices trained per second by our engine against a plain sequential
torch loop (``core.training.train_local`` device after device), on one workload:

    Synthetic(1,1), 1000 devices (seed 0); 100 devices a round from a fixed seeded schedule;
    1 local epoch, batch 10, SGD lr 0.01; 20 rounds; FedAvg.
    models: logistic regression 60->10, MLP 60-200-200-10

Prints one JSON line per (engine, model): steady-state devices/s over rounds 2-20, round 1's
seconds apart (warm-up), peak RSS of the whole process tree (psutil, sampled every 50 ms), and
the final test accuracy.

    python benchmarks/simulation.py [--engines ours,sequential] [--models lr,mlp] [--rounds 20]

Other frameworks plug in through :data:`ENGINES`: a function ``(Workload, model key) ->
Measurement`` that trains the same schedule (``workload.schedule``) with the same data
(``workload.data``) and calls ``measure.round_done()`` after each round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.models import build_model, initial_state, load_numpy_state  # noqa: E402
from core.training import evaluate  # noqa: E402
from core.types import LocalTraining, ModelSpec, ServerOptimizer  # noqa: E402
from simulations.algorithms import FederatedAlgorithm  # noqa: E402
from simulations.cohort import DeviceJob, DeviceTable, LocalObjective, make_trainer  # noqa: E402
from simulations.config import (  # noqa: E402
    AlgorithmConfig,
    DataConfig,
    DataSource,
    EngineKind,
)
from simulations.data import FederatedData, load_federated_data  # noqa: E402
from simulations.engine import device_seed  # noqa: E402

MODELS = {
    "lr": ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10}),
    "mlp": ModelSpec("mlp", {"input_dim": 60, "hidden": [200, 200], "num_classes": 10}),
}
LOCAL = LocalTraining(epochs=1, batch_size=10, learning_rate=0.01)


@dataclass(frozen=True, eq=False)
class Workload:
    data: FederatedData
    schedule: list[list[int]]  # device indices per round
    local: LocalTraining = LOCAL
    seed: int = 0


def make_workload(*, devices: int = 1000, per_round: int = 100, rounds: int = 20,
                  seed: int = 0) -> Workload:
    data = load_federated_data(DataConfig(DataSource.SYNTHETIC, num_devices=devices, seed=seed))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C4E]))
    schedule = [sorted(rng.choice(devices, size=per_round, replace=False).tolist())
                for _ in range(rounds)]
    return Workload(data, schedule, seed=seed)


@dataclass
class Measurement:
    """Round end times; peak RSS of this process and its children, sampled in a thread."""

    round_ends: list[float] = field(default_factory=list)
    peak_rss: int = 0
    _start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        import psutil

        self._start = time.perf_counter()
        me = psutil.Process(os.getpid())

        def sample() -> None:
            while not self._stop.wait(0.05):
                rss = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)

        threading.Thread(target=sample, daemon=True).start()

    def round_done(self) -> None:
        self.round_ends.append(time.perf_counter())

    def stop(self) -> None:
        self._stop.set()

    def summary(self, per_round: int) -> dict[str, float]:
        ends = [self._start, *self.round_ends]
        steady = ends[-1] - ends[1]
        return {"round1_s": round(ends[1] - ends[0], 3),
                "devices_per_s": round(per_round * (len(ends) - 2) / steady, 1),
                "steady_rounds": len(ends) - 2,
                "peak_rss_mb": round(self.peak_rss / 2**20, 1)}


def _run_in_process(workload: Workload, model: str, kind: EngineKind) -> tuple[Measurement, float]:
    spec = MODELS[model]
    table = DeviceTable(workload.data)
    trainer = make_trainer(kind, spec, table, workload.local, LocalObjective())
    algorithm = FederatedAlgorithm(AlgorithmConfig(), ServerOptimizer())
    params = initial_state(spec, workload.seed)
    measure = Measurement()
    measure.start()
    for r, devices in enumerate(workload.schedule, start=1):
        jobs = [DeviceJob(d, device_seed(workload.seed, r, d)) for d in devices]
        result = trainer.train({n: torch.from_numpy(v) for n, v in params.items()}, jobs)
        params = algorithm.server_update(params, devices, result)
        measure.round_done()
    measure.stop()
    eval_model = build_model(spec)
    load_numpy_state(eval_model, params)
    _, accuracy = evaluate(eval_model, workload.data.x_test, workload.data.y_test)
    return measure, accuracy


def ours(workload: Workload, model: str) -> tuple[Measurement, float]:
    return _run_in_process(workload, model, EngineKind.AUTO)


def sequential(workload: Workload, model: str) -> tuple[Measurement, float]:
    return _run_in_process(workload, model, EngineKind.LOOP)


#: Engine name -> runner. Slot for Flower / pfl-research runners (added by another change):
#: each must train ``workload.schedule`` on ``workload.data`` and time its rounds.
ENGINES: dict[str, Callable[[Workload, str], tuple[Measurement, float]]] = {
    "ours": ours,
    "sequential": sequential,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="ours,sequential")
    parser.add_argument("--models", default="lr,mlp")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = make_workload(rounds=args.rounds)
    for model in args.models.split(","):
        for engine in args.engines.split(","):
            measure, accuracy = ENGINES[engine](workload, model)
            print(json.dumps({"benchmark": "simulation", "engine": engine, "model": model,
                              "devices": workload.data.num_devices,
                              "per_round": len(workload.schedule[0]),
                              "rounds": len(workload.schedule), "threads": args.threads,
                              **measure.summary(len(workload.schedule[0])),
                              "final_accuracy": round(accuracy, 4)}), flush=True)


if __name__ == "__main__":
    main()
