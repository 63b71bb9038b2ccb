"""A Flower client as a device's trainer: our plan becomes Flower's fit/evaluate calls, the
client's answers become our update, example count and metrics, and the device's own upload
path (metrics policy included) does the rest. A tiny NumPyClient; no network."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.models import initial_state
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    UpdateHeader,
)
from core.security.identity import DeviceKey
from core.tensors import from_raw_bytes, save_safetensors, sha256_hex, tensor_infos
from core.types import DataSchema, DeviceAttributes, LocalTraining, ModelSpec
from device_agent.errors import Declined
from device_agent.runtime.device import Device

flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install 'fedcoord[flower]'")
from flwr.client import NumPyClient  # noqa: E402

from device_agent.flower import (  # noqa: E402
    FlowerClientError,
    FlowerTrainer,
    flower_trainers,
    parse_node_config,
)

MODEL = ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2})
P = Participation("dev", "task-1", 3, "token")


def plan(*, evaluate: bool = True, metrics: MetricsPolicy = MetricsPolicy.CLEAR) -> Plan:
    params = initial_state(MODEL, seed=0)
    data = save_safetensors(params)
    return Plan(task_id="task-1", round_number=3, model=MODEL, model_version=2,
                model_sha256=sha256_hex(data), model_size_bytes=len(data),
                local=LocalTraining(epochs=2, batch_size=8, learning_rate=0.25),
                evaluate=evaluate, deadline=1e12, max_update_bytes=1 << 20,
                max_chunk_bytes=1 << 20, update_tensors=tensor_infos(params), seed=7,
                metrics=metrics)


class AddOne(NumPyClient):  # type: ignore[misc]
    """Adds 1 to every weight; records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[np.ndarray], dict[str, Any]]] = []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.calls.append(("fit", parameters, config))
        return [p + 1 for p in parameters], 17, {"loss": 0.5, "note": "text is dropped"}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        self.calls.append(("evaluate", parameters, config))
        return 1.25, 5, {"accuracy": 0.6}


def test_fit_receives_the_plans_tensors_in_order_and_its_local_settings() -> None:
    client = AddOne()
    received = initial_state(MODEL, seed=0)
    FlowerTrainer(client).fit(P, plan(), received, seed=99)
    kinds = [c[0] for c in client.calls]
    assert kinds == ["evaluate", "fit"], "the received model is evaluated before training"
    _, params, config = client.calls[1]
    assert [p.shape for p in params] == [tuple(t.shape) for t in plan().update_tensors]
    for got, name in zip(params, [t.name for t in plan().update_tensors], strict=True):
        np.testing.assert_array_equal(got, received[name])
    assert config == {"server_round": 3, "task_id": "task-1", "epochs": 2, "batch_size": 8,
                      "optimizer": "sgd", "learning_rate": 0.25, "momentum": 0.0, "seed": 99}


def test_results_map_to_weights_examples_and_metrics() -> None:
    received = initial_state(MODEL, seed=0)
    fit = FlowerTrainer(AddOne()).fit(P, plan(), received, seed=0)
    assert fit.num_examples == 17
    for name, value in received.items():
        np.testing.assert_allclose(fit.trained[name], value + 1)
        assert fit.trained[name].dtype == value.dtype
    assert fit.metrics == {"eval_loss": 1.25, "eval_examples": 5.0, "eval_accuracy": 0.6,
                           "train_loss": 0.5}


def test_no_evaluation_unless_the_plan_asks() -> None:
    client = AddOne()
    fit = FlowerTrainer(client).fit(P, plan(evaluate=False), initial_state(MODEL, seed=0),
                                    seed=0)
    assert [c[0] for c in client.calls] == ["fit"]
    assert "eval_loss" not in fit.metrics


class Returns(NumPyClient):  # type: ignore[misc]
    def __init__(self, arrays: Any, examples: Any = 10) -> None:
        self.arrays, self.examples = arrays, examples

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[Any, Any, dict[str, Any]]:
        return self.arrays(parameters), self.examples, {}


@pytest.mark.parametrize(("arrays", "examples", "message"), [
    (lambda ps: ps[:-1], 10, "returned 3 arrays; the task's model has 4 tensors"),
    (lambda ps: [ps[1], ps[0], *ps[2:]], 10, "array 0 of shape [3]; the task's tensor "
                                             "'0.weight' has shape [3, 4]"),
    (lambda ps: ps, 0, "reported 0 training examples"),
    (lambda ps: ps, 2.5, "reported 2.5 training examples"),
])
def test_mismatched_answers_are_refused_naming_the_mismatch(
        arrays: Any, examples: Any, message: str) -> None:
    with pytest.raises(Declined, match=message.replace("[", r"\[").replace("]", r"\]")):
        FlowerTrainer(Returns(arrays, examples)).fit(P, plan(evaluate=False),
                                                     initial_state(MODEL, seed=0), seed=0)


