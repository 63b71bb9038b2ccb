"""``--data`` specs: ``SOURCE[:key=value,key=value...]``.

Sources::

    synthetic:alpha=A,beta=B,shard=K/N[,seed=S][,iid=true|false]   FedProx Synthetic(A, B)
    digits:shard=K/N[,dirichlet=ALPHA][,seed=S]                    sklearn digits, non-IID
    digits:split=test                                              the global held-out set

Shards are 0-based: ``K/N`` with ``0 <= K < N``. Every error is a :class:`DataSpecError`
whose message quotes the spec and names the field, e.g.
``data spec 'digits:shard=5/4': shard index 5 out of range for 4 shards``.

Each source is one function in the :data:`_SOURCES` registry. It reads and checks its fields
and returns a loader; parsing runs it (so a bad spec fails when it is read, before any data
is generated) and :func:`load_dataset` runs it and calls the loader. Generators (numpy,
scikit-learn) are imported only when data is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from core.data.dataset import LocalDataset
from core.errors import DataSpecError


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec; ``str()`` gives back the text form (params in their order)."""

    source: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.source
        return self.source + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_data_spec(text: str) -> DataSpec:
    """Parses and fully validates a data spec (no data is generated).

    Raises:
        DataSpecError: unknown source, a malformed ``key=value`` item, a repeated, unknown,
            missing or out-of-range field; the message quotes ``text`` and names the field.
    """
    source, _, rest = text.partition(":")
    source = source.strip()
    params: dict[str, str] = {}
    for item in (part.strip() for part in rest.split(",")):
        if not item and not rest.strip():
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            _fail(text, f"expected key=value, got {item!r}")
        if key in params:
            _fail(text, f"{key} given twice")
        params[key] = value
    spec = DataSpec(source, params)
    _loader(spec, text)
    return spec


def load_dataset(spec: DataSpec | str) -> LocalDataset:
    """Validates ``spec`` and generates or loads the device's data. Deterministic: the same
    spec always gives the same arrays.

    Raises:
        DataSpecError: as :func:`parse_data_spec`.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    return _loader(spec, str(spec))()


def with_shard(spec: DataSpec, shard: int, num_shards: int) -> DataSpec:
    """A copy of ``spec`` with ``shard=shard/num_shards`` (added or replaced), so one process
    can host many virtual devices from one spec.

    Raises:
        DataSpecError: the source takes no shard (e.g. ``digits:split=test``) or the shard is
            out of range.
    """
    result = DataSpec(spec.source, {**spec.params, "shard": f"{shard}/{num_shards}"})
    _loader(result, str(result))
    return result


# -- fields ----------------------------------------------------------------------------------

Loader = Callable[[], LocalDataset]


def _fail(text: str, message: str) -> NoReturn:
    raise DataSpecError(f"data spec {text!r}: {message}")


class _Fields:
    """The params of one spec, read field by field; :meth:`done` refuses any left unread."""

    def __init__(self, spec: DataSpec, text: str) -> None:
        self.source = spec.source
        self.text = text
        self._params = dict(spec.params)
        self._read: set[str] = set()

    def fail(self, message: str) -> NoReturn:
        _fail(self.text, message)

    def raw(self, key: str) -> str | None:
        self._read.add(key)
        return self._params.get(key)

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


def _loader(spec: DataSpec, text: str) -> Loader:
    source = _SOURCES.get(spec.source)
    if source is None:
        _fail(text, f"unknown source {spec.source!r} (expected one of "
                    f"{', '.join(sorted(_SOURCES))})")
    fields = _Fields(spec, text)
    loader = source(fields)
    fields.done()
    return loader


# -- sources ---------------------------------------------------------------------------------

def _synthetic(fields: _Fields) -> Loader:
    alpha = fields.number("alpha")
    beta = fields.number("beta")
    shard, num_shards = fields.shard()
    seed = fields.natural("seed", default=0)
    iid = fields.flag("iid", default=False)

    def load() -> LocalDataset:
        from core.data.synthetic import synthetic_shard

        return synthetic_shard(alpha=alpha, beta=beta, shard=shard, num_shards=num_shards,
                               seed=seed, iid=iid)

    return load


def _digits(fields: _Fields) -> Loader:
    from core.data import digits

    if fields.has("split"):
        if fields.raw("split") != "test":
            fields.fail(f"split must be 'test', got {fields.raw('split')!r}")
        fields.done("digits:split=test")
        return digits.digits_test_set
    shard, num_shards = fields.shard()
    if num_shards > digits.MAX_SHARDS:
        fields.fail(f"shard count {num_shards} too large: digits has at most "
                    f"{digits.MAX_SHARDS} shards")
    dirichlet = fields.number("dirichlet", default=0.5, positive=True)
    seed = fields.natural("seed", default=0)

    def load() -> LocalDataset:
        return digits.digits_shard(shard=shard, num_shards=num_shards, dirichlet=dirichlet,
                                   seed=seed)

    return load


#: Source name -> function that reads the source's fields and returns its loader.
_SOURCES: dict[str, Callable[[_Fields], Loader]] = {
    "synthetic": _synthetic,
    "digits": _digits,
}
