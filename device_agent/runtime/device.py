"""One device's life: check in -> plan -> model -> train -> privatize -> upload, until the
task ends.

A task the device cannot run (its model does not build here or does not fit the device's
data, or training or evaluation raises: user code runs here) is *declined*: the device
reports the reason (``ReportStatus`` with ``decline``), remembers the task (at most
:data:`MAX_DECLINED` of them) and names it at every check-in, so it is never offered it again,
and goes on with other tasks. Only a device started for that one task stops, as failed.

Local data never leaves this object: only the update (trained weights minus the received
weights), its example count and summary metrics are sent, and the metrics only as the plan's
:class:`~core.protocol.MetricsPolicy` says: in the clear, inside the masked vector (secure
aggregation), or not at all (differential privacy).

Differential privacy (the plan's ``privacy``): under central DP the whole update is scaled to
at most the round's L2 clip norm before it leaves the device, before quantization under
secure aggregation, so the masked vector encodes the clipped update; under adaptive clipping
the device also sends whether its update fitted (a metric in the clear, or one more masked
value). Under local DP the device trains with DP-SGD (Opacus) and reports its epsilon.

Training itself is a :class:`LocalTrainer`'s: :class:`TorchTrainer` (the plan's model on the
device's :class:`~core.data.dataset.LocalDataset`, the default) or another one, such as
:class:`device_agent.flower.FlowerTrainer` (a Flower client); the update, clipping, metrics
policy and upload around it are the same for every trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from core.data.dataset import LocalDataset
from core.errors import CoreError
from core.evaluation import (
    TENSOR_NAME,
    DeviceResult,
    EvaluationLayout,
    EvaluationPlan,
    device_vector,
    encode_masked_report,
    read_plan,
    split_bundle,
)
from core.experiments.assignment import stratum_problem
from core.privacy.accounting import MechanismSteps, epsilon_of_history
from core.privacy.adaptive_clipping import clipped_bit
from core.privacy.clipping import clip_to_l2_norm
from core.privacy.distributed import device_noise_share
from core.privacy.noise import NoiseSource
from core.protocol import (
    UNCLIPPED_METRIC,
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    UpdateHeader,
    config_hash,
)
from core.secagg.client import SecAggClient, SecAggRefused
from core.secagg.encoding import add_noise_share, encode_update, masked_metric_values
from core.secagg.messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    RingVector,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from core.security.identity import DeviceKey
from core.tensors import TensorInfo, load_safetensors, sha256_hex, to_raw_bytes
from core.types import DataSchema, DeviceAttributes, EvaluationSplit
from device_agent.errors import (
    AgentError,
    BadPayload,
    BudgetExhausted,
    Declined,
    Rejected,
    RoundOver,
    Unreachable,
)
from device_agent.runtime.faults import crash_point

if TYPE_CHECKING:
    from torch import nn

    from core.training import TrainResult

log = logging.getLogger(__name__)

#: Bounds on the coordinator's "come back after": never spin, never sleep for ever.
MIN_WAIT_S = 0.05
MAX_WAIT_S = 60.0
#: How long a device whose update went to a shard waits before it checks in again, while
#: the coordinator is still offering it the seat it reported for (its polls are 0.25 s apart).
REPORTED_WAIT_S = 1.0

#: Tasks a device remembers having declined (the oldest is forgotten first: offered again,
#: it declines again).
MAX_DECLINED = 32
#: An app's metrics a device reports per evaluation, and the names the coordinator accepts.
MAX_APP_METRICS = 16
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,59}")
_MAX_METRIC_VALUE = 1e9

#: Updates are clipped this much below the plan's norm, so that float32 rounding of the
#: scaled update (relative 2^-24 per value) cannot push its norm above the norm.
CLIP_MARGIN = 1.0 - 2.0**-20


class Coordinator(Protocol):
    """What a device needs from the coordinator (``DeviceClient`` implements it)."""

    def enroll(self, key: DeviceKey, enrollment_token: str = "",
               attestation: bytes = b"") -> str: ...

    def check_in(
        self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
        schema: DataSchema | None = None, declined: Sequence[str] = (),
        stratum: str | None = None
    ) -> CheckInResult: ...

    def get_plan(self, p: Participation) -> Plan: ...

    def download_model(self, p: Participation, plan: Plan) -> bytes: ...

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int, *,
                      shard_address: str | None = None, deadline: float | None = None
                      ) -> str: ...

    def report_status(
        self, p: Participation, *, metrics: dict[str, float] | None = None, error: str = "",
        decline: bool = False
    ) -> None: ...

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement, *,
                         wait_s: float) -> ShareKeysRequest: ...

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse, *,
                          wait_s: float) -> MaskedInputRequest: ...

    def secagg_masked_input(self, p: Participation, vector: RingVector,
                            metrics: Mapping[str, float], clipped: int, *,
                            wait_s: float) -> UnmaskRequest: ...

    def secagg_unmask(self, p: Participation, message: UnmaskResponse, *,
                      wait_s: float) -> None: ...


@dataclass(frozen=True)
class LocalFit:
    """What a :class:`LocalTrainer` returns for a round.

    ``trained``: the trained tensors by name, at least those of the plan's
    ``update_tensors`` (the device computes the update, trained minus received, from them);
    ``num_examples``: the update's FedAvg weight; ``metrics``: everything the device measured
    (``train_loss``, ``eval_loss``, ``eval_NAME``, ...). The device applies the plan's metrics
    policy to them, so a trainer never decides what leaves the device."""

    trained: Mapping[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@runtime_checkable
class LocalTrainer(Protocol):
    """How a device trains the received model on its own data (one instance per device;
    called from that device's thread only).

    ``schema``: the data schema the device reports at check-in, or None (it reports none).
    ``fit`` evaluates first when ``plan.evaluate`` (``eval_*`` metrics of the *received*
    model), then trains; ``seed`` is the round's seed for this device.

    Raises (from ``fit``):
        Declined: the trainer cannot run this task (the model does not build or fit).
        BudgetExhausted: local DP: sending this round would spend past the budget.
        Exception: whatever user code raises; the device declines the task with it.
    """

    @property
    def schema(self) -> DataSchema | None: ...

    def fit(self, p: Participation, plan: Plan, received: Mapping[str, np.ndarray], *,
            seed: int) -> LocalFit: ...


@runtime_checkable
class LocalEvaluator(Protocol):
    """A trainer that can also run evaluation tasks: evaluates each model version of an
    evaluation bundle on the device's own data, without training (called from the device's
    thread only). Where ``evaluation.sketch`` is set, each result also carries every
    example's values of the sketched metrics (``DeviceResult.per_example``); a result
    without them makes the device decline the task.

    Raises (from ``evaluate_versions``):
        Declined: the model does not build or fit here, the split holds no example, or a
            metric the plan declares is missing.
        Exception: whatever user code raises; the device declines the task with it.
    """

    def evaluate_versions(self, plan: Plan, evaluation: EvaluationPlan,
                          versions: Mapping[int, Mapping[str, np.ndarray]]
                          ) -> dict[int, DeviceResult]: ...


@dataclass
class DeviceStats:
    rounds_joined: int = 0
    updates_accepted: int = 0
    updates_rejected: int = 0
    last_error: str = ""
    finished_reason: str = ""
    #: True when the device stopped because the coordinator stayed unreachable.
    gave_up: bool = False
    history: list[str] = field(default_factory=list)
    #: Tasks this device declined (it cannot run them), and why.
    declined: dict[str, str] = field(default_factory=dict)
    #: Why the device ended badly (unreachable, refused, crashed, declined the one task it
    #: was started for); "" when it ended well (task finished, stopped, idle).
    failure: str = ""


class Device:
    """A (possibly virtual) device. ``run()`` returns when the task ends or ``stop`` is set."""

    def __init__(
        self,
        key: DeviceKey,
        data: LocalDataset | None,
        coordinator: Coordinator,
        *,
        trainer: LocalTrainer | None = None,
        attributes: DeviceAttributes | None = None,
        task_id: str | None = None,
        exit_when_idle: bool = False,
        stop: threading.Event | None = None,
        local_dp_secure_noise: bool = True,
        enrollment_token: str = "",
        attestation: bytes = b"",
        stratum: str | None = None,
    ) -> None:
        """``key``: the device's identity (its id is derived from the public key);
        ``enrollment_token`` and ``attestation`` are sent when it enrolls. ``stratum``:
        declared at every check-in; in an experiment with per-stratum splits it picks the
        split this device's arm comes from (:mod:`core.experiments.assignment`); raises
        ValueError for a name that is not a stratum name.
        ``local_dp_secure_noise=False`` lets local-DP training use seeded (insecure)
        noise: tests and simulations only; production draws it from the OS-keyed CSPRNG.
        ``trainer``: how the device trains (default: :class:`TorchTrainer` on ``data``; one
        of the two is required)."""
        if stratum is not None and stratum_problem(stratum) is not None:
            raise ValueError(f"stratum: {stratum_problem(stratum)}")
        self.stratum = stratum
        if trainer is None:
            if data is None:
                raise ValueError("a device needs its data or a trainer")
            trainer = TorchTrainer(data, key.device_id,
                                   local_dp_secure_noise=local_dp_secure_noise)
        self.trainer = trainer
        self.key = key
        self.device_id = key.device_id
        self.enrollment_token = enrollment_token
        self.attestation = attestation
        self.data = data
        self.coordinator = coordinator
        self.attributes = attributes or DeviceAttributes()
        self.task_id = task_id
        self.exit_when_idle = exit_when_idle
        self.stop = stop or threading.Event()
        self.stats = DeviceStats()
        #: Tasks whose local-DP budget this device has spent: it refuses their rounds.
        self._exhausted: set[str] = set()
        #: Tasks this device declined, oldest first (sent at every check-in).
        self._declined: OrderedDict[str, str] = OrderedDict()
        #: The participation token of this device's last accepted upload: a sharded round's
        #: coordinator learns of an upload to a shard at its next poll (a fraction of a
        #: second), and until then answers a check-in with the same seat again.
        self._reported_token: str | None = None

    def _check_in(self, schema: DataSchema | None) -> CheckInResult:
        if self.stratum is None:  # no stratum: the call any Coordinator takes
            return self.coordinator.check_in(self.key, self.attributes, self.task_id,
                                             schema=schema, declined=list(self._declined))
        return self.coordinator.check_in(self.key, self.attributes, self.task_id,
                                         schema=schema, declined=list(self._declined),
                                         stratum=self.stratum)

    def run(self) -> DeviceStats:
        """Takes part until the task ends (or, without one, until ``stop``); never raises for
        a task's sake (see the module docstring). ``stats.failure`` says whether it ended
        badly."""
        try:
            self.coordinator.enroll(self.key, self.enrollment_token, self.attestation)
        except Unreachable as exc:
            self._unreachable(exc)
            return self.stats
        except Rejected as exc:
            log.error("%s: enrollment refused: %s", self.device_id, exc)
            self.stats.finished_reason = self.stats.failure = f"enrollment refused: {exc}"
            return self.stats
        schema = self.trainer.schema
        first = True
        while not self.stop.is_set():
            try:
                result = self._check_in(schema)
            except Unreachable as exc:
                self._unreachable(exc)
                break
            except Rejected as exc:
                log.error("%s: check-in refused: %s", self.device_id, exc)
                self.stats.finished_reason = self.stats.failure = str(exc)
                break
            if first:
                first = False
                log.info("%s: checked in with data %s: %s", self.device_id,
                         "of no schema" if schema is None else
                         f"{list(schema.feature_shape)} -> {schema.num_classes} classes",
                         result.outcome.value)
            if result.outcome is CheckInOutcome.FINISHED:
                self.stats.finished_reason = result.message
                break
            if result.outcome is CheckInOutcome.NO_TASK and self.exit_when_idle:
                self.stats.finished_reason = result.message
                break
            if result.outcome is not CheckInOutcome.ACCEPTED:
                self.stop.wait(min(max(result.retry_after_s, MIN_WAIT_S), MAX_WAIT_S))
                continue
            if result.token == self._reported_token:
                # The seat this device's update already went to (to a shard): nothing to
                # do in this round; its coordinator has not heard of the update yet.
                self.stop.wait(REPORTED_WAIT_S)
                continue
            p = Participation(self.device_id, result.task_id, result.round_number, result.token)
            try:
                self._participate(p)
            except Unreachable as exc:
                self._unreachable(exc)
                break
            if self.task_id is not None and (self.task_id in self._exhausted
                                             or self.task_id in self._declined):
                break
        return self.stats

    def _unreachable(self, exc: Unreachable) -> None:
        self.stats.finished_reason = str(exc)
        self.stats.gave_up = not self.stop.is_set()
        if self.stats.gave_up:
            self.stats.failure = str(exc)

    def _participate(self, p: Participation) -> None:
        if p.task_id in self._exhausted:
            self._report_error(p, "this device's local DP budget for the task is spent")
            return
        self.stats.rounds_joined += 1
        try:
            plan = self.coordinator.get_plan(p)
            model_bytes = self.coordinator.download_model(p, plan)
            if is_evaluation(plan):
                self._evaluate_and_report(p, plan, model_bytes)
            else:
                received = load_safetensors(model_bytes)
                del model_bytes  # the arrays are copies: the file's bytes are not kept
                header, payload, unclipped = self._train(p, plan, received)
                if plan.secure_aggregation is not None:
                    self._secure_upload(p, plan, header, payload, unclipped)
                elif plan.shard_upload is not None:
                    # A sharded round: the update goes to the shard the plan names, with
                    # the coordinator's ticket.
                    self.coordinator.upload_update(
                        dataclasses.replace(header, ticket=plan.shard_upload.ticket), payload,
                        plan.max_chunk_bytes, shard_address=plan.shard_upload.address,
                        deadline=plan.deadline)
                    self._reported_token = p.token
                else:
                    self.coordinator.upload_update(header, payload, plan.max_chunk_bytes)
            self.stats.updates_accepted += 1
            self.stats.history.append(f"round {p.round_number}: accepted")
        except RoundOver as exc:
            self.stats.history.append(f"round {p.round_number}: {exc.code}")
            log.info("%s: round %d moved on: %s", self.device_id, p.round_number, exc.message)
        except SecAggRefused as exc:
            # The coordinator deviated from the protocol: stop, reveal nothing more.
            self.stats.updates_rejected += 1
            self.stats.last_error = f"secure aggregation refused: {exc}"
            log.error("%s: round %d: secure aggregation refused: %s", self.device_id,
                      p.round_number, exc)
            self._report_error(p, f"secure aggregation refused: {exc}")
        except (Rejected, BadPayload) as exc:
            self.stats.updates_rejected += 1
            self.stats.last_error = str(exc)
            log.warning("%s: round %d: %s", self.device_id, p.round_number, exc)
            self._report_error(p, str(exc))
        except Unreachable:
            raise
        except BudgetExhausted as exc:
            log.warning("%s: %s; stopping for task %s", self.device_id, exc, p.task_id)
            self._report_error(p, str(exc))
            self._exhausted.add(p.task_id)
            if self.task_id == p.task_id:
                self.stats.finished_reason = str(exc)
        except Declined as exc:
            self._decline(p, str(exc))
        except AgentError as exc:
            self._report_error(p, str(exc))
        except Exception as exc:  # noqa: BLE001 - user code or a bug: this task only
            log.exception("%s: round %d of task %s failed", self.device_id, p.round_number,
                          p.task_id)
            self._decline(p, f"{type(exc).__name__}: {exc}")

    def _decline(self, p: Participation, reason: str) -> None:
        """Reports that this device cannot run ``p``'s task, and never takes part again."""
        log.warning("%s: declines task %s: %s", self.device_id, p.task_id, reason)
        self._declined[p.task_id] = reason
        self._declined.move_to_end(p.task_id)
        while len(self._declined) > MAX_DECLINED:
            self._declined.popitem(last=False)
        self.stats.declined[p.task_id] = reason
        self.stats.last_error = reason
        self.stats.history.append(f"round {p.round_number}: declined: {reason}")
        self._report_error(p, reason, decline=True)
        if self.task_id == p.task_id:
            self.stats.finished_reason = self.stats.failure = (
                f"declined task {p.task_id}: {reason}")

    def _secure_upload(self, p: Participation, plan: Plan, header: UpdateHeader,
                       payload: bytes, unclipped: int | None) -> None:
        """The four SecAgg+ stages; the update only ever leaves masked."""
        sa = plan.secure_aggregation
        assert sa is not None
        values = np.frombuffer(payload, dtype="<f4")
        if unclipped is not None:
            # Adaptive clipping's bit rides as one more masked value, scaled to the
            # quantizer's range (the coordinator divides by clip again).
            values = np.append(values.astype(np.float64), unclipped * sa.params.clip)
        if plan.metrics is MetricsPolicy.MASKED:
            # The metrics ride masked too: the coordinator learns only their sums.
            values = np.append(values.astype(np.float64),
                               masked_metric_values(header.metrics, sa.params.clip))
        try:
            encoded = encode_update(values, header.num_examples, sa.params,
                                    np.random.default_rng())
        except CoreError as exc:
            raise SecAggRefused(f"cannot encode the update: {exc}") from None
        vector = encoded.vector
        privacy = plan.privacy
        if privacy is not None and privacy.distributed_noise_steps:
            # Distributed DP: this device's share of the round's noise, in the integer ring,
            # before masking; the coordinator never sees an un-noised sum.
            try:
                share = device_noise_share(len(vector) - 1,
                                           noise_stddev=privacy.distributed_noise_steps,
                                           devices_planned=privacy.devices_planned,
                                           source=NoiseSource.secure())
            except ValueError as exc:
                raise SecAggRefused(f"cannot add this round's noise share: {exc}") from None
            vector = add_noise_share(vector, share)
        self._secure_stages(p, plan, vector, encoded.clipped)

    def _secure_stages(self, p: Participation, plan: Plan, vector: RingVector,
                       clipped: int) -> None:
        """The four SecAgg+ stages for an encoded ``vector``; it only ever leaves masked."""
        sa = plan.secure_aggregation
        assert sa is not None
        client = SecAggClient(sa.params, sa.context, config_hash(plan))
        step = sa.phase_timeout_s + 10.0
        first = max(plan.deadline - time.time(), 0.0) + step
        crash_point("secagg.advertise", p.round_number)
        share_req = self.coordinator.secagg_advertise(p, client.advertise(), wait_s=first)
        log.info("%s: round %d: secure aggregation: keys advertised, participant %d",
                 self.device_id, p.round_number, share_req.index)
        crash_point("secagg.share_keys", p.round_number)
        mask_req = self.coordinator.secagg_share_keys(p, client.share_keys(share_req),
                                                      wait_s=step)
        log.info("%s: round %d: secure aggregation: shares sent", self.device_id,
                 p.round_number)
        crash_point("secagg.masked_input", p.round_number)
        unmask_req = self.coordinator.secagg_masked_input(
            p, client.mask(mask_req, vector), {}, clipped, wait_s=step)
        log.info("%s: round %d: secure aggregation: masked input sent", self.device_id,
                 p.round_number)
        crash_point("secagg.unmask", p.round_number)
        self.coordinator.secagg_unmask(p, client.unmask(unmask_req), wait_s=step)
        log.info("%s: round %d: secure aggregation: unmasking shares sent", self.device_id,
                 p.round_number)

    def _evaluate_and_report(self, p: Participation, plan: Plan, model_bytes: bytes) -> None:
        """An evaluation round (:mod:`core.evaluation`): evaluates every model version of the
        bundle on this device's data, without training, and sends the report vector: in the
        clear (with KLL sketches of per-example values where the plan asks for them), or
        masked (secure aggregation; scaled for central DP as the plan says; never sketches).

        Raises:
            BadPayload: the plan's report layout is not the bundle's.
            Declined: the trainer cannot evaluate, the model does not build or fit, or a
                metric the task declares is missing.
        """
        try:
            evaluation = read_plan(model_bytes)
            if evaluation is None:
                raise BadPayload("the plan asks for an evaluation report, but the model file "
                                 "is not an evaluation bundle")
            layout = EvaluationLayout(evaluation)
            versions = split_bundle(load_safetensors(model_bytes), evaluation)
        except CoreError as exc:
            raise BadPayload(f"the evaluation bundle: {exc}") from None
        expected = [TensorInfo(TENSOR_NAME, "float32", (layout.length,))]
        if list(plan.update_tensors) != expected:
            raise BadPayload(f"the plan's report tensors {plan.update_tensors} are not the "
                             f"bundle's layout ({layout.length} values)")
        if not isinstance(self.trainer, LocalEvaluator):
            raise Declined(f"this device's trainer ({type(self.trainer).__name__}) cannot run "
                           f"an evaluation task")
        # In an experiment this device evaluates only its arm's version (the same keyed hash
        # the coordinator checks the report against), and the CUPED covariate's version if
        # the experiment has one; the other blocks stay zero.
        mine = evaluation.versions_for(self.device_id, self.stratum)
        if mine is not None:
            versions = {v: versions[v] for v in mine}
        results = self.trainer.evaluate_versions(plan, evaluation, versions)
        try:
            report = device_vector(layout, results)
        except ValueError as exc:
            raise Declined(f"cannot report the evaluation: {exc}") from None
        log.info("%s: round %d: evaluated model version(s) %s", self.device_id,
                 p.round_number, ", ".join(map(str, versions)))
        sa = plan.secure_aggregation
        if evaluation.sketch is not None and (sa is not None or plan.privacy is not None):
            # Sketch items are per-example values: they leave the device only in the clear.
            raise BadPayload("the evaluation plan asks for per-example sketches in a round "
                             "under secure aggregation or DP")
        if sa is not None:
            clip = plan.privacy.l2_clip_norm if plan.privacy is not None else None
            try:
                encoded = encode_masked_report(layout, report, sa.params, dp_l2_clip_norm=clip,
                                               rng=np.random.default_rng())
            except CoreError as exc:
                raise SecAggRefused(f"cannot encode the report: {exc}") from None
            self._secure_stages(p, plan, encoded.vector, encoded.clipped)
            return
        payload = report.astype("<f4").tobytes()
        first = next(iter(results))
        header = UpdateHeader(
            participation=p,
            num_examples=int(report[layout.index(first, "", "examples")]),
            tensors=expected, total_bytes=len(payload), sha256=sha256_hex(payload),
            metrics={}, upload_id=secrets.token_urlsafe(24))
        self.coordinator.upload_update(header, payload, plan.max_chunk_bytes)

    def _report_error(self, p: Participation, error: str, *, decline: bool = False) -> None:
        try:
            if decline:
                self.coordinator.report_status(p, error=error, decline=True)
            else:
                self.coordinator.report_status(p, error=error)
        except AgentError:
            pass

    def _train(
        self, p: Participation, plan: Plan, received: dict[str, np.ndarray]
    ) -> tuple[UpdateHeader, bytes, int | None]:
        """(header, raw update, adaptive clipping's bit for the secure path or None), from
        the plan's model (``received``: its tensors, loaded from the downloaded file).

        Raises:
            Declined: the trainer cannot run the task (the model does not build here or does
                not fit this device's data; a Flower client's weights do not match).
            Exception: whatever the task's or the trainer's code raises in training or
                evaluation; the caller declines the task with it.
        """
        seed = int(sha256_hex(f"{plan.seed}/{p.round_number}/{self.device_id}".encode())[:8], 16)
        fit = self.trainer.fit(p, plan, received, seed=seed)
        trained, metrics = fit.trained, dict(fit.metrics)
        privacy = plan.privacy
        names = [t.name for t in plan.update_tensors]
        delta = {n: (trained[n] - received[n]).astype(np.float32) for n in names}
        unclipped = None
        if privacy is not None and privacy.l2_clip_norm is not None:
            delta, norm = clip_to_l2_norm(delta, l2_clip_norm=privacy.l2_clip_norm * CLIP_MARGIN)
            if privacy.report_unclipped:
                bit = clipped_bit(norm, l2_clip_norm=privacy.l2_clip_norm)
                if plan.secure_aggregation is None:
                    metrics[UNCLIPPED_METRIC] = float(bit)
                else:
                    unclipped = bit
        if plan.metrics is not MetricsPolicy.CLEAR and plan.secure_aggregation is None:
            # Withheld: only adaptive clipping's bit, which the release accounts for.
            metrics = {k: v for k, v in metrics.items() if k == UNCLIPPED_METRIC}
        payload = to_raw_bytes(delta)
        header = UpdateHeader(
            participation=p,
            num_examples=fit.num_examples,
            tensors=list(plan.update_tensors),
            total_bytes=len(payload),
            sha256=sha256_hex(payload),
            metrics=metrics,
            # Fresh per update, the same on every retry of it: the coordinator answers a
            # retried upload as the first time instead of counting it twice or refusing it.
            upload_id=secrets.token_urlsafe(24),
        )
        return header, payload, unclipped


