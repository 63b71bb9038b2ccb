"""Epsilon of the documented DP example (examples/digits_mlp_dp.yaml) before and after issue 12,
as one JSON line: what the old coordinator reported, what its selection really did, and what
the example now does and reports. Usage: ``python benchmarks/dp_example_epsilon.py``.

Before: 20 devices, clients_per_round 16, over_selection 1.25: every round admitted all 20
(q = 1) and summed the first 16 reports (an order set by training speed); the accountant was
told q = 16/20. After: 10 of the 20 drawn uniformly (q = 0.5), every drawn report summed.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.privacy.accounting import Sampling, epsilon
from core.privacy.task import TaskPrivacy
from core.taskspec import parse_task_yaml


def _eps(q: float, rounds: int, z: float, n: int) -> float:
    return epsilon(noise_multiplier=z, sampling_rate=q, steps=rounds, delta=1e-5,
                   sampling=Sampling.FIXED_SIZE, population=n)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    spec = parse_task_yaml((root / "examples/digits_mlp_dp.yaml").read_text(),
                           source="examples/digits_mlp_dp.yaml")
    privacy = TaskPrivacy.for_task(spec)
    assert privacy is not None and spec.privacy is not None
    z, n, rounds = privacy.noise_multiplier, privacy.population, spec.rounds
    after = privacy.epsilon([(z, privacy.planned_draw)] * rounds)
    print(json.dumps({
        "example": "examples/digits_mlp_dp.yaml", "rounds": rounds, "noise_multiplier": z,
        "delta": 1e-5,
        "before_reported_q": 16 / 20, "before_reported_epsilon": _eps(16 / 20, rounds, z, n),
        "before_actual_q": 1.0,
        "before_actual_epsilon_without_the_report_order_cut": _eps(1.0, rounds, z, n),
        "after_q": privacy.planned_draw.sampling_rate, "after_epsilon": after,
        "budget": privacy.budget,
    }))


if __name__ == "__main__":
    main()
