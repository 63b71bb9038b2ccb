"""What a task's spec implies at run time, derived once: its privacy state, its secure
aggregation parameters, its selection policy and what devices are told about privacy; and the
refusals, at launch, of what the coordinator cannot run or its analysis does not cover."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from coordinator.rounds.aggregators import MAX_ROBUST_UPDATE_BYTES
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.selection import SelectionPolicy
from core.aggregation.robust import RobustAggregationError, check_rule_applies
from core.errors import CoreError
from core.privacy.accounting import Sampling
from core.privacy.errors import PrivacyError
from core.privacy.spec import FixedClip, PrivacyMode
from core.privacy.task import TaskPrivacy
from core.protocol import PlanPrivacy
from core.secagg import encoding
from core.secagg.params import SecAggParamError, SecAggParams, derive
from core.types import AggregationMode, RobustKind, TaskSpec

#: Without DP the analysis needs no population: selection draws from whatever it sees.
_UNBOUNDED_POPULATION = 1 << 62


def check_supported(spec: TaskSpec) -> None:
    """Raises InvalidRequest (naming the field) for a task the coordinator must not run: a
    DP task without a budget, Poisson sampling with secure aggregation (a random cohort size),
    a cohort larger than the population, distributed DP with adaptive clipping, a model local
    DP cannot train."""
    _check_aggregation(spec)
    privacy = spec.privacy
    if privacy is None:
        return
    if privacy.mode in (PrivacyMode.CENTRAL, PrivacyMode.DISTRIBUTED):
        if privacy.budget is None:
            raise InvalidRequest("spec.privacy.max_epsilon: a DP task needs a budget (or "
                                 "target_epsilon, which is then the budget)")
        assert privacy.population is not None
        if spec.selection_target > privacy.population:
            raise InvalidRequest(
                f"spec.privacy.population: {privacy.population} devices cannot supply a "
                f"cohort of {spec.selection_target} (clients_per_round x over_selection)")
        if privacy.sampling is Sampling.POISSON and spec.secure_aggregation is not None:
            raise InvalidRequest(
                "spec.privacy.sampling: poisson makes the cohort size random, but secure "
                "aggregation's parameters are derived for a fixed cohort; use sampling: fixed")
    if privacy.mode is PrivacyMode.DISTRIBUTED and not isinstance(privacy.clip, FixedClip):
        raise InvalidRequest("spec.privacy.clip: distributed DP needs a fixed clip norm "
                             "(adaptive clipping is supported in central mode)")
    if privacy.mode is PrivacyMode.LOCAL:
        from core.models import build_model, model_hooks  # torch: imported only when needed
        from core.privacy.local_model import check_local_dp_model

        if model_hooks(spec.model.architecture).loss is not None:
            raise InvalidRequest(
                f"spec.privacy.mode: local DP-SGD trains with cross-entropy on class logits; "
                f"the app's loss of {spec.model.architecture!r} would be ignored, so the task "
                f"is refused (use central DP, or a model without its own loss)")

        try:
            check_local_dp_model(build_model(spec.model))
        except (CoreError, PrivacyError) as exc:
            raise InvalidRequest(f"spec.model: {exc}") from None


def _check_aggregation(spec: TaskSpec) -> None:
    """What of the ``aggregation`` section this coordinator runs: synchronous rounds with
    example-weighted FedAvg or a robust rule on clear uploads, and asynchronous FedBuff
    (:mod:`coordinator.rounds.asynchronous`) with example-weighted FedAvg or central DP on
    clear uploads only: the simulator's refusals, for the same reasons."""
    aggregation = spec.aggregation
    if aggregation.mode is AggregationMode.ASYNC:
        if spec.secure_aggregation is not None:
            raise InvalidRequest(
                "spec.aggregation.mode: 'async' cannot run with secure_aggregation: SecAgg+ "
                "masks cancel only over a fixed group of devices that report together, and a "
                "FedBuff buffer mixes devices that started on different versions; use mode: "
                "sync")
        _check_async_privacy(spec)
        if aggregation.robust.kind is not RobustKind.MEAN:
            raise InvalidRequest(
                f"spec.aggregation.mode: 'async' cannot run with aggregation.robust.kind "
                f"{aggregation.robust.kind.value!r}: the robust rules score a round's cohort "
                "together, and a FedBuff buffer weighs each upload by its staleness; use "
                "kind: mean, or mode: sync")
        return
    _check_robust(spec)


def _check_async_privacy(spec: TaskSpec) -> None:
    """Central DP runs asynchronously (each version one noised release, accounted without
    amplification: :mod:`core.privacy.task`) with a fixed-size analysis only; local DP runs
    as in synchronous rounds (each device accounts its own training)."""
    privacy = spec.privacy
    if privacy is None or privacy.mode is PrivacyMode.LOCAL:
        return
    if privacy.mode is PrivacyMode.DISTRIBUTED:
        raise InvalidRequest(
            "spec.privacy.mode: 'distributed' needs secure aggregation, which asynchronous "
            "aggregation cannot run; use mode: central (the coordinator noises each buffer) "
            "or aggregation.mode: sync")
    if privacy.sampling is Sampling.POISSON:
        raise InvalidRequest(
            "spec.privacy.sampling: 'poisson' does not apply to aggregation.mode 'async': "
            "nobody is sampled, every version is accounted as if every device of the "
            "population took part (no amplification, replace-one); use sampling: fixed")