class TorchTrainer:
    """The default :class:`LocalTrainer`: builds the plan's model, evaluates it on the
    dataset's test split (when the plan asks), trains it on the train split (DP-SGD under
    local DP, whose per-task history this trainer keeps for the cumulative epsilon)."""

    def __init__(self, data: LocalDataset, device_id: str, *,
                 local_dp_secure_noise: bool = True) -> None:
        self.data = data
        self.device_id = device_id
        self.local_dp_secure_noise = local_dp_secure_noise
        #: Local DP: the DP-SGD steps this device took per task, for its cumulative epsilon.
        self._local_dp_history: dict[str, list[MechanismSteps]] = {}

    @property
    def schema(self) -> DataSchema:
        return self.data.schema

    def fit(self, p: Participation, plan: Plan, received: Mapping[str, np.ndarray], *,
            seed: int) -> LocalFit:
        from core.model_fit import fit_problem
        from core.models import build_model, load_numpy_state, model_hooks, state_to_numpy
        from core.training import evaluate, evaluate_metrics, train_local

        try:
            model = build_model(plan.model)
            load_numpy_state(model, received)
        except CoreError as exc:
            raise Declined(f"the model does not build on this device: {exc}") from None
        schema = self.data.schema
        problem = fit_problem(model, schema)
        if problem is not None:
            raise Declined(f"the model does not fit this device's data "
                           f"({list(schema.feature_shape)} -> {schema.num_classes} classes): "
                           f"{problem}")
        hooks = model_hooks(plan.model.architecture)
        metrics: dict[str, float] = {}
        if plan.evaluate and len(self.data.y_test) > 0:
            loss, acc = evaluate(model, self.data.x_test, self.data.y_test, loss=hooks.loss)
            metrics.update(eval_loss=loss, eval_accuracy=acc,
                           eval_examples=float(len(self.data.y_test)))
            if hooks.metrics is not None:
                app = app_metrics(evaluate_metrics(model, self.data.x_test,
                                                    self.data.y_test, hooks.metrics))
                for name, value in app.items():
                    metrics.setdefault(name, value)  # the built-in ones keep their names
        privacy = plan.privacy
        if privacy is not None and privacy.local is not None:
            result = self._train_local_dp(p, plan, model, seed, metrics)
        else:
            result = train_local(model, self.data.x_train, self.data.y_train, plan.local,
                                 seed=seed, loss=hooks.loss)
        metrics["train_loss"] = result.loss
        return LocalFit(state_to_numpy(model), result.num_examples, metrics)

    def evaluate_versions(self, plan: Plan, evaluation: EvaluationPlan,
                          versions: Mapping[int, Mapping[str, np.ndarray]]
                          ) -> dict[int, DeviceResult]:
        """Each version's loss (the app's loss when it has one), accuracy and the metrics
        the plan declares (the app's metrics hook), on the plan's split of the local data;
        with each example's values of the metrics the plan sketches (reports in the clear,
        :class:`core.evaluation.plan.SketchPlan`)."""
        from core.evaluation.per_example import device_result
        from core.model_fit import fit_problem
        from core.models import build_model, load_numpy_state, model_hooks

        x, y = self._split(evaluation.split)
        if len(y) == 0:
            raise Declined(f"this device holds no {evaluation.split.value} examples to "
                           f"evaluate on")
        hooks = model_hooks(plan.model.architecture)
        declared = evaluation.declared
        if declared and hooks.metrics is None:
            raise Declined(f"the task declares metrics {', '.join(declared)}, but model "
                           f"{plan.model.architecture!r} has no metrics hook")
        out = {}
        for version, params in versions.items():
            try:
                model = build_model(plan.model)
                load_numpy_state(model, params)
            except CoreError as exc:
                raise Declined(f"model version {version} does not build on this device: "
                               f"{exc}") from None
            problem = fit_problem(model, self.data.schema)
            if problem is not None:
                raise Declined(f"the model does not fit this device's data: {problem}")
            try:
                out[version] = device_result(model, x, y, evaluation, loss=hooks.loss,
                                             metrics=hooks.metrics)
            except ValueError as exc:  # a declared metric the hook does not return
                raise Declined(str(exc)) from None
        return out

    def _split(self, split: EvaluationSplit) -> tuple[np.ndarray, np.ndarray]:
        data = self.data
        if split is EvaluationSplit.TEST:
            return data.x_test, data.y_test
        if split is EvaluationSplit.TRAIN:
            return data.x_train, data.y_train
        return (np.concatenate([data.x_train, data.x_test]),
                np.concatenate([data.y_train, data.y_test]))

    def _train_local_dp(self, p: Participation, plan: Plan, model: nn.Module, seed: int,
                        metrics: dict[str, float]) -> TrainResult:
        from device_agent.training.local_dp import train_local_dp

        assert plan.privacy is not None and plan.privacy.local is not None
        local = plan.privacy.local
        dp = train_local_dp(model, self.data.x_train, self.data.y_train, plan.local, noise_multiplier=local.noise_multiplier,
                            max_grad_norm=local.max_grad_norm, delta=local.delta, seed=seed,
                            secure_mode=self.local_dp_secure_noise)
        history = self._local_dp_history.setdefault(p.task_id, [])
        steps = MechanismSteps(local.noise_multiplier, dp.sampling_rate, dp.train.steps)
        spent = epsilon_of_history([*history, steps], delta=local.delta)
        if spent > local.max_epsilon:
            # Nothing of this round leaves the device, so nothing of it is spent.
            raise BudgetExhausted(
                f"sending round {p.round_number}'s update would take this device's local DP "
                f"epsilon to {spent:.4g}, past the task's budget {local.max_epsilon:g}")
        history.append(steps)
        metrics["local_dp_round_epsilon"] = dp.epsilon
        metrics["local_dp_epsilon"] = spent
        log.info("%s: round %d: local DP epsilon %.4g so far (%.4g this round) at delta %g",
                 self.device_id, p.round_number, metrics["local_dp_epsilon"], dp.epsilon,
                 local.delta)
        return dp.train


def is_evaluation(plan: Plan) -> bool:
    """Whether the plan asks for an evaluation report rather than an update."""
    return len(plan.update_tensors) == 1 and plan.update_tensors[0].name == TENSOR_NAME


def app_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """An app's evaluation metrics as the device reports them: ``eval_NAME``, only names and
    values the coordinator accepts (it refuses a whole report with one bad metric), at most
    :data:`MAX_APP_METRICS`; the rest is dropped with a warning."""
    out: dict[str, float] = {}
    dropped = []
    for name, value in values.items():
        if (len(out) < MAX_APP_METRICS and _METRIC_NAME.fullmatch(name)
                and abs(value) <= _MAX_METRIC_VALUE):
            out[f"eval_{name}"] = value
        else:
            dropped.append(name)
    if dropped:
        log.warning("app metrics not reported (at most %d, names of [A-Za-z0-9_.:-], values "
                    "up to %g): %s", MAX_APP_METRICS, _MAX_METRIC_VALUE,
                    ", ".join(repr(n[:40]) for n in dropped[:8]))
    return out
