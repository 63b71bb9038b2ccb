"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) applied to
the pseudo-gradient ``g = -(weighted mean of client deltas)`` with ``torch.optim``:

    fedavg   SGD(lr)                with lr=1 this is plain FedAvg: x + mean delta
    fedavgm  SGD(lr, momentum)
    fedadam  Adam(lr, betas, eps)   (torch's Adam has bias correction; Reddi's has none)
    fedyogi  Yogi(lr, betas, eps)   torch has no Yogi; :class:`Yogi` below

Optimizer state crosses rounds as a flat ``{param/key: array}`` mapping, so it can be stored
as safetensors next to each model version and survive restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from core.types import ServerOptimizer, ServerOptimizerKind


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al., NeurIPS 2018), as FedYogi uses it on the server:

        m = b1 m + (1 - b1) g
        v = v - (1 - b2) g^2 sign(v - g^2)
        x = x - lr m / (sqrt(v) + eps)

    with v initialised to eps^2 (Reddi et al. use tau^2), no bias correction.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["eps"] ** 2)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                g2 = g * g
                v.sub_((1 - b2) * g2 * torch.sign(v - g2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return None


_FACTORIES: dict[ServerOptimizerKind,
                 Callable[[list[torch.Tensor], ServerOptimizer], torch.optim.Optimizer]] = {
    ServerOptimizerKind.FEDAVG: lambda p, c: torch.optim.SGD(p, lr=c.learning_rate),
    ServerOptimizerKind.FEDAVGM: lambda p, c: torch.optim.SGD(p, lr=c.learning_rate,
                                                              momentum=c.momentum),
    ServerOptimizerKind.FEDADAM: lambda p, c: torch.optim.Adam(
        p, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.epsilon),
    ServerOptimizerKind.FEDYOGI: lambda p, c: Yogi(
        p, lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.epsilon),
}


def apply_server_optimizer(
    params: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    config: ServerOptimizer,
    state: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One server step. Returns (new float32 params in the same key order, flat state)."""
    names = list(params)
    tensors = [torch.tensor(np.asarray(params[n], dtype=np.float32), requires_grad=True)
               for n in names]
    for n, t in zip(names, tensors, strict=True):
        t.grad = -torch.from_numpy(np.asarray(mean_delta[n], dtype=np.float32).copy())
    optimizer = _FACTORIES[config.kind](tensors, config)
    if state:
        _load_state(optimizer, names, tensors, state)
    optimizer.step()
    new = {n: t.detach().numpy().astype(np.float32, copy=True)
           for n, t in zip(names, tensors, strict=True)}
    return new, _flat_state(optimizer, names, tensors)


def _flat_state(optimizer: torch.optim.Optimizer, names: list[str],
                tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for n, t in zip(names, tensors, strict=True):
        for key, value in optimizer.state.get(t, {}).items():
            if isinstance(value, torch.Tensor):
                flat[f"{n}/{key}"] = value.detach().numpy().copy()
            else:
                flat[f"{n}/{key}"] = np.asarray(value, dtype=np.float64)
    return flat


def _load_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: list[torch.Tensor],
                flat: Mapping[str, np.ndarray]) -> None:
    for n, t in zip(names, tensors, strict=True):
        prefix = f"{n}/"
        entry: dict[str, Any] = {}
        for key, value in flat.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = torch.from_numpy(np.array(value, copy=True))
        if entry:
            optimizer.state[t] = entry
