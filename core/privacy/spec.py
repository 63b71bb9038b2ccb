"""The ``privacy`` section of a task file -> :class:`PrivacySpec`, with errors naming the file
and field (format of :class:`core.taskspec.TaskSpecError`). Unknown keys are errors.

::

    privacy:
      mode: central            # off | central | distributed | local
      noise_multiplier: 1.0    # or target_epsilon: 8.0 (exactly one, central/distributed)
      delta: 1.0e-5
      clip: 0.5                # a fixed L2 clip norm, or adaptive (Andrew et al. 2021):
      # clip: {target_quantile: 0.5, initial: 0.1, learning_rate: 0.2, bit_noise: 5.0}
      population: 1000         # devices the cohorts are drawn from (at most; q uses what is seen)
      sampling: fixed          # fixed (default: uniform, fixed-size, without replacement) | poisson
      max_epsilon: 10.0        # the budget: required with noise_multiplier (default: target_epsilon)
      accounting: rdp          # rdp | prv (prv: Poisson only)
      min_noise_multiplier: 0.9  # distributed only: abort a round whose reports carry less

    privacy:
      mode: local              # DP-SGD on each device (Opacus)
      local: {noise_multiplier: 1.1, max_grad_norm: 1.0, delta: 1.0e-5, max_epsilon: 8.0}
      # max_epsilon: each device's budget; an update that would take the device's epsilon
      # past it is never sent, and the device stops taking part in the task

A missing section or ``mode: off`` means no privacy; then no other key is allowed.
"""

from __future__ import annotations

import enum
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.privacy.accounting import AccountingMethod, Sampling
from core.privacy.errors import PrivacySpecError


class PrivacyMode(enum.Enum):
    OFF = "off"
    #: The coordinator clips each update, sums, and adds Gaussian noise (trusted server).
    CENTRAL = "central"
    #: Devices add discrete-Gaussian shares before secure aggregation (untrusted server).
    DISTRIBUTED = "distributed"
    #: Each device trains with DP-SGD (Opacus); updates are private on their own.
    LOCAL = "local"


@dataclass(frozen=True)
class FixedClip:
    l2_clip_norm: float


@dataclass(frozen=True)
class AdaptiveClip:
    """Quantile-tracking clip norm; see :mod:`core.privacy.adaptive_clipping`.
    ``bit_noise_std`` is sigma_b, the std of the noise on the count of unclipped updates."""

    target_quantile: float
    initial_l2_clip_norm: float
    learning_rate: float
    bit_noise_std: float


@dataclass(frozen=True)
class LocalDp:
    """DP-SGD parameters each device trains with, and each device's budget: epsilon (at
    ``delta``) past which it sends no more updates of the task."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    max_epsilon: float


@dataclass(frozen=True)
class PrivacySpec:
    """Validated privacy configuration of a task. For central and distributed modes exactly
    one of ``noise_multiplier`` / ``target_epsilon`` is set and ``delta`` and ``clip`` are;
    for local mode only ``local`` is; for off, nothing."""

    mode: PrivacyMode = PrivacyMode.OFF
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    clip: FixedClip | AdaptiveClip | None = None
    sampling: Sampling = Sampling.FIXED_SIZE
    accounting: AccountingMethod = AccountingMethod.RDP
    min_noise_multiplier: float | None = None
    local: LocalDp | None = None
    #: Size of the population cohorts are drawn from (sampling rate = cohort / population).
    population: int | None = None
    #: Epsilon (at ``delta``) after which no round opens; None: ``target_epsilon`` (if set).
    max_epsilon: float | None = None

    @property
    def budget(self) -> float | None:
        """The epsilon no release may exceed: ``max_epsilon``, else ``target_epsilon``."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


_TOP_KEYS = ("mode", "noise_multiplier", "target_epsilon", "delta", "clip", "sampling",
             "accounting", "min_noise_multiplier", "local", "population", "max_epsilon")
_ADAPTIVE_KEYS = {"target_quantile": "target_quantile", "initial": "initial_l2_clip_norm",
                  "learning_rate": "learning_rate", "bit_noise": "bit_noise_std"}
_LOCAL_KEYS = ("noise_multiplier", "max_grad_norm", "delta", "max_epsilon")


