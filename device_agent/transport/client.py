"""The device's stub wrapper: deadlines on every call, retries with jittered exponential
backoff while the coordinator is unreachable, and translation to plain values.

Several coordinator addresses (replicas on one database, ``"HOST:PORT,HOST:PORT"``): calls
go to one of them until it fails with a retryable status (UNAVAILABLE: down, or a standby
replica that does not lead), then to the next; the backoff grows once per pass over every
address, so a standby's refusal costs no wait.

Thread-safety: one ``DeviceClient`` may be shared by many device threads (gRPC channels are
thread-safe).
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from core.protocol import CheckInOutcome, CheckInResult, Participation, Plan, UpdateHeader
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
from core.tls import ClientTls
from core.types import API_VERSION, DataSchema, DeviceAttributes
from device_agent.errors import BadPayload, Rejected, RoundOver, Unreachable
from protos import convert
from protos.fedcoord.v1 import aggregator_pb2_grpc, device_pb2, device_pb2_grpc

T = TypeVar("T")

#: Retried with backoff. CANCELLED too: a gRPC server sheds the calls it cannot take yet
#: (its backlog of calls waiting for the application past ``grpc.server.max_pending_requests``,
#: 1000 by default) by cancelling them at once; 10,000 devices on one coordinator got 1.6M such
#: answers in ten minutes, half within 4 ms (benchmarks/scale.py, 2026-12-07). Every call
#: retried here is idempotent (an upload carries its upload id).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED}
#: With several addresses, these move the calls on to the next one: the coordinator is down,
#: a standby replica, or hung. (CANCELLED is a busy coordinator shedding load: stay.)
_MOVE_ON = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_ROUND_OVER = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED}
_OUTCOMES = {
    device_pb2.CheckInResponse.ACCEPTED: CheckInOutcome.ACCEPTED,
    device_pb2.CheckInResponse.RETRY_LATER: CheckInOutcome.RETRY_LATER,
    device_pb2.CheckInResponse.NO_TASK: CheckInOutcome.NO_TASK,
    device_pb2.CheckInResponse.FINISHED: CheckInOutcome.FINISHED,
}


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff ("full jitter"): sleep U(0, min(cap, base * 2^n))."""

    base_s: float = 0.2
    cap_s: float = 10.0
    #: Give up after this long without a successful call.
    give_up_after_s: float = 120.0
    call_timeout_s: float = 30.0
    transfer_timeout_s: float = 600.0


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """The coordinator addresses of ``"A"``, ``"A,B"`` or a sequence of them (blanks
    dropped); ValueError when none is left."""
    items = [target] if isinstance(target, str) else list(target)
    targets = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not targets:
        raise ValueError("no coordinator address given")
    return targets


