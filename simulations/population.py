"""Populations too large to hold: a device's data are generated when a round admits it
(``simulation.population.load: per_round``) and dropped when the round is over.

With ``load: all`` (:func:`simulations.data.load_federated_data`) every device's training
data sit in one table for the whole run: 10,000 FedProx Synthetic devices took 1.63 GB and
19-29 s before the first round (``benchmarks/sim_population.py``), so 100,000 would need
~11 GB. Here memory is O(devices per round + per-device metadata):

- **per round**: the shards of the admitted devices (a device's data, as an agent started
  with ``SPEC,shard=i/N`` loads it: :func:`core.data.spec.load_dataset`), packed into a
  cohort table for the trainer and released after the round;
- **metadata**: the devices' profiles (:mod:`simulations.devices`, four floats each) and
  nothing else: a device's size is learnt by generating its shard when it is admitted;
- **evaluation sample**: devices drawn once in a seeded order until their training
  examples reach ``evaluation.train_loss_samples`` (and at least
  :data:`EVALUATION_DEVICES` devices, or all): the train loss is measured on their
  training data and, without ``test_data``, the test set is the union of their test
  splits (with ``load: all`` it is every device's).

Training gives exactly what ``load: all`` gives for the same devices: a job's shuffling
seed is its device's, and the cohort table holds the same rows (a test checks it).
Every admitted device is generated, those whose reports are then not used too (dropouts,
stragglers, late reports): selection needs its size for its steps and arrival time, as the
coordinator learns it from the device. Selection still draws availability for every device
each round: one vectorized numpy draw over the population's profile arrays.

Not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import NoReturn, overload

import numpy as np
import torch

from core.data.dataset import LocalDataset
from core.types import LocalTraining, ModelSpec
from simulations.cohort import (
    CohortResult,
    DeviceJob,
    DeviceTable,
    LocalObjective,
    make_trainer,
)
from simulations.config import DataConfig, EngineKind
from simulations.data import FederatedData, pack_shards
from simulations.errors import SimulationConfigError

#: The evaluation sample holds at least this many devices (or all of them).
EVALUATION_DEVICES = 100

_FIELD = "simulation.population.data"


class OnDemandPopulation:
    """``config.num_devices`` devices whose data are generated when asked for
    (:meth:`shard`) and kept until :meth:`end_round`. ``evaluation`` is the evaluation
    sample (module docstring) as a :class:`FederatedData`, its test set the global one.

    Raises:
        SimulationConfigError: (here and from any method that generates data) the spec is
            refused, a source fails, a device has no training examples, or devices' features
            differ in shape; naming ``source`` and the field.
    """

    def __init__(self, config: DataConfig, *, source: str = "<simulation>", seed: int = 0,
                 evaluation_examples: int = 20000) -> None:
        from core.data.spec import parse_data_spec
        from core.errors import CoreError

        self._source = source
        self.num_devices = config.num_devices
        try:
            self._spec = parse_data_spec(config.spec)
        except CoreError as exc:
            self._fail(_FIELD, str(exc))
        self._round: dict[int, LocalDataset] = {}
        self._shape: tuple[int, ...] | None = None
        #: Device shards generated so far (evaluation sample included): the work spent on
        #: data, and what a test checks to see that only admitted devices are generated.
        self.generated = 0
        #: Seconds spent generating them (wall clock).
        self.generate_s = 0.0
        #: Training examples per device, read as ``sizes[device]`` (generates the device's
        #: data unless this round already did): what selection reads.
        self.sizes: Sequence[int] = _Sizes(self)
        self.evaluation = self._evaluation_sample(config, seed, evaluation_examples)

    @property
    def held(self) -> int:
        """Devices whose data this round holds (admitted, not yet moved into a table)."""
        return len(self._round)

    def shard(self, device: int) -> LocalDataset:
        """Device ``device``'s data, generated once per round."""
        found = self._round.get(device)
        if found is None:
            found = self._generate(device)
            self._round[device] = found
        return found

    def table(self, devices: Sequence[int]) -> DeviceTable:
        """A device table whose device ``i`` is ``devices[i]`` (the rows ``load: all``'s
        table holds for it); the shards move into it and leave this round's cache."""
        shards = [self._round.pop(d) if d in self._round else self._generate(d)
                  for d in devices]
        packed = pack_shards(shards, x_test=np.zeros((0, *self._feature_shape())),
                             y_test=np.zeros(0, dtype=np.int64), num_classes=1)
        return DeviceTable(packed)

    def end_round(self) -> None:
        """Drops the data generated this round (devices admitted but not trained)."""
        self._round.clear()

    def _feature_shape(self) -> tuple[int, ...]:
        assert self._shape is not None
        return self._shape

    def _generate(self, device: int) -> LocalDataset:
        from core.data.spec import load_dataset, with_shard
        from core.errors import CoreError

        n = self.num_devices
        if not 0 <= device < n:
            raise IndexError(f"device {device} of {n}")
        began = time.perf_counter()
        try:
            shard = load_dataset(with_shard(self._spec, device, n))
        except (CoreError, ValueError) as exc:
            self._fail(_FIELD, f"{exc} (device {device} of {n})")
        finally:
            self.generate_s += time.perf_counter() - began
        shape = tuple(int(d) for d in shard.x_train.shape[1:])
        if len(shard.y_train) == 0:
            self._fail(_FIELD, f"device {device} of {n} has no training examples")
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            self._fail(_FIELD, f"device {device} has features of shape {list(shape)}, "
                               f"earlier devices {list(self._shape)}")
        self.generated += 1
        return shard

    def _evaluation_sample(self, config: DataConfig, seed: int, examples: int
                           ) -> FederatedData:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A2]))
        order = rng.permutation(self.num_devices)
        shards: list[LocalDataset] = []
        total = 0
        for device in order.tolist():
            if total >= examples and len(shards) >= min(EVALUATION_DEVICES, self.num_devices):
                break
            shards.append(self._generate(device))
            total += len(shards[-1].y_train)
        classes = max(s.classes for s in shards)
        if config.test_data:
            from core.data.spec import load_dataset
            from core.errors import CoreError

            try:
                test = load_dataset(config.test_data)
            except (CoreError, ValueError) as exc:
                self._fail("simulation.test_data", str(exc))
            x_test, y_test, classes = test.x_test, test.y_test, max(classes, test.classes)
        else:
            x_test = np.concatenate([s.x_test for s in shards])
            y_test = np.concatenate([s.y_test for s in shards])
        if len(y_test) == 0:
            self._fail("simulation.test_data", "no test examples: name a test set with "
                       "simulation.test_data (or evaluation.server_data)")
        if tuple(x_test.shape[1:]) != self._feature_shape():
            self._fail("simulation.test_data", f"test features of shape "
                       f"{list(x_test.shape[1:])} do not fit the devices' "
                       f"{list(self._feature_shape())}")
        return pack_shards(shards, x_test=x_test, y_test=y_test, num_classes=classes)

    def _fail(self, name: str, message: str) -> NoReturn:
        raise SimulationConfigError(self._source, name, message)


