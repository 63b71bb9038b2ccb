"""``--data`` specs: ``SOURCE[:key=value,key=value...]``.

Built-in sources::

    synthetic:alpha=A,beta=B,shard=K/N[,seed=S][,iid=true|false]   FedProx Synthetic(A, B)
    digits:shard=K/N[,dirichlet=ALPHA][,seed=S]                    sklearn digits, non-IID
    digits:split=test                                              the global held-out set

and any source an engineer's app registers (:mod:`core.apps`). Shards are 0-based: ``K/N``
with ``0 <= K < N``. Every error is a :class:`DataSpecError` whose message quotes the spec
and names the field, e.g. ``data spec 'digits:shard=5/4': shard index 5 out of range for 4
shards``.

A source is a function ``(params: DataParams) -> LocalDataset``: it reads its fields through
:class:`DataParams` (which checks them) and returns the device's data. :func:`parse_data_spec`
checks the syntax and that the source exists; the fields are checked when the source runs
(:func:`load_dataset`), which also refuses a key the source never read.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from core import entry_points
from core.app_types import DataSource
from core.data.dataset import LocalDataset
from core.data.params import DataParams, fail
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
    """Parses a data spec and checks that its source is registered (no data is loaded; the
    source's own fields are checked by :func:`load_dataset`).

    Raises:
        DataSpecError: unknown source, a malformed ``key=value`` item or a repeated key; the
            message quotes ``text`` and names the field.
    """
    source, _, rest = text.partition(":")
    source = source.strip()
    params: dict[str, str] = {}
    for item in (part.strip() for part in rest.split(",")):
        if not item and not rest.strip():
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            fail(text, f"expected key=value, got {item!r}")
        if key in params:
            fail(text, f"{key} given twice")
        params[key] = value
    spec = DataSpec(source, params)
    _source(spec, text)
    return spec


def load_dataset(spec: DataSpec | str) -> LocalDataset:
    """Runs the spec's source: the device's data. Deterministic for the built-in sources (the
    same spec always gives the same arrays).

    Raises:
        DataSpecError: as :func:`parse_data_spec`, a field the source refuses, a key it does
            not read, or a user source that fails or returns something else than a
            LocalDataset (the message names the spec).
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    text = str(spec)
    registered = _source(spec, text)
    params = DataParams(spec.source, spec.params, text)
    if registered.origin == "built-in":
        dataset = registered.load(params)
    else:
        try:
            dataset = registered.load(params)
        except DataSpecError:
            raise
        except Exception as exc:
            fail(text, f"source {spec.source!r} ({registered.origin}) failed: "
                        f"{type(exc).__name__}: {exc}")
        if not isinstance(dataset, LocalDataset):
            fail(text, f"source {spec.source!r} ({registered.origin}) returned "
                        f"{type(dataset).__name__}, not a LocalDataset")
    params.done()
    return dataset


def with_shard(spec: DataSpec, shard: int, num_shards: int) -> DataSpec:
    """A copy of ``spec`` with ``shard=shard/num_shards`` (added or replaced), so one process
    can host many virtual devices (and a simulation many devices) from one spec.

    Raises:
        DataSpecError: the shard is out of range, or the spec already names a split that
            takes no shard (``digits:split=test``).
    """
    if not 0 <= shard < num_shards:
        fail(str(spec), f"shard index {shard} out of range for {num_shards} shards")
    if "split" in spec.params:
        fail(str(spec), "a split takes no shard")
    return DataSpec(spec.source, {**spec.params, "shard": f"{shard}/{num_shards}"})


# -- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Registered:
    load: DataSource
    origin: str


_lock = threading.Lock()
_SOURCES: dict[str, _Registered] = {}


def register_data_source(name: str, source: DataSource, *, origin: str = "built-in") -> None:
    """Registers ``source`` under ``name`` (``origin`` names it in messages); the same
    function again under the same name does nothing.

    Raises:
        ValueError: ``name`` is already registered, or is not a plain identifier.
    """
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"data source name {name!r}: use letters, digits, '_' and '-'")
    with _lock:
        if name in _SOURCES and _SOURCES[name].load is source:
            return  # the same app found twice (--app and its entry point): no-op
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is already registered "
                             f"({_SOURCES[name].origin})")
        _SOURCES[name] = _Registered(source, origin)


def data_source_names() -> list[str]:
    """The registered source names (built-in, apps, installed entry points), sorted."""
    _discover()
    return sorted(_SOURCES)


#: Sources of installed apps that could not be registered (a name taken) -> why.
_refused: dict[str, str] = {}
_discovered = False


def _discover() -> None:
    """Registers the data sources of installed apps (:mod:`core.entry_points`), once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for found in entry_points.installed_apps():
        for name, source in found.app.data.items():
            try:
                register_data_source(name, source, origin=found.origin)
            except ValueError as exc:
                _refused.setdefault(name, f"{found.origin}: {exc}")


def _source(spec: DataSpec, text: str) -> _Registered:
    if spec.source not in _SOURCES:
        _discover()
    registered = _SOURCES.get(spec.source)
    if registered is None:
        why = _refused.get(spec.source) or entry_points.broken(spec.source)
        if why is not None:
            fail(text, why)
        fail(text, f"unknown source {spec.source!r} (expected one of "
                    f"{', '.join(data_source_names())}; user sources come from --app "
                    f"module:attribute or an installed 'fedcoord.data' entry point)")
    return registered


# -- built-in sources ------------------------------------------------------------------------

def _synthetic(params: DataParams) -> LocalDataset:
    from core.data.synthetic import synthetic_shard

    alpha = params.number("alpha")
    beta = params.number("beta")
    shard, num_shards = params.shard()
    seed = params.natural("seed", default=0)
    iid = params.flag("iid", default=False)
    params.done()
    return synthetic_shard(alpha=alpha, beta=beta, shard=shard, num_shards=num_shards,
                           seed=seed, iid=iid)


def _digits(params: DataParams) -> LocalDataset:
    from core.data import digits

    if params.has("split"):
        if params.raw("split") != "test":
            params.fail(f"split must be 'test', got {params.raw('split')!r}")
        params.done("digits:split=test")
        return digits.digits_test_set()
    shard, num_shards = params.shard()
    if num_shards > digits.MAX_SHARDS:
        params.fail(f"shard count {num_shards} too large: digits has at most "
                    f"{digits.MAX_SHARDS} shards")
    dirichlet = params.number("dirichlet", default=0.5, positive=True)
    seed = params.natural("seed", default=0)
    params.done()
    return digits.digits_shard(shard=shard, num_shards=num_shards, dirichlet=dirichlet,
                               seed=seed)


register_data_source("synthetic", _synthetic)
register_data_source("digits", _digits)
