"""Local training of a whole cohort of simulated devices.

Every trainer does, for each device, exactly what :func:`core.training.train_local` does for
one device: ``epochs`` passes of minibatch SGD over batches of ``batch_size`` (the last one
smaller), reshuffled every epoch by a ``torch.Generator`` seeded with the job's seed, with a
fresh optimizer. On top of that, a device may be cut short after ``max_steps`` steps (partial
work before a deadline) and its gradient may carry extra terms (:class:`LocalObjective`:
FedProx's proximal term, SCAFFOLD's control-variate correction).

Trainers (all implement :class:`CohortTrainer`; results agree within float tolerance):

- :class:`BmmTrainer` (``bmm``, linear and MLP models) stacks the parameters of a group of
  devices ``[devices, ...]`` and runs one step of the whole group at once: forward and
  backward by hand as batched matrix products, the SGD step fused into the weight-gradient
  product. Devices are sorted by step count, so the devices still training at step ``s`` are
  a prefix and each step works on views, without padding devices. A step's ``[devices,
  batch]`` rows of the flat data table (padded and masked where a device's last batch is
  smaller) are gathered for many steps at once, so a step is a dozen torch calls and no
  Python bookkeeping. Groups are sized to keep their weights in cache and, with several
  threads, run on a pool, longest first.
- :class:`VectorizedTrainer` (``vmap``): the same lock step over the whole cohort with
  ``torch.func``'s ``vmap(grad(functional_call))``, for any model without buffers (features
  of any shape).
- :class:`LoopTrainer` trains one device after another with ``train_local`` itself (the
  reference, and the fallback for other optimizers and for models whose app brings its own
  loss).

Not thread-safe: a trainer reuses its buffers across calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core.app_types import LossFn
from core.models import build_model, model_hooks
from core.training import train_local
from core.types import LocalOptimizerKind, LocalTraining, ModelSpec
from simulations.config import EngineKind
from simulations.data import FederatedData, PackedRows

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalObjective:
    """Extra gradient terms every device of a round adds: ``prox_mu * (w - w_global)``
    (FedProx). SCAFFOLD's per-device correction ``c - c_i`` is passed to
    :meth:`CohortTrainer.train` as ``corrections``."""

    prox_mu: float = 0.0


@dataclass(frozen=True)
class DeviceJob:
    """Train device ``device`` (an index into the data) with shuffling seed ``seed``, for at
    most ``max_steps`` optimizer steps (None: the full ``epochs``)."""

    device: int
    seed: int
    max_steps: int | None = None


@dataclass(frozen=True, eq=False)
class CohortResult:
    """In job order: trained parameters stacked ``[jobs, ...]``, steps taken, training
    examples (the FedAvg weight), and the mean cross-entropy over the last epoch as
    ``train_local`` reports it (NaN for a device cut short).

    ``delta_sum``: instead of ``params`` (then empty), the cohort's example-weighted sum
    of deltas ``sum_i num_examples[i] * (trained_i - global)`` per tensor, flat float64,
    each device's term formed as the coordinator's mean forms it: what a trainer that sums
    in its workers returns (:class:`simulations.process_backend.ProcessCohortTrainer` with
    ``sum_deltas``), all that FedAvg's mean needs."""

    params: Params
    steps: np.ndarray
    num_examples: np.ndarray
    loss: np.ndarray
    delta_sum: dict[str, np.ndarray] | None = None


class CohortTrainer(Protocol):
    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        """Trains every job from ``global_params``; ``corrections`` (stacked ``[jobs, ...]``)
        are added to each device's gradients (SCAFFOLD)."""
        ...


def full_steps(num_examples: int, local: LocalTraining) -> int:
    """Optimizer steps of a complete local run: ``epochs * ceil(n / batch_size)``."""
    return local.epochs * math.ceil(num_examples / local.batch_size)


