"""A KLL quantile sketch (Karnin, Lang, Liberty 2016) as pure functions: build one from a
device's per-example values, merge devices' sketches, read quantiles with a rank-error bound.
It is mergeable but not linear (a merge compacts), so it travels only in clear reports:
under secure aggregation or DP the fixed-bin histograms of :mod:`core.evaluation.sketch`
stay (their merge is a sum, which masking and noise preserve).

**Why our own and not Apache DataSketches' ``kll_floats_sketch``** (the ``datasketches``
wheel, 5.2.0): the coordinator reads sketches that devices send, and that binding's
``deserialize`` is not safe on untrusted bytes: a valid 20-byte KLL header followed by 0-2
bytes ends the process with a segmentation fault
(``kll_floats_sketch.deserialize(good[:21])``, ``good`` any serialized sketch of more than
one item), and bit flips crash it or corrupt the heap. Here a sketch from a device is not
parsed from a byte format at all: its level sizes follow from its item count and ``k``
(:func:`level_sizes`, the schedule of :func:`build`), so the report carries only the items
(float32, in the report vector) and :func:`parse_items` checks every one of them.

**Structure.** Level ``h`` holds sorted items of weight ``2**h``; the weights sum to ``n``
exactly. Level ``h`` of ``H`` levels has a capacity of ``max(8, ceil(k (2/3)**(H-1-h)))``
items; while the sketch holds more items than all capacities together, its lowest level
over capacity is *compacted*: sorted, one item left behind when the count is odd, and of
the rest every other item (from a random offset, 0 or 1) is promoted with twice the weight.
A compaction of weight-``w`` items moves the estimated rank of any one value by ``-w``, 0
or ``+w``, with mean 0 whatever happened before (the offset is a fair coin), so the errors
of all compactions form a martingale and, by Azuma-Hoeffding,

    P(|estimated rank - true rank| >= t) <= 2 exp(-t^2 / (2 V)),   V = sum of w^2

for any one value. The sketch tracks ``V`` (:attr:`KllSketch.variance`; merges add it up),
and :func:`rank_error_bound` turns it into the normalized bound released with quantiles:
the true rank of each released quantile is within it of its q, with the stated confidence.
The bound assumes devices built their sketches honestly (with fair coins); the coordinator
checks what it can: the count, the level sizes, the order and range of every item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: The default accuracy parameter: at most 684 items retained for up to 2**20 values
#: (:func:`max_items`); rank-error bounds of 1-2% of n in the tests.
DEFAULT_K = 200
MIN_K, MAX_K = 8, 4096
#: The smallest capacity of a level.
_MIN_WIDTH = 8
_DECAY = 2.0 / 3.0


@dataclass(frozen=True)
class KllSketch:
    """``levels[h]``: sorted items of weight ``2**h`` (float64); ``n``: the weighted count
    (the number of values sketched); ``variance``: the sum of the squared weights of every
    compaction that made it (0 for an exact sketch). Immutable; build with :func:`build`,
    :func:`merge` or :func:`parse_items`."""

    k: int
    n: int
    levels: tuple[npt.NDArray[np.float64], ...]
    variance: float

    @property
    def retained(self) -> int:
        return sum(len(level) for level in self.levels)

    def items(self) -> npt.NDArray[np.float64]:
        """Every level's items, level 0 first (the order of the report, :func:`to_items`)."""
        return (np.concatenate(self.levels) if self.levels
                else np.zeros(0, dtype=np.float64))


def capacity(h: int, height: int, k: int) -> int:
    """The capacity of level ``h`` of ``height`` levels: beyond it, the level is the one
    compacted when the sketch as a whole is over its total capacity."""
    return max(_MIN_WIDTH, math.ceil(k * _DECAY ** (height - 1 - h)))


def _check_k(k: int) -> None:
    if not MIN_K <= k <= MAX_K:
        raise ValueError(f"the KLL parameter k must be between {MIN_K} and {MAX_K}, got {k}")