class _Sizes(Sequence[int]):
    """``population.sizes``: training examples of device ``k``, generating its data."""

    def __init__(self, population: OnDemandPopulation) -> None:
        self._population = population

    def __len__(self) -> int:
        return self._population.num_devices

    @overload
    def __getitem__(self, k: int) -> int: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[int]: ...

    def __getitem__(self, k: int | slice) -> int | Sequence[int]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return len(self._population.shard(int(k)).y_train)


class OnDemandCohortTrainer:
    """Trains a round's jobs (device indices of ``population``) with the ``kind`` engine on
    a cohort table of their data (:meth:`OnDemandPopulation.table`): the result is what the
    same engine gives over ``load: all``'s table."""

    def __init__(self, population: OnDemandPopulation, kind: EngineKind, model: ModelSpec,
                 local: LocalTraining, objective: LocalObjective, *, threads: int = 1) -> None:
        self._population = population
        self._kind = kind
        self._model = model
        self._local = local
        self._objective = objective
        self._threads = threads

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        table = self._population.table([j.device for j in jobs])
        return train_on_table(table, jobs, global_params, corrections, kind=self._kind,
                              model=self._model, local=self._local, objective=self._objective,
                              threads=self._threads)


def train_on_table(table: DeviceTable, jobs: Sequence[DeviceJob],
                   global_params: Mapping[str, torch.Tensor],
                   corrections: Mapping[str, torch.Tensor] | None, *, kind: EngineKind,
                   model: ModelSpec, local: LocalTraining, objective: LocalObjective,
                   threads: int = 1) -> CohortResult:
    """Trains ``jobs`` whose device ``i`` is row range ``i`` of ``table`` (a cohort table:
    job ``i``'s own device index only names it), each with its own seed and step budget."""
    trainer = make_trainer(kind, model, table, local, objective, threads=threads)
    local_jobs = [DeviceJob(i, j.seed, j.max_steps) for i, j in enumerate(jobs)]
    return trainer.train(global_params, local_jobs, corrections)
