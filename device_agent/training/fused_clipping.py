"""Fused per-example clipping: an Opacus grad-sample mode that clips every example's
gradient in one backward pass, built on Opacus's own extension points.

How it plugs into Opacus:

- :class:`FusedGradSampleModule` is an ``opacus.grad_sample.AbstractGradSampleModule``, the
  base of Opacus's own hooks, expanded-weights and ghost-clipping modes. It wraps the model,
  records each trainable layer's input and output in the forward pass, and its
  :meth:`~FusedGradSampleModule.backward` leaves ``sum_i clip_C(grad_i)`` (times a scale) in
  the parameters' ``.grad``: the role ghost clipping's ``DPLossFastGradientClipping.backward``
  plays there.
- Each layer's per-example work comes from a grad-sampler registry. Layer types with a
  *fused sampler* (:data:`FUSED_SAMPLERS`, registered with :func:`register_fused_sampler`
  in the style of ``opacus.grad_sample.register_grad_sampler``) never materialize a
  per-example gradient; ``nn.Linear`` on ``[batch, features]`` inputs is registered here.
  Every other layer uses Opacus's grad-sampler registry
  (``opacus.grad_sample.GradSampleHooks.GRAD_SAMPLERS``: convolutions, embeddings,
  normalization layers, and whatever a user registered with ``register_grad_sampler``),
  else functorch (``ft_compute_per_sample_gradient``): Opacus's own order in its hooks mode.
  Such a layer's per-example gradients exist for that layer only, for the step.
- :class:`FusedDPOptimizer` is an ``opacus.optimizers.DPOptimizerFastGradientClipping``, the
  optimizer of Opacus's ghost mode (``.grad`` arrives already clipped and summed): it adds
  the step's noise and steps. The privacy accountant attaches through Opacus's own optimizer
  hook (``RDPAccountant.get_optimizer_hook_fn``).

Why it is faster than Opacus's modes: for a linear layer ``y = a W^T + b`` and example ``i``,
the gradient is ``g_i a_i^T`` for ``W`` and ``g_i`` for ``b`` (``g_i = dL_i/dy_i``); its
squared norm is ``(|a_i|^2 + 1) |g_i|^2`` (Goodfellow 2015; Opacus's ghost norm for linear
layers). One step:

1. the forward pass records each trainable layer's input ``a`` and output ``y``;
2. one backward pass, ``torch.autograd.grad(loss, [y...])``, gives each layer's ``g`` and
   skips the weight gradients that non-private backprop would compute;
3. per-example norms over all layers give the clip factors ``min(1, C / |grad_i|)``;
4. a linear layer's clipped sum is ``(c * g)^T a``, one matmul, which is what non-private
   backprop pays for the weight gradient.

Opacus's hooks, functorch and expanded-weights modes materialize every layer's per-example
gradients, and ghost clipping runs backward twice; this mode does neither for linear layers.
:func:`unsupported_reason` says when a model is outside what one pass can clip correctly
(a layer run twice, shared weights, a reshaped batch, an output modified in place), and the
caller then uses Opacus's hooks mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from device_agent.training.noise_prefetch import StepNoise


class LayerClipping(Protocol):
    """One trainable layer's part of a step: :meth:`add_squared_norms` adds its trained
    parameters' squared per-example gradient norms to ``total``, from the layer's recorded
    inputs and the gradient of the summed loss with respect to its output; then
    :meth:`add_clipped` adds ``sum_i factor_i grad_i`` to their ``.grad`` views."""

    def add_squared_norms(self, inputs: Sequence[torch.Tensor], output_grad: torch.Tensor,
                          total: torch.Tensor) -> None: ...

    def add_clipped(self, factors: torch.Tensor) -> None:
        """``factors`` is ``[batch]``."""


#: A fused sampler: given a layer and ``{parameter: .grad view}`` of its trained
#: parameters, the object that clips that layer's per-example gradients.
FusedSampler = Callable[[nn.Module, dict[torch.Tensor, torch.Tensor]], LayerClipping]

#: Fused samplers by layer type (exact type, as Opacus's registries).
FUSED_SAMPLERS: dict[type[nn.Module], FusedSampler] = {}


def register_fused_sampler(*layer_types: type[nn.Module]
                           ) -> Callable[[FusedSampler], FusedSampler]:
    """Registers the decorated class or function as the fused sampler of ``layer_types``
    (exact types, as ``opacus.grad_sample.register_grad_sampler`` does)."""
    def decorate(sampler: FusedSampler) -> FusedSampler:
        for layer_type in layer_types:
            FUSED_SAMPLERS[layer_type] = sampler
        return sampler

    return decorate


def per_example_squared_norms(inputs: Sequence[torch.Tensor],
                              output_grads: Sequence[torch.Tensor],
                              trained: Sequence[tuple[bool, bool]] | None = None
                              ) -> torch.Tensor:
    """``[batch]`` squared L2 norms of each example's gradient over linear layers with these
    ``[batch, in]`` inputs and ``[batch, out]`` output gradients; ``trained`` says per layer
    whether its (weight, bias) count (default: both). Call under ``torch.no_grad()``."""
    if not inputs:
        raise ValueError("no linear layers")
    total = torch.zeros(len(inputs[0]), dtype=inputs[0].dtype)
    flags = trained if trained is not None else [(True, True)] * len(inputs)
    for a, g, (weight, bias) in zip(inputs, output_grads, flags, strict=True):
        _add_linear_squared_norms(total, a, g, weight, bias)
    return total


def _add_linear_squared_norms(total: torch.Tensor, a: torch.Tensor, g: torch.Tensor,
                              weight: bool, bias: bool) -> None:
    # |g_i a_i^T|^2 + |g_i|^2 = (|a_i|^2 + 1) |g_i|^2
    if weight:
        scale = torch.linalg.vecdot(a, a)
        if bias:
            scale.add_(1.0)
    else:
        scale = torch.full((a.shape[0],), 1.0 if bias else 0.0, dtype=a.dtype)
    total.addcmul_(scale, torch.linalg.vecdot(g, g))


@register_fused_sampler(nn.Linear)
class LinearFusedClipping:
    """``nn.Linear`` on ``[batch, in]``: norms from the input and the output gradient,
    clipped sums as one matmul (weight) and one matvec (bias), added in place. On
    ``[batch, ..., in]`` inputs it clips through Opacus's registry (:class:`RegistryClipping`)."""

    def __init__(self, layer: nn.Module, grads: dict[torch.Tensor, torch.Tensor]) -> None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"not an nn.Linear: {type(layer).__name__}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._weight_grad = grads.get(layer.weight)
        self._bias_grad = None if layer.bias is None else grads.get(layer.bias)
        # The clip factors scale whichever of input and output gradient is narrower.
        self._scale_input = layer.in_features <= layer.out_features
        self._general = RegistryClipping(layer, grads)
        self._a = self._g = torch.empty(0)
        self._two_d = True

    def add_squared_norms(self, inputs: Sequence[torch.Tensor], output_grad: torch.Tensor,
                          total: torch.Tensor) -> None:
        self._a, self._g = inputs[0], output_grad
        self._two_d = self._a.dim() == 2
        if not self._two_d:
            self._general.add_squared_norms(inputs, output_grad, total)
            return
        _add_linear_squared_norms(total, self._a, self._g, self._weight_grad is not None,
                                  self._bias_grad is not None)

    def add_clipped(self, factors: torch.Tensor) -> None:
        if not self._two_d:
            self._general.add_clipped(factors)
            return
        self.add_scaled(self._a, self._g, factors)

    def add_scaled(self, a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor,
                   alpha: float = 1.0) -> None:
        """Adds ``alpha sum_i factor_i g_i a_i^T`` to the weight's ``.grad`` and
        ``alpha sum_i factor_i g_i`` to the bias's, for ``[batch, in]`` inputs ``a`` and
        ``[batch, out]`` output gradients ``g``."""
        g_t = g.T
        if self._weight_grad is not None:
            if self._scale_input:
                self._weight_grad.addmm_(g_t, a * factors.unsqueeze(1), alpha=alpha)
            else:
                self._weight_grad.addmm_(g_t * factors, a, alpha=alpha)
        if self._bias_grad is not None:
            self._bias_grad.addmv_(g_t, factors, alpha=alpha)


