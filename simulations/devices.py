"""Simulated devices: speed, availability, latency and dropout, and a simulated clock that
decides, round by round, whose work the server aggregates.

A device's profile is drawn once from the simulation seed (or read from a CSV trace):
``speed`` (training examples per simulated second; a step costs ``batch_size`` examples),
``availability`` (chance to be online in a round), ``latency_s`` (download plus upload) and
``dropout`` (chance to vanish during a round).

A round, as the coordinator runs it (:mod:`coordinator.rounds`), on a simulated clock that
starts at 0 when training starts:

1. Online devices (a Bernoulli draw per device) are the candidates; ``clients_per_round x
   over_selection`` of them are admitted with :func:`core.sampling.sample_uniform`.
2. An admitted device needs ``latency + steps * batch_size / speed`` seconds for its full
   ``epochs``. With a deadline, it finishes only the steps that fit before it. Stragglers
   (``straggler_fraction`` of the admitted, FedProx's systems heterogeneity) can do only a
   uniformly random number of epochs in ``[1, epochs)`` (steps in ``[1, steps)`` when
   ``epochs`` is 1), whatever the deadline.
3. A device that did not finish is dropped (a straggler), or, with ``keep_partial_work``,
   reports the steps it did at the deadline. Dropouts never report.
4. Reports in order of arrival: the first ``clients_per_round`` are aggregated, later ones
   are late. Fewer than ``min_reports`` and the round fails (the model stays as it was).

Trace CSV: a header with ``device`` (0-based index) and any of ``speed``, ``availability``,
``latency_s``, ``dropout``; each row overrides the named device's drawn values.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.sampling import sample_uniform
from core.types import LocalTraining
from simulations.config import Distribution, DistributionKind, HeterogeneityConfig, SelectionConfig
from simulations.errors import SimulationConfigError

_TRACE_COLUMNS = ("speed", "availability", "latency_s", "dropout")


@dataclass(frozen=True, eq=False)
class DeviceProfiles:
    """Per-device float64 arrays, ``[num_devices]`` each."""

    speed: np.ndarray
    availability: np.ndarray
    latency_s: np.ndarray
    dropout: np.ndarray


def draw(distribution: Distribution, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` float64 draws of ``distribution``."""
    if distribution.kind is DistributionKind.UNIFORM:
        return rng.uniform(distribution.low, distribution.high, size)
    if distribution.kind is DistributionKind.LOGNORMAL:
        return rng.lognormal(distribution.mu, distribution.sigma, size)
    return np.full(size, distribution.value, dtype=np.float64)


