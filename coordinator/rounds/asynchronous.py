"""Asynchronous buffered aggregation (FedBuff: Nguyen et al., AISTATS 2022; Papaya: Huba et
al., MLSys 2022) on the coordinator: the policy of an ``aggregation.mode: async`` task, which
the round machine (:mod:`.round_machine`) and the devices' calls (:mod:`.participation`)
consult where a synchronous task selects a cohort and waits for its round's goal.

The same semantics as the simulator (:mod:`simulations.asynchronous`), mapped onto rounds:
the version being built is an open round record whose number is the version it will commit
(round n commits model version n), so commits, crash recovery and the task's end work as
for synchronous rounds::

    on check-in: seat the device at once (no window, no cohort) if fewer than
        max_concurrency seats are in flight; it trains on the current version (its plan
        says which) and its seat expires round_deadline_s later if no update came
    on an upload: s = version now - version trained on
        if s > max_staleness: reject it as late (the device is told why)
        else: sum += n * weight(s) * delta; examples += n     # weight(s) = (1 + s) ** -a
    when buffer updates were accepted: mean = sum / examples   # not renormalised: a
        buffer of stale updates moves the model less (FedBuff's sum / K, as the simulator)
        step the server optimizer along mean and commit the next version; the seats still
        in flight are carried to the next version's round (their rows re-added there)

Rules of this implementation:

* A device contributes at most once to a version: one that reported (or whose seat was
  refused, errored or expired) is told to come back once the version is committed. So
  ``buffer`` must not exceed the devices that take part, or no version ever commits.
* "In flight": seated for the version or carried over, and neither reported, errored nor
  expired. Freed seats are refilled by the next check-ins.
* Uploads that arrive while a version is being committed (off the event loop, usually
  milliseconds) are answered Late like any upload to a closed round; the device checks in
  again.
* Crash safety is the synchronous rounds': a version is recorded by one commit of its round
  record (never twice: a restart fails the open round and redoes its number). A restart
  loses the uncommitted buffer (at most ``buffer - 1`` accepted updates) and every seat in
  flight; those devices are told their round closed and check in again.

Central DP: each version is one release, the buffer's clipped updates (weight 1 times the
staleness weight, never past the clip) summed, noised once and divided by ``buffer``;
accounted as a draw of the whole population (no amplification; what it assumes is in
:mod:`core.privacy.task`). Local DP runs as in synchronous rounds.

Refused at launch (:func:`~coordinator.rounds.task_setup.check_supported`): secure
aggregation (so distributed DP), Poisson sampling under DP, and robust rules other than the
mean.

Not thread-safe (the service's event loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.rounds.errors import Late
from core.aggregation.staleness import staleness_weight
from core.types import Aggregation, AggregationMode, TaskSpec

if TYPE_CHECKING:
    from coordinator.rounds.state import OpenRound, Seat


class FedBuff:
    """One asynchronous task's policy: admission, seat expiry, the staleness rule and when a
    version commits. Holds no state of its own: everything lives on the open round and its
    seats (:mod:`coordinator.rounds.state`)."""

    def __init__(self, aggregation: Aggregation, *, seat_s: float) -> None:
        """``seat_s``: how long a seat lasts without an update (the task's
        ``round_deadline_s``)."""
        self.aggregation = aggregation
        self.seat_s = seat_s

    @classmethod
    def for_spec(cls, spec: TaskSpec) -> FedBuff | None:
        """The policy of an asynchronous task; None for synchronous rounds."""
        if spec.aggregation.mode is not AggregationMode.ASYNC:
            return None
        return cls(spec.aggregation, seat_s=spec.round_deadline_s)

    @property
    def buffer(self) -> int:
        return self.aggregation.buffer

    def in_flight(self, rnd: OpenRound) -> list[str]:
        """The devices holding a seat that may still bring an update."""
        done = rnd.reported | rnd.errored
        return [d for d in rnd.seats if d not in done]

    def has_free_seat(self, rnd: OpenRound) -> bool:
        return len(self.in_flight(rnd)) < self.aggregation.max_concurrency

    def seat_deadline(self, now: float) -> float:
        return now + self.seat_s

    def expired(self, rnd: OpenRound, now: float) -> list[str]:
        """The devices in flight whose seat has expired at ``now`` (the caller records them
        as errored, which frees their seats)."""
        return [d for d in self.in_flight(rnd) if rnd.seats[d].deadline <= now]

    def staleness(self, seat: Seat, version: int) -> int:
        """Versions committed since the one ``seat`` trained on."""
        return version - seat.version

    def take_update(self, rnd: OpenRound, seat: Seat, version: int) -> float:
        """Admits an update trained by ``seat`` into the buffer of ``rnd`` at the current
        ``version``: records its staleness and returns the factor it is scaled by.

        Raises:
            Late: the update is staler than ``max_staleness`` (counted in ``rnd.late``).
        """
        s = self.staleness(seat, version)
        if s > self.aggregation.max_staleness:
            rnd.late += 1
            raise Late(
                f"update trained on model version {seat.version} is {s} versions old, staler "
                f"than the task's max_staleness of {self.aggregation.max_staleness} "
                "(spec.aggregation.max_staleness); it was rejected as late: check in again "
                "for the current version")
        rnd.staleness.append(s)
        return staleness_weight(s, self.aggregation.staleness)

    def buffer_full(self, rnd: OpenRound) -> bool:
        """True when the round's buffer holds ``buffer`` accepted updates: commit it."""
        return len(rnd.reported) >= self.aggregation.buffer

    def carried_seats(self, rnd: OpenRound) -> dict[str, Seat]:
        """The seats in flight when ``rnd``'s version commits: they go on to the next."""
        return {d: rnd.seats[d] for d in self.in_flight(rnd)}

    def metrics(self, rnd: OpenRound) -> dict[str, float]:
        """What a committed version records of its buffer: the staleness of its updates
        (mean and max) and how many updates were rejected as late while it was open."""
        out = {"late": float(rnd.late)}
        if rnd.staleness:
            out["staleness_mean"] = sum(rnd.staleness) / len(rnd.staleness)
            out["staleness_max"] = float(max(rnd.staleness))
        return out
