"""``--data`` specs: ``SOURCE[:key=value,...]``, e.g. ``digits:shard=3/20,dirichlet=0.5``.

Sources: ``synthetic`` (alpha, beta, shard, [seed], [iid]), ``digits`` (shard, [dirichlet],
[seed]) and ``digits:split=test`` (the global held-out set). Shards are 0-based ``K/N``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.data.dataset import LocalDataset
from core.errors import DataSpecError


@dataclass(frozen=True)
class DataSpec:
    source: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.source
        return self.source + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_data_spec(text: str) -> DataSpec:
    source, _, rest = text.strip().partition(":")
    if source not in _SOURCES:
        raise DataSpecError(
            f"data spec {text!r}: unknown source {source!r} (expected one of "
            f"{', '.join(sorted(_SOURCES))})")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise DataSpecError(f"data spec {text!r}: expected key=value, got {item!r}")
        if key in params:
            raise DataSpecError(f"data spec {text!r}: {key} given twice")
        params[key] = value
    spec = DataSpec(source, params)
    _validate(spec, text)
    return spec


def with_shard(spec: DataSpec, shard: int, num_shards: int) -> DataSpec:
    return DataSpec(spec.source, {**spec.params, "shard": f"{shard}/{num_shards}"})


def load_dataset(spec: DataSpec | str) -> LocalDataset:
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    else:
        _validate(spec, str(spec))
    return _SOURCES[spec.source][1](spec)


# -- sources ------------------------------------------------------------------

def _shard(spec: DataSpec, text: str) -> tuple[int, int]:
    raw = spec.params.get("shard")
    if raw is None:
        raise DataSpecError(f"data spec {text!r}: shard=K/N is required")
    k, slash, n = raw.partition("/")
    try:
        shard, shards = int(k), int(n)
    except ValueError:
        raise DataSpecError(f"data spec {text!r}: shard must look like K/N, got {raw!r}") from None
    if not slash or shards < 1:
        raise DataSpecError(f"data spec {text!r}: shard must look like K/N with N >= 1")
    if not 0 <= shard < shards:
        raise DataSpecError(
            f"data spec {text!r}: shard index {shard} out of range for {shards} shards")
    return shard, shards


def _float(spec: DataSpec, text: str, key: str, default: float | None, *, positive: bool = True
           ) -> float:
    raw = spec.params.get(key)
    if raw is None:
        if default is None:
            raise DataSpecError(f"data spec {text!r}: {key} is required")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DataSpecError(f"data spec {text!r}: {key} must be a number, got {raw!r}") from None
    if positive and not value > 0:
        raise DataSpecError(f"data spec {text!r}: {key} must be positive, got {raw!r}")
    if not positive and value < 0:
        raise DataSpecError(f"data spec {text!r}: {key} must be >= 0, got {raw!r}")
    return value


def _int(spec: DataSpec, text: str, key: str, default: int) -> int:
    raw = spec.params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DataSpecError(f"data spec {text!r}: {key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise DataSpecError(f"data spec {text!r}: {key} must be >= 0, got {raw!r}")
    return value


def _check_keys(spec: DataSpec, text: str, allowed: set[str]) -> None:
    for key in spec.params:
        if key not in allowed:
            raise DataSpecError(
                f"data spec {text!r}: unknown key {key!r} for {spec.source} "
                f"(expected: {', '.join(sorted(allowed))})")


def _validate(spec: DataSpec, text: str) -> None:
    if spec.source not in _SOURCES:
        raise DataSpecError(f"data spec {text!r}: unknown source {spec.source!r}")
    _SOURCES[spec.source][0](spec, text)


def _check_synthetic(spec: DataSpec, text: str) -> None:
    _check_keys(spec, text, {"alpha", "beta", "shard", "seed", "iid"})
    _float(spec, text, "alpha", None, positive=False)
    _float(spec, text, "beta", None, positive=False)
    _shard(spec, text)
    _int(spec, text, "seed", 0)
    if spec.params.get("iid", "false") not in ("true", "false"):
        raise DataSpecError(f"data spec {text!r}: iid must be true or false")


def _load_synthetic(spec: DataSpec) -> LocalDataset:
    from core.data.synthetic import synthetic_shard

    text = str(spec)
    shard, shards = _shard(spec, text)
    return synthetic_shard(alpha=_float(spec, text, "alpha", None, positive=False),
                           beta=_float(spec, text, "beta", None, positive=False),
                           shard=shard, num_shards=shards, seed=_int(spec, text, "seed", 0),
                           iid=spec.params.get("iid") == "true")


def _check_digits(spec: DataSpec, text: str) -> None:
    if "split" in spec.params:
        _check_keys(spec, text, {"split"})
        if spec.params["split"] != "test":
            raise DataSpecError(f"data spec {text!r}: split must be 'test'")
        return
    _check_keys(spec, text, {"shard", "dirichlet", "seed"})
    _, shards = _shard(spec, text)
    if shards > 700:
        raise DataSpecError(f"data spec {text!r}: digits supports at most 700 shards")
    _float(spec, text, "dirichlet", 0.5)
    _int(spec, text, "seed", 0)


def _load_digits(spec: DataSpec) -> LocalDataset:
    from core.data.digits import digits_shard, digits_test_set

    if spec.params.get("split") == "test":
        return digits_test_set()
    text = str(spec)
    shard, shards = _shard(spec, text)
    return digits_shard(shard=shard, num_shards=shards,
                        dirichlet=_float(spec, text, "dirichlet", 0.5),
                        seed=_int(spec, text, "seed", 0))


_SOURCES: dict[str, tuple[Callable[[DataSpec, str], None], Callable[[DataSpec], LocalDataset]]] = {
    "synthetic": (_check_synthetic, _load_synthetic),
    "digits": (_check_digits, _load_digits),
}
