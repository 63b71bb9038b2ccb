"""Errors of the simulation engine::

    SimulationError
     +-- SimulationConfigError   a simulation file is invalid; names the file and the field
     +-- BackendUnavailable      an optional backend (Ray) is not installed or unreachable

Errors from :mod:`core` (a bad model or data spec found while a simulation is built) are
reported as :class:`SimulationConfigError` naming the field they came from.
"""

from __future__ import annotations


class SimulationError(Exception):
    """Root of the errors raised by :mod:`simulations`."""


class SimulationConfigError(SimulationError):
    """A simulation file or config is invalid. ``str()`` names the source and the field,
    e.g. ``sim.yaml: field 'local.epochs': must be at least 1, got 0``."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"field '{field}'" if field else "top level"
        super().__init__(f"{source}: {where}: {message}")


class BackendUnavailable(SimulationError):
    """An optional execution backend cannot be used; the message says how to get it."""
