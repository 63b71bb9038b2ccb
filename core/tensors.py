"""Tensor encodings for the wire and for files. Never pickle.

Two forms:

* raw buffers: tensors back to back, little-endian, C order, described by a list of
  :class:`TensorInfo` sent alongside. Used for updates, which the coordinator streams to disk
  and reads back in chunks.
* safetensors files (a JSON header, then the raw data; parsing cannot run code). Used for
  model versions and server optimizer state.

Only numpy is imported here; safetensors is imported when a file is written or read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import TensorFormatError

_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

#: Metadata key under which :func:`save_safetensors` records the original key order.
ORDER_METADATA_KEY = "order"


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype name (a key of :func:`numpy_dtype`) and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes. Raises TensorFormatError if ``dtype`` is unknown."""
        return self.numel * numpy_dtype(self.dtype).itemsize


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The little-endian numpy dtype for a dtype name.

    Raises:
        TensorFormatError: ``name`` is not one of float32, float64, float16, int32, int64.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise TensorFormatError(
            f"unknown dtype {name!r} (expected one of {', '.join(_DTYPES)})"
        ) from None


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The name of a supported numpy dtype, whatever its byte order.

    Raises:
        TensorFormatError: the dtype is not one of the five supported ones.
    """
    little = dtype.newbyteorder("<")
    for name, supported in _DTYPES.items():
        if supported == little:
            return name
    raise TensorFormatError(f"unsupported dtype {dtype} (expected one of {', '.join(_DTYPES)})")


def tensor_infos(state: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    """One :class:`TensorInfo` per array, in mapping order.

    Raises:
        TensorFormatError: an array has an unsupported dtype.
    """
    return [TensorInfo(name, dtype_name(value.dtype), tuple(int(d) for d in value.shape))
            for name, value in state.items()]


def to_raw_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    """The arrays back to back, each little-endian and in C order, in mapping order.

    Raises:
        TensorFormatError: an array has an unsupported dtype.
    """
    parts = []
    for value in state.values():
        little = numpy_dtype(dtype_name(value.dtype))
        parts.append(np.asarray(value).astype(little, order="C", copy=False).tobytes(order="C"))
    return b"".join(parts)


def from_raw_bytes(data: bytes | memoryview, infos: Sequence[TensorInfo], *,
                   copy: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_raw_bytes`: arrays in the order of ``infos``.

    The arrays are writable copies in native byte order, independent of ``data``; with
    ``copy=False`` they are little-endian views of ``data`` instead (no memory: a large
    model's update read in place; writable only if ``data`` is).

    Raises:
        TensorFormatError: an info has an unknown dtype, a negative dimension or a repeated
            name, or ``data`` is not exactly as long as the tensors need.
    """
    _check_infos(infos)
    buffer = memoryview(data).cast("B")
    expected = sum(info.nbytes for info in infos)
    if buffer.nbytes != expected:
        raise TensorFormatError(f"buffer has {buffer.nbytes} bytes, tensors need {expected}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for info in infos:
        dtype = numpy_dtype(info.dtype)
        flat = np.frombuffer(buffer, dtype=dtype, count=info.numel, offset=offset)
        if copy:
            flat = flat.astype(dtype.newbyteorder("="), copy=True)
        out[info.name] = flat.reshape(info.shape)
        offset += info.nbytes
    return out


def _check_infos(infos: Sequence[TensorInfo]) -> None:
    seen: set[str] = set()
    for info in infos:
        numpy_dtype(info.dtype)
        if any(d < 0 for d in info.shape):
            raise TensorFormatError(f"tensor {info.name!r}: negative dimension in {info.shape}")
        if info.name in seen:
            raise TensorFormatError(f"tensor {info.name!r} is described twice")
        seen.add(info.name)


def save_safetensors(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                     ) -> bytes:
    """A safetensors file, in memory.

    safetensors stores tensors sorted by name; the mapping's own order is kept as a JSON
    list under the metadata key ``"order"`` (reserved: a caller's ``"order"`` is replaced)
    and restored by :func:`load_safetensors`. 0-d arrays stay 0-d.

    Raises:
        TensorFormatError: safetensors refuses an array (e.g. an object dtype).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save

    arrays, meta = _safetensors_input(state, metadata)
    try:
        return bytes(save(arrays, metadata=meta))
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:
        raise TensorFormatError(f"cannot write a safetensors file: {exc}") from None


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes the file :func:`save_safetensors` makes straight to ``path`` (replaced if it
    exists), from the arrays' own memory: no copy of the data is made (``save_safetensors``
    holds two, 800 MB for a 100M-parameter float32 model). No flush to disk.

    Raises:
        TensorFormatError: safetensors refuses an array.
        OSError: the file cannot be written.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays, meta = _safetensors_input(state, metadata)
    try:
        save_file(arrays, path, metadata=meta)
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:
        raise TensorFormatError(f"cannot write a safetensors file: {exc}") from None


def _safetensors_input(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[ORDER_METADATA_KEY] = json.dumps(list(state))
    arrays = {}
    for name, value in state.items():
        array = np.asarray(value)
        # astype keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
        arrays[name] = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return arrays, meta


def load_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Parses a safetensors file (parsing cannot execute code), in the saved key order.

    Files written elsewhere, without an ``"order"`` entry, come back sorted by name
    (safetensors itself returns them in no stable order).
    The arrays are writable copies, independent of ``data``.

    Raises:
        TensorFormatError: the file is truncated or malformed, or its ``"order"`` entry does
            not name exactly the tensors in the file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(bytes(data))
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise TensorFormatError(f"not a valid safetensors file: {exc}") from None
    order = _saved_order(data)
    if order is None:
        order = sorted(arrays)
    elif len(order) != len(arrays) or set(order) != set(arrays):
        raise TensorFormatError("safetensors metadata 'order' does not match the tensors")
    return {name: np.array(arrays[name], copy=True) for name in order}


def _saved_order(data: bytes) -> list[str] | None:
    """The ``"order"`` metadata of a file safetensors has already parsed successfully."""
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
        order = header.get("__metadata__", {}).get(ORDER_METADATA_KEY)
        value = None if order is None else json.loads(order)
    except (ValueError, AttributeError, TypeError) as exc:
        raise TensorFormatError(f"safetensors metadata 'order' is malformed: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise TensorFormatError("safetensors metadata 'order' is not a list of names")
    return value


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data`` (64 characters)."""
    return hashlib.sha256(data).hexdigest()
