"""Per-example gradient clipping in one backward pass, for models whose trainable
parameters all sit in ``nn.Linear`` layers applied to ``[batch, features]`` inputs.

For a linear layer ``y = a W^T + b`` and example ``i``, the gradient of its loss is
``g_i a_i^T`` for ``W`` and ``g_i`` for ``b``, where ``g_i = dL_i/dy_i``. Its squared L2 norm is
``(|a_i|^2 + 1) |g_i|^2``, so no per-example gradient needs to exist (Goodfellow, "Efficient
per-example gradient computations", 2015; the same identity is Opacus's ghost norm for
linear layers). One step here:

1. the forward pass records each linear layer's input ``a`` and output ``y`` (forward hooks);
2. one backward pass, ``torch.autograd.grad(loss, [y...])``, gives each layer's ``g`` and
   skips the weight gradients that non-private backprop would compute;
3. per-example norms over all layers give the clip factors ``min(1, C / |grad_i|)``;
4. each layer's clipped sum is ``(c * g)^T a``, one matmul, which is what non-private
   backprop pays for the weight gradient. It is added onto the step's Gaussian noise,
   already drawn into the flat buffer that the parameters' ``.grad`` are views of, so the
   caller's optimizer steps on ``(clipped sum + noise) / expected batch``.

Opacus's modes materialize per-example gradients (hooks, functorch, expanded weights) or run
backward twice (ghost clipping); this module does neither, which is where their 4-9x over
non-private training went. :func:`unsupported_reason` says when a model is outside this
shape, and the caller then uses Opacus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
        # |g_i a_i^T|^2 + |g_i|^2 = (|a_i|^2 + 1) |g_i|^2
        if weight:
            scale = torch.linalg.vecdot(a, a)
            if bias:
                scale.add_(1.0)
        else:
            scale = torch.full((len(a),), 1.0 if bias else 0.0, dtype=a.dtype)
        total.addcmul_(scale, torch.linalg.vecdot(g, g))
    return total


def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float,
                 divisor: float = 1.0) -> torch.Tensor:
    """``min(1, C / |grad_i|) / divisor`` per example; a zero gradient keeps factor 1."""
    factors = torch.rsqrt(squared_norms)  # inf for a zero gradient, clamped below
    return factors.mul_(max_grad_norm / divisor).clamp_(max=1.0 / divisor)


def unsupported_reason(model: nn.Module, probe: torch.Tensor) -> str | None:
    """Why one-pass clipping cannot train ``model``, or None when it can: every trainable
    parameter is a weight or bias of an ``nn.Linear``, and a forward pass on ``probe`` (a
    few examples) calls each such layer once, on a 2-D input, without modifying its output
    in place (``ReLU(inplace=True)`` would)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owners: dict[int, int] = {}
    for m in linears:
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    trainable = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        trainable += 1
        if id(p) not in owners:
            return f"trainable parameter {name!r} is not in an nn.Linear layer"
        if owners[id(p)] > 1:
            # Its gradient is the sum over the layers: per-layer norms would not bound it.
            return f"trainable parameter {name!r} is shared by several linear layers"
    if trainable == 0:
        return "the model has no trainable parameters"
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        calls.setdefault(id(module), []).append((args[0], out, out._version))

    handles = [m.register_forward_hook(record) for m in linears]
    try:
        with torch.enable_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not any(p.requires_grad for p in m.parameters()):
            continue
        seen = calls.get(id(m), [])
        if len(seen) != 1:
            return f"linear layer {name!r} ran {len(seen)} times in one forward pass"
        a, out, version = seen[0]
        if a.dim() != 2:
            return f"linear layer {name!r} got a {a.dim()}-D input"
        if len(a) != len(probe) or len(out) != len(probe):
            # A row must be one example, or one example's rows would be clipped apart.
            return (f"linear layer {name!r} got {len(a)} rows for {len(probe)} examples "
                    "(the batch is reshaped)")
        if out._version != version:
            return f"the output of linear layer {name!r} is modified in place"
    return None