class RegistryClipping:
    """Any layer: its per-example gradients from Opacus's grad-sampler registry (else
    functorch), their squared norms, and their clipped sum by one contraction each. The
    per-example gradients live from :meth:`add_squared_norms` to :meth:`add_clipped`."""

    def __init__(self, layer: nn.Module, grads: dict[torch.Tensor, torch.Tensor]) -> None:
        self._layer = layer
        self._grads = grads
        self._per_example: dict[torch.Tensor, torch.Tensor] = {}

    def add_squared_norms(self, inputs: Sequence[torch.Tensor], output_grad: torch.Tensor,
                          total: torch.Tensor) -> None:
        sampler = GradSampleHooks.GRAD_SAMPLERS.get(type(self._layer),
                                                    ft_compute_per_sample_gradient)
        self._per_example = {p: gs for p, gs in
                             sampler(self._layer, list(inputs), output_grad).items()
                             if p in self._grads}
        for gs in self._per_example.values():
            if gs.shape[0] != total.shape[0]:
                raise RuntimeError(f"{type(self._layer).__name__}'s grad sampler gave "
                                   f"{gs.shape[0]} rows for {total.shape[0]} examples")
            flat = gs.reshape(gs.shape[0], -1)
            total.add_(torch.linalg.vecdot(flat, flat))

    def add_clipped(self, factors: torch.Tensor) -> None:
        for p, gs in self._per_example.items():
            self._grads[p].add_(torch.tensordot(factors, gs, dims=1))
        self._per_example = {}


