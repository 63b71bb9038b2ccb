"""The fused Opacus mode: one-pass per-example clipping gives exactly what clipping each
example's own gradient gives, for linear layers (fused sampler) and every other layer
(Opacus's grad-sampler registry, else functorch); it is built from Opacus's extension
classes, and says which models it cannot train."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.models import build_model
from core.types import ModelSpec
from device_agent.training.fused_clipping import (
    FusedDPOptimizer,
    FusedGradSampleModule,
    _probe_reason,
    _trainable_layers,
    clip_factors,
    per_example_squared_norms,
    unsupported_reason,
)
from device_agent.training.local_dp import poisson_batches
from device_agent.training.noise_prefetch import StepNoise


class TwoTowers(nn.Module):
    """Not an nn.Sequential: recorded through forward hooks; layers run in a data order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def explicit_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: each example's own gradient by autograd, clipped to ``clip``, summed;
    and the per-example norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norms = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
        norm = flat.norm()
        norms.append(norm)
        total += flat * min(1.0, clip / max(norm.item(), 1e-12))
    return total, torch.stack(norms)


def fused_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                      divisor: float = 1.0) -> torch.Tensor:
    dp_model = FusedGradSampleModule(model, max_grad_norm=clip)
    try:
        loss = nn.functional.cross_entropy(dp_model(x), y, reduction="sum")
        dp_model.backward(loss, scale=1.0 / divisor)
        return torch.cat([p.grad.reshape(-1) for p in dp_model.params]).double().clone()
    finally:
        dp_model.close()


def batch(n: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=g) * 3,
            torch.randint(0, classes, (n,), generator=g))


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
       n=st.integers(1, 9), clip=st.floats(0.01, 20.0), seed=st.integers(0, 2**16))
def test_the_one_pass_sum_equals_clipping_each_examples_own_gradient(
        widths: list[int], n: int, clip: float, seed: int) -> None:
    widths = [*widths[:-1], max(widths[-1], 2)]  # at least two classes
    torch.manual_seed(seed)
    model = mlp(widths)
    x, y = batch(n, widths[0], widths[-1], seed)
    expected, _ = explicit_clipped_sum(model, x, y, clip)
    torch.testing.assert_close(fused_clipped_sum(model, x, y, clip), expected,
                               rtol=1e-4, atol=1e-5)


def test_per_example_norms_are_those_of_the_explicit_gradients() -> None:
    torch.manual_seed(0)
    model = mlp([6, 9, 4])
    x, y = batch(8, 6, 4, 1)
    _, expected = explicit_clipped_sum(model, x, y, 1.0)
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    h = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            inputs.append(h)
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    grads = torch.autograd.grad(nn.functional.cross_entropy(h, y, reduction="sum"), outputs)
    with torch.no_grad():
        squared = per_example_squared_norms([a.detach() for a in inputs], list(grads))
    torch.testing.assert_close(squared.sqrt().double(), expected, rtol=1e-5, atol=1e-6)


def test_a_model_that_is_not_sequential_is_clipped_through_hooks_and_a_biasless_layer_counts(
        ) -> None:
    torch.manual_seed(0)
    model = TwoTowers()
    x, y = batch(6, 5, 3, 2)
    expected, norms = explicit_clipped_sum(model, x, y, 0.3)
    assert (norms > 0.3).any(), "the test must clip something"
    torch.testing.assert_close(fused_clipped_sum(model, x, y, 0.3), expected,
                               rtol=1e-4, atol=1e-6)


def test_frozen_parameters_are_left_out_of_the_norm_and_the_gradient() -> None:
    torch.manual_seed(0)
    model = mlp([4, 6, 3])
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    x, y = batch(5, 4, 3, 3)
    expected, _ = explicit_clipped_sum(model, x, y, 0.2)
    torch.testing.assert_close(fused_clipped_sum(model, x, y, 0.2), expected,
                               rtol=1e-4, atol=1e-6)
    assert model[0].bias.grad is None and model[2].weight.grad is None


