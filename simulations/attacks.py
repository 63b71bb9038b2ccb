"""Poisoning attacks on a simulated federation, to measure the robust aggregation rules
(:mod:`core.aggregation.robust`). Nothing in production imports this module.

A fixed set of devices (``fraction`` of the population, at least one) is malicious for the
whole run; whenever selection picks one, its update is replaced by the attack's:

* ``sign_flip``: the honest delta reversed and multiplied by ``boost`` (default 1);
* ``scaling``: the honest delta multiplied by ``boost`` (default 10);
* ``backdoor`` (Bagdasaryan et al. 2020, model replacement): the attacker's data is
  augmented with copies of its examples carrying a trigger (the last ``trigger_size``
  features set to the data's maximum) relabelled to ``target_class``
  (:func:`poison_data`), it trains on that, and scales its delta by ``boost`` (default:
  the cohort size over the server learning rate, so that the mean is replaced by the
  backdoored model).

:class:`AttackingTrainer` wraps any :class:`~simulations.cohort.CohortTrainer`, so every
engine's training is attacked the same way. :func:`backdoor_success` is the attack success
rate: the fraction of triggered test inputs (whose true class is not the target) the model
classifies as the target.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simulations.cohort import CohortResult, CohortTrainer, DeviceJob
from simulations.data import FederatedData


class AttackKind(enum.Enum):
    NONE = "none"
    SIGN_FLIP = "sign_flip"
    SCALING = "scaling"
    BACKDOOR = "backdoor"


@dataclass(frozen=True)
class Attack:
    """Which attack, on what fraction of the devices; ``boost`` None: the kind's default
    (sign_flip 1, scaling 10, backdoor the cohort size / server learning rate)."""

    kind: AttackKind = AttackKind.NONE
    fraction: float = 0.0
    boost: float | None = None
    target_class: int = 0
    trigger_size: int = 4
    #: backdoor: triggered copies added per clean example of an attacker.
    poison_ratio: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"attack fraction must be in [0, 1), got {self.fraction}")

    def scale(self, *, clients_per_round: int, server_learning_rate: float) -> float:
        if self.boost is not None:
            return self.boost
        if self.kind is AttackKind.SIGN_FLIP:
            return 1.0
        if self.kind is AttackKind.SCALING:
            return 10.0
        return clients_per_round / server_learning_rate


def choose_attackers(attack: Attack, num_devices: int) -> frozenset[int]:
    """``round(fraction x num_devices)`` devices (at least one when the fraction is not 0),
    drawn with the attack's seed."""
    if attack.kind is AttackKind.NONE or attack.fraction == 0.0:
        return frozenset()
    count = max(1, round(attack.fraction * num_devices))
    rng = np.random.default_rng(np.random.SeedSequence([attack.seed, 0xBAD]))
    return frozenset(int(d) for d in rng.choice(num_devices, size=count, replace=False))


def add_trigger(x: np.ndarray, *, trigger_size: int, value: float) -> np.ndarray:
    """A copy of ``x`` (``[n, ...]``) with the last ``trigger_size`` features of each
    example (flattened) set to ``value``: for 8x8 digits, a bar at the bottom right."""
    flat = np.array(x, dtype=np.float32).reshape(len(x), -1)
    flat[:, -trigger_size:] = value
    return flat.reshape(x.shape)


def trigger_value(data: FederatedData) -> float:
    return float(np.max(data.x_test))


def poison_data(data: FederatedData, attackers: frozenset[int], attack: Attack
                ) -> FederatedData:
    """``data`` with each attacker's training set (backdoor only) extended by triggered
    copies of its examples labelled ``target_class``."""
    if attack.kind is not AttackKind.BACKDOOR or not attackers:
        return data
    value = trigger_value(data)
    rng = np.random.default_rng(np.random.SeedSequence([attack.seed, 0x7216]))
    xs, ys = list(data.x_train), list(data.y_train)
    for device in sorted(attackers):
        x, y = xs[device], ys[device]
        take = max(1, math.ceil(attack.poison_ratio * len(y)))
        chosen = rng.choice(len(y), size=take, replace=take > len(y))
        xs[device] = np.concatenate(
            [x, add_trigger(x[chosen], trigger_size=attack.trigger_size, value=value)])
        ys[device] = np.concatenate([y, np.full(take, attack.target_class, dtype=y.dtype)])
    return FederatedData(xs, ys, data.x_test, data.y_test, data.num_classes)


class AttackingTrainer:
    """Trains the cohort with ``inner``, then replaces each attacker's trained parameters
    by ``global + s x (trained - global)`` with ``s`` the attack's signed scale (the
    attackers' poisoned data is already in the table). Not thread-safe."""

    def __init__(self, inner: CohortTrainer, attack: Attack, attackers: frozenset[int], *,
                 clients_per_round: int, server_learning_rate: float) -> None:
        self.inner = inner
        self.attack = attack
        self.attackers = attackers
        scale = attack.scale(clients_per_round=clients_per_round,
                             server_learning_rate=server_learning_rate)
        self._scale = -scale if attack.kind is AttackKind.SIGN_FLIP else scale
        #: Attacker updates sent so far (over all rounds).
        self.poisoned_updates = 0

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        result = self.inner.train(global_params, jobs, corrections)
        rows = [i for i, job in enumerate(jobs) if job.device in self.attackers]
        if not rows or self.attack.kind is AttackKind.NONE:
            return result
        self.poisoned_updates += len(rows)
        params = {}
        for name, stacked in result.params.items():
            out = stacked.clone()
            base = global_params[name].to(out.dtype)
            for i in rows:
                out[i] = base + self._scale * (stacked[i] - base)
            params[name] = out
        return CohortResult(params, result.steps, result.num_examples, result.loss)


def backdoor_success(predict: np.ndarray, y_true: np.ndarray, *, target_class: int) -> float:
    """The fraction of triggered inputs not of ``target_class`` predicted as it
    (``predict``: the model's classes on the triggered test set)."""
    mask = y_true != target_class
    if not mask.any():
        return 0.0
    return float(np.mean(predict[mask] == target_class))


__all__ = [
    "Attack",
    "AttackKind",
    "AttackingTrainer",
    "add_trigger",
    "backdoor_success",
    "choose_attackers",
    "poison_data",
    "trigger_value",
]