class _LinearPlan:
    """Every layer of a forward pass is an ``nn.Linear`` on ``[batch, in]``: the clip factors
    of all layers in eight ops, however many layers. With ``S`` a matrix that sums
    each layer's columns (a layer's input columns weighted ``w_l``) and ``o`` a row of
    offsets, ``cat(a_1..a_L, g_1..g_L)^2 @ S + o`` is ``[w_l |a_l|^2 + b_l | |g_l|^2]``, and
    ``|grad_i|^2 = sum_l (w_l |a_l|^2 + b_l) |g_l|^2``, where ``w_l``, ``b_l`` (0 or 1) say
    whether the layer's weight and bias are trained. The clip scale ``C / expected batch``
    is the matmuls' ``alpha``, not one more op."""

    def __init__(self, layers: list[LinearFusedClipping], dtype: torch.dtype) -> None:
        count = len(layers)
        widths = [c.in_features for c in layers] + [c.out_features for c in layers]
        trained = [(c._weight_grad is not None, c._bias_grad is not None) for c in layers]
        self._count = count
        self._segments = torch.zeros(sum(widths), len(widths), dtype=dtype)
        offset = 0
        for column, width in enumerate(widths):
            weight = trained[column][0] if column < count else True
            self._segments[offset:offset + width, column] = float(weight)
            offset += width
        self._offsets = torch.tensor([float(bias) for _, bias in trained] + [0.0] * count,
                                     dtype=dtype)
        self._layers = layers

    @staticmethod
    def applies(activations: Sequence[torch.Tensor]) -> bool:
        return all(a.dim() == 2 for a in activations)

    def add_clipped_sum(self, activations: list[torch.Tensor],
                        output_grads: Sequence[torch.Tensor], max_grad_norm: float,
                        scale: float, batch: int) -> None:
        count = self._count
        stacked = torch.cat([*activations, *output_grads], dim=1)
        if stacked.shape[0] != batch:  # cat has checked that every layer has as many rows
            raise RuntimeError("the rows of a linear layer's input are not the batch's "
                               "examples")
        squares = torch.addmm(self._offsets, stacked.square_(), self._segments)
        # [w_l |a_l|^2 + b_l ; |g_l|^2] per row, multiplied per layer and summed.
        total = squares.view(batch, 2, count).prod(1).sum(1)
        # 1 / max(|grad_i|, C): times C below, min(1, C / |grad_i|); a zero gradient gets 1.
        inverse = total.clamp_min_(max_grad_norm * max_grad_norm).rsqrt_()
        alpha = max_grad_norm * scale
        for clipping, a, g in zip(self._layers, activations, output_grads, strict=True):
            clipping.add_scaled(a, g, inverse, alpha)


def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float,
                 divisor: float = 1.0) -> torch.Tensor:
    """``min(1, C / |grad_i|) / divisor`` per example; a zero gradient keeps factor 1."""
    factors = torch.rsqrt(squared_norms)  # inf for a zero gradient, clamped below
    return factors.mul_(max_grad_norm / divisor).clamp_(max=1.0 / divisor)