def privacy_from_dict(raw: Mapping[str, Any] | None, source: str, *, path: str = "privacy"
                      ) -> PrivacySpec:
    """Parses and validates a task file's privacy section (``None``: privacy off).

    ``path`` prefixes field names in errors (``privacy.clip.target_quantile``).

    Raises:
        PrivacySpecError: a key is unknown, missing, of the wrong type, out of range, or not
            allowed in the chosen mode; the message names ``source`` and the field.
    """
    if raw is None:
        return PrivacySpec()

    def fail(field: str, message: str) -> typing.NoReturn:
        raise PrivacySpecError(source, _join(path, field), message)

    if not isinstance(raw, Mapping):
        raise PrivacySpecError(source, path, f"expected a mapping, got {_describe(raw)}")
    _no_unknown_keys(raw, _TOP_KEYS, source, path)
    raw_mode = raw.get("mode", "off")
    # YAML 1.1 (PyYAML) reads a bare ``off`` as false.
    mode = _enum(PrivacyMode, "off" if raw_mode is False else raw_mode, source,
                 _join(path, "mode"))
    present = {key for key in raw if key != "mode"}

    if mode is PrivacyMode.OFF:
        if present:
            fail(sorted(present)[0], "not allowed when mode is 'off'")
        return PrivacySpec()

    if mode is PrivacyMode.LOCAL:
        extra = present - {"local"}
        if extra:
            fail(sorted(extra)[0], "not allowed when mode is 'local' (set the device's "
                                   "parameters under 'local')")
        if "local" not in raw:
            fail("local", "is required when mode is 'local'")
        return PrivacySpec(mode=mode, local=_local(raw["local"], source, _join(path, "local")))

    # central or distributed
    if "local" in raw:
        fail("local", f"only allowed when mode is 'local', not {mode.value!r}")
    has_z, has_eps = "noise_multiplier" in raw, "target_epsilon" in raw
    if has_z == has_eps:
        fail("noise_multiplier", "set exactly one of 'noise_multiplier' and 'target_epsilon'")
    noise_multiplier = (_positive(raw["noise_multiplier"], source, _join(path, "noise_multiplier"))
                        if has_z else None)
    target_epsilon = (_positive(raw["target_epsilon"], source, _join(path, "target_epsilon"))
                      if has_eps else None)
    if "delta" not in raw:
        fail("delta", "is required (e.g. 1.0e-5, below 1 / population)")
    delta = _number(raw["delta"], source, _join(path, "delta"))
    if not 0 < delta < 1:
        fail("delta", f"must be in (0, 1), got {delta}")
    if "clip" not in raw:
        fail("clip", "is required: an L2 norm, or {target_quantile, initial, learning_rate, "
                     "bit_noise} for adaptive clipping")
    clip = _clip(raw["clip"], source, _join(path, "clip"))
    sampling = _enum(Sampling, raw.get("sampling", Sampling.FIXED_SIZE.value), source,
                     _join(path, "sampling"))
    accounting = _enum(AccountingMethod, raw.get("accounting", "rdp"), source,
                       _join(path, "accounting"))
    if accounting is AccountingMethod.PRV and sampling is Sampling.FIXED_SIZE:
        fail("accounting", "prv supports Poisson sampling only; use rdp for sampling 'fixed'")
    min_noise = None
    if "min_noise_multiplier" in raw:
        if mode is not PrivacyMode.DISTRIBUTED:
            fail("min_noise_multiplier", "only allowed when mode is 'distributed'")
        min_noise = _positive(raw["min_noise_multiplier"], source,
                              _join(path, "min_noise_multiplier"))
        if noise_multiplier is not None and min_noise > noise_multiplier:
            fail("min_noise_multiplier", f"{min_noise} exceeds noise_multiplier "
                                         f"{noise_multiplier}: no round could pass")
    if "population" not in raw:
        fail("population", "is required: the number of devices cohorts are sampled from "
                           "(the sampling rate is clients_per_round / population)")
    population = raw["population"]
    if not isinstance(population, int) or isinstance(population, bool) or population < 1:
        fail("population", f"expected a positive integer, got {_describe(population)}")
    max_epsilon = (_positive(raw["max_epsilon"], source, _join(path, "max_epsilon"))
                   if "max_epsilon" in raw else None)
    if max_epsilon is None and target_epsilon is None:
        fail("max_epsilon", "is required with noise_multiplier: the epsilon budget after which "
                            "no round opens (with target_epsilon it defaults to that)")
    if (max_epsilon is not None and target_epsilon is not None
            and max_epsilon < target_epsilon):
        fail("max_epsilon", f"{max_epsilon} is below target_epsilon {target_epsilon}")
    if (isinstance(clip, AdaptiveClip) and noise_multiplier is not None
            and 2 * clip.bit_noise_std <= noise_multiplier):
        fail("clip.bit_noise", f"must exceed noise_multiplier / 2 = {noise_multiplier / 2} "
                               f"(the clipped-bit count would use the whole budget)")
    return PrivacySpec(mode=mode, noise_multiplier=noise_multiplier,
                       target_epsilon=target_epsilon, delta=delta, clip=clip, sampling=sampling,
                       accounting=accounting, min_noise_multiplier=min_noise,
                       population=population, max_epsilon=max_epsilon)