class DeviceTable:
    """All devices' training data as one float32 table ``[total + 1, *feature_shape]`` (the
    last row is zero padding) and int64 labels, with each device's row offset.

    Data loaded by :func:`simulations.data.load_federated_data` is already laid out so
    (:class:`~simulations.data.PackedRows`): the table is that memory, not a copy."""

    def __init__(self, data: FederatedData) -> None:
        self.sizes = data.sizes()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.pad_row = int(self.offsets[-1])
        self._packed: list[PackedRows] = []
        if _is_table(data.x_train, self.offsets, np.float32) and _is_table(
                data.y_train, self.offsets, np.int64):
            assert isinstance(data.x_train, PackedRows) and isinstance(data.y_train, PackedRows)
            self._packed = [data.x_train, data.y_train]
            x, y = data.x_train.table, data.y_train.table
        else:
            x = np.concatenate([*data.x_train, np.zeros((1, *data.feature_shape), np.float32)])
            y = np.concatenate([*data.y_train, np.zeros(1, np.int64)])
        self.x = _tensor(np.ascontiguousarray(x, dtype=np.float32))
        self.y = _tensor(np.ascontiguousarray(y, dtype=np.int64))

    def __getstate__(self) -> dict[str, object]:
        # A worker process gets the table (shared tensors: mapped, not copied), never the
        # data it came from: numpy arrays would be pickled by value, a copy per worker.
        return {**self.__dict__, "_packed": []}

    def share_memory(self) -> None:
        """Moves the table into shared memory (for worker processes to map) and points the
        data it was built from at it, so the data are still held once.

        Raises:
            RuntimeError, OSError: no room in shared memory (``/dev/shm``).
        """
        self.x.share_memory_()  # type: ignore[no-untyped-call]
        self.y.share_memory_()  # type: ignore[no-untyped-call]
        for rows, tensor in zip(self._packed, (self.x, self.y), strict=False):
            rows.rebase(tensor.numpy())

    def device_arrays(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[device]), int(self.offsets[device + 1])
        return self.x[lo:hi].numpy(), self.y[lo:hi].numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a tensor on the same memory; the shared-memory tensor it views, if it
    is one (``torch.from_numpy`` would hide that it is shared, and sharing would copy it)."""
    base = array.base
    if (isinstance(base, torch.Tensor) and base.is_shared()
            and base.data_ptr() == array.ctypes.data and tuple(base.shape) == array.shape):
        return base
    return torch.from_numpy(array)


def _is_table(rows: object, offsets: np.ndarray, dtype: type) -> bool:
    """``rows`` are PackedRows over a contiguous ``dtype`` table with exactly one zero
    padding row after ``offsets``' rows."""
    if not isinstance(rows, PackedRows):
        return False
    table = rows.table
    return (table.dtype == dtype and table.flags.c_contiguous and len(table) == offsets[-1] + 1
            and np.array_equal(rows.offsets, offsets) and not table[-1].any())


def make_trainer(kind: EngineKind, spec: ModelSpec, table: DeviceTable, local: LocalTraining,
                 objective: LocalObjective, *, threads: int = 1) -> CohortTrainer:
    """The trainer ``kind`` names; ``auto`` picks ``bmm`` where it applies, then ``vmap``,
    then ``loop`` (the vectorized trainers implement SGD with momentum and cross-entropy
    only: a model whose app brings its own loss trains in the loop, with that loss).
    ``threads``: worker threads of the ``bmm`` trainer (the others use torch's intra-op
    threads).

    Raises:
        ValueError: ``bmm`` or ``vmap`` asked for a model, optimizer or loss they do not
            support.
    """
    model = build_model(spec)
    loss = model_hooks(spec.architecture).loss
    sgd = local.optimizer is LocalOptimizerKind.SGD
    flat = table.x.dim() == 2
    kind = _resolve(kind, model, spec, table, local)
    if kind is EngineKind.LOOP:
        return LoopTrainer(model, table, local, objective, loss=loss)
    if not sgd:
        raise ValueError(f"engine {kind.value!r} trains with SGD only, "
                         f"got local.optimizer {local.optimizer.value!r}")
    if loss is not None:
        raise ValueError(f"engine {kind.value!r} trains with cross-entropy; "
                         f"{spec.architecture!r} has its app's own loss: use engine 'loop'")
    if kind is EngineKind.BMM:
        layers = mlp_layers(model)
        if layers is None or not flat:
            raise ValueError(f"engine 'bmm' supports linear and MLP models on flat features, "
                             f"not {spec.architecture!r}")
        return BmmTrainer(layers, table, local, objective, threads=threads)
    return VectorizedTrainer(_vmap_kernel(model), table, local, objective)


def resolve_kind(kind: EngineKind, spec: ModelSpec, table: DeviceTable,
                 local: LocalTraining) -> EngineKind:
    """The trainer :func:`make_trainer` builds for ``kind`` (``auto`` resolved)."""
    return _resolve(kind, build_model(spec), spec, table, local)


