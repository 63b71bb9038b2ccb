"""Fault injection for tests of the whole system: a real process dying at a named point.

``FEDCOORD_FAULT_AT=<point>[@<round>]`` in an agent's environment makes the process kill
itself with SIGKILL (no cleanup, no goodbye to the coordinator: a phone losing power) when a
device reaches that point, e.g. ``secagg.masked_input@1`` just before it would upload its
masked input in round 1. Unset in normal operation, where this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "FEDCOORD_FAULT_AT"


def crash_point(name: str, round_number: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, at_round = spec.partition("@")
    if point == name and (not at_round or int(at_round) == round_number):
        os.kill(os.getpid(), signal.SIGKILL)
