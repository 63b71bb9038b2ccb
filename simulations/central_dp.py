"""Central DP in simulation, as the coordinator runs it: the same
:class:`core.privacy.task.TaskPrivacy` (noise, accountant, budget), the same budget checks at
the same moments, and FedBuff's per-version release.

When the coordinator checks the budget (:mod:`core.privacy.task`), and so the simulator:

* before a round (an asynchronous task: a version) opens, with the planned draw
  (:func:`budget_exhausted`): past the budget, the task ends in
  :attr:`~core.types.TaskState.BUDGET_EXHAUSTED` with the last committed model;
* when a synchronous round's selection closes, with the draw it made
  (:func:`draw_refusal`): fewer devices online than the population means a larger q, and a
  draw that would pass the budget fails the round before anyone trains (it is redone as a
  new attempt). An asynchronous version's draw is always the planned one (the whole
  population), so it needs no second check.

A FedBuff version under DP (:func:`release_buffer`): each accepted update clipped to C, times
its staleness weight (at most 1), weight 1 otherwise, summed with
:class:`core.privacy.central.ClippedSum`, noised once and divided by ``buffer`` by
:meth:`TaskPrivacy.release`, accounted as a draw of the whole population.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from core.privacy.adaptive_clipping import clipped_bit
from core.privacy.central import ClippedSum
from core.privacy.noise import NoiseSource
from core.privacy.spec import PrivacyMode, PrivacySpec
from core.privacy.task import Release, TaskPrivacy
from core.sampling import CohortDraw, fixed_size_draw
from core.types import Aggregation, ModelSpec, TaskSpec


def task_privacy(*, name: str, model: ModelSpec, rounds: int, clients_per_round: int,
                 privacy: PrivacySpec | None, aggregation: Aggregation | None = None
                 ) -> TaskPrivacy | None:
    """The coordinator's central-DP state of the task (None without central DP): the
    release's denominator is ``clients_per_round`` (synchronous: simulations refuse
    over-selection under DP) or the buffer (``aggregation.mode: async``).

    Raises:
        ValueError: ``target_epsilon`` unreachable in ``rounds`` (TaskPrivacy.for_task).
    """
    if privacy is None or privacy.mode is not PrivacyMode.CENTRAL:
        return None
    task = TaskSpec(name=name, model=model, rounds=rounds, clients_per_round=clients_per_round,
                    min_reports=1, over_selection=1.0, privacy=privacy,
                    aggregation=aggregation if aggregation is not None else Aggregation())
    return TaskPrivacy.for_task(task)


def budget_exhausted(privacy: TaskPrivacy, *, committed: int) -> str | None:
    """Why no further round may open (one more with the planned draw would pass the
    budget), in the coordinator's words; None when one may. ``committed``: rounds (versions)
    committed so far."""
    exceeds, after = privacy.next_round_exceeds_budget()
    if not exceeds:
        return None
    return (f"privacy budget exhausted after {committed} rounds: epsilon is "
            f"{privacy.epsilon():.4g} and one more round would reach {after:.4g} > "
            f"{privacy.budget:.4g} (delta {privacy.delta:g})")


def selection_draw(privacy: TaskPrivacy, *, available: int, admitted: int) -> CohortDraw:
    """What a synchronous round's selection did: ``admitted`` drawn uniformly from the
    ``available`` devices online (the accountant's input)."""
    return fixed_size_draw(eligible=available, cohort=admitted, population=privacy.population)


def draw_refusal(privacy: TaskPrivacy, draw: CohortDraw) -> str | None:
    """Why a round whose selection made ``draw`` must fail before training (it would pass
    the budget), in the coordinator's words; None when it may go on."""
    exceeds, after = privacy.draw_exceeds_budget(draw)
    if not exceeds:
        return None
    return (f"only {draw.eligible} eligible devices checked in: a cohort of {draw.cohort} "
            f"drawn from them (q = {draw.sampling_rate:.4g}) would take epsilon to "
            f"{after:.4g}, past the budget {privacy.budget:.4g}")


def release_buffer(privacy: TaskPrivacy, updates: Sequence[npt.NDArray[np.floating]],
                   staleness_weights: Sequence[float], *, source: NoiseSource) -> Release:
    """A FedBuff version's DP release: ``(sum_i w_i clip(u_i, C) + N(0, (z C)^2)) / buffer``
    (flat ``updates``, one staleness weight ``w_i`` in [0, 1] each), accounted as a draw of
    the whole population. Not yet committed: call :meth:`TaskPrivacy.committed` once the
    version is. Under adaptive clipping each update's bit is its device's, as a device
    computes it.

    Raises:
        ValueError: no update, updates of different sizes, or a weight outside [0, 1].
    """
    if not updates:
        raise ValueError("a version releases at least one update")
    total = ClippedSum(int(np.asarray(updates[0]).size), l2_clip_norm=privacy.clip)
    for update, weight in zip(updates, staleness_weights, strict=True):
        total.add(update, weight=weight)
    unclipped = None
    if privacy.adaptive is not None:
        unclipped = float(sum(clipped_bit(n, l2_clip_norm=privacy.clip) for n in total.norms))
    return privacy.release(total.total, unclipped, draw=privacy.planned_draw, source=source,
                           require_secure=False)