def _resolve(kind: EngineKind, model: nn.Module, spec: ModelSpec, table: DeviceTable,
             local: LocalTraining) -> EngineKind:
    if kind is not EngineKind.AUTO:
        return kind
    if (local.optimizer is not LocalOptimizerKind.SGD
            or model_hooks(spec.architecture).loss is not None or list(model.buffers())):
        return EngineKind.LOOP
    flat = table.x.dim() == 2
    return EngineKind.BMM if flat and mlp_layers(model) is not None else EngineKind.VMAP


def lock_step_devices(param_bytes: int) -> int:
    """Devices the ``bmm`` trainer steps together (one thread): as many as keep their
    ``param_bytes`` of weights each in cache, at least one."""
    return max(1, _GROUP_PARAM_BYTES // max(param_bytes, 1))


def mlp_layers(model: nn.Module) -> list[tuple[str, str]] | None:
    """(weight name, bias name) of each Linear layer if ``model`` is a chain
    Linear (ReLU Linear)* (logistic_regression and mlp are), else None."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    kinds = [type(m) for _, m in leaves]
    expected = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(leaves))]
    if not leaves or kinds != expected or len(leaves) % 2 == 0:
        return None
    if type(model) is not nn.Sequential and len(leaves) != 1:
        return None  # a custom forward might not be the chain its modules suggest
    layers = [(f"{name}.weight", f"{name}.bias") for name, m in leaves if isinstance(m, nn.Linear)]
    if any(m.bias is None for _, m in leaves if isinstance(m, nn.Linear)):
        return None
    return layers


# -- vectorized ---------------------------------------------------------------------------------

#: (parameter views [k, ...], features [k, B, F], labels [k, B], weights [k, B]) ->
#: (gradients [k, ...], per-device loss sum(ce * weight) [k])
Kernel = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class _Schedule:
    order: torch.Tensor        # sorted position -> job index (most steps first)
    steps: np.ndarray          # per job
    rows: torch.Tensor         # [S, D, B] table rows, pad_row where no example
    weights: torch.Tensor      # [S, D, B] 1/len(batch) on real examples, else 0
    loss_weight: torch.Tensor  # [S, D] len(batch)/n on the last epoch of complete runs
    active: list[int]          # per step: devices still training (a prefix)


def _schedule(table: DeviceTable, jobs: Sequence[DeviceJob], local: LocalTraining) -> _Schedule:
    batch = local.batch_size
    sizes = [int(table.sizes[j.device]) for j in jobs]
    full = [full_steps(n, local) for n in sizes]
    steps = np.array([f if j.max_steps is None else min(f, j.max_steps)
                      for j, f in zip(jobs, full, strict=True)], dtype=np.int64)
    order = np.argsort(-steps, kind="stable")
    total = int(steps.max(initial=0))
    rows = torch.full((total, len(jobs), batch), table.pad_row, dtype=torch.int64)
    loss_weight = torch.zeros((total, len(jobs)), dtype=torch.float64)
    for pos, j in enumerate(order.tolist()):
        n, s_j = sizes[j], int(steps[j])
        if s_j == 0:
            continue
        per_epoch = math.ceil(n / batch)
        generator = torch.Generator().manual_seed(jobs[j].seed)
        epochs = math.ceil(s_j / per_epoch)
        # The same draws as train_local: one randperm(n) per epoch from the seeded generator.
        perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(epochs)])
        padded = torch.full((epochs, per_epoch * batch), table.pad_row, dtype=torch.int64)
        padded[:, :n] = perms + int(table.offsets[jobs[j].device])
        rows[:s_j, pos] = padded.view(epochs * per_epoch, batch)[:s_j]
        if s_j == full[j]:
            last = slice((local.epochs - 1) * per_epoch, s_j)
            loss_weight[last, pos] = (rows[last, pos] != table.pad_row).sum(1).double() / n
    valid = (rows != table.pad_row).float()
    weights = valid / valid.sum(2, keepdim=True).clamp(min=1.0)
    sorted_steps = steps[order]
    active = [int((sorted_steps > s).sum()) for s in range(total)]
    return _Schedule(torch.from_numpy(order), steps, rows, weights, loss_weight, active)


class VectorizedTrainer:
    """Trains the cohort in lock step with a batched ``kernel``; see the module docstring."""

    def __init__(self, kernel: Kernel, table: DeviceTable, local: LocalTraining,
                 objective: LocalObjective) -> None:
        if local.optimizer is not LocalOptimizerKind.SGD:
            raise ValueError("the vectorized trainer implements SGD (with momentum) only")
        self._kernel = kernel
        self._table = table
        self._local = local
        self._objective = objective

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        plan = _schedule(self._table, jobs, self._local)
        d, batch = len(jobs), self._local.batch_size
        lr, momentum, mu = self._local.learning_rate, self._local.momentum, self._objective.prox_mu
        params = {n: p.detach().unsqueeze(0).expand(d, *p.shape).clone()
                  for n, p in global_params.items()}
        anchor = {n: p.detach() for n, p in global_params.items()}
        corr = ({n: c.index_select(0, plan.order) for n, c in corrections.items()}
                if corrections is not None else None)
        buffers = {n: torch.zeros_like(p) for n, p in params.items()} if momentum else {}
        step_losses = torch.zeros((len(plan.active), d), dtype=torch.float32)
        x, y = self._table.x, self._table.y
        features = x.shape[1:]
        with torch.no_grad():
            for s, k in enumerate(plan.active):
                rows = plan.rows[s, :k].reshape(-1)
                xb = x.index_select(0, rows).view(k, batch, *features)
                yb = y.index_select(0, rows).view(k, batch)
                view = {n: p[:k] for n, p in params.items()}
                grads, step_loss = self._kernel(view, xb, yb, plan.weights[s, :k])
                step_losses[s, :k] = step_loss
                for n, p in view.items():
                    g = grads[n]
                    if mu:
                        g = g + mu * (p - anchor[n])
                    if corr is not None:
                        g = g + corr[n][:k]
                    if momentum:
                        g = buffers[n][:k].mul_(momentum).add_(g)
                    p.add_(g, alpha=-lr)
        inverse = torch.argsort(plan.order)
        sizes = self._table.sizes[[j.device for j in jobs]]
        loss = (step_losses.double() * plan.loss_weight).sum(0)
        loss_np = loss.index_select(0, inverse).numpy()
        full = np.array([full_steps(int(n), self._local) for n in sizes])
        loss_np[plan.steps < full] = np.nan
        return CohortResult(params={n: p.index_select(0, inverse) for n, p in params.items()},
                            steps=plan.steps, num_examples=sizes, loss=loss_np)


def _vmap_kernel(model: nn.Module) -> Kernel:
    """``vmap(grad_and_value(loss))`` with the model called through ``functional_call``."""
    from torch.func import functional_call, grad_and_value, vmap

    def device_loss(p: Params, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor
                    ) -> torch.Tensor:
        logits = functional_call(model, p, (xb,))
        return (nn.functional.cross_entropy(logits, yb, reduction="none") * wb).sum()

    batched = vmap(grad_and_value(device_loss))

    def kernel(p: Params, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor
               ) -> tuple[Params, torch.Tensor]:
        with torch.enable_grad():
            grads, loss = batched(p, xb, yb, wb)
        return grads, loss

    return kernel


# -- bmm: fused batched SGD for Linear (ReLU Linear)* ------------------------------------------

#: Parameter bytes of the devices one lock-step group trains together. Measured with
#: benchmarks/simulation_groups.py on the 2-core development machine (2 MiB L2 per core), the
#: 54k-parameter MLP: 0.5 MiB 202, 1 MiB 247, 2 MiB 267, 4 MiB 270, 16 MiB 259 devices/s with
#: one thread, and 4 MiB 304-330 against 1 MiB 173-188 with two: past the L2 size, fewer and
#: larger batched products win.
_GROUP_PARAM_BYTES = 4 << 20
#: Packed minibatch rows gathered at a time (features, labels, targets of that many rows).
_CHUNK_ROWS = 1 << 14


@dataclass(frozen=True, eq=False)
class _Packed:
    """One group's steps, packed: step ``s`` trains the first ``active[s]`` devices of the
    group (most steps first) on rows ``starts[s]:starts[s + 1]`` of ``rows``."""

    active: list[int]
    starts: np.ndarray         # [S + 1]
    rows: torch.Tensor         # [P, B] table rows, pad_row where a batch has no example
    weights: torch.Tensor      # [P, B] 1/len(batch) on real examples, else 0
    loss_scale: torch.Tensor   # [P] 1/n on the last epoch of a complete run, else 0
    position: torch.Tensor     # [P] the device (position in the group) a row belongs to


def _pack(table: DeviceTable, jobs: Sequence[DeviceJob], steps: np.ndarray,
          local: LocalTraining) -> _Packed:
    """``jobs`` sorted by ``steps``, descending; the shuffles are ``train_local``'s."""
    batch = local.batch_size
    total = int(steps[0]) if len(steps) else 0
    done_by = np.cumsum(np.bincount(np.minimum(steps, total), minlength=total + 1))
    active = (len(steps) - done_by[:total]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(active)]).astype(np.int64)
    parts, scales, where = [], [], []
    for pos, (job, s_j) in enumerate(zip(jobs, steps.tolist(), strict=True)):
        if s_j == 0:
            break
        n = int(table.sizes[job.device])
        per_epoch = math.ceil(n / batch)
        generator = torch.Generator().manual_seed(job.seed)
        epochs = math.ceil(s_j / per_epoch)
        # The same draws as train_local: one randperm(n) per epoch from the seeded generator.
        padded = torch.full((epochs, per_epoch * batch), table.pad_row, dtype=torch.int64)
        for e in range(epochs):
            padded[e, :n] = torch.randperm(n, generator=generator)
        padded[:, :n] += int(table.offsets[job.device])
        parts.append(padded.view(epochs * per_epoch, batch)[:s_j])
        scale = torch.zeros(s_j, dtype=torch.float64)
        if s_j == full_steps(n, local):
            scale[(local.epochs - 1) * per_epoch:] = 1.0 / n
        scales.append(scale)
        where.append(starts[:s_j] + pos)
    count = int(starts[-1])
    rows = torch.empty((count, batch), dtype=torch.int64)
    loss_scale = torch.empty(count, dtype=torch.float64)
    if parts:
        index = torch.from_numpy(np.concatenate(where))
        rows.index_copy_(0, index, torch.cat(parts))
        loss_scale.index_copy_(0, index, torch.cat(scales))
    valid = (rows != table.pad_row).float()
    weights = valid / valid.sum(1, keepdim=True).clamp(min=1.0)
    position = torch.from_numpy(np.arange(count) - np.repeat(starts[:-1], active))
    return _Packed(active.tolist(), starts, rows, weights, loss_scale, position)


