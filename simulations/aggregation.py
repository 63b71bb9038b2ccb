"""How a simulated round turns the cohort's deltas into one mean delta: exactly as the
coordinator does, with the coordinator's code.

* plain: the example-weighted mean (:func:`core.aggregation.fedavg.weighted_mean`);
* ``secure_aggregation``: every device encodes its delta (:mod:`core.secagg.encoding`), the
  cohort runs a real SecAgg+ round in this process (:func:`core.secagg.inprocess.run_round`:
  key agreement, Shamir shares, AES-CTR masks, unmasking) and the mean is decoded from the
  unmasked integer sum, so quantization error and clipping counts are those of production;
* ``privacy: {mode: central}``: devices clip their whole delta to C, the sum gets Gaussian
  noise of std z C and is divided by ``clients_per_round`` (the coordinator's
  :class:`core.privacy.task.TaskPrivacy`, which also keeps the accountant's epsilon
  per round). Noise comes from a seeded source: simulations must be reproducible.

Both together: devices clip, then encode with weight 1; noise is added after unmasking.

``aggregation.robust`` (:mod:`core.aggregation.robust`): in plain rounds the rule replaces
the weighted mean (``robust_kept`` and the norm bound's metrics are reported). Under secure
aggregation or central DP only a fixed ``norm_bound`` applies: each device scales its delta
to the bound before it is encoded (or before the DP clip); other rules are refused when the
aggregator is built (:func:`~core.aggregation.robust.check_rule_applies` says why).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

import numpy as np

from core.aggregation.fedavg import weighted_mean
from core.aggregation.robust import check_rule_applies, robust_aggregate
from core.privacy.adaptive_clipping import clipped_bit
from core.privacy.clipping import clip_to_l2_norm
from core.privacy.noise import NoiseSource
from core.privacy.spec import PrivacyMode, PrivacySpec
from core.privacy.task import TaskPrivacy
from core.sampling import CohortDraw
from core.secagg import encoding
from core.secagg.inprocess import run_round
from core.secagg.params import derive
from core.types import ModelSpec, RobustAggregation, RobustKind, SecureAggregation
from simulations.central_dp import selection_draw, task_privacy

State = dict[str, np.ndarray]


class CohortAggregator:
    """Not thread-safe; one per simulation (it keeps the privacy accountant's history).

    Raises:
        RobustAggregationError: ``robust`` names a rule that cannot run under the task's
            secure aggregation or central DP.
    """

    def __init__(self, *, model: ModelSpec, rounds: int, clients_per_round: int, seed: int,
                 secure_aggregation: SecureAggregation | None = None,
                 privacy: PrivacySpec | None = None,
                 robust: RobustAggregation | None = None) -> None:
        self.secure_aggregation = secure_aggregation
        self.robust = robust if robust is not None else RobustAggregation()
        central = privacy is not None and privacy.mode is PrivacyMode.CENTRAL
        check_rule_applies(self.robust, secure=secure_aggregation is not None,
                           central_dp=central)
        self.metrics: dict[str, float] = {}
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EC]))
        self._seed = seed
        #: Central DP: the coordinator's state (clip, noise, accountant, budget).
        self.privacy: TaskPrivacy | None = task_privacy(
            name="simulation", model=model, rounds=rounds, clients_per_round=clients_per_round,
            privacy=privacy)
        self._noise = NoiseSource.seeded(seed)
        self._rounds = 0
        self._draw: CohortDraw | None = None

    def begin_round(self, *, available: int, admitted: int) -> None:
        """What this round's selection did: ``admitted`` drawn uniformly from the
        ``available`` devices (the accountant's input under DP)."""
        if self.privacy is not None:
            self._draw = selection_draw(self.privacy, available=available, admitted=admitted)

    @property
    def epsilon(self) -> float | None:
        return self.metrics.get("dp_epsilon")

    def mean_delta(self, global_params: Mapping[str, np.ndarray],
                   trained: Mapping[str, np.ndarray], num_examples: Sequence[int]) -> State:
        """``trained[name]`` is stacked ``[devices, ...]`` in cohort order."""
        self._rounds += 1
        names = list(global_params)
        count = len(num_examples)
        flat = np.concatenate([
            (np.asarray(trained[n], dtype=np.float64) - global_params[n]).reshape(count, -1)
            for n in names], axis=1)
        self.metrics = {}
        rule = self.robust
        masked_or_private = self.secure_aggregation is not None or self.privacy is not None
        if rule.kind is RobustKind.NORM_BOUND and masked_or_private:
            # Each device's own step, before encoding or the DP clip (the bound is fixed:
            # check_rule_applies refused an adaptive one).
            assert rule.norm_bound is not None
            bound = rule.norm_bound
            flat = np.stack([clip_to_l2_norm(row, l2_clip_norm=bound)[0] for row in flat])
        unclipped: float | None = None
        if self.privacy is not None:
            clip = self.privacy.clip
            clipped = [clip_to_l2_norm(row, l2_clip_norm=clip) for row in flat]
            flat = np.stack([row for row, _ in clipped])
            weights = [1] * count
            if self.privacy.adaptive is not None:
                # Each device's bit, summed (in the clear or in the SecAgg ring alike).
                unclipped = float(sum(clipped_bit(norm, l2_clip_norm=clip)
                                      for _, norm in clipped))
        else:
            weights = [int(n) for n in num_examples]
        if self.secure_aggregation is not None and count >= 3:
            mean, denominator = self._secure_mean(flat, weights, self._rounds)
        elif rule.kind is not RobustKind.MEAN and not masked_or_private:
            result = robust_aggregate(flat, [float(w) for w in weights], rule)
            self.metrics.update(result.metrics)
            return unflatten(result.mean, global_params)
        else:
            denominator = sum(weights)
            mean = weighted_mean(list(flat), [float(w) for w in weights])
        if self.privacy is not None:
            assert self._draw is not None, "begin_round first: DP accounts the round's draw"
            release = self.privacy.release(mean * denominator, unclipped, draw=self._draw,
                                           source=self._noise, require_secure=False)
            self.privacy.committed(release)
            self.metrics.update(release.metrics)
            mean = release.mean.astype(np.float64)
        return unflatten(mean, global_params)

    def _secure_mean(self, flat: np.ndarray, weights: list[int], round_index: int
                     ) -> tuple[np.ndarray, int]:
        sa = self.secure_aggregation
        assert sa is not None
        if self.privacy is not None:
            sa = dataclasses.replace(sa, weight_cap=1)
        params = derive(sa, len(weights))
        inputs = {i: encoding.encode_update(row, w, params, self._rng)
                  for i, (row, w) in enumerate(zip(flat, weights, strict=True))}
        context = f"simulation/{self._seed}/round/{round_index}".encode()
        out = run_round(params, {i: e.vector for i, e in inputs.items()}, context=context,
                        rng=random.Random(self._seed * 1_000_003 + round_index))
        mean, weight = encoding.decode_mean(out.result.total, len(out.result.survivors), params)
        self.metrics.update({
            "secagg_neighbours": float(params.neighbours),
            "secagg_threshold": float(params.threshold),
            "secagg_clipped_values": float(sum(e.clipped for e in inputs.values())),
            "secagg_max_error": encoding.max_mean_error(len(out.result.survivors), weight,
                                                        params),
        })
        return mean, weight


def unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> State:
    """``flat`` (the tensors of ``like`` concatenated in order) cut back into ``like``'s
    shapes and dtypes."""
    out: State = {}
    offset = 0
    for name, value in like.items():
        size = value.size
        out[name] = flat[offset:offset + size].reshape(value.shape).astype(value.dtype)
        offset += size
    return out