def _check_robust(spec: TaskSpec) -> None:
    """A robust rule runs on clear uploads (:class:`~coordinator.rounds.aggregators.
    RobustAggregator`): refused under secure aggregation or central/distributed DP for the
    reasons :func:`~core.aggregation.robust.check_rule_applies` gives (the simulator's
    refusals), and here also ``norm_bound`` there, since devices are not told a bound to
    clip to before masking (under central DP with a fixed clip, the clip norm is that
    bound); and refused when the round's updates would not fit in
    :data:`~coordinator.rounds.aggregators.MAX_ROBUST_UPDATE_BYTES`."""
    rule = spec.aggregation.robust
    if rule.kind is RobustKind.MEAN:
        return
    privacy = spec.privacy
    secure = spec.secure_aggregation is not None
    central = privacy is not None and privacy.mode in (PrivacyMode.CENTRAL,
                                                       PrivacyMode.DISTRIBUTED)
    try:
        check_rule_applies(rule, secure=secure, central_dp=central)
    except RobustAggregationError as exc:
        raise InvalidRequest(f"spec.{exc}") from None
    if central:
        raise InvalidRequest(
            "spec.aggregation.robust.kind: 'norm_bound' under central or distributed DP: the "
            "DP clip already bounds every update; set privacy.clip to the bound instead")
    if secure:
        return  # a fixed bound: devices clip to it before masking (plan_privacy tells them)
    from core.models import build_model  # torch: imported only when needed

    try:
        size = sum(int(p.numel()) for p in build_model(spec.model).state_dict().values())
    except CoreError as exc:
        raise InvalidRequest(f"spec.model: {exc}") from None
    needed = spec.selection_target * size * 4
    if needed > MAX_ROBUST_UPDATE_BYTES:
        raise InvalidRequest(
            f"spec.aggregation.robust.kind: {rule.kind.value!r} holds every update of a round "
            f"in memory: {spec.selection_target} devices x {size:,} parameters x 4 bytes = "
            f"{needed / (1 << 20):,.0f} MiB, above the coordinator's "
            f"{MAX_ROBUST_UPDATE_BYTES >> 20} MiB; lower clients_per_round or use 'mean'")


def task_privacy(spec: TaskSpec, committed: Sequence[Mapping[str, float]]
                 ) -> TaskPrivacy | None:
    """The central/distributed DP state given the committed rounds' metrics (None without)."""
    try:
        return TaskPrivacy.for_task(spec, committed)
    except ValueError as exc:
        raise InvalidRequest(f"spec.privacy: {exc}") from None


def secagg_params(spec: TaskSpec, privacy: TaskPrivacy | None) -> SecAggParams | None:
    """The task's secure-aggregation parameters. Under DP every device weighs 1 (weight_cap
    1: the update is encoded unscaled and the weight coordinate counts devices). Distributed
    DP also sets the per-coordinate range to the L2 clip C (nothing clipped twice) and leaves
    the ring headroom for the devices' integer noise, whose total std (in quantization steps)
    it hands to ``privacy``."""
    if spec.secure_aggregation is None:
        return None
    config = spec.secure_aggregation
    if privacy is not None:
        config = replace(config, weight_cap=1)
        if privacy.distributed:
            config = replace(config, clip=privacy.clip, bits=encoding.distributed_value_bits(
                spec.selection_target, privacy.noise_multiplier))
    try:
        params = derive(config, spec.selection_target)
    except SecAggParamError as exc:
        raise InvalidRequest(f"spec.secure_aggregation: {exc}") from None
    if privacy is not None and privacy.distributed:
        if params.ring_bits != 32:
            raise InvalidRequest("spec.secure_aggregation: distributed DP needs the 32-bit ring")
        privacy.distributed_noise_steps = encoding.noise_std_in_steps(
            params, privacy.noise_multiplier)
    return params


def selection_policy(spec: TaskSpec) -> SelectionPolicy:
    """Uniform fixed-size selection with late admission without DP; under central or
    distributed DP the sampling the task's accountant analyses, and no late admission."""
    privacy = spec.privacy
    if privacy is None or privacy.population is None:
        return SelectionPolicy(Sampling.FIXED_SIZE, spec.selection_target,
                               population=_UNBOUNDED_POPULATION, late_admission=True)
    return SelectionPolicy(privacy.sampling, spec.selection_target,
                           population=privacy.population, late_admission=False,
                           min_cohort=spec.min_reports)


def plan_privacy(spec: TaskSpec, privacy: TaskPrivacy | None) -> PlanPrivacy | None:
    """What devices are told to do for privacy this round."""
    if privacy is not None:
        return privacy.plan()
    bound = _device_norm_bound(spec)
    if spec.privacy is not None and spec.privacy.mode is PrivacyMode.LOCAL:
        return PlanPrivacy(local=spec.privacy.local, l2_clip_norm=bound)
    if bound is not None:
        return PlanPrivacy(l2_clip_norm=bound)
    return None


def _device_norm_bound(spec: TaskSpec) -> float | None:
    """The L2 bound devices clip their update to themselves: a fixed ``norm_bound`` rule
    under secure aggregation, where the coordinator never sees one update to scale it."""
    rule = spec.aggregation.robust
    if (spec.secure_aggregation is not None and rule.kind is RobustKind.NORM_BOUND
            and rule.norm_bound is not None):
        return rule.norm_bound
    return None