def build(values: npt.ArrayLike, *, k: int = DEFAULT_K, rng: np.random.Generator
          ) -> KllSketch:
    """The sketch of ``values`` (one batch: the level sizes, hence :func:`level_sizes`,
    depend only on the count and ``k``; the items on the values and ``rng``'s coins).

    Raises:
        ValueError: a NaN value, or ``k`` outside [8, 4096].
    """
    _check_k(k)
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if np.isnan(v).any():
        raise ValueError("a KLL sketch cannot hold NaN")
    levels, variance = _compacted([v], k, rng)
    return KllSketch(k, int(v.size), levels, variance)


def merge(sketches: Sequence[KllSketch], *, rng: np.random.Generator) -> KllSketch:
    """One sketch of everything ``sketches`` hold: levels concatenated, then compacted;
    the variances add up.

    Raises:
        ValueError: no sketch, or sketches of different ``k``.
    """
    if not sketches:
        raise ValueError("merging needs at least one sketch")
    k = sketches[0].k
    if any(s.k != k for s in sketches):
        raise ValueError(f"cannot merge KLL sketches of different k: "
                         f"{sorted({s.k for s in sketches})}")
    height = max(len(s.levels) for s in sketches)
    levels = [np.sort(np.concatenate([s.levels[h] for s in sketches if h < len(s.levels)]))
              for h in range(height)]
    merged, variance = _compacted(levels, k, rng)
    return KllSketch(k, sum(s.n for s in sketches), merged,
                     math.fsum(s.variance for s in sketches) + variance)


def _compacted(levels: list[npt.NDArray[np.float64]], k: int, rng: np.random.Generator
               ) -> tuple[tuple[npt.NDArray[np.float64], ...], float]:
    """``levels`` (each sorted) compacted until they hold at most their capacities' total,
    and the variance the compactions added. Each compaction removes at least 4 items (a
    level over a capacity of at least 8), so this ends."""
    levels = list(levels)
    variance = 0.0
    while True:
        over = _to_compact([len(level) for level in levels], k)
        if over is None:
            return tuple(levels), variance
        height = len(levels)
        level = levels[over]
        even = len(level) - len(level) % 2
        # The largest item stays behind when the count is odd.
        promoted = level[int(rng.integers(2)):even:2]
        levels[over] = level[even:]
        if over + 1 == height:
            levels.append(promoted)
        else:
            levels[over + 1] = np.sort(np.concatenate([levels[over + 1], promoted]))
        variance += float(4 ** over)


def _to_compact(sizes: Sequence[int], k: int) -> int | None:
    """The level to compact next: none while the sketch holds no more items than its levels'
    capacities together (so a batch keeps as many as fit), else the lowest level over its
    own capacity (there is one)."""
    height = len(sizes)
    if sum(sizes) <= sum(capacity(h, height, k) for h in range(height)):
        return None
    return next(h for h in range(height) if sizes[h] > capacity(h, height, k))


def level_sizes(n: int, k: int) -> tuple[int, ...]:
    """The level sizes of :func:`build` over ``n`` values: the same for any values and
    coins, so a device's report needs only its items.

    Raises:
        ValueError: ``n`` < 0, or ``k`` outside [8, 4096].
    """
    return _schedule(n, k)[0]


def build_variance(n: int, k: int) -> float:
    """The variance :func:`build` adds over ``n`` values (its compactions are the same for
    any values), computed by the coordinator rather than taken from a device."""
    return _schedule(n, k)[1]


def _schedule(n: int, k: int) -> tuple[tuple[int, ...], float]:
    """:func:`_compacted` on counts alone: the level sizes and the variance of a build."""
    if n < 0:
        raise ValueError(f"a count of values must be >= 0, got {n}")
    _check_k(k)
    sizes = [n]
    variance = 0.0
    while True:
        over = _to_compact(sizes, k)
        if over is None:
            return tuple(sizes), variance
        height = len(sizes)
        promoted = sizes[over] // 2
        sizes[over] %= 2
        if over + 1 == height:
            sizes.append(promoted)
        else:
            sizes[over + 1] += promoted
        variance += float(4 ** over)


def max_items(max_n: int, k: int) -> int:
    """An upper bound on the items of a :func:`build` sketch of at most ``max_n`` values
    (the length of its region in a report): never more than the values, nor than the total
    capacity of ``floor(log2(max_n)) + 1`` levels (the top level's weight is at most n,
    and the total capacity grows with the levels)."""
    if max_n < 1:
        return 0
    height = max_n.bit_length()
    return min(max_n, sum(capacity(h, height, k) for h in range(height)))