class BmmTrainer:
    """Lock-step SGD of Linear (ReLU Linear)* models with cross-entropy: forward and backward
    by hand as batched matrix products over the devices, and the SGD update fused into the
    weight-gradient product (``W.baddbmm_(g^T, h, alpha=-lr)``). ReLU's derivative at 0 is 0,
    as in autograd.

    The cohort, sorted by steps, is cut into groups small enough that a group's weights stay
    in cache for a whole step; with ``threads > 1`` the groups (longest first) are shared by
    that many worker threads, each running torch ops with one intra-op thread."""

    def __init__(self, layers: list[tuple[str, str]], table: DeviceTable, local: LocalTraining,
                 objective: LocalObjective, *, threads: int = 1) -> None:
        if local.optimizer is not LocalOptimizerKind.SGD:
            raise ValueError("the bmm trainer implements SGD (with momentum) only")
        self._layers = layers
        self._table = table
        self._local = local
        self._objective = objective
        self._threads = max(1, threads)

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        local = self._local
        sizes = self._table.sizes[[j.device for j in jobs]]
        full = np.array([full_steps(int(n), local) for n in sizes], dtype=np.int64)
        steps = np.array([f if j.max_steps is None else min(int(f), j.max_steps)
                          for j, f in zip(jobs, full, strict=True)], dtype=np.int64)
        order = np.argsort(-steps, kind="stable")
        order = order[steps[order] > 0]
        out = {n: p.detach().unsqueeze(0).expand(len(jobs), *p.shape).clone()
               for n, p in global_params.items()}
        loss = np.full(len(jobs), np.nan)
        groups = self._groups(global_params, order)
        tasks = [(g, global_params, steps, corrections, out, loss) for g in groups]
        if self._threads == 1 or len(groups) == 1:
            for task in tasks:
                self._train_group(*task, jobs=jobs)
        else:
            from concurrent.futures import ThreadPoolExecutor

            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(self._threads) as pool:
                    for future in [pool.submit(self._train_group, *t, jobs=jobs) for t in tasks]:
                        future.result()
            finally:
                torch.set_num_threads(before)
        loss[steps < full] = np.nan
        return CohortResult(params=out, steps=steps, num_examples=sizes, loss=loss)

    def _groups(self, global_params: Mapping[str, torch.Tensor], order: np.ndarray
                ) -> list[np.ndarray]:
        """Consecutive runs of ``order``; with several threads, at least ``2 x threads``
        groups so that the long ones (first) overlap with the rest."""
        per_device = sum(p.numel() * p.element_size() for p in global_params.values())
        size = lock_step_devices(per_device)
        if self._threads > 1:
            size = min(size, max(1, math.ceil(len(order) / (2 * self._threads))))
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _train_group(self, members: np.ndarray, global_params: Mapping[str, torch.Tensor],
                     steps: np.ndarray, corrections: Mapping[str, torch.Tensor] | None,
                     out: dict[str, torch.Tensor], loss: np.ndarray, *,
                     jobs: Sequence[DeviceJob]) -> None:
        local, table = self._local, self._table
        lr, momentum, mu = local.learning_rate, local.momentum, self._objective.prox_mu
        batch, features = local.batch_size, table.x.shape[1]
        plan = _pack(table, [jobs[i] for i in members], steps[members], local)
        index = torch.from_numpy(members)
        d = len(members)
        # Weights [d, out, in] and biases as [d, 1, out], so both update with baddbmm_.
        params = [(global_params[w].detach().unsqueeze(0).expand(d, -1, -1).clone(),
                   global_params[b].detach().view(1, 1, -1).expand(d, -1, -1).clone())
                  for w, b in self._layers]
        flat = [t for pair in params for t in pair]
        names = [n for pair in self._layers for n in pair]
        extra_terms = bool(mu) or corrections is not None
        anchors = [global_params[n].detach().view(t.shape[1:]) for n, t in zip(names, flat,
                                                                                   strict=True)]
        corr = ([corrections[n].index_select(0, index).view(t.shape)
                 for n, t in zip(names, flat, strict=True)] if corrections is not None else None)
        buffers = [torch.zeros_like(t) for t in flat] if momentum else None
        classes = params[-1][0].shape[1]
        ones = torch.ones((1, 1, batch))
        last = len(params) - 1
        log_p = torch.empty((int(plan.starts[-1]), batch, 1))
        x, y = table.x, table.y

        def update(i: int, k: int, a: torch.Tensor, b: torch.Tensor) -> None:
            """Parameter ``i`` (of the first k devices) takes an SGD step with gradient a @ b
            plus the objective's extra terms, through torch.optim.SGD's momentum rule."""
            p = flat[i][:k]
            if buffers is None and not extra_terms:
                p.baddbmm_(a, b, alpha=-lr)
                return
            # The gradient's terms in train_local's order (hooks, then SGD's momentum).
            direction = torch.bmm(a, b)
            if mu:
                direction = direction + mu * (p - anchors[i])
            if corr is not None:
                direction = direction + corr[i][:k]
            if buffers is not None:
                direction = buffers[i][:k].mul_(momentum).add_(direction)
            p.add_(direction, alpha=-lr)

        with torch.no_grad():
            s = 0
            while s < len(plan.active):
                # A chunk of steps whose rows are gathered at once (views thereafter).
                end = int(np.searchsorted(plan.starts, plan.starts[s] + _CHUNK_ROWS, "right")) - 1
                end = min(max(end, s + 1), len(plan.active))
                lo, hi = int(plan.starts[s]), int(plan.starts[end])
                rows = plan.rows[lo:hi].reshape(-1)
                counts = plan.active[s:end]
                xs = torch.split(x.index_select(0, rows).view(-1, batch, features), counts)
                labels = y.index_select(0, rows).view(-1, batch, 1)
                w3 = plan.weights[lo:hi].unsqueeze(2)
                # softmax * w - onehot * w is the weighted cross-entropy's gradient.
                targets = torch.zeros((hi - lo, batch, classes)).scatter_(2, labels, -w3)
                chunk = zip(xs, torch.split(labels, counts), torch.split(w3, counts),
                            torch.split(targets, counts), torch.split(log_p[lo:hi], counts),
                            counts, strict=True)
                for xb, yb, wb, target, lp_out, k in chunk:
                    h, inputs = xb, [xb]
                    for i, (wt, bt) in enumerate(params):
                        h = torch.baddbmm(bt[:k], h, wt[:k].transpose(1, 2))
                        if i < last:
                            h = h.relu_()
                            inputs.append(h)
                    lp = torch.log_softmax(h, dim=2)
                    torch.gather(lp, 2, yb, out=lp_out)
                    g = torch.addcmul(target, lp.exp_(), wb)
                    for i in range(last, -1, -1):
                        back = torch.bmm(g, params[i][0][:k]) if i > 0 else None
                        update(2 * i, k, g.transpose(1, 2), inputs[i])
                        update(2 * i + 1, k, ones.expand(k, -1, -1), g)
                        if back is not None:
                            # ReLU's backward in one pass (what autograd runs for relu).
                            g = torch.ops.aten.threshold_backward(back, inputs[i], 0.0)
                s = end
        # Per row: the batch's mean cross-entropy; a device's loss sums, over its last epoch,
        # the means times len(batch) / n, as train_local does.
        per_row = -(log_p.squeeze(2).double() * plan.weights.double()).sum(1)
        valid = (plan.rows != table.pad_row).sum(1).double()
        weighted = per_row * valid * plan.loss_scale
        device_loss = torch.zeros(d, dtype=torch.float64).index_add_(0, plan.position, weighted)
        loss[members] = device_loss.numpy()
        for (wn, bn), (wt, bt) in zip(self._layers, params, strict=True):
            out[wn].index_copy_(0, index, wt)
            out[bn].index_copy_(0, index, bt.view(d, -1))


