"""Local differential privacy on the device: DP-SGD with Opacus's ``PrivacyEngine``.

Each step samples a Poisson batch (rate ``batch_size / n``), clips every example's gradient
to ``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the
sum, and steps; Opacus's RDP accountant gives the device's epsilon at ``delta`` over the
steps of this call (one call = one round; composing rounds is the caller's business, e.g.
with :func:`core.privacy.epsilon_of_history`).

Grad-sample modes (how per-example gradients are clipped): ``fused`` (the default; an Opacus
grad-sample mode of ours built on Opacus's extension classes and its grad-sampler registry:
one backward pass, linear layers clipped without per-example gradients, every other layer
through Opacus's registered grad samplers; :mod:`device_agent.training.fused_clipping`) and
Opacus's own: ``hooks`` (module hooks + einsum), ``functorch`` (vmap over
``torch.func.grad``), ``ew`` (expanded weights), ``ghost`` (ghost clipping: per-example
*norms* only, two backward passes). A model one pass cannot clip correctly (a layer run
twice, shared weights, a reshaped batch, an output modified in place) falls back to
``hooks``; the result says which mode ran and why. Whatever the mode, sampling (Poisson),
the noise scale, the mean over the *expected* batch and the RDP accountant are Opacus's
semantics, so epsilon is the same.

Opacus (and its torch hooks) is imported on first use. Not thread-safe per model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.privacy import MechanismSteps, epsilon_of_history
from core.training import TrainResult, as_tensors
from core.types import LocalOptimizerKind, LocalTraining
from device_agent.errors import AgentError
from device_agent.training.noise_prefetch import SecureGaussian, SeededGaussian, StepNoise


class LocalDpError(AgentError):
    """The model or the local-DP configuration cannot be trained with DP-SGD."""


class GradSampleMode(enum.Enum):
    FUSED = "fused"
    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    EXPANDED_WEIGHTS = "ew"
    GHOST = "ghost"


#: Default mode. In benchmarks/privacy.py (2 CPU cores) ``fused`` was the fastest on every
#: MLP and on the CNN.
FASTEST_MODE = GradSampleMode.FUSED
#: Least noise a call draws (coordinates over all its steps) for it to be drawn ahead by
#: default: below it, drawing in line (~3.5 ns a coordinate, ~2 ms here) costs less than
#: starting the worker's job and handing the blocks over (a 4.8k-parameter MLP: one epoch
#: at batch 64, 140k coordinates, was faster in line; at batch 10, 866k, ahead).
PREFETCH_MIN_COORDINATES = 1 << 19
#: CPUs of this machine (``os.cpu_count`` reads /proc on every call).
_CPUS = os.cpu_count() or 1
#: What runs when ``fused`` cannot train the model.
FALLBACK_MODE = GradSampleMode.HOOKS


@dataclass(frozen=True)
class LocalDpResult:
    """``train``: as :func:`core.training.train_local` reports it (``loss`` is the mean
    cross-entropy over the examples sampled in the last epoch); ``epsilon`` at ``delta``: the
    device's privacy cost of this call's steps (RDP accountant, Poisson sampling)."""

    train: TrainResult
    epsilon: float
    delta: float
    sampling_rate: float
    grad_sample_mode: GradSampleMode = FASTEST_MODE
    #: Why ``fused`` was not used, when it was asked for and the model is outside its shape.
    fallback_reason: str | None = None


def check_local_dp_model(model: nn.Module) -> None:
    """Refuses a model DP-SGD cannot train: layers without per-example gradients or that mix
    examples (BatchNorm), per Opacus's ``ModuleValidator`` (the check the coordinator also
    runs at task launch, :func:`core.privacy.local_model.check_local_dp_model`).

    Raises:
        LocalDpError: naming each offending layer, the reason, and the fix.
    """
    from core.privacy.errors import UnsupportedModelError
    from core.privacy.local_model import check_local_dp_model as check

    try:
        check(model)
    except UnsupportedModelError as exc:
        raise LocalDpError(str(exc)) from None


def train_local_dp(model: nn.Module, x: np.ndarray, y: np.ndarray, config: LocalTraining, *,
                   noise_multiplier: float, max_grad_norm: float, delta: float, seed: int,
                   grad_sample_mode: GradSampleMode = FASTEST_MODE,
                   secure_mode: bool = False,
                   prefetch_noise: bool | None = None) -> LocalDpResult:
    """Trains ``model`` in place with DP-SGD for ``config.epochs`` epochs of Poisson-sampled
    batches (expected size ``config.batch_size``) and the configured optimizer.

    ``seed`` drives batch sampling and the noise unless ``secure_mode``: seeded runs are for
    simulations and tests. ``secure_mode=True`` (what a production device uses) samples the
    batches from a seed read from ``os.urandom`` (the coordinator knows the plan's seed) and
    draws every step's
    noise from :meth:`core.privacy.noise.NoiseSource.secure` (AES-CTR keyed from the OS
    CSPRNG, hardened against the floating-point attack like Opacus's own secure mode) through
    the DP optimizer's ``add_noise`` step, so torchcsprng is not needed.

    ``prefetch_noise`` (``fused`` mode): draw the steps' noise ahead, in blocks, in the noise
    worker process (:mod:`device_agent.training.noise_worker`), else on a thread while that
    starts or serves another call (:mod:`device_agent.training.noise_prefetch`); the same
    noise in the same order as drawing in line. Default: when the machine has more than one
    CPU and the call draws at least ``PREFETCH_MIN_COORDINATES`` coordinates of noise.

    Raises:
        LocalDpError: the model has unsupported layers (see :func:`check_local_dp_model`) or a
            parameter is out of range.
        ValueError: no data, or ``x`` and ``y`` of different lengths.
    """
    _check_parameters(noise_multiplier, max_grad_norm, delta, config)
    check_local_dp_model(model)
    features, labels = as_tensors(x, y, "training")
    if secure_mode:
        # The batches must be as secret as the noise: a seed the coordinator can derive
        # would tell it which examples each step used, which the accountant assumes hidden.
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    fallback_reason = None
    if grad_sample_mode is GradSampleMode.FUSED:
        from device_agent.training.fused_clipping import unsupported_reason

        fallback_reason = unsupported_reason(model, features[:3])
        if fallback_reason is None:
            return _train_fused(model, features, labels, config,
                                noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, delta=delta, seed=seed,
                                secure_mode=secure_mode, prefetch_noise=prefetch_noise)
        grad_sample_mode = FALLBACK_MODE
    result = _train_opacus(model, features, labels, config, noise_multiplier=noise_multiplier,
                           max_grad_norm=max_grad_norm, delta=delta, seed=seed,
                           grad_sample_mode=grad_sample_mode, secure_mode=secure_mode)
    return dataclasses.replace(result, fallback_reason=fallback_reason)


def _train_fused(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                 config: LocalTraining, *, noise_multiplier: float, max_grad_norm: float,
                 delta: float, seed: int, secure_mode: bool,
                 prefetch_noise: bool | None) -> LocalDpResult:
    """DP-SGD in the ``fused`` Opacus mode
    (:class:`~device_agent.training.fused_clipping.FusedGradSampleModule` and
    :class:`~device_agent.training.fused_clipping.FusedDPOptimizer`, Opacus's RDP accountant
    on the optimizer's step hook), matching what Opacus's ``make_private`` does for the same
    arguments: Poisson batches at rate ``1 / ceil(n / batch)`` for ``ceil(n / batch)`` steps
    per epoch (empty batches included), noise std ``z C`` on the clipped sum, divided by the
    expected batch ``int(n q)``."""
    from opacus.accountants import RDPAccountant

    from device_agent.training.fused_clipping import FusedDPOptimizer, FusedGradSampleModule

    n = len(labels)
    steps_per_epoch = math.ceil(n / min(config.batch_size, n))
    sampling_rate = 1 / steps_per_epoch
    expected_batch = max(int(n * sampling_rate), 1)
    generator = torch.Generator().manual_seed(seed)
    fill: Callable[[torch.Tensor, float], None] = (
        SecureGaussian() if secure_mode else SeededGaussian(seed + 1))
    noise_std = noise_multiplier * max_grad_norm
    accountant = RDPAccountant()
    was_training = model.training
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(model.train, was_training)
        dp_model = FusedGradSampleModule(model, max_grad_norm=max_grad_norm)
        cleanup.callback(dp_model.close)  # hooks and gradient views off the caller's model
        if prefetch_noise is None:
            drawn = dp_model.flat.numel() * config.epochs * steps_per_epoch
            prefetch_noise = _CPUS > 1 and drawn >= PREFETCH_MIN_COORDINATES
        noise = cleanup.enter_context(StepNoise(
            dp_model.flat.numel(), noise_std / expected_batch, fill,
            steps=config.epochs * steps_per_epoch, background=prefetch_noise))
        dp_optimizer = FusedDPOptimizer(_optimizer(model, config), module=dp_model,
                                        noise=noise, noise_multiplier=noise_multiplier,
                                        expected_batch_size=expected_batch)
        dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sampling_rate))
        scale = 1.0 / expected_batch
        dp_model.train()
        for _ in range(config.epochs):
            loss_sum = torch.zeros((), dtype=torch.float64)
            seen = 0
            # A DataLoader draws one int64 from its generator per epoch (its workers' base
            # seed); drawing it too keeps the batches exactly Opacus's for the same seed.
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            for index in poisson_batches(n, sampling_rate, steps_per_epoch, generator):
                dp_optimizer.zero_grad()
                logits = dp_model(features[index])
                loss = nn.functional.cross_entropy(logits, labels[index], reduction="sum")
                dp_model.backward(loss, scale=scale)
                dp_optimizer.step()
                loss_sum += loss.detach().double()
                seen += len(index)
    history = [MechanismSteps(z, q, count) for z, q, count in accountant.history]
    steps = sum(item.steps for item in history)
    return LocalDpResult(
        train=TrainResult(num_examples=n, loss=float(loss_sum) / seen if seen else math.nan,
                          steps=steps),
        epsilon=epsilon_of_history(history, delta=delta),
        delta=delta,
        sampling_rate=sampling_rate, grad_sample_mode=GradSampleMode.FUSED)


def poisson_batches(n: int, rate: float, steps: int, generator: torch.Generator
                    ) -> Iterator[torch.Tensor]:
    """``steps`` Poisson batches of ``range(n)``: each index is in each batch independently
    with probability ``rate`` (Opacus's ``UniformWithReplacementSampler`` distribution;
    batches may be empty). Drawn for many steps per call (~4M coin flips), in order."""
    per_draw = max(1, (1 << 22) // max(n, 1))
    for first in range(0, steps, per_draw):
        count = min(per_draw, steps - first)
        chosen = torch.rand(count, n, generator=generator) < rate
        sizes = chosen.sum(1).tolist()
        yield from torch.split(chosen.nonzero()[:, 1], sizes)


def _train_opacus(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                  config: LocalTraining, *, noise_multiplier: float, max_grad_norm: float,
                  delta: float, seed: int, grad_sample_mode: GradSampleMode,
                  secure_mode: bool) -> LocalDpResult:
    from opacus import PrivacyEngine

    n = len(labels)
    loader = torch.utils.data.DataLoader(
        _BatchFetch(features, labels), batch_size=min(config.batch_size, n),
        collate_fn=_identity, generator=torch.Generator().manual_seed(seed))
    optimizer = _optimizer(model, config)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    noise_generator = torch.Generator().manual_seed(seed + 1)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode=False is insecure: we document it instead.
        warnings.simplefilter("ignore", UserWarning)
        made: Any = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=True, grad_sample_mode=grad_sample_mode.value,
            loss_reduction="sum", noise_generator=noise_generator)
    if grad_sample_mode is GradSampleMode.GHOST:
        dp_model, dp_optimizer, dp_criterion, dp_loader = made
    else:
        dp_model, dp_optimizer, dp_loader = made
        dp_criterion = criterion
    if secure_mode:
        _use_secure_noise(dp_optimizer)
    # Per-example losses are summed so that empty Poisson batches (possible on small
    # devices) give a zero loss rather than NaN; the optimizer then divides the noisy sum by
    # the *expected* batch size, which is DP-SGD's mean (Opacus's "mean" scaling).
    dp_optimizer.loss_reduction = "mean"
    was_training = model.training
    dp_model.train()
    steps = 0
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    try:
        for _ in range(config.epochs):
            loss_sum = torch.zeros((), dtype=torch.float64)
            seen = 0
            for xb, yb in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                loss = dp_criterion(dp_model(xb), yb)
                loss.backward()
                dp_optimizer.step()
                loss_sum += loss.detach().double()
                seen += len(yb)
                steps += 1
    finally:
        dp_model._close()  # removes Opacus's hooks: the caller's model is plain again
        model.train(was_training)
    sampling_rate = 1 / len(dp_loader)
    spent = float(engine.accountant.get_epsilon(delta=delta)) if steps else 0.0
    loss = float(loss_sum) / seen if seen else math.nan
    return LocalDpResult(train=TrainResult(num_examples=n, loss=loss, steps=steps),
                         epsilon=spent, delta=delta, sampling_rate=sampling_rate,
                         grad_sample_mode=grad_sample_mode)


class _BatchFetch(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fetches a whole batch with one tensor index (``__getitems__``) instead of collating
    examples one by one: the loader's cost stays that of non-private training."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.features[index], self.labels[index]


def _use_secure_noise(dp_optimizer: Any) -> None:
    """Replaces the DP optimizer's noise step (its ``add_noise``, which ``pre_step`` calls
    after clipping) with one drawing N(0, (z C)^2) from the OS-keyed AES-CTR source (the
    same fill as the ``fused`` mode's)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    fill = SecureGaussian()

    def add_noise() -> None:
        std = dp_optimizer.noise_multiplier * dp_optimizer.max_grad_norm
        for p in dp_optimizer.params:
            _check_processed_flag(p.summed_grad)
            noise = torch.empty(p.summed_grad.shape, dtype=torch.float32)
            fill(noise, std)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)

    dp_optimizer.add_noise = add_noise


def _identity(batch: Any) -> Any:
    return batch


def _optimizer(model: nn.Module, config: LocalTraining) -> torch.optim.Optimizer:
    if config.optimizer is LocalOptimizerKind.ADAM:
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                           momentum=config.momentum)


def _check_parameters(noise_multiplier: float, max_grad_norm: float, delta: float,
                      config: LocalTraining) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise LocalDpError(f"noise_multiplier must be positive, got {noise_multiplier}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise LocalDpError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if not 0 < delta < 1:
        raise LocalDpError(f"delta must be in (0, 1), got {delta}")
    if config.epochs < 1 or config.batch_size < 1:
        raise LocalDpError(f"epochs and batch_size must be at least 1, got {config.epochs} "
                           f"and {config.batch_size}")