class LinearClipping:
    """Attaches to ``model`` (see :func:`unsupported_reason` for which models) and makes each
    trainable parameter's ``.grad`` a view into one flat buffer (:attr:`flat`, in the order
    of :attr:`params`); :meth:`step_gradient` fills it with a DP-SGD gradient. :meth:`close`
    removes the hooks and the views."""

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, nn.Linear)
                        and any(p.requires_grad for p in m.parameters(recurse=False))]
        self.params = [p for m in self._layers for p in m.parameters(recurse=False)
                       if p.requires_grad]
        for p in model.parameters():
            if not p.requires_grad:
                p.grad = None  # a stale gradient would be stepped on without noise
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype)
        views: dict[int, torch.Tensor] = {}
        offset = 0
        for p in self.params:
            views[id(p)] = self.flat[offset:offset + p.numel()].view_as(p)
            p.grad = views[id(p)]
            offset += p.numel()
        self._grads = {id(m): (views.get(id(m.weight)),
                               None if m.bias is None else views.get(id(m.bias)))
                       for m in self._layers}
        self._batch = 0
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._order: list[nn.Linear] = []
        # An nn.Sequential whose trainable linear layers are direct children is run layer
        # by layer here (no hooks: module hooks cost ~10 us a call); anything else records
        # through forward hooks.
        direct = type(model) is nn.Sequential and all(
            any(m is child for child in model) for m in self._layers)
        self._chain: list[nn.Module] | None = list(model.children()) if direct else None
        self._handles = [] if direct else [m.register_forward_hook(self._record)
                                           for m in self._layers]

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...],
                out: torch.Tensor) -> None:
        self._order.append(module)  # type: ignore[arg-type]
        self._inputs.append(args[0])
        self._outputs.append(out)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)``, recording what :meth:`step_gradient` needs."""
        self._inputs.clear()
        self._outputs.clear()
        self._order.clear()
        self._batch = len(x)
        if self._chain is None:
            out: torch.Tensor = model(x)
            return out
        for module in self._chain:
            if isinstance(module, nn.Linear) and id(module) in self._grads:
                self._order.append(module)
                self._inputs.append(x)
                x = module(x)
                self._outputs.append(x)
            else:
                x = module(x)
        return x

    def step_gradient(self, loss_sum: torch.Tensor, *, max_grad_norm: float, divisor: float,
                      noise: torch.Tensor) -> None:
        """Sets every parameter's ``.grad`` to ``sum_i clip_C(grad_i) / divisor + noise``,
        where ``loss_sum`` is the sum of per-example losses of the last :meth:`forward` (an
        empty batch: zero with no graph, so the gradient is the noise alone) and ``noise``
        is this step's flat noise vector, already divided by ``divisor``, in the order of
        :attr:`params`."""
        self.flat.copy_(noise)
        if not self._outputs or not loss_sum.requires_grad:
            return
        grads = torch.autograd.grad(loss_sum, self._outputs, allow_unused=True)
        with torch.no_grad():
            output_grads = [torch.zeros_like(y) if g is None else g
                            for g, y in zip(grads, self._outputs, strict=True)]
            if any(len(a) != self._batch for a in self._inputs):
                # A row must be one example, or one example's rows would be clipped apart.
                raise RuntimeError("a linear layer's rows are not the batch's examples")
            layer_grads = [self._grads[id(m)] for m in self._order]
            trained = [(w is not None, b is not None) for w, b in layer_grads]
            squared = per_example_squared_norms(self._inputs, output_grads, trained)
            factors = clip_factors(squared, max_grad_norm, divisor)
            column = factors.unsqueeze(1)
            for (weight_grad, bias_grad), a, g in zip(layer_grads, self._inputs, output_grads,
                                                      strict=True):
                # sum_i c_i g_i a_i^T and sum_i c_i g_i, onto the noise: one matmul and one
                # matvec (in place: measured faster than their out= forms). Only trained
                # parameters have views: a frozen one never gets a gradient.
                if weight_grad is not None:
                    weight_grad.addmm_(g.T, a * column)
                if bias_grad is not None:
                    bias_grad.addmv_(g.T, factors)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for p in self.params:
            p.grad = None