def device_profiles(config: HeterogeneityConfig, num_devices: int, *, seed: int,
                    base_dir: str = ".") -> DeviceProfiles:
    """The devices' profiles: drawn from ``config``'s distributions with ``seed``, then
    overridden by the trace file's rows.

    Raises:
        SimulationConfigError: the trace cannot be read, or has a bad header or value.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    columns = {
        "speed": draw(config.speed, num_devices, rng),
        "availability": np.clip(draw(config.availability, num_devices, rng), 0.0, 1.0),
        "latency_s": draw(config.latency_s, num_devices, rng),
        "dropout": np.full(num_devices, config.dropout),
    }
    if config.trace:
        _apply_trace(Path(base_dir) / config.trace, columns, num_devices)
    return DeviceProfiles(**columns)


def _apply_trace(path: Path, columns: dict[str, np.ndarray], num_devices: int) -> None:
    source = str(path)

    def fail(message: str) -> SimulationConfigError:
        return SimulationConfigError(source, "heterogeneity.trace", message)

    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    unknown = [c for c in header if c not in ("device", *_TRACE_COLUMNS)]
    if "device" not in header or unknown:
        raise fail(f"the header needs 'device' and any of {', '.join(_TRACE_COLUMNS)}; "
                   f"got {', '.join(header) or 'nothing'}")
    for line, row in enumerate(rows, start=2):
        try:
            device = int(row["device"])
            values = {c: float(row[c]) for c in _TRACE_COLUMNS if c in row and row[c] != ""}
        except (TypeError, ValueError):
            raise fail(f"line {line}: expected numbers, got {dict(row)}") from None
        if not 0 <= device < num_devices:
            raise fail(f"line {line}: device {device} out of range for {num_devices} devices")
        for column, value in values.items():
            bounded = column in ("availability", "dropout")
            if not math.isfinite(value) or value < 0 or (bounded and value > 1):
                raise fail(f"line {line}: {column} {value} out of range")
            columns[column][device] = value


@dataclass(frozen=True)
class DeviceWork:
    """An aggregated device: the steps it did (all of them when ``complete``) and when its
    report arrived, in simulated seconds after the round started."""

    device: int
    steps: int
    complete: bool
    arrival_s: float


@dataclass(frozen=True)
class RoundPlan:
    """Who was online, admitted, and whose work is used; counts of the rest."""

    available: int
    admitted: tuple[int, ...]
    used: tuple[DeviceWork, ...]
    dropped_out: int
    stragglers: int
    late: int
    committed: bool
    duration_s: float

    @property
    def partial(self) -> int:
        """Used devices that reported partial work."""
        return sum(not w.complete for w in self.used)


def plan_round(round_index: int, *, profiles: DeviceProfiles, sizes: np.ndarray | Sequence[int],
               selection: SelectionConfig, local: LocalTraining, straggler_fraction: float,
               seed: int, attempt: int = 1) -> RoundPlan:
    """Decides attempt ``attempt`` of round ``round_index`` as the module docstring says.
    Deterministic in its arguments (each attempt draws afresh); no training happens here,
    so the work of devices whose reports would be thrown away is never computed. ``sizes``
    (training examples per device) is read for the admitted devices only."""
    entropy = [seed, round_index, 0xC10C] + ([attempt] if attempt > 1 else [])
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    online = np.flatnonzero(rng.random(len(sizes)) < profiles.availability)
    chooser = random.Random(int(rng.integers(1 << 62)))
    admitted = sample_uniform(online.tolist(), selection.admitted, chooser)
    stragglers = set(chooser.sample(admitted, int(round(straggler_fraction * len(admitted)))))
    deadline = selection.round_deadline_s
    reports: list[DeviceWork] = []
    dropped_out = missed = 0
    for device in admitted:
        n = int(sizes[device])
        per_epoch = math.ceil(n / local.batch_size)
        full = local.epochs * per_epoch
        budget = full
        if device in stragglers:
            budget = (int(rng.integers(1, local.epochs)) * per_epoch if local.epochs > 1
                      else int(rng.integers(1, full)) if full > 1 else 0)
        latency = float(profiles.latency_s[device])
        seconds_per_step = local.batch_size / max(float(profiles.speed[device]), 1e-12)
        if deadline > 0:
            budget = min(budget, max(0, math.floor((deadline - latency) / seconds_per_step)))
        if rng.random() < profiles.dropout[device]:
            dropped_out += 1
            continue
        complete = budget >= full
        if not complete and not (selection.keep_partial_work and budget > 0):
            missed += 1
            continue
        arrival = latency + budget * seconds_per_step
        if not complete and deadline > 0:
            arrival = deadline
        reports.append(DeviceWork(device, budget, complete, arrival))
    reports.sort(key=lambda w: (w.arrival_s, w.device))
    used = tuple(reports[:selection.clients_per_round])
    committed = len(used) >= selection.min_reports
    if len(used) == selection.clients_per_round or deadline <= 0:
        duration = max((w.arrival_s for w in used), default=0.0)
    else:
        duration = deadline
    return RoundPlan(available=len(online), admitted=tuple(admitted), used=used,
                     dropped_out=dropped_out, stragglers=missed,
                     late=len(reports) - len(used), committed=committed, duration_s=duration)