def test_the_optimizer_steps_on_the_clipped_sum_over_the_divisor_plus_the_steps_noise(
        ) -> None:
    torch.manual_seed(0)
    model = mlp([4, 5, 3])
    x, y = batch(7, 4, 3, 4)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    expected, _ = explicit_clipped_sum(model, x, y, 0.5)
    numel = start.numel()
    expected_noise = torch.empty(numel).normal_(0.0, 0.3, generator=torch.Generator()
                                                .manual_seed(1))

    generator = torch.Generator().manual_seed(1)

    def fill(buffer: torch.Tensor, std: float) -> None:
        buffer.normal_(0.0, std, generator=generator)

    dp_model = FusedGradSampleModule(model, max_grad_norm=0.5)
    steps: list[int] = []
    with StepNoise(numel, 0.3, fill, steps=1, background=False) as noise:
        optimizer = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                     module=dp_model, noise=noise, noise_multiplier=4.2,
                                     expected_batch_size=7)  # z C / B = 0.3
        optimizer.attach_step_hook(lambda opt: steps.append(1))
        optimizer.zero_grad()
        dp_model.backward(nn.functional.cross_entropy(dp_model(x), y, reduction="sum"),
                          scale=1 / 7)
        optimizer.step()
    dp_model.close()
    moved = start - torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    torch.testing.assert_close(moved, expected / 7 + expected_noise.double(), rtol=1e-4,
                               atol=1e-5)
    assert steps == [1], "the step hook (where the accountant attaches) ran once"


def test_an_empty_batch_steps_on_the_noise_alone() -> None:
    model = mlp([4, 5, 3])
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    loss = nn.functional.cross_entropy(dp_model(x), y, reduction="sum")
    dp_model.flat.fill_(0.25)  # what the noise left
    dp_model.backward(loss, scale=0.1)
    assert torch.equal(dp_model.flat, torch.full_like(dp_model.flat, 0.25))
    dp_model.close()


@pytest.mark.parametrize("zero_grad_first", [True, False])
def test_each_step_gets_one_fresh_noise_vector_wherever_zero_grad_is_called(
        zero_grad_first: bool) -> None:
    """zero_grad starts the gradient at the next step's noise; a step without it adds its
    own. Empty batches: the parameters move by the noise alone (lr 1)."""
    model = mlp([4, 5, 3])
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    draws = iter(range(1, 100))

    def numbered(block: torch.Tensor, std: float) -> None:
        for row in block:
            row.fill_(next(draws))

    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with StepNoise(dp_model.flat.numel(), 1.0, numbered, steps=3, background=False) as noise:
        optimizer = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                     module=dp_model, noise=noise, noise_multiplier=1.0,
                                     expected_batch_size=1)
        for _ in range(3):
            if zero_grad_first:
                optimizer.zero_grad()
            loss = nn.functional.cross_entropy(dp_model(torch.zeros(0, 4)),
                                               torch.zeros(0, dtype=torch.int64),
                                               reduction="sum")
            dp_model.backward(loss, scale=1.0)
            optimizer.step()
            if not zero_grad_first:
                optimizer.zero_grad()  # after the last step: no vector left, and none drawn
        assert noise.remaining == 0
    moved = start - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(moved, torch.full_like(moved, 1.0 + 2.0 + 3.0))
    dp_model.close()


def test_it_is_an_opacus_grad_sample_module_and_dp_optimizer() -> None:
    from opacus.grad_sample import AbstractGradSampleModule
    from opacus.optimizers import DPOptimizer

    model = mlp([4, 5, 3])
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    with StepNoise(dp_model.flat.numel(), 0.25, lambda b, s: b.zero_(), steps=1,
                   background=False) as noise:
        optimizer = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     module=dp_model, noise=noise, noise_multiplier=1.0,
                                     expected_batch_size=4)
    assert isinstance(dp_model, AbstractGradSampleModule)
    assert isinstance(optimizer, DPOptimizer)
    dp_model.close()
    assert not any(hasattr(p, attr) for p in model.parameters()
                   for attr in ("grad_sample", "_forward_counter", "summed_grad"))


def test_clip_factors_never_scale_up_and_keep_a_zero_gradient() -> None:
    factors = clip_factors(torch.tensor([0.0, 0.25, 1.0, 16.0]), 1.0, divisor=2.0)
    torch.testing.assert_close(factors, torch.tensor([0.5, 0.5, 0.5, 0.125]))


def test_close_removes_the_hooks_and_the_gradient_views() -> None:
    model = TwoTowers()
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    assert all(p.grad is not None for p in model.parameters())
    assert any(m._forward_hooks for m in model.modules())
    dp_model.close()
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


class OwnAndChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.inner = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


@pytest.mark.parametrize(("model", "reason"), [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)),
     "modified in place"),
    (nn.Sequential(nn.Linear(4, 3), OwnAndChild()), "trainable sublayer"),
])
def test_models_outside_the_shape_are_named_with_the_reason(model: nn.Module,
                                                             reason: str) -> None:
    found = unsupported_reason(model, torch.randn(2, 4))
    assert found is not None and reason in found


def test_a_layer_used_twice_is_named() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    found = unsupported_reason(Twice(), torch.randn(2, 3))
    assert found is not None and "ran 2 times" in found
    assert unsupported_reason(mlp([3, 4, 2]), torch.randn(2, 3)) is None
    shared = nn.Linear(3, 3)
    found = unsupported_reason(nn.Sequential(shared, nn.ReLU(), shared), torch.randn(2, 3))
    assert found is not None and "ran 2 times" in found


