"""A task meets its devices' data: what the coordinator checks at launch, and how it treats
devices that decline a task they cannot run. The real service on a manual clock and an
in-memory store; no network."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import DataMismatch, InvalidRequest
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core import apps
from core.apps import App
from core.data.dataset import LocalDataset
from core.data.params import DataParams
from core.models import register_model
from core.protocol import CheckInOutcome, Participation
from core.types import DataSchema, DeviceAttributes, ModelSpec, TaskSpec, TaskState

ATTRS = DeviceAttributes()
DIGITS = DataSchema((64,), 10)


def spec(input_dim: int = 64, **kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="fit", model=ModelSpec("logistic_regression",
                                    {"input_dim": input_dim, "num_classes": 10}),
        rounds=2, clients_per_round=3, min_reports=2, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0)
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(3), settings=CoordinatorSettings())


def report(service: CoordinatorService, schema: DataSchema, devices: int,
           population: str = "default", prefix: str = "d") -> None:
    """``devices`` devices of ``population`` check in with data ``schema`` (no task yet)."""
    attrs = DeviceAttributes(population=population)
    for i in range(devices):
        service.check_in(f"{prefix}{i}", attrs, schema=schema)


# ---------------------------------------------------------------- launch


def test_a_model_that_does_not_fit_the_populations_data_is_refused_naming_both_sides(
    service: CoordinatorService
) -> None:
    report(service, DIGITS, 12)
    with pytest.raises(DataMismatch) as refused:
        service.create_task(spec(input_dim=60))
    message = str(refused.value)
    assert message.startswith("task 'fit': the model does not fit the data population "
                              "'default' reported, [64] -> 10 classes (12 devices)")
    assert "takes 60 features" in message  # the model's side
    assert service.list_tasks() == []


def test_a_declared_schema_must_be_the_one_the_population_reported(
    service: CoordinatorService
) -> None:
    report(service, DIGITS, 3)
    declared = DataSchema((8, 8), 10)
    with pytest.raises(DataMismatch, match=r"declares data \[8, 8\] -> 10 classes, but "
                                           r"population 'default' reported \[64\] -> 10 "
                                           r"classes \(3 devices\)"):
        service.create_task(spec(model=ModelSpec("cnn", {}), data_schema=declared))


def test_a_model_must_fit_its_declared_schema(service: CoordinatorService) -> None:
    with pytest.raises(InvalidRequest, match=r"spec.data_schema: .* \[60\] -> 10 classes: a "
                                             r"batch of shape \[1, 60\] raised RuntimeError"):
        service.create_task(spec(input_dim=64, data_schema=DataSchema((60,), 10)))
    with pytest.raises(InvalidRequest, match=r"gave outputs of shape \[1, 10\], not \[1, 3\]"):
        service.create_task(spec(data_schema=DataSchema((64,), 3)))


@pytest.mark.parametrize(("server_data", "message"), [
    ("digits:shard=0/4,colour=red", "unknown key 'colour' for digits"),
    ("mnist:split=test", "unknown source 'mnist'"),
    ("digits:shard=0/4,dirichlet=0.5", None),
])
def test_server_evaluation_data_is_loaded_at_launch(service: CoordinatorService,
                                                    server_data: str, message: str | None
                                                    ) -> None:
    from core.types import Evaluation

    task = spec(evaluation=Evaluation(server_data=server_data))
    if message is None:
        service.create_task(task)  # a shard's own held-out part is evaluation data
        return
    with pytest.raises(InvalidRequest, match=f"spec.evaluation.server_data: .*{message}"):
        service.create_task(task)


def no_examples(params: DataParams) -> LocalDataset:
    empty = np.zeros((0, 64), np.float32)
    return LocalDataset(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), classes=10)


def test_server_evaluation_data_without_examples_is_refused(service: CoordinatorService) -> None:
    from core.types import Evaluation

    apps.install(App(data={"nothing_here_test": no_examples}), origin="test")
    with pytest.raises(InvalidRequest, match="holds no evaluation examples"):
        service.create_task(spec(evaluation=Evaluation(server_data="nothing_here_test")))


def test_a_fitting_task_launches_and_says_what_was_checked(service: CoordinatorService) -> None:
    report(service, DIGITS, 5)
    report(service, DataSchema((60,), 10), 1, prefix="odd")
    view = service.create_task(spec(data_schema=DIGITS))
    checks = view.launch_checks
    assert checks[0] == ("model 'logistic_regression': 650 parameters in 2 tensors: "
                         "linear.weight [10, 64], linear.bias [10]")
    assert "declared data [64] -> 10 classes: the model fits it" in checks
    assert "population 'default' reported [64] -> 10 classes (5 devices): the model fits it" \
        in checks
    # One odd device (or a malicious one) cannot block a launch; it is named, and declines.
    assert any(c.startswith("population 'default' reported [60] -> 10 classes (1 device): "
                            "those devices will decline") for c in checks)


def test_a_population_nobody_reported_launches_unchecked_and_says_so(
    service: CoordinatorService
) -> None:
    report(service, DataSchema((60,), 10), 4, population="elsewhere")
    view = service.create_task(spec(input_dim=64))
    assert view.launch_checks[-1].startswith("population 'default': no device reported its "
                                             "data in the last 600 s")


def test_the_schemas_of_a_population_expire_after_the_window(
    service: CoordinatorService, clock: ManualClock
) -> None:
    report(service, DataSchema((60,), 10), 4)
    clock.advance(601)
    service.create_task(spec(input_dim=64))  # nothing recent to contradict it


def test_an_unknown_architecture_says_the_coordinator_needs_the_app(
    service: CoordinatorService
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        service.create_task(spec(model=ModelSpec("nobody_registered_this", {})))
    message = str(refused.value)
    assert "does not know the architecture 'nobody_registered_this'" in message
    assert "--app module:attribute" in message and "entry point" in message


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model only takes images")


register_model("unit_broken_forward")(lambda: _Broken())


def test_a_model_that_raises_is_refused_with_its_exception(service: CoordinatorService) -> None:
    report(service, DIGITS, 2)
    with pytest.raises(DataMismatch, match="raised ValueError: this model only takes images"):
        service.create_task(spec(model=ModelSpec("unit_broken_forward", {})))


# ---------------------------------------------------------------- declines


def seat(service: CoordinatorService, clock: ManualClock, task_id: str, devices: list[str]
         ) -> dict[str, Participation]:
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        assert r.outcome is CheckInOutcome.ACCEPTED
        seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def test_a_task_no_device_can_run_fails_with_the_reason_instead_of_waiting(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec()).record.task_id
    seats = seat(service, clock, task_id, ["a", "b", "c"])
    reason = "the model does not fit this device's data ([60] -> 10 classes)"
    service.report_status(seats["a"], {}, reason, decline=True)
    service.report_status(seats["b"], {}, reason, decline=True)
    assert service.get_task(task_id).record.state is TaskState.RUNNING  # c may yet succeed
    service.report_status(seats["c"], {}, reason, decline=True)
    view = service.get_task(task_id)
    assert view.record.state is TaskState.FAILED
    assert reason in view.record.reason and "no device could run the task" in view.record.reason
    assert view.declines == {reason: 3}
    assert service.list_rounds(task_id)[-1].failure_reason == view.record.reason


def test_one_declining_device_cannot_fail_a_task_others_can_run(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec(clients_per_round=3, min_reports=1)).record.task_id
    seats = seat(service, clock, task_id, ["mallory", "alice", "bob"])
    service.report_status(seats["mallory"], {}, "I refuse", decline=True)
    service.report_status(seats["alice"], {}, "out of battery")  # an error, not a decline
    view = service.get_task(task_id)
    assert view.record.state is TaskState.RUNNING
    assert view.declines == {"I refuse": 1}


def test_a_device_is_never_offered_a_task_it_declined(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec()).record.task_id
    declined = frozenset({task_id})
    r = service.check_in("d", ATTRS, declined=declined)
    assert r.outcome is CheckInOutcome.NO_TASK
    r = service.check_in("d", ATTRS, task_id, declined=declined)
    assert r.outcome is CheckInOutcome.FINISHED and "declined" in r.message


def test_a_decline_needs_its_reason(service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(spec()).record.task_id
    seats = seat(service, clock, task_id, ["a"])
    with pytest.raises(InvalidRequest, match="reason"):
        service.report_status(seats["a"], {}, "", decline=True)
