"""Errors of :mod:`core.experiments`. All derive from :class:`core.errors.CoreError`::

    CoreError
     +-- ExperimentError          root of this package's errors
          +-- ExperimentSpecError an experiment spec is invalid; also a ``ValueError``.
                                  ``str()`` is ``"field 'FIELD': MESSAGE"``; the caller that
                                  read the YAML file prefixes its name
                                  (:meth:`ExperimentSpecError.with_source`)

Bad arguments from our own code (negative variances, weights that do not sum to one passed
to :func:`~core.experiments.assignment.assign_arm`) stay plain ``ValueError``.
"""

from __future__ import annotations

from core.errors import CoreError


class ExperimentError(CoreError):
    """Root of the errors raised by :mod:`core.experiments`."""


class ExperimentSpecError(ExperimentError, ValueError):
    """An experiment spec is invalid. ``field`` is a dotted path (``arms[1].weight``);
    ``source`` is empty until a caller that knows the file adds it."""

    def __init__(self, field: str, message: str, *, source: str = "") -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f"field '{field}'" if field else "top level"
        super().__init__(f"{source}: {where}: {message}" if source else f"{where}: {message}")

    def with_source(self, source: str) -> ExperimentSpecError:
        """The same error, its message prefixed with ``source`` (a file name)."""
        return ExperimentSpecError(self.field, self.message, source=source)
