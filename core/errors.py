"""Errors of the shared core.

CoreError
 +-- TensorFormatError   a tensor buffer or safetensors file is malformed
 +-- ModelSpecError      unknown architecture or bad constructor arguments
 +-- DataSpecError       a --data spec is malformed or out of range
 +-- TaskSpecError       a task file/spec is invalid (core.taskspec; names file and field)
"""

from __future__ import annotations


class CoreError(Exception):
    """Root of the errors raised by :mod:`core`."""


class TensorFormatError(CoreError):
    pass


class ModelSpecError(CoreError):
    pass


class DataSpecError(CoreError):
    pass
