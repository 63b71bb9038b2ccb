"""What the evaluation and experiment round tests share (test_evaluation_rounds.py,
test_experiment_rounds.py): a service over an in-memory store with a manual clock and seeded
noise, devices admitted through a round's selection window, and a seat's download of the
evaluation bundle and upload of its report."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.evaluation import EvaluationLayout, encode_masked_report, read_plan
from core.privacy import NoiseSource
from core.protocol import CheckInOutcome, Participation, Plan, UpdateHeader, config_hash
from core.secagg.client import SecAggClient
from core.secagg.messages import MaskedInputRequest, ShareKeysRequest, Stage, UnmaskRequest
from core.tensors import sha256_hex
from core.types import DeviceAttributes, ModelSpec

ATTRS = DeviceAttributes()
MODEL = ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3})


def make_service(tmp_path: Path, clock: ManualClock, *, store: InMemoryStore | None = None,
                 seed: int = 0) -> CoordinatorService:
    """A service whose blobs are under ``tmp_path``; pass ``store`` to restart on it."""
    return CoordinatorService(store if store is not None else InMemoryStore(),
                              FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(seed), noise=NoiseSource.seeded(0),
                              settings=CoordinatorSettings(allow_seeded_noise=True))


def admit(service: CoordinatorService, clock: ManualClock, task_id: str,
          devices: Sequence[str]) -> dict[str, Participation]:
    """Seats ``devices`` in the open round: each checks in while the window is open, the
    clock passes its close, and each checks in again and is accepted."""
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        assert r.outcome is CheckInOutcome.ACCEPTED, r.message
        seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def bundle(service: CoordinatorService, p: Participation) -> tuple[Plan, bytes]:
    """The seat's plan and the model file it downloads (an evaluation task's bundle)."""
    plan = service.get_plan(p)
    record = service.model_for_participant(p, plan.model_version)
    return plan, b"".join(service.model_chunks(record, 1 << 20))


def layout_of(service: CoordinatorService, p: Participation) -> EvaluationLayout:
    """The report layout of the plan in the seat's evaluation bundle."""
    evaluation = read_plan(bundle(service, p)[1])
    assert evaluation is not None
    return EvaluationLayout(evaluation)


def upload(service: CoordinatorService, p: Participation, payload: bytes,
           examples: int = 1) -> str:
    """Uploads ``payload`` (the seat's update or report) in one piece; returns the receipt."""
    plan = service.get_plan(p)
    up = service.begin_upload(UpdateHeader(p, examples, list(plan.update_tensors),
                                           len(payload), sha256_hex(payload), {}))
    up.write(payload)
    return service.finish_upload(up)


#: One device's report: (its seat's index, its id, its seat) -> (the layout, its vector).
Report = Callable[[int, str, Participation], tuple[EvaluationLayout, np.ndarray]]


def run_secure_round(service: CoordinatorService, seats: dict[str, Participation],
                     report: Report) -> None:
    """Every seated device goes through the four SecAgg stages, its ``report`` encoded as the
    agent encodes it (scaled for DP when the plan says so)."""
    plan = service.get_plan(next(iter(seats.values())))
    sa = plan.secure_aggregation
    assert sa is not None
    clip = plan.privacy.l2_clip_norm if plan.privacy is not None else None
    clients = {d: SecAggClient(sa.params, sa.context, config_hash(plan)) for d in seats}
    for d in seats:
        service.secagg_advertise(seats[d], clients[d].advertise())
    for d in seats:
        req = service.secagg_reply(seats[d], Stage.ADVERTISE)
        assert isinstance(req, ShareKeysRequest)
        service.secagg_share_keys(seats[d], clients[d].share_keys(req))
    for i, d in enumerate(seats):
        layout, vector = report(i, d, seats[d])
        encoded = encode_masked_report(layout, vector, sa.params, dp_l2_clip_norm=clip,
                                       rng=np.random.default_rng(i))
        req = service.secagg_reply(seats[d], Stage.SHARE_KEYS)
        assert isinstance(req, MaskedInputRequest)
        service.secagg_masked_input(seats[d], clients[d].mask(req, encoded.vector), {},
                                    encoded.clipped)
    for d in seats:
        req = service.secagg_reply(seats[d], Stage.MASKED_INPUT)
        assert isinstance(req, UnmaskRequest)
        service.secagg_unmask(seats[d], clients[d].unmask(req))