@pytest.mark.parametrize("model", [
    mlp([3, 4, 2]),
    nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2)),
    nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)),
    nn.Sequential(nn.Unflatten(1, (3, 1)), nn.Linear(1, 2), nn.Flatten()),
])
def test_a_linear_chain_is_judged_without_running_it_as_the_probe_judges_it(
        model: nn.Module) -> None:
    layers = _trainable_layers(model)
    probed = next((reason for examples in (torch.randn(3, 3), torch.randn(2, 3))
                   if (reason := _probe_reason(model, layers, examples)) is not None), None)
    assert unsupported_reason(model, torch.randn(3, 3)) == probed


def test_poisson_batches_include_each_index_at_the_rate() -> None:
    n, rate, steps = 300, 0.05, 2000
    counts = torch.zeros(n)
    sizes = []
    for index in poisson_batches(n, rate, steps, torch.Generator().manual_seed(0)):
        counts[index] += 1
        sizes.append(len(index))
    assert len(sizes) == steps
    # Each index is a Binomial(2000, 0.05): mean 100, sd ~9.7.
    assert abs(counts.mean().item() - 100) < 1.5
    assert counts.min() > 100 - 5 * math.sqrt(95) and counts.max() < 100 + 5 * math.sqrt(95)
    assert 0 in sizes or min(sizes) < 8, "batch sizes vary, as Poisson sampling does"


class Regrouped(nn.Module):
    """Reshapes each example into 4 rows: a row is not an example."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.reshape(-1, 4)).reshape(len(x), -1)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class CustomSequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * 2.0)


def test_models_whose_rows_or_weights_are_not_one_examples_are_refused() -> None:
    found = unsupported_reason(Regrouped(), torch.randn(2, 16))
    assert found is not None and "rows for 2 examples" in found
    found = unsupported_reason(Tied(), torch.randn(2, 4))
    assert found is not None and "shared by several layers" in found
    frozen = mlp([4, 3]).requires_grad_(False)
    assert unsupported_reason(frozen, torch.randn(2, 4)) == "the model has no trainable parameters"


def test_a_sequential_subclass_runs_its_own_forward() -> None:
    torch.manual_seed(0)
    model = CustomSequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = batch(6, 4, 3, 5)
    expected, _ = explicit_clipped_sum(model, x, y, 0.3)
    torch.testing.assert_close(fused_clipped_sum(model, x, y, 0.3), expected,
                               rtol=1e-4, atol=1e-6)


def test_a_frozen_parameter_with_a_stale_gradient_gets_none() -> None:
    model = mlp([4, 5, 3])
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    x, y = batch(4, 4, 3, 6)
    fused_clipped_sum(model, x, y, 1.0)
    assert model[0].weight.grad is None


class Scaled(nn.Module):
    """A layer type no registry knows: its per-example gradients come from functorch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.parametrize("name", ["cnn", "conv1d", "3-d linear", "functorch layer",
                                  "groupnorm"])
def test_layers_outside_the_fused_samplers_are_clipped_through_opacus_registry(
        name: str) -> None:
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "cnn": (build_model(ModelSpec("cnn", {})), (64,)),
        "conv1d": (nn.Sequential(nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                                 nn.Linear(16, 3)), (10,)),
        "3-d linear": (nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Linear(2, 3), nn.Flatten(),
                                     nn.Linear(6, 3)), (4,)),
        "functorch layer": (nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.Tanh(),
                                          nn.Linear(5, 3)), (4,)),
        "groupnorm": (nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 4, 1),
                                    nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(12, 3)),
                      (6,)),
    }
    model, shape = models[name]
    classes = 10 if name == "cnn" else 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, *shape, generator=g)
    y = torch.randint(0, classes, (6,), generator=g)
    assert unsupported_reason(model, x[:2]) is None
    expected, norms = explicit_clipped_sum(model, x, y, 0.4)
    assert (norms > 0.4).any(), "the test must clip something"
    torch.testing.assert_close(fused_clipped_sum(model, x, y, 0.4), expected,
                               rtol=1e-4, atol=1e-5)


