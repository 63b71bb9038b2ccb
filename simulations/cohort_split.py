"""Splitting a round's cohort across workers (Ray actors or local processes) and merging
their results back in job order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from simulations.cohort import CohortResult, DeviceJob


def split_jobs(jobs: Sequence[DeviceJob], costs: Sequence[int], parts: int, *,
               lock_step_overhead: float = 0.0) -> list[list[int]]:
    """Job indices in ``parts`` groups of similar total cost, longest job first, each to the
    group it finishes soonest in; groups may be empty.

    A group's cost is the sum of its jobs' ``costs`` (steps) plus ``lock_step_overhead``
    times its longest job: a lock-step trainer pays a per-step price however few devices
    are still training (measured on the bmm trainer for the benchmark MLP: ~64 us a step
    plus ~74 us a device-step, so ~0.9). Without that term, the device with 10x the steps
    of any other was given a share of the rest as well, and its group finished last."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0.0] * parts
    longest = [0.0] * parts
    for i in sorted(range(len(jobs)), key=lambda i: -costs[i]):
        cost = float(costs[i])
        finish = [totals[g] + cost + lock_step_overhead * max(longest[g], cost)
                  for g in range(parts)]
        g = finish.index(min(finish))
        groups[g].append(i)
        totals[g] += cost
        longest[g] = max(longest[g], cost)
    return groups


#: ``lock_step_overhead`` for the lock-step trainers (bmm, vmap); see :func:`split_jobs`.
LOCK_STEP_OVERHEAD = 0.9


def merge_results(groups: Sequence[Sequence[int]], parts: Sequence[CohortResult],
                  names: Iterable[str]) -> CohortResult:
    """One :class:`CohortResult` in job order from ``parts[g]``, the result of the jobs
    ``groups[g]`` (in that order)."""
    order = torch.tensor([i for g in groups for i in g], dtype=torch.int64)
    inverse = torch.argsort(order)
    merged = {n: torch.cat([torch.as_tensor(p.params[n]) for p in parts]
                           ).index_select(0, inverse) for n in names}
    inv = inverse.numpy()
    return CohortResult(
        params=merged,
        steps=np.concatenate([p.steps for p in parts])[inv],
        num_examples=np.concatenate([p.num_examples for p in parts])[inv],
        loss=np.concatenate([p.loss for p in parts])[inv])
