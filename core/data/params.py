"""The ``key=value`` fields of one data spec, as a data source reads them
(:class:`DataParams`); every error quotes the spec and names the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NoReturn

from core.errors import DataSpecError


def fail(text: str, message: str) -> NoReturn:
    """Raises DataSpecError quoting the spec ``text``."""
    raise DataSpecError(f"data spec {text!r}: {message}")


class DataParams:
    """The ``key=value`` fields of one data spec, as a source reads them. Each reader checks
    its field and raises :class:`DataSpecError` quoting the spec and naming the field; after
    the source returns, a key it never read is refused (a typo must not fall back to a
    default)."""

    def __init__(self, source: str, params: Mapping[str, str], text: str) -> None:
        self.source = source
        self._text = text
        self._params = dict(params)
        self._read: set[str] = set()

    def fail(self, message: str) -> NoReturn:
        """Raises DataSpecError quoting the spec."""
        fail(self._text, message)

    def raw(self, key: str) -> str | None:
        """The field's text, or None when absent."""
        self._read.add(key)
        return self._params.get(key)

    def text(self, key: str, *, default: str | None = None) -> str:
        """A string field; required unless ``default``."""
        raw = self.raw(key)
        if raw is None:
            if default is None:
                self.fail(f"{key} is required")
            return default
        return raw

    def integer(self, key: str, *, default: int | None = None) -> int:
        """A non-negative integer field; required unless ``default``."""
        raw = self.raw(key)
        if raw is None:
            if default is None:
                self.fail(f"{key} is required")
            return default
        value = _decimal(raw)
        if value is None:
            self.fail(f"{key} must be a non-negative integer, got {raw!r}")
        return value

    def has(self, key: str) -> bool:
        return key in self._params

    def shard(self) -> tuple[int, int]:
        """``shard=K/N`` (required) as (K, N) with ``0 <= K < N``."""
        raw = self.raw("shard")
        if raw is None:
            self.fail("shard=K/N is required")
        k, slash, n = raw.partition("/")
        shard, shards = _decimal(k), _decimal(n)
        if not slash or shard is None or shards is None:
            self.fail(f"shard must look like K/N with 0 <= K < N, got {raw!r}")
        if shards < 1:
            self.fail(f"shard count must be at least 1, got {raw!r}")
        if shard >= shards:
            self.fail(f"shard index {shard} out of range for {shards} shards")
        return shard, shards

    def number(self, key: str, *, default: float | None = None, positive: bool = False
               ) -> float:
        """A finite float, >= 0 (or > 0 if ``positive``); required unless ``default``."""
        raw = self.raw(key)
        if raw is None:
            if default is None:
                self.fail(f"{key} is required")
            return default
        try:
            value = float(raw)
        except ValueError:
            self.fail(f"{key} must be a number, got {raw!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            self.fail(f"{key} must be a finite number {'> 0' if positive else '>= 0'}, "
                      f"got {raw!r}")
        return value

    def natural(self, key: str, *, default: int) -> int:
        """A non-negative integer in decimal digits."""
        raw = self.raw(key)
        if raw is None:
            return default
        value = _decimal(raw)
        if value is None:
            self.fail(f"{key} must be a non-negative integer, got {raw!r}")
        return value

    def flag(self, key: str, *, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        if raw not in ("true", "false"):
            self.fail(f"{key} must be true or false, got {raw!r}")
        return raw == "true"

    def done(self, context: str = "") -> None:
        """Refuses keys no reader asked for (called by :func:`load_dataset`)."""
        unknown = [key for key in self._params if key not in self._read]
        if unknown:
            where = context or self.source
            self.fail(f"unknown key {unknown[0]!r} for {where} "
                      f"(expected: {', '.join(sorted(self._read))})")


def _decimal(text: str) -> int | None:
    """A non-negative integer written in decimal digits, or None (signs, spaces, ``_`` and
    numbers too long for ``int()`` are refused)."""
    if not text.isdecimal():
        return None
    try:
        return int(text)
    except ValueError:
        return None