def _trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own trainable parameters directly (Opacus's ``trainable_modules``)."""
    return [(name, m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def unsupported_reason(model: nn.Module, probe: torch.Tensor) -> str | None:
    """Why one-pass clipping cannot train ``model`` correctly, or None when it can: each
    trainable parameter belongs to one layer, that layer has no trainable sublayer, and a
    forward pass on ``probe`` (a few examples) calls it once, with rows that are the
    examples, returning one tensor it does not later modify in place
    (``ReLU(inplace=True)`` after it would)."""
    layers = _trainable_layers(model)
    if not layers:
        return "the model has no trainable parameters"
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if len(dtypes) > 1:
        return f"trainable parameters mix dtypes {sorted(str(d) for d in dtypes)}"
    for name, m in layers:
        known = type(m) in FUSED_SAMPLERS or type(m) in GradSampleHooks.GRAD_SAMPLERS
        if not known and (type(m) is nn.EmbeddingBag or any(True for _ in m.buffers())):
            # Neither registry knows it, and Opacus's functorch route refuses these.
            return f"layer {name!r} ({type(m).__name__}) has no grad sampler functorch can run"
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and owners[id(p)] > 1:
            # Its gradient is the sum over the layers: per-layer norms would not bound it.
            return f"trainable parameter {name!r} is shared by several layers"
    for name, m in layers:
        for child_name, child in m.named_modules():
            if child is not m and any(p.requires_grad for p in child.parameters(recurse=False)):
                return (f"layer {name!r} has its own parameters and a trainable sublayer "
                        f"{child_name!r}")
    if probe.dim() == 2 and _is_linear_chain(model):
        return None  # what the probe would find, known without running it
    # Two batch sizes: a layer whose rows are not the batch (e.g. batch-second, or a
    # reshaped batch) cannot match both.
    for examples in (probe, probe[:-1]) if len(probe) > 1 else (probe,):
        reason = _probe_reason(model, layers, examples)
        if reason is not None:
            return reason
    return None


#: Layers that map each row of a ``[batch, features]`` input to the same row of their
#: output (``nn.Linear``), or act on each element (the rest), and hold no state.
_ROW_WISE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Dropout)


def _is_linear_chain(model: nn.Module) -> bool:
    """A plain ``nn.Sequential`` of distinct row-wise layers (exact types), none in place:
    on ``[batch, features]`` inputs each layer runs once, on rows that are the examples,
    and no output is modified in place, which is what the probe checks by running it."""
    if type(model) is not nn.Sequential:
        return False
    children = list(model)  # as Sequential.forward runs them: a repeat counts twice
    return (len({id(child) for child in children}) == len(children)
            and all(type(child) in _ROW_WISE_LAYERS and not getattr(child, "inplace", False)
                    and not child._forward_hooks and not child._forward_pre_hooks
                    for child in children))


def _probe_reason(model: nn.Module, layers: list[tuple[str, nn.Module]],
                  probe: torch.Tensor) -> str | None:
    calls: dict[int, list[tuple[tuple[Any, ...], Any, int]]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        version = out._version if isinstance(out, torch.Tensor) else -1
        calls.setdefault(id(module), []).append((args, out, version))

    handles = [m.register_forward_hook(record) for _, m in layers]
    try:
        with torch.enable_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    for name, m in layers:
        seen = calls.get(id(m), [])
        if len(seen) != 1:
            return f"layer {name!r} ran {len(seen)} times in one forward pass"
        args, out, version = seen[0]
        if not isinstance(out, torch.Tensor):
            return f"layer {name!r} returns {type(out).__name__}, not one tensor"
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return f"layer {name!r} takes inputs that are not tensors"
        if any(a.dim() == 0 or len(a) != len(probe) for a in args) or len(out) != len(probe):
            # A row must be one example, or one example's rows would be clipped apart.
            return (f"layer {name!r} got {len(args[0]) if args[0].dim() else 0} rows for "
                    f"{len(probe)} examples (the batch is reshaped)")
        if out._version != version:
            return f"the output of layer {name!r} is modified in place"
    return None


class FusedGradSampleModule(AbstractGradSampleModule):  # type: ignore[misc]
    """Opacus grad-sample module of the ``fused`` mode (see the module docstring): wraps
    ``m`` (a model :func:`unsupported_reason` accepts) and makes each trainable parameter's
    ``.grad`` a view into one flat buffer (:attr:`flat`, in the order of :attr:`params`).
    :meth:`backward` adds the clipped sum there; :meth:`close` removes the hooks, the views
    and Opacus's parameter attributes, leaving ``m`` as it was."""

    def __init__(self, m: nn.Module, *, max_grad_norm: float, batch_first: bool = True,
                 loss_reduction: str = "sum") -> None:
        if not batch_first or loss_reduction != "sum":
            raise ValueError("the fused mode takes batch-first inputs and a summed loss")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.max_grad_norm = max_grad_norm
        self._layers = [layer for _, layer in _trainable_layers(m)]
        self.params = [p for layer in self._layers for p in layer.parameters(recurse=False)
                       if p.requires_grad]
        for p in m.parameters():
            if not p.requires_grad:
                p.grad = None  # a stale gradient would be stepped on without noise
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype)
        offset = 0
        views: dict[torch.Tensor, torch.Tensor] = {}
        for p in self.params:
            views[p] = self.flat[offset:offset + p.numel()].view_as(p)
            p.grad = views[p]
            offset += p.numel()
        self._clipping: dict[int, LayerClipping] = {
            id(layer): FUSED_SAMPLERS.get(type(layer), RegistryClipping)(
                layer, {p: views[p] for p in layer.parameters(recurse=False)
                        if p.requires_grad})
            for layer in self._layers}
        self._plans: dict[tuple[int, ...], _LinearPlan | None] = {}
        self._batch = 0
        self._inputs: list[tuple[torch.Tensor, ...]] = []
        self._outputs: list[torch.Tensor] = []
        self._order: list[nn.Module] = []
        # A plain nn.Sequential whose trainable layers are direct children is run layer by
        # layer here (no hooks: a module hook costs ~10 us a call); anything else records
        # through forward hooks.
        direct = type(m) is nn.Sequential and all(
            any(layer is child for child in m) for layer in self._layers)
        self._chain: list[tuple[nn.Module, bool]] | None = None
        if direct and isinstance(m, nn.Sequential):
            # As Sequential.forward runs them (children() would drop a repeated layer).
            self._chain = [(child, id(child) in self._clipping) for child in m]
            self._order = [child for child, recorded in self._chain if recorded]
        # The chain's layers run in one order: its plan is looked up once.
        self._chain_plan = self._linear_plan() if direct else None
        self._handles = [] if direct else [layer.register_forward_hook(self._record)
                                           for layer in self._layers]

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...],
                out: torch.Tensor) -> None:
        if any(module is seen for seen in self._order):
            # The probe saw it once; a data-dependent forward ran it again.
            raise RuntimeError(f"{type(module).__name__} ran twice in one forward pass; "
                               "the fused mode clips a layer called once per step")
        self._order.append(module)
        self._inputs.append(args)
        self._outputs.append(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``m(x)``, recording what :meth:`backward` needs."""
        self._inputs.clear()
        self._outputs.clear()
        self._batch = len(x)
        if self._chain is None:
            self._order.clear()
            out: torch.Tensor = self._module(x)
            return out
        inputs, outputs = self._inputs, self._outputs
        for module, recorded in self._chain:
            if recorded:
                inputs.append((x,))
                x = module(x)
                outputs.append(x)
            else:
                x = module(x)
        return x

    def backward(self, loss_sum: torch.Tensor, *, scale: float) -> None:
        """Adds ``scale * sum_i clip_C(grad_i)`` to every trained parameter's ``.grad``,
        where ``loss_sum`` is the sum of per-example losses of the last :meth:`forward`;
        ``scale`` is 1 / the expected batch (DP-SGD's mean, as the noise is scaled). An
        empty batch adds nothing."""
        if self._batch == 0 or not self._outputs or not loss_sum.requires_grad:
            return
        grads = torch.autograd.grad(loss_sum, self._outputs, allow_unused=True)
        batch = self._batch
        # Inference mode, not no_grad: the norms and factors never meet autograd, and their
        # small ops dispatch ~15-25% faster (measured), which counts at small batches.
        with torch.inference_mode():
            if any(g is None for g in grads):  # an output the loss does not use
                grads = tuple(torch.zeros_like(y) if g is None else g
                              for y, g in zip(self._outputs, grads, strict=True))
            plan = self._linear_plan() if self._chain is None else self._chain_plan
            if plan is not None:
                activations = [args[0] for args in self._inputs]
                if plan.applies(activations):
                    plan.add_clipped_sum(activations, grads, self.max_grad_norm, scale, batch)
                    return
            for layer, inputs in zip(self._order, self._inputs, strict=True):
                for a in inputs:
                    if a.shape[0] != batch:
                        # A row must be one example, or its rows would be clipped apart.
                        raise RuntimeError(f"the rows of {type(layer).__name__}'s input are "
                                           "not the batch's examples")
            total = torch.zeros(batch, dtype=self.flat.dtype)
            used: list[LayerClipping] = []
            for layer, inputs, g in zip(self._order, self._inputs, grads, strict=True):
                clipping = self._clipping[id(layer)]
                clipping.add_squared_norms(inputs, g, total)
                used.append(clipping)
            factors = clip_factors(total, self.max_grad_norm, 1.0 / scale)
            for clipping in used:
                clipping.add_clipped(factors)

    def _linear_plan(self) -> _LinearPlan | None:
        """The all-linear fast path for the layers in this forward's order, or None when a
        layer is not a plain ``nn.Linear`` clipped by :class:`LinearFusedClipping`."""
        key = tuple(id(layer) for layer in self._order)
        if key not in self._plans:
            linear = all(type(layer) is nn.Linear
                         and type(self._clipping[id(layer)]) is LinearFusedClipping
                         for layer in self._order)
            self._plans[key] = _LinearPlan(
                [self._clipping[id(layer)] for layer in self._order],  # type: ignore[misc]
                self.flat.dtype) if linear else None
        return self._plans[key]

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Refused: the gradients are the optimizer's (``FusedDPOptimizer.zero_grad``); zeroing
        them here between its ``zero_grad`` and ``step`` would be harmless, but unlinking
        them from the flat buffer would silently skip the step."""
        raise RuntimeError("zero the gradients with the FusedDPOptimizer, not the model")

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            if hasattr(layer, "ft_compute_sample_grad"):  # Opacus's functorch cache
                del layer.ft_compute_sample_grad

    def close(self) -> None:
        """Hooks, ``.grad`` views and Opacus's parameter attributes off the wrapped model."""
        self._inputs.clear()
        self._outputs.clear()
        self._order.clear()
        self._clipping.clear()  # and the last batch's activations they hold
        self._plans.clear()
        self.cleanup()
        for p in self.params:
            p.grad = None
        for p in self._module.parameters():
            if hasattr(p, "summed_grad"):  # set by Opacus's DP optimizer
                del p.summed_grad


class FusedDPOptimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus's ghost-mode DP optimizer over a :class:`FusedGradSampleModule`: ``.grad``
    arrives as the clipped sum already divided by the expected batch (the module's
    :meth:`~FusedGradSampleModule.backward` with ``scale=1/expected_batch_size``), and a
    step adds this step's noise ``N(0, (z C / expected batch)^2)``, drawn by ``noise`` (in
    line or ahead, from a seeded or a secure source), calls the step hook (where the
    accountant attaches) and steps the wrapped optimizer. :meth:`zero_grad` starts the flat
    gradient at the coming step's noise (the parameters' ``.grad`` stay views of it; the
    backward pass adds the clipped sum on top, so the noise costs no pass over the gradient
    of its own); a step not preceded by :meth:`zero_grad` adds its noise itself. Either way
    each step gets one fresh noise vector. A step whose gradients are no longer the flat
    buffer's views is refused, as it would step without noise. One backward, one step:
    gradient accumulation (``signal_skip_step``) is not supported.

    Raises:
        ValueError: ``noise`` does not draw std ``z C / expected_batch_size``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: FusedGradSampleModule,
                 noise: StepNoise, noise_multiplier: float, expected_batch_size: int) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=module.max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        planned = noise_multiplier * module.max_grad_norm / expected_batch_size
        if not math.isclose(noise.std, planned, rel_tol=1e-9):
            raise ValueError(f"the noise draws std {noise.std}, but z C / expected batch is "
                             f"{planned}")
        self._flat = module.flat
        self._views = [(p, p.grad) for p in module.params]
        self._noise = noise
        self._step_noise: torch.Tensor | None = None  # drawn by zero_grad for the next step

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self._step_noise is None and self._noise.remaining:
            self._step_noise = self._noise.next()
        if self._step_noise is None:  # past the planned steps: no step may follow
            self._flat.zero_()
        else:
            self._flat.copy_(self._step_noise)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        raise NotImplementedError("the fused mode steps after every backward pass")

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        for p, view in self._views:
            if p.grad is not view:
                raise RuntimeError("a parameter's .grad was replaced (e.g. by the model's "
                                   "zero_grad): this step would miss the noise")
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def add_noise(self) -> None:
        """This step's noise, unless :meth:`zero_grad` already started the gradient at it."""
        if self._step_noise is None:
            self._flat.add_(self._noise.next())
        self._step_noise = None

    def scale_grad(self) -> None:
        """Nothing left to scale: the clip factors and the noise carry 1/expected batch."""