def test_a_grad_sampler_registered_with_opacus_is_the_one_used() -> None:
    from opacus.grad_sample import GradSampleHooks, register_grad_sampler

    calls: list[int] = []

    class Scaled2(Scaled):
        pass

    @register_grad_sampler(Scaled2)
    def scaled_grad_sample(layer: nn.Module, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        calls.append(len(backprops))
        return {layer.weight: activations[0] * backprops}

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), Scaled2(5), nn.Linear(5, 3))
        x, y = batch(6, 4, 3, 8)
        expected, _ = explicit_clipped_sum(model, x, y, 0.3)
        torch.testing.assert_close(fused_clipped_sum(model, x, y, 0.3), expected,
                                   rtol=1e-4, atol=1e-5)
        assert calls == [6]
    finally:
        GradSampleHooks.GRAD_SAMPLERS.pop(Scaled2, None)


def test_a_layer_that_runs_twice_at_training_time_is_an_error_not_a_wrong_clip() -> None:
    class Sometimes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x)
            return self.layer(out) if len(x) > 2 else out

    model = Sometimes()
    assert unsupported_reason(model, torch.randn(2, 3)) is None
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="ran twice"):
        dp_model(torch.randn(4, 3))
    dp_model.close()


def _optimizer_over(dp_model: FusedGradSampleModule, model: nn.Module, noise: StepNoise,
                    expected_batch: int = 4) -> FusedDPOptimizer:
    return FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), module=dp_model,
                            noise=noise, noise_multiplier=noise.std * expected_batch,
                            expected_batch_size=expected_batch)  # C = 1


def test_an_empty_batch_through_a_convolution_steps_on_the_noise_alone() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", {}))
    start = [p.detach().clone() for p in model.parameters()]
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    with StepNoise(dp_model.flat.numel(), 0.01, lambda b, s: b.fill_(s), steps=1,
                   background=False) as noise:
        optimizer = _optimizer_over(dp_model, model, noise)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(dp_model(torch.zeros(0, 64)),
                                           torch.zeros(0, dtype=torch.int64), reduction="sum")
        dp_model.backward(loss, scale=0.25)
        optimizer.step()
    dp_model.close()
    for before, p in zip(start, model.parameters(), strict=True):
        torch.testing.assert_close(before - p.detach(), torch.full_like(before, 0.01))


def test_gradients_unlinked_from_the_flat_buffer_are_refused_not_stepped_without_noise(
        ) -> None:
    model = mlp([4, 5, 3])
    dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="FusedDPOptimizer"):
        dp_model.zero_grad()
    with StepNoise(dp_model.flat.numel(), 0.1, lambda b, s: b.zero_(), steps=2,
                   background=False) as noise:
        optimizer = _optimizer_over(dp_model, model, noise)
        optimizer.zero_grad()
        model.zero_grad(set_to_none=True)  # the raw model's: unlinks the views
        with pytest.raises(RuntimeError, match="miss the noise"):
            optimizer.step()
        with pytest.raises(ValueError, match="z C / expected batch"):
            FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), module=dp_model,
                             noise=noise, noise_multiplier=1.0, expected_batch_size=4)
    dp_model.close()


def test_close_removes_opacus_functorch_cache_from_the_callers_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.Linear(5, 3))
    x, y = batch(6, 4, 3, 9)
    fused_clipped_sum(model, x, y, 1.0)
    assert not hasattr(model[1], "ft_compute_sample_grad")


class BatchSecond(nn.Module):
    """Runs its linear layer on [time, batch, features]: rows are not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(len(x), 2, 2).transpose(0, 1)
        return self.layer(steps).transpose(0, 1).reshape(len(x), -1)


class Buffered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.offset


def test_layers_one_pass_cannot_clip_are_found_by_the_probe() -> None:
    # Batch-second with time 2 passes a probe of 2 examples; the second size catches it.
    found = unsupported_reason(BatchSecond(), torch.randn(2, 4))
    assert found is not None and "rows" in found
    found = unsupported_reason(nn.Sequential(Buffered(), nn.Linear(4, 2)), torch.randn(3, 4))
    assert found is not None and "no grad sampler functorch can run" in found
    mixed = mlp([4, 5, 3])
    mixed[2].double()
    found = unsupported_reason(mixed, torch.randn(3, 4))
    assert found is not None and "mix dtypes" in found


def test_all_linear_models_take_the_batched_norm_path_and_others_the_per_layer_one() -> None:
    """Both paths are checked against explicit clipping above; this pins which one runs."""
    torch.manual_seed(0)
    for model, x, linear in ((mlp([4, 6, 3]), torch.randn(5, 4), True),
                             (build_model(ModelSpec("cnn", {})), torch.randn(5, 64), False)):
        dp_model = FusedGradSampleModule(model, max_grad_norm=1.0)
        y = torch.zeros(5, dtype=torch.int64)
        dp_model.backward(nn.functional.cross_entropy(dp_model(x), y, reduction="sum"),
                          scale=1.0)
        assert [plan is not None for plan in dp_model._plans.values()] == [linear]
        dp_model.close()
