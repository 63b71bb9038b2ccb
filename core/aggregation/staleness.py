"""FedBuff's staleness weight (Nguyen et al., AISTATS 2022): how much an asynchronous upload
counts given how many model versions were committed since the version it trained on. One
home for the coordinator (:mod:`coordinator.rounds.asynchronous`) and the simulator
(:mod:`simulations.asynchronous`)."""

from __future__ import annotations

from core.types import Staleness, StalenessKind


def staleness_weight(staleness: int, spec: Staleness) -> float:
    """The factor an upload ``staleness`` versions old is scaled by: 1 for ``constant``,
    ``(1 + staleness) ** -exponent`` for ``polynomial``.

    Raises:
        ValueError: a negative staleness.
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if spec.kind is StalenessKind.CONSTANT:
        return 1.0
    return float((1.0 + staleness) ** -spec.exponent)