# -- one device at a time ----------------------------------------------------------------------

class _BudgetSpent(Exception):
    """Raised before the step after a device's last permitted step."""


class LoopTrainer:
    """One device after another through :func:`core.training.train_local`, with ``loss``
    (an app's) instead of cross-entropy when given. The extra terms are gradient hooks on
    the parameters; a step budget stops training before the forward pass of the first step
    over budget (so the parameters are those after ``max_steps``)."""

    def __init__(self, model: nn.Module, table: DeviceTable, local: LocalTraining,
                 objective: LocalObjective, *, loss: LossFn | None = None) -> None:
        self._model = model
        self._loss = loss
        self._table = table
        self._local = local
        self._objective = objective

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        named = dict(self._model.named_parameters())
        out: dict[str, list[torch.Tensor]] = {n: [] for n in named}
        steps, examples, losses = [], [], []
        for i, job in enumerate(jobs):
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(global_params[n])
            handles = []
            for n, p in named.items():
                correction = None if corrections is None else corrections[n][i]
                hook = self._hook(p, global_params[n].detach(), correction)
                handles.append(p.register_hook(hook))  # type: ignore[no-untyped-call]
            x, y = self._table.device_arrays(job.device)
            budget = full_steps(len(y), self._local)
            if job.max_steps is not None:
                budget = min(budget, job.max_steps)
            calls = [0]

            def count(_module: nn.Module, _inputs: object, calls: list[int] = calls,
                      budget: int = budget) -> None:
                calls[0] += 1
                if calls[0] > budget:
                    raise _BudgetSpent

            handles.append(self._model.register_forward_pre_hook(count))
            try:
                result = train_local(self._model, x, y, self._local, seed=job.seed,
                                     loss=self._loss)
                steps.append(result.steps)
                losses.append(result.loss)
            except _BudgetSpent:
                steps.append(budget)
                losses.append(math.nan)
            finally:
                for handle in handles:
                    handle.remove()
            examples.append(len(y))
            for n, p in named.items():
                out[n].append(p.detach().clone())
        return CohortResult(params={n: torch.stack(v) for n, v in out.items()},
                            steps=np.array(steps, dtype=np.int64),
                            num_examples=np.array(examples, dtype=np.int64),
                            loss=np.array(losses, dtype=np.float64))

    def _hook(self, p: torch.Tensor, anchor: torch.Tensor, correction: torch.Tensor | None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        mu = self._objective.prox_mu

        def hook(g: torch.Tensor) -> torch.Tensor:
            if mu:
                g = g + mu * (p.detach() - anchor)
            if correction is not None:
                g = g + correction
            return g

        return hook
