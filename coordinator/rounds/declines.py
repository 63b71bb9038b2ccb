"""Devices that decline a task (they cannot run it: its model does not build or does not fit
their data, training raised), counted by reason, and the rule that fails a task no device
can run instead of letting it wait for reports that never come.

The rule (:meth:`Declines.verdict`): a task fails with the most common decline reason when

1. no update of the task was ever accepted (no round committed, none accepted in the open
   attempt): a task some device can run is never failed by declines; rounds short of
   reports fail as before, and ``max_failed_attempts`` ends the task;
2. at least ``max(min_reports, 2)`` distinct devices declined it since it was loaded: one
   device (or fewer devices than a round needs) cannot fail a task alone, and every decline
   comes from a device seated in a round, authenticated by its participation token;
3. no device of the open attempt is still taking part (every seated device declined or
   reported an error, and no upload is in progress): a device still training may yet
   succeed, so a fast decline never races a slow success.

A device that declined is not offered the task again: its check-ins carry the tasks it
declined (bounded on the device and on the wire), so the coordinator keeps nothing per
device for that.

Memory is bounded whatever devices send: reasons are normalised (whitespace collapsed, the
first line, at most :data:`REASON_CHARS` characters), at most :data:`MAX_REASONS` distinct
ones are kept (later ones count under :data:`OTHER_REASONS`), and decliners are remembered
only until the rule's threshold is reached. Counts live in memory: they restart with the
coordinator (the per-round records keep each device's error).

Not thread-safe (the service's event loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Longest reason kept (characters).
REASON_CHARS = 160
#: Distinct reasons kept per task; the rest count together.
MAX_REASONS = 16
OTHER_REASONS = "(other reasons)"
#: Fewest distinct decliners that can fail a task, whatever its min_reports.
MIN_DECLINERS = 2


def normalise_reason(reason: str) -> str:
    """A decline reason as counted: its first line, whitespace collapsed, cut to
    :data:`REASON_CHARS` characters (``...`` marks the cut)."""
    first = " ".join(reason.strip().splitlines()[0].split()) if reason.strip() else ""
    if not first:
        return "(no reason given)"
    if len(first) > REASON_CHARS:
        return first[:REASON_CHARS - 3] + "..."
    return first


@dataclass
class Declines:
    """One task's declines. ``needed``: the distinct decliners that can fail it (see the
    module docstring)."""

    needed: int
    by_reason: dict[str, int] = field(default_factory=dict)
    #: Distinct decliners, kept only until ``needed`` of them were seen.
    _decliners: set[str] = field(default_factory=set)
    _enough: bool = False

    @classmethod
    def for_task(cls, min_reports: int) -> Declines:
        return cls(needed=max(min_reports, MIN_DECLINERS))

    def record(self, device_id: str, reason: str) -> None:
        """``device_id`` declined the task; a device's repeated decline counts once towards
        the rule (every decline counts in :attr:`by_reason`)."""
        key = normalise_reason(reason)
        if key not in self.by_reason and len(self.by_reason) >= MAX_REASONS:
            key = OTHER_REASONS
        self.by_reason[key] = self.by_reason.get(key, 0) + 1
        if not self._enough:
            self._decliners.add(device_id)
            if len(self._decliners) >= self.needed:
                self._enough = True
                self._decliners.clear()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def verdict(self, *, any_accepted: bool, any_pending: bool) -> str | None:
        """Why the task must fail (no device can run it), or None while it may still run.
        ``any_accepted``: an update of the task was ever accepted; ``any_pending``: a device
        of the open attempt is still taking part."""
        if any_accepted or any_pending or not self._enough:
            return None
        reason, count = max(self.by_reason.items(), key=lambda item: item[1])
        return (f"no device could run the task: {self.total} declines from at least "
                f"{self.needed} devices, none succeeded; most common reason ({count}): "
                f"{reason}")
