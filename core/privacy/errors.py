"""Errors of :mod:`core.privacy`. All derive from :class:`core.errors.CoreError`::

    CoreError
     +-- PrivacyError            root of this package's errors
          +-- PrivacySpecError   a privacy section of a task file is invalid; names source
          |                      and field like core.taskspec.TaskSpecError
          +-- InsecureNoiseError a seeded (simulation-only) noise source was offered where
          |                      production privacy needs a CSPRNG
          +-- NoiseFloorError    too few devices reported in distributed DP: the noise in the
          |                      sum is below the configured floor, the round must abort
          +-- UnsupportedModelError  a model DP-SGD (local DP) cannot train; says the fix

Bad arguments from our own code (a negative clip norm passed by a caller) stay ``ValueError``.
"""

from __future__ import annotations

from core.errors import CoreError


class PrivacyError(CoreError):
    """Root of the errors raised by :mod:`core.privacy`."""


class PrivacySpecError(PrivacyError):
    """A privacy spec is invalid. ``str()`` is ``"SOURCE: field 'FIELD': MESSAGE"``, the
    format of :class:`core.taskspec.TaskSpecError`."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"field '{field}'" if field else "top level"
        super().__init__(f"{source}: {where}: {message}")


class InsecureNoiseError(PrivacyError):
    """A seeded noise source was used where a cryptographically secure one is required."""


class NoiseFloorError(PrivacyError):
    """The noise actually present in a distributed-DP sum is below the configured floor.

    ``effective_noise_multiplier`` is what the reported devices contributed,
    ``min_noise_multiplier`` the floor."""

    def __init__(self, message: str, *, effective_noise_multiplier: float,
                 min_noise_multiplier: float) -> None:
        self.effective_noise_multiplier = effective_noise_multiplier
        self.min_noise_multiplier = min_noise_multiplier
        super().__init__(message)


class UnsupportedModelError(PrivacyError):
    """A model has layers DP-SGD cannot train (no per-example gradients, or layers that mix
    examples such as BatchNorm). The message names the layers and the Opacus fix."""