def test_a_client_from_to_client_works_the_same() -> None:
    fit = FlowerTrainer(AddOne().to_client()).fit(P, plan(), initial_state(MODEL, seed=0),
                                                  seed=0)
    assert fit.num_examples == 17 and fit.metrics["eval_accuracy"] == 0.6


@dataclass
class OneRound:
    """A scripted coordinator: one round of ``plan``, then finished."""

    plan: Plan
    schemas: list[DataSchema | None] = field(default_factory=list)
    uploads: list[tuple[UpdateHeader, bytes]] = field(default_factory=list)
    offered: bool = False

    def enroll(self, key: DeviceKey, enrollment_token: str = "", attestation: bytes = b""
               ) -> str:
        return key.device_id

    def check_in(self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: DataSchema | None = None, declined: Sequence[str] = ()
                 ) -> CheckInResult:
        self.schemas.append(schema)
        if self.offered:
            return CheckInResult(CheckInOutcome.FINISHED, message="done")
        self.offered = True
        return CheckInResult(CheckInOutcome.ACCEPTED, "task-1", 3, "token")

    def get_plan(self, p: Participation) -> Plan:
        return self.plan

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        return save_safetensors(initial_state(MODEL, seed=0))

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int) -> str:
        self.uploads.append((header, payload))
        return "accepted"

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        raise AssertionError(f"unexpected report: {error}")


def run_device(policy: MetricsPolicy) -> tuple[OneRound, Device]:
    coordinator = OneRound(plan(metrics=policy))
    device = Device(DeviceKey.generate(), None, coordinator,  # type: ignore[arg-type]
                    trainer=FlowerTrainer(AddOne()), task_id="task-1")
    device.run()
    return coordinator, device


def test_the_update_goes_through_the_devices_upload_path_without_a_schema() -> None:
    coordinator, device = run_device(MetricsPolicy.CLEAR)
    assert device.stats.updates_accepted == 1 and not device.stats.failure
    assert coordinator.schemas[0] is None, "a Flower client owns its data: no schema"
    header, payload = coordinator.uploads[0]
    assert header.num_examples == 17
    assert header.metrics["train_loss"] == 0.5 and header.metrics["eval_accuracy"] == 0.6
    delta = from_raw_bytes(payload, header.tensors)
    for value in delta.values():
        np.testing.assert_allclose(value, 1.0, rtol=1e-6)


def test_the_metrics_policy_applies_to_the_clients_metrics() -> None:
    coordinator, _ = run_device(MetricsPolicy.WITHHELD)
    header, _ = coordinator.uploads[0]
    assert header.metrics == {}


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    (tmp_path / "my_flower_client.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_flower_client"


CLIENT_MODULE = """
    from flwr.client import ClientApp, NumPyClient

    class Client(NumPyClient):
        def __init__(self, partition):
            self.partition = partition

    instance = Client(-1)

    def client_fn(context):
        return Client(context.node_config["partition-id"]).to_client()

    def no_args():
        return Client(0)

    def not_a_client(context):
        return 42

    app = ClientApp(client_fn=client_fn)
"""


def test_client_functions_get_a_context_per_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = write_module(tmp_path, monkeypatch, CLIENT_MODULE)
    trainers = flower_trainers(f"{module}:client_fn", ["a-0", "a-1", "a-2"],
                               node_config="partition-id=4 num-partitions=8")
    partitions = [t._calls._client.numpy_client.partition for t in trainers]  # type: ignore[attr-defined]
    assert partitions == [4, 5, 6]
    assert len(flower_trainers(f"{module}:no_args", ["a"])) == 1
    assert len(flower_trainers(f"{module}:instance", ["a"])) == 1


@pytest.mark.parametrize(("attribute", "devices", "message"), [
    ("instance", 2, "one client instance, which serves one device"),
    ("app", 1, "is a ClientApp"),
    ("not_a_client", 1, "returned a int"),
    ("missing", 1, "has no attribute 'missing'"),
])
def test_unusable_targets_are_refused_with_a_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attribute: str, devices: int,
        message: str) -> None:
    module = write_module(tmp_path, monkeypatch, CLIENT_MODULE)
    with pytest.raises(FlowerClientError, match=message):
        flower_trainers(f"{module}:{attribute}", [f"d-{i}" for i in range(devices)])


def test_node_config_parses_like_flower_supernode() -> None:
    assert parse_node_config('partition-id=0 num-partitions=2,path="/x" f=0.5 on=true') == {
        "partition-id": 0, "num-partitions": 2, "path": "/x", "f": 0.5, "on": True}
    with pytest.raises(FlowerClientError, match="not KEY=VALUE"):
        parse_node_config("oops")