def to_items(sketch: KllSketch, length: int) -> npt.NDArray[np.float64]:
    """The sketch's items (level 0 first, each level sorted), zero-padded to ``length``:
    its region of a report. Raises ValueError when it holds more than ``length``."""
    items = sketch.items()
    if items.size > length:
        raise ValueError(f"the sketch holds {items.size} items, its region {length}")
    out = np.zeros(length, dtype=np.float64)
    out[:items.size] = items
    return out


def items_problem(region: npt.NDArray[np.floating], n: int, *, k: int, low: float,
                  high: float) -> str | None:
    """Why ``region`` is not the report region of a :func:`build` sketch of ``n`` values
    within [low, high] (a message for the device), or None."""
    r = np.asarray(region, dtype=np.float64)
    sizes = level_sizes(n, k)
    used = sum(sizes)
    if used > r.size:
        return f"a sketch of {n} values holds {used} items; the region has {r.size}"
    if not np.isfinite(r).all():
        return "the sketch holds NaN or infinite values"
    if np.any(r[used:] != 0.0):
        return f"the sketch of {n} values holds {used} items; the rest of its region must be 0"
    items = r[:used]
    if items.size and not (low <= items.min() and items.max() <= high):
        return (f"a sketch item is outside the metric's range [{low:g}, {high:g}] "
                f"(min {items.min():g}, max {items.max():g})")
    start = 0
    for h, size in enumerate(sizes):
        if np.any(np.diff(items[start:start + size]) < 0):
            return f"level {h} of the sketch is not sorted"
        start += size
    return None


def parse_items(region: npt.NDArray[np.floating], n: int, *, k: int) -> KllSketch:
    """The sketch whose report region is ``region`` (checked with :func:`items_problem`
    first), with the variance its :func:`build` added."""
    r = np.asarray(region, dtype=np.float64)
    levels = []
    start = 0
    for size in level_sizes(n, k):
        levels.append(r[start:start + size].copy())
        start += size
    return KllSketch(k, n, tuple(levels), build_variance(n, k))


def quantiles(sketch: KllSketch, qs: Sequence[float]) -> list[float]:
    """The ``qs`` quantiles (each in [0, 1]): the smallest item whose estimated rank (the
    weight of the items at or below it) reaches ``q n``; q = 0 gives the smallest item.
    NaN for each when the sketch is empty.

    Raises:
        ValueError: a q outside [0, 1].
    """
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be in [0, 1], got {list(qs)}")
    if sketch.n == 0:
        return [math.nan for _ in qs]
    items = sketch.items()
    weights = np.concatenate([np.full(len(level), 2.0 ** h)
                              for h, level in enumerate(sketch.levels)])
    order = np.argsort(items, kind="stable")
    cumulative = np.cumsum(weights[order])
    out = []
    for q in qs:
        j = int(np.searchsorted(cumulative, q * sketch.n, side="left"))
        out.append(float(items[order[min(j, items.size - 1)]]))
    return out


def rank(sketch: KllSketch, value: float) -> float:
    """The estimated normalized rank of ``value``: the weight of the items <= it, over n
    (NaN for an empty sketch)."""
    if sketch.n == 0:
        return math.nan
    total = math.fsum(float((level <= value).sum()) * 2.0 ** h
                      for h, level in enumerate(sketch.levels))
    return total / sketch.n


def rank_error_bound(sketch: KllSketch, *, confidence: float = 0.99) -> float:
    """A bound on the normalized rank error of one released quantile, holding with
    probability ``confidence``: ``sqrt(2 V ln(4 / (1 - confidence))) / n``. (A quantile's
    true rank is within the bound of q when the Azuma bound holds at the two values whose
    true ranks are q -/+ the bound, hence ``1 - confidence`` split between two.) 0 for an
    exact sketch, NaN for an empty one.

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if sketch.n == 0:
        return math.nan
    return math.sqrt(2.0 * sketch.variance * math.log(4.0 / (1.0 - confidence))) / sketch.n