def privacy_to_dict(spec: PrivacySpec) -> dict[str, Any]:
    """Plain data; ``privacy_from_dict(privacy_to_dict(s), src) == s``."""
    out: dict[str, Any] = {"mode": spec.mode.value}
    if spec.mode is PrivacyMode.OFF:
        return out
    if spec.local is not None:
        out["local"] = {"noise_multiplier": spec.local.noise_multiplier,
                        "max_grad_norm": spec.local.max_grad_norm, "delta": spec.local.delta,
                        "max_epsilon": spec.local.max_epsilon}
        return out
    for key in ("noise_multiplier", "target_epsilon", "delta", "min_noise_multiplier",
                "population", "max_epsilon"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if isinstance(spec.clip, FixedClip):
        out["clip"] = spec.clip.l2_clip_norm
    elif isinstance(spec.clip, AdaptiveClip):
        out["clip"] = {key: getattr(spec.clip, attr) for key, attr in _ADAPTIVE_KEYS.items()}
    out["sampling"] = spec.sampling.value
    out["accounting"] = spec.accounting.value
    return out


# -- helpers --------------------------------------------------------------------------------

def _clip(value: Any, source: str, path: str) -> FixedClip | AdaptiveClip:
    if not isinstance(value, Mapping):
        if not _is_number(value):
            raise PrivacySpecError(
                source, path, f"expected an L2 norm or a mapping with keys "
                              f"{', '.join(_ADAPTIVE_KEYS)}, got {_describe(value)}")
        return FixedClip(_positive(value, source, path))
    _no_unknown_keys(value, tuple(_ADAPTIVE_KEYS), source, path)
    for key in _ADAPTIVE_KEYS:
        if key not in value:
            raise PrivacySpecError(source, _join(path, key), "is required for adaptive clipping")
    quantile = _number(value["target_quantile"], source, _join(path, "target_quantile"))
    if not 0 < quantile < 1:
        raise PrivacySpecError(source, _join(path, "target_quantile"),
                               f"must be in (0, 1), got {quantile}")
    return AdaptiveClip(
        target_quantile=quantile,
        initial_l2_clip_norm=_positive(value["initial"], source, _join(path, "initial")),
        learning_rate=_positive(value["learning_rate"], source, _join(path, "learning_rate")),
        bit_noise_std=_positive(value["bit_noise"], source, _join(path, "bit_noise")))


def _local(value: Any, source: str, path: str) -> LocalDp:
    if not isinstance(value, Mapping):
        raise PrivacySpecError(source, path, f"expected a mapping, got {_describe(value)}")
    _no_unknown_keys(value, _LOCAL_KEYS, source, path)
    for key in _LOCAL_KEYS:
        if key not in value:
            raise PrivacySpecError(source, _join(path, key), "is required")
    delta = _number(value["delta"], source, _join(path, "delta"))
    if not 0 < delta < 1:
        raise PrivacySpecError(source, _join(path, "delta"), f"must be in (0, 1), got {delta}")
    return LocalDp(
        noise_multiplier=_positive(value["noise_multiplier"], source,
                                   _join(path, "noise_multiplier")),
        max_grad_norm=_positive(value["max_grad_norm"], source, _join(path, "max_grad_norm")),
        delta=delta,
        max_epsilon=_positive(value["max_epsilon"], source, _join(path, "max_epsilon")))


E = typing.TypeVar("E", bound=enum.Enum)


def _enum(tp: type[E], value: Any, source: str, path: str) -> E:
    for member in tp:
        if value == member.value or value is member:
            return member
    choices = ", ".join(repr(m.value) for m in tp)
    raise PrivacySpecError(source, path, f"expected one of {choices}, got {_describe(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, source: str, path: str) -> float:
    if not _is_number(value):
        hint = ""
        if isinstance(value, str) and _parses_as_float(value):
            hint = " (YAML reads 1e-5 as a string: write 1.0e-5)"
        raise PrivacySpecError(source, path, f"expected a number, got {_describe(value)}{hint}")
    if not math.isfinite(value):
        raise PrivacySpecError(source, path, f"must be finite, got {value}")
    return float(value)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _positive(value: Any, source: str, path: str) -> float:
    number = _number(value, source, path)
    if number <= 0:
        raise PrivacySpecError(source, path, f"must be positive, got {number}")
    return number


def _no_unknown_keys(raw: Mapping[Any, Any], known: tuple[str, ...], source: str,
                     path: str) -> None:
    for key in raw:
        if key not in known:
            raise PrivacySpecError(source, _join(path, str(key)),
                                   f"unknown field (expected one of: {', '.join(sorted(known))})")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
