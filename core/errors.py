"""Errors of the shared core. Every error :mod:`core` raises on bad input derives from
:class:`CoreError`, so a caller can catch one class::

    CoreError
     +-- TensorFormatError   a tensor buffer or safetensors file is malformed (core.tensors)
     +-- ModelSpecError      unknown architecture, bad constructor arguments, or a state that
     |                       does not fit the model (core.models)
     +-- DataSpecError       a --data spec is malformed or out of range (core.data.spec)
     +-- TaskSpecError       a task file/spec is invalid; names file and field (core.taskspec)
     +-- AppError            user code ("apps") cannot be found, imported or registered
     |                       (core.apps)
     +-- RobustAggregationError  a round's updates cannot be combined by the task's robust
     |                       rule, or the rule cannot run with SecAgg/DP
     |                       (core.aggregation.robust)
     +-- SecAggError         anything secure aggregation refuses; its own tree is drawn in
                             core.secagg.errors

Programming errors (wrong types from our own code, impossible states) stay ``ValueError`` /
``TypeError``; these classes are for input that came from a person or a peer.
"""

from __future__ import annotations


class CoreError(Exception):
    """Root of the errors raised by :mod:`core`."""


class TensorFormatError(CoreError):
    """A tensor buffer, tensor description or safetensors file is malformed."""


class ModelSpecError(CoreError):
    """A model spec names an unknown architecture or has a missing, unknown or badly typed
    argument; or a weight mapping does not fit the model. The message names the field."""


class AppError(CoreError):
    """User code cannot be loaded: a ``module:attribute`` that does not import or is not an
    app, an entry point that fails, a name registered twice. The message names the app."""


class DataSpecError(CoreError):
    """A ``--data`` spec is malformed or out of range. The message quotes the spec and
    names the field."""
