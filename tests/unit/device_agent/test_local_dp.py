"""Local DP on the device: DP-SGD through Opacus trains the registry's models, reports the
device's epsilon, leaves the model plain afterwards, and refuses layers DP-SGD cannot train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.models import build_model
from core.privacy import epsilon
from core.training import evaluate
from core.types import LocalTraining, ModelSpec
from device_agent.errors import AgentError
from device_agent.training.local_dp import (
    GradSampleMode,
    LocalDpError,
    check_local_dp_model,
    train_local_dp,
)

MLP = ModelSpec("mlp", {"input_dim": 8, "hidden": [16], "num_classes": 3})


def data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 8)).astype(np.float32) + 2.0 * np.eye(3, 8)[y]
    return x, y


def model(spec: ModelSpec = MLP) -> nn.Module:
    torch.manual_seed(0)
    return build_model(spec)


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_every_grad_sample_mode_trains_and_reports_the_accountants_epsilon(
        mode: GradSampleMode) -> None:
    x, y = data()
    net = model()
    before = evaluate(net, x, y)[0]
    result = train_local_dp(net, x, y, LocalTraining(epochs=3, batch_size=12, learning_rate=0.5),
                            noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5, seed=1,
                            grad_sample_mode=mode)
    assert result.sampling_rate == pytest.approx(12 / 120)
    assert result.train.steps == 30 and result.train.num_examples == 120
    assert result.epsilon == pytest.approx(epsilon(noise_multiplier=0.5, sampling_rate=0.1,
                                                   steps=30, delta=1e-5), rel=1e-6)
    assert evaluate(net, x, y)[0] < before


def test_training_is_reproducible_from_the_seed_and_leaves_no_opacus_hooks() -> None:
    x, y = data()
    config = LocalTraining(epochs=1, batch_size=10)
    nets = [model(), model()]
    for net in nets:
        train_local_dp(net, x, y, config, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                       seed=3)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not any(m._forward_hooks or m._backward_hooks for m in nets[0].modules())
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for p in nets[0].parameters())


def test_more_noise_costs_less_epsilon() -> None:
    x, y = data()
    config = LocalTraining(epochs=1, batch_size=10)
    low = train_local_dp(model(), x, y, config, noise_multiplier=0.8, max_grad_norm=1.0,
                         delta=1e-5, seed=0)
    high = train_local_dp(model(), x, y, config, noise_multiplier=2.0, max_grad_norm=1.0,
                          delta=1e-5, seed=0)
    assert high.epsilon < low.epsilon


def test_a_device_with_very_little_data_survives_empty_poisson_batches() -> None:
    x, y = data(n=4)
    net = model()
    result = train_local_dp(net, x, y, LocalTraining(epochs=5, batch_size=1),
                            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    assert result.train.steps == 20
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_the_cnn_is_supported() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 64)).astype(np.float32), rng.integers(0, 10, size=20)
    result = train_local_dp(model(ModelSpec("cnn", {})), x, y, LocalTraining(batch_size=10),
                            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    assert result.train.steps == 2


def test_batchnorm_is_refused_with_the_reason_and_the_fix() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(LocalDpError, match=r"BatchNorm.*GroupNorm.*ModuleValidator\.fix"):
        check_local_dp_model(net)
    x, y = data()
    with pytest.raises(LocalDpError):
        train_local_dp(net, x, y, LocalTraining(), noise_multiplier=1.0, max_grad_norm=1.0,
                       delta=1e-5, seed=0)
    assert issubclass(LocalDpError, AgentError)


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0.0), dict(max_grad_norm=-1.0),
                                 dict(delta=1.0)])
def test_out_of_range_privacy_parameters_are_refused(bad: dict[str, float]) -> None:
    x, y = data()
    kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, **bad}
    with pytest.raises(LocalDpError, match=next(iter(bad))):
        train_local_dp(model(), x, y, LocalTraining(), seed=0, **kwargs)


def test_secure_mode_draws_fresh_csprng_noise_of_the_right_scale_without_torchcsprng() -> None:
    x, y = data()
    config = LocalTraining(epochs=1, batch_size=10, learning_rate=1.0)
    start = {k: v.clone() for k, v in model().state_dict().items()}

    def moved(secure: bool, noise: float) -> torch.Tensor:
        net = model()
        train_local_dp(net, x, y, config, noise_multiplier=noise, max_grad_norm=1e-6,
                       delta=1e-5, seed=3, secure_mode=secure)
        return torch.cat([(net.state_dict()[k] - start[k]).ravel() for k in start])

    a, b = moved(True, 100.0), moved(True, 100.0)
    assert not torch.equal(a, b), "same seed, fresh noise: the seed does not drive it"
    # Each step's clipped gradient has L2 norm <= C = 1e-6 in all, while the noise is
    # z C / E[batch] = 1e-5 per coordinate: over 12 steps the weights move by the noise,
    # std sqrt(12) * 100 * 1e-6 / 10.
    assert a.std().item() == pytest.approx(12**0.5 * 1e-5, rel=0.15)
    assert torch.equal(moved(False, 1.0), moved(False, 1.0)), "seeded noise is reproducible"


def test_fused_clipping_trains_the_same_model_as_opacus_with_the_same_batches() -> None:
    """Same seed, so the same Poisson batches; with negligible noise, the one-pass clipping
    and Opacus's per-sample gradients must step the same way."""
    x, y = data()
    config = LocalTraining(epochs=2, batch_size=12, learning_rate=0.5, momentum=0.9)
    nets = {mode: model() for mode in (GradSampleMode.FUSED, GradSampleMode.HOOKS)}
    results = {mode: train_local_dp(net, x, y, config, noise_multiplier=1e-9,
                                    max_grad_norm=0.05, delta=1e-5, seed=5,
                                    grad_sample_mode=mode)
               for mode, net in nets.items()}
    fused, hooks = results[GradSampleMode.FUSED], results[GradSampleMode.HOOKS]
    assert fused.grad_sample_mode is GradSampleMode.FUSED and fused.fallback_reason is None
    assert fused.epsilon == pytest.approx(hooks.epsilon, rel=1e-9)
    assert fused.train.loss == pytest.approx(hooks.train.loss, rel=1e-4)
    for a, b in zip(nets[GradSampleMode.FUSED].parameters(),
                    nets[GradSampleMode.HOOKS].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_cnn_trains_in_the_fused_mode_with_its_convolutions_through_opacus_registry(
        ) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 64)).astype(np.float32), rng.integers(0, 10, size=20)
    result = train_local_dp(model(ModelSpec("cnn", {})), x, y, LocalTraining(batch_size=10),
                            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    assert result.grad_sample_mode is GradSampleMode.FUSED and result.fallback_reason is None


class TiedLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_a_model_one_pass_cannot_clip_falls_back_to_opacus_hooks_and_says_why() -> None:
    x, y = data()
    net = TiedLayers()
    result = train_local_dp(net, x, y, LocalTraining(batch_size=10), noise_multiplier=1.0,
                            max_grad_norm=1.0, delta=1e-5, seed=0)
    assert result.grad_sample_mode is GradSampleMode.HOOKS
    assert result.fallback_reason is not None and "shared" in result.fallback_reason
    assert result.train.steps == 12


def test_drawing_noise_ahead_in_the_worker_or_on_a_thread_changes_nothing_in_the_model(
) -> None:
    from device_agent.training.noise_worker import NoiseWorker

    x, y = data()
    config = LocalTraining(epochs=2, batch_size=10)

    def trained(ahead: bool) -> list[torch.Tensor]:
        net = model()
        train_local_dp(net, x, y, config, noise_multiplier=1.0, max_grad_norm=1.0,
                       delta=1e-5, seed=9, prefetch_noise=ahead)
        return list(net.parameters())

    worker = NoiseWorker.claim(wait=60.0)
    assert worker is not None
    on_a_thread = trained(True)  # the worker is held: a thread draws
    worker.finish()
    for ahead in (trained(True), trained(False)):  # the worker process; in line
        for a, b in zip(on_a_thread, ahead, strict=True):
            assert torch.equal(a, b)


def test_secure_mode_with_noise_drawn_ahead_trains_and_cleans_up() -> None:
    import threading

    x, y = data()
    before = threading.active_count()
    net = model()
    start = evaluate(net, x, y)[0]
    result = train_local_dp(net, x, y, LocalTraining(epochs=3, batch_size=12,
                                                     learning_rate=0.5),
                            noise_multiplier=0.3, max_grad_norm=1.0, delta=1e-5, seed=0,
                            secure_mode=True, prefetch_noise=True)
    assert result.grad_sample_mode is GradSampleMode.FUSED and result.train.steps == 30
    assert evaluate(net, x, y)[0] < start
    assert threading.active_count() == before
    assert not any(m._forward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
