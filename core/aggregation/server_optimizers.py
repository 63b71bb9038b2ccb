"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), applied
with ``torch.optim`` to the pseudo-gradient ``g = -(weighted mean of client deltas)``:

    fedavg    SGD(lr)                   with lr=1 exactly FedAvg: x + mean delta
    fedavgm   SGD(lr, momentum)         (Hsu et al., 2019)
    fedadam   Adam(lr, betas, eps)      torch's Adam, which bias-corrects m and v (Reddi's
                                        pseudocode does not; only early rounds differ)
    fedyogi   Yogi(lr, betas, eps)      torch has no Yogi: :class:`Yogi` below

``ServerOptimizer.epsilon`` is the adaptivity ``tau``. Optimizer state crosses rounds as a
flat ``{"param_name/state_key": array}`` mapping (see :func:`apply_server_optimizer`), so it
can be stored as a safetensors file next to each model version and survive restarts; one
step from stored state is bit-identical to a step of an optimizer kept alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from core.types import ServerOptimizer, ServerOptimizerKind


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al., NeurIPS 2018) as FedYogi uses it (Reddi et al., 2021, Alg. 2)::

        m = beta1 m + (1 - beta1) g
        v = v - (1 - beta2) g^2 sign(v - g^2)
        x = x - lr m / (sqrt(v) + eps)

    Choices: ``v`` starts at ``eps^2`` (Reddi et al. require ``v_{-1} >= tau^2``) and ``m``
    at 0; no bias correction, as in Reddi et al. ``v`` then stays positive (it only shrinks
    while ``v > g^2``, and by less than ``g^2``). ``step`` counts steps; the update does not
    use it.

    State per parameter: ``step`` (0-d float32), ``exp_avg`` (m), ``exp_avg_sq`` (v), the
    keys torch's Adam uses for the same quantities.

    Raises:
        ValueError: (on construction) ``lr < 0``, a beta outside [0, 1), or ``eps <= 0``.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3) -> None:
        if lr < 0:
            raise ValueError(f"Yogi: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Yogi: betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"Yogi: eps must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                eps = group["eps"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.full_like(p, eps * eps)
                    grad = p.grad
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    state["step"] += 1
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    grad_sq = grad * grad
                    v.addcmul_(grad_sq, torch.sign(v - grad_sq), value=-(1 - beta2))
                    p.addcdiv_(m, v.sqrt().add_(eps), value=-group["lr"])
        return loss


@dataclass(frozen=True)
class _Kind:
    factory: Callable[[list[torch.Tensor], ServerOptimizer], torch.optim.Optimizer]
    #: Per-parameter state keys the optimizer keeps; anything else in a stored state is
    #: refused (it would come from another optimizer kind).
    state_keys: frozenset[str]


_KINDS: dict[ServerOptimizerKind, _Kind] = {
    ServerOptimizerKind.FEDAVG: _Kind(
        lambda p, c: torch.optim.SGD(p, lr=c.learning_rate),
        frozenset()),
    ServerOptimizerKind.FEDAVGM: _Kind(
        lambda p, c: torch.optim.SGD(p, lr=c.learning_rate, momentum=c.momentum),
        frozenset({"momentum_buffer"})),
    ServerOptimizerKind.FEDADAM: _Kind(
        lambda p, c: torch.optim.Adam(p, lr=c.learning_rate, betas=(c.beta1, c.beta2),
                                      eps=c.epsilon),
        frozenset({"step", "exp_avg", "exp_avg_sq"})),
    ServerOptimizerKind.FEDYOGI: _Kind(
        lambda p, c: Yogi(p, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.epsilon),
        frozenset({"step", "exp_avg", "exp_avg_sq"})),
}


def make_server_optimizer(params: list[torch.Tensor], config: ServerOptimizer
                          ) -> torch.optim.Optimizer:
    """The torch optimizer ``config`` describes, over ``params`` (for callers that keep one
    alive, e.g. simulations; :func:`apply_server_optimizer` is the stateless form)."""
    return _KINDS[config.kind].factory(params, config)


def apply_server_optimizer(
    params: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    config: ServerOptimizer,
    state: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One server step: ``params`` moved by the optimizer along ``-mean_delta``.

    ``state`` is the flat state a previous call returned (after any round trip through
    :func:`core.tensors.save_safetensors`/``load_safetensors``), or None/empty for the first
    step. Returns (new float32 params in ``params``' key order, new flat state). The flat
    state has keys ``"{param_name}/{state_key}"`` (e.g. ``"w/exp_avg"``, ``"w/step"`` as a
    0-d array); FedAvg has none. The inputs are not modified.

    Raises:
        ValueError: ``mean_delta`` does not have exactly ``params``' names and shapes, or
            ``state`` names a tensor not in ``params``, a key this optimizer kind does not
            keep, or an array of the wrong shape.
    """
    kind = _KINDS[config.kind]
    _check_delta(params, mean_delta)
    names = list(params)
    tensors = [torch.tensor(np.asarray(params[n], dtype=np.float32), requires_grad=True)
               for n in names]
    for name, tensor in zip(names, tensors, strict=True):
        pseudo_gradient = np.array(mean_delta[name], dtype=np.float32, copy=True)
        np.negative(pseudo_gradient, out=pseudo_gradient)
        tensor.grad = torch.from_numpy(pseudo_gradient)
    optimizer = kind.factory(tensors, config)
    if state:
        _load_flat_state(optimizer, dict(zip(names, tensors, strict=True)), state, kind)
    optimizer.step()
    # The tensors are this call's own float32 copies: their memory becomes the result's
    # (no third copy of the model; 400 MB at 100M parameters).
    new_params = {name: t.detach().numpy() for name, t in zip(names, tensors, strict=True)}
    return new_params, _flat_state(optimizer, names, tensors)


def _check_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    if set(params) != set(delta):
        missing = sorted(set(params) - set(delta))
        extra = sorted(set(delta) - set(params))
        raise ValueError(f"mean delta does not match the parameters: missing {missing}, "
                         f"unexpected {extra}")
    for name, value in params.items():
        if np.shape(delta[name]) != np.shape(value):
            raise ValueError(f"mean delta {name!r} has shape {np.shape(delta[name])}, "
                             f"the parameter has {np.shape(value)}")


def _flat_state(optimizer: torch.optim.Optimizer, names: list[str],
                tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for name, tensor in zip(names, tensors, strict=True):
        for key, value in optimizer.state.get(tensor, {}).items():
            if value is None:  # e.g. SGD's momentum_buffer before its first use
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, "
                                f"not a tensor; it cannot be stored")
            flat[f"{name}/{key}"] = value.detach().numpy().copy()
    return flat


def _load_flat_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                     flat: Mapping[str, np.ndarray], kind: _Kind) -> None:
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for flat_key, value in flat.items():
        name, slash, key = flat_key.rpartition("/")
        if not slash or name not in tensors:
            raise ValueError(f"optimizer state {flat_key!r} names no parameter of the model")
        if key not in kind.state_keys:
            raise ValueError(f"optimizer state {flat_key!r}: {key!r} is not kept by this "
                             f"optimizer (expected one of {sorted(kind.state_keys)})")
        shape = np.shape(value)
        if shape not in ((), tuple(tensors[name].shape)):
            raise ValueError(f"optimizer state {flat_key!r} has shape {shape}, "
                             f"the parameter has {tuple(tensors[name].shape)}")
        per_param.setdefault(name, {})[key] = torch.from_numpy(np.array(value, copy=True))
    for name, entry in per_param.items():
        optimizer.state[tensors[name]] = entry
