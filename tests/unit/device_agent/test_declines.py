"""A device that cannot run a task declines it and goes on: it reports why (a decline, not a
crash), never takes part in that task again, and the agent's exit code says whether any
device ended well. A scripted coordinator; no network."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from core.data.dataset import LocalDataset
from core.models import initial_state, register_model
from core.protocol import CheckInOutcome, CheckInResult, Participation, Plan, UpdateHeader
from core.security.identity import DeviceKey
from core.tensors import save_safetensors, sha256_hex, tensor_infos
from core.types import DataSchema, DeviceAttributes, LocalTraining, ModelSpec
from device_agent.app import exit_status
from device_agent.runtime.device import Device, DeviceStats


def digits_like(n: int = 40) -> LocalDataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return LocalDataset(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8], classes=10)


@dataclass
class Report:
    task_id: str
    error: str
    decline: bool


@dataclass
class ScriptedCoordinator:
    """Offers the tasks in ``offers`` (one round each) to whoever checks in, skipping those
    the device says it declined; then "no task" (or "finished" for a named task)."""

    offers: dict[str, ModelSpec]
    check_ins: list[tuple[DataSchema | None, tuple[str, ...]]] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    uploads: list[UpdateHeader] = field(default_factory=list)
    offered: set[str] = field(default_factory=set)

    def enroll(self, key: DeviceKey, enrollment_token: str = "", attestation: bytes = b""
               ) -> str:
        return key.device_id

    def check_in(self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: DataSchema | None = None, declined: Sequence[str] = ()
                 ) -> CheckInResult:
        self.check_ins.append((schema, tuple(declined)))
        for offer in self.offers:
            if offer not in self.offered and offer not in declined and task_id in (None, offer):
                self.offered.add(offer)
                return CheckInResult(CheckInOutcome.ACCEPTED, offer, 1, "token")
        if task_id is not None:
            return CheckInResult(CheckInOutcome.FINISHED, message="done")
        return CheckInResult(CheckInOutcome.NO_TASK, message="nothing to do")

    def get_plan(self, p: Participation) -> Plan:
        model = self.offers[p.task_id]
        params = initial_state(model, seed=0)
        data = save_safetensors(params)
        return Plan(task_id=p.task_id, round_number=1, model=model, model_version=0,
                    model_sha256=sha256_hex(data), model_size_bytes=len(data),
                    local=LocalTraining(epochs=1, batch_size=16), evaluate=True,
                    deadline=1e12, max_update_bytes=1 << 20, max_chunk_bytes=1 << 20,
                    update_tensors=tensor_infos(params), seed=0)

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        return save_safetensors(initial_state(plan.model, seed=0))

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int) -> str:
        self.uploads.append(header)
        return "accepted"

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        self.reports.append(Report(p.task_id, error, decline))


FITS = ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10})
TOO_NARROW = ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10})


def test_a_task_whose_model_does_not_fit_is_declined_and_the_device_goes_on() -> None:
    coordinator = ScriptedCoordinator({"narrow": TOO_NARROW, "good": FITS})
    device = Device(DeviceKey.generate(), digits_like(), coordinator, exit_when_idle=True)
    stats = device.run()
    [report] = coordinator.reports
    assert report.task_id == "narrow" and report.decline
    assert report.error.startswith("the model does not fit this device's data ([64] -> 10 "
                                   "classes): a batch of shape [1, 64] raised RuntimeError")
    assert [u.participation.task_id for u in coordinator.uploads] == ["good"]
    # Every check-in after the decline names the task, and carries the device's data.
    assert coordinator.check_ins[0] == (DataSchema((64,), 10), ())
    assert all(declined == ("narrow",) for _, declined in coordinator.check_ins[1:])
    assert stats.declined == {"narrow": report.error}
    assert stats.failure == ""  # it ended well: idle, after its other task


def test_a_device_started_for_one_task_it_cannot_run_stops_as_failed() -> None:
    coordinator = ScriptedCoordinator({"narrow": TOO_NARROW})
    device = Device(DeviceKey.generate(), digits_like(), coordinator, task_id="narrow")
    stats = device.run()
    assert stats.failure.startswith("declined task narrow: the model does not fit")
    assert len(coordinator.check_ins) == 1


def _raising_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    raise ArithmeticError("the app's loss is broken")


register_model("unit_device_broken_loss", loss=_raising_loss)(
    lambda input_dim=64, num_classes=10: nn.Linear(input_dim, num_classes))


def test_an_exception_of_the_tasks_own_code_declines_the_task_and_names_the_error() -> None:
    coordinator = ScriptedCoordinator({"broken": ModelSpec("unit_device_broken_loss", {})})
    device = Device(DeviceKey.generate(), digits_like(), coordinator, exit_when_idle=True)
    stats = device.run()
    [report] = coordinator.reports
    assert report.decline and report.error == "ArithmeticError: the app's loss is broken"
    assert stats.failure == ""


def test_the_agent_exits_non_zero_only_when_every_device_failed() -> None:
    well, failed = DeviceStats(), DeviceStats(failure="declined task t: does not fit")
    assert exit_status([well, failed]) == 0
    assert exit_status([failed, failed]) == 1
    assert exit_status([well]) == 0