class DeviceClient:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        policy: RetryPolicy | None = None,
        stop: threading.Event | None = None,
        max_message_bytes: int = 64 << 20,
        tls: ClientTls | None = None,
    ) -> None:
        """``target``: the coordinator's address, or several (comma-separated or a
        sequence: replicas, tried in turn; see the module docstring). ``tls``: verify the
        coordinator against its CA (and present a client certificate when it holds one);
        None: plaintext. One channel per address, so one handshake per connection, shared
        by every device of the process."""
        self.targets = parse_targets(target)
        self.policy = policy or RetryPolicy()
        self._stop = stop or threading.Event()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
        ]
        credentials = None if tls is None else grpc.ssl_channel_credentials(
            root_certificates=tls.ca_pem, private_key=tls.key_pem,
            certificate_chain=tls.cert_chain_pem)
        self._channels = [
            grpc.insecure_channel(t, options=options) if credentials is None
            else grpc.secure_channel(t, credentials, options=options)
            for t in self.targets]
        self._stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in self._channels]
        self._options = options
        self._credentials = credentials
        self._shard_stubs: dict[str, aggregator_pb2_grpc.AggregatorServiceStub] = {}
        #: Index of the address calls go to now; moved on by :meth:`_move_on`.
        self._current = 0
        self._lock = threading.Lock()
        self._rng = random.Random()

    @property
    def target(self) -> str:
        """The address calls go to now."""
        return self.targets[self._current]

    @property
    def _stub(self) -> device_pb2_grpc.DeviceServiceStub:
        return self._stubs[self._current]

    def _move_on(self, failed: int) -> None:
        """The address at ``failed`` did not serve: the next one gets the calls (unless
        another thread moved on already)."""
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self._stubs)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # -- calls ---------------------------------------------------------------

    def enroll(self, key: DeviceKey, enrollment_token: str = "",
               attestation: bytes = b"") -> str:
        """Registers the device's public key (a repeat is harmless); returns its device id."""
        def call() -> device_pb2.EnrollResponse:
            req = device_pb2.EnrollRequest(
                api_version=API_VERSION,
                proof=convert.device_proof_to_proto(key.prove("enroll")),
                enrollment_token=enrollment_token, attestation=attestation)
            resp: device_pb2.EnrollResponse = self._stub.Enroll(
                req, timeout=self.policy.call_timeout_s)
            return resp

        resp = self._retrying(call, rate_limited=True)
        return resp.device_id

    def check_in(
        self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
        schema: DataSchema | None = None, declined: Sequence[str] = (),
        stratum: str | None = None
    ) -> CheckInResult:
        """A signed check-in (a fresh proof per attempt), with the device's data ``schema``,
        the tasks it ``declined`` (at most the newest 32 are sent) and its ``stratum``. Over
        the coordinator's rate limit, the answer is RETRY_LATER after the time it asks for."""
        declined_ids = list(declined)[-convert.MAX_DECLINED_TASKS:]

        def call() -> device_pb2.CheckInResponse:
            req = device_pb2.CheckInRequest(
                api_version=API_VERSION, device_id=key.device_id,
                attributes=convert.attributes_to_proto(attrs), task_id=task_id or "",
                proof=convert.device_proof_to_proto(key.prove("check-in", task_id or "")),
                data_schema=(convert.data_schema_to_proto(schema) if schema is not None
                             else None),
                declined_task_ids=declined_ids, stratum=stratum or "",
            )
            resp: device_pb2.CheckInResponse = self._stub.CheckIn(
                req, timeout=self.policy.call_timeout_s)
            return resp

        try:
            resp = self._retrying(call)
        except Rejected as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED.name:
                raise
            return CheckInResult(outcome=CheckInOutcome.RETRY_LATER, task_id="", round_number=0,
                                 token="", retry_after_s=exc.retry_after_s or 1.0,
                                 message=exc.message)
        return CheckInResult(
            outcome=_OUTCOMES.get(resp.outcome, CheckInOutcome.RETRY_LATER),
            task_id=resp.task_id,
            round_number=resp.round_number,
            token=resp.participation_token,
            retry_after_s=resp.retry_after_ms / 1000.0,
            message=resp.message,
        )

    def get_plan(self, p: Participation) -> Plan:
        req = device_pb2.GetPlanRequest(api_version=API_VERSION, participation=_participation(p))
        resp = self._retrying(lambda: self._stub.GetPlan(req, timeout=self.policy.call_timeout_s))
        model, local = convert.plan_parts_from_proto(resp.model, resp.local)
        return Plan(
            task_id=resp.task_id,
            round_number=resp.round_number,
            model=model,
            model_version=resp.model_version,
            model_sha256=resp.model_sha256,
            model_size_bytes=resp.model_size_bytes,
            local=local,
            evaluate=resp.evaluate,
            deadline=resp.deadline_unix_ms / 1000.0,
            max_update_bytes=resp.max_update_bytes,
            max_chunk_bytes=resp.max_chunk_bytes,
            update_tensors=convert.tensor_infos_from_proto(resp.update_tensors),
            seed=resp.seed,
            secure_aggregation=(convert.secagg_plan_from_proto(resp.secure_aggregation)
                                if resp.HasField("secure_aggregation") else None),
            privacy=convert.plan_privacy_from_proto(resp),
            metrics=convert.metrics_policy_from_proto(resp.metrics),
            shard_upload=convert.shard_upload_from_proto(resp),
        )

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        """The plan's model file, checked against the plan's size and sha256."""
        req = device_pb2.DownloadModelRequest(
            api_version=API_VERSION, participation=_participation(p),
            model_version=plan.model_version,
        )

        def call() -> bytes:
            parts: list[bytes] = []
            size = 0
            for msg in self._stub.DownloadModel(req, timeout=self.policy.transfer_timeout_s):
                if msg.HasField("chunk"):
                    size += len(msg.chunk)
                    if size > plan.model_size_bytes:
                        raise BadPayload(
                            f"model download exceeds its declared {plan.model_size_bytes} bytes"
                        )
                    parts.append(msg.chunk)
            return b"".join(parts)

        data = self._retrying(call)
        if len(data) != plan.model_size_bytes or hashlib.sha256(data).hexdigest() != plan.model_sha256:
            raise BadPayload(
                f"model v{plan.model_version} does not match the plan's size/sha256; refusing it"
            )
        return data

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int, *,
                      shard_address: str | None = None, deadline: float | None = None) -> str:
        """Streams ``payload`` (the raw update) after ``header``; returns the server's message.
        Retries resend the same header, upload id included, so a retry of an upload the
        coordinator already counted gets its first answer, not ALREADY_EXISTS.
        ``shard_address``: the aggregator shard the plan names (the header carries its
        ticket); the upload goes there instead, retried there only, and not past
        ``deadline`` (the plan's, Unix seconds: the round has moved on, RoundOver)."""
        head = device_pb2.UploadUpdateRequest(
            header=device_pb2.UpdateHeader(
                api_version=API_VERSION,
                participation=_participation(header.participation),
                num_examples=header.num_examples,
                tensors=convert.tensor_infos_to_proto(header.tensors),
                total_bytes=header.total_bytes,
                sha256=header.sha256,
                metrics=dict(header.metrics),
                upload_id=header.upload_id,
                ticket=convert.ticket_to_proto(header.ticket),
            )
        )
        view = memoryview(payload)

        def messages() -> Iterator[device_pb2.UploadUpdateRequest]:
            yield head
            for start in range(0, len(view), chunk_bytes):
                yield device_pb2.UploadUpdateRequest(chunk=bytes(view[start:start + chunk_bytes]))

        if shard_address is not None:
            shard = self._shard_stub(shard_address)
            def timeout() -> float:  # a hung shard holds the device no later than the round
                left = math.inf if deadline is None else deadline - time.time()
                return max(5.0, min(self.policy.transfer_timeout_s, left))

            resp = self._retrying(
                lambda: shard.UploadUpdate(messages(), timeout=timeout()),
                move_on=False, what=f"aggregator shard {shard_address}", deadline=deadline)
        else:
            resp = self._retrying(
                lambda: self._stub.UploadUpdate(messages(), timeout=self.policy.transfer_timeout_s)
            )
        return str(resp.message)

    def _shard_stub(self, address: str) -> aggregator_pb2_grpc.AggregatorServiceStub:
        """A stub for an aggregator shard, on one channel per address (the coordinator's
        TLS settings: shards present certificates of the same CA)."""
        with self._lock:
            stub = self._shard_stubs.get(address)
            if stub is None:
                channel = (grpc.insecure_channel(address, options=self._options)
                           if self._credentials is None else
                           grpc.secure_channel(address, self._credentials,
                                               options=self._options))
                self._channels.append(channel)
                stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
                self._shard_stubs[address] = stub
        return stub

    def report_status(
        self, p: Participation, *, metrics: Mapping[str, float] | None = None, error: str = "",
        decline: bool = False
    ) -> None:
        """Evaluation-only metrics, or why the device is out of the round (``decline``: it
        cannot run the task at all, and will not take part in it again)."""
        req = device_pb2.ReportStatusRequest(
            api_version=API_VERSION, participation=_participation(p),
            metrics=dict(metrics or {}), error=error[:1000], decline=decline,
        )
        self._retrying(lambda: self._stub.ReportStatus(req, timeout=self.policy.call_timeout_s))

    # -- secure aggregation: each call waits for its stage to close ----------------

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement, *,
                         wait_s: float) -> ShareKeysRequest:
        req = device_pb2.SecAggAdvertiseKeysRequest(
            api_version=API_VERSION, participation=_participation(p),
            encryption_public_key=message.encryption_public,
            mask_public_key=message.mask_public, config_hash=message.config_hash,
        )
        resp = self._once(lambda: self._stub.SecAggAdvertiseKeys(req, timeout=wait_s))
        out: ShareKeysRequest = convert.share_keys_instruction_from_proto(resp)
        return out

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse, *,
                          wait_s: float) -> MaskedInputRequest:
        req = device_pb2.SecAggShareKeysRequest(
            api_version=API_VERSION, participation=_participation(p),
            ciphertexts=convert.ciphertexts_to_proto(message.ciphertexts),
        )
        resp = self._once(lambda: self._stub.SecAggShareKeys(req, timeout=wait_s))
        return MaskedInputRequest(convert.ciphertexts_from_proto(resp.ciphertexts))

    def secagg_masked_input(self, p: Participation, vector: RingVector,
                            metrics: Mapping[str, float], clipped: int, *,
                            wait_s: float) -> UnmaskRequest:
        req = device_pb2.SecAggMaskedInputRequest(
            api_version=API_VERSION, participation=_participation(p),
            masked_input=convert.ring_vector_to_bytes(vector), metrics=dict(metrics),
            clipped_values=clipped,
        )
        resp = self._once(lambda: self._stub.SecAggMaskedInput(req, timeout=wait_s))
        out: UnmaskRequest = convert.unmask_instruction_from_proto(resp)
        return out

    def secagg_unmask(self, p: Participation, message: UnmaskResponse, *, wait_s: float) -> None:
        req = device_pb2.SecAggUnmaskRequest(
            api_version=API_VERSION, participation=_participation(p),
            seed_shares=convert.shares_to_proto(message.seed_shares),
            key_shares=convert.shares_to_proto(message.key_shares),
        )
        self._once(lambda: self._stub.SecAggUnmask(req, timeout=wait_s))

    # -- retries -------------------------------------------------------------

    def _once(self, call: Callable[[], T]) -> T:
        """A protocol step is not idempotent: it is sent once; failure ends this device's part
        (the protocol tolerates dropouts), mapped like any other error."""
        used = self._current
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if code in _ROUND_OVER or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RoundOver(code.name, details) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                self._move_on(used)  # the next check-in goes to the next address
                raise RoundOver(code.name, f"coordinator unavailable during secure "
                                f"aggregation: {details}") from None
            raise Rejected(code.name, details) from None

    def _retrying(self, call: Callable[[], T], *, rate_limited: bool = False,
                  move_on: bool = True, what: str = "", deadline: float | None = None) -> T:
        """Retries while the coordinator is unreachable (and, with ``rate_limited``, while it
        asks to come back later: RESOURCE_EXHAUSTED with ``retry-after-ms``). ``move_on``:
        an unreachable coordinator moves the calls on to the next address (not for a call
        to an aggregator shard, ``what``)."""
        started = time.monotonic()
        attempt = 0
        tried = 0
        while True:
            delay = None
            used = self._current
            try:
                return call()
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if code in _ROUND_OVER:
                    raise RoundOver(code.name, details) from None
                retry_after = _retry_after_s(exc) if code == _LIMITED else None
                if code not in _RETRYABLE and not (rate_limited and retry_after is not None):
                    raise Rejected(code.name, details, retry_after_s=retry_after) from None
                if deadline is not None and time.time() >= deadline:
                    raise RoundOver(code.name, f"{what or 'coordinator'} unreachable until the "
                                    f"round's deadline: {details}") from None
                if time.monotonic() - started > self.policy.give_up_after_s:
                    raise Unreachable(
                        f"{what or 'coordinator ' + ', '.join(self.targets)} unreachable for "
                        f"{self.policy.give_up_after_s:.0f} s: {code.name} {details}"
                    ) from None
                delay = retry_after
                if move_on and code in _MOVE_ON and len(self._stubs) > 1:
                    self._move_on(used)
                    tried += 1
                    if tried % len(self._stubs):
                        continue  # the next address at once; back off after a full pass
            if delay is None:
                delay = self._rng.uniform(0, min(self.policy.cap_s,
                                                 self.policy.base_s * 2**attempt))
            attempt += 1
            if self._stop.wait(delay):
                raise Unreachable("stopped while waiting to retry")


_LIMITED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    """The ``retry-after-ms`` a rate-limited answer carries, in seconds (capped at a minute)."""
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for item in trailing or ():
        if item[0] == "retry-after-ms":
            try:
                return min(60.0, max(0.0, int(item[1]) / 1000.0))
            except (TypeError, ValueError):
                return None
    return None


def _participation(p: Participation) -> device_pb2.Participation:
    return device_pb2.Participation(
        device_id=p.device_id, task_id=p.task_id, round_number=p.round_number, token=p.token
    )
