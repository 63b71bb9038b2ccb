"""Tensor encodings for the wire and for files. Never pickle.

Two forms: raw little-endian buffers (tensors back to back in a known order, described by
:class:`TensorInfo` s sent alongside) for updates, and safetensors files for model versions.
"""

from __future__ import annotations

import hashlib
import json
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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * numpy_dtype(self.dtype).itemsize


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The little-endian numpy dtype for a dtype name; TensorFormatError if unknown."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise TensorFormatError(
            f"unknown dtype {name!r} (expected one of {', '.join(_DTYPES)})"
        ) from None


def dtype_name(dtype: np.dtype[Any]) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype.newbyteorder("<"):
            return name
    raise TensorFormatError(f"unsupported dtype {dtype}")


def tensor_infos(state: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    return [TensorInfo(k, dtype_name(v.dtype), tuple(int(d) for d in v.shape))
            for k, v in state.items()]


def to_raw_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    """Tensors back to back, little-endian, C order, in mapping order."""
    parts = []
    for v in state.values():
        dt = numpy_dtype(dtype_name(v.dtype))
        parts.append(np.ascontiguousarray(v, dtype=dt).tobytes())
    return b"".join(parts)


def from_raw_bytes(data: bytes | memoryview, infos: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_raw_bytes`; raises TensorFormatError unless sizes match exactly.
    The arrays are copies (writable, independent of ``data``)."""
    expected = sum(i.nbytes for i in infos)
    if len(data) != expected:
        raise TensorFormatError(f"buffer has {len(data)} bytes, tensors need {expected}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for info in infos:
        n = info.nbytes
        arr = np.frombuffer(data, dtype=numpy_dtype(info.dtype), count=info.numel, offset=offset)
        out[info.name] = arr.reshape(info.shape).copy()
        offset += n
    return out


def save_safetensors(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                     ) -> bytes:
    """A safetensors file in memory; the original key order is kept in metadata."""
    from safetensors.numpy import save

    meta = dict(metadata or {})
    meta["order"] = json.dumps(list(state))
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    return bytes(save(arrays, metadata=meta))


def load_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Parses a safetensors file (no code execution possible); TensorFormatError if malformed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(data)
        order = _order(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise TensorFormatError(f"not a valid safetensors file: {exc}") from None
    if order is None or set(order) != set(arrays):
        return dict(arrays)
    return {k: arrays[k] for k in order}


def _order(data: bytes) -> list[str] | None:
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    order = meta.get("order")
    if order is None:
        return None
    value = json.loads(order)
    return [str(k) for k in value] if isinstance(value, list) else None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
