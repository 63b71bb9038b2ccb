"""The round state machine under random interleavings (hypothesis stateful testing): devices
check in, upload (valid, duplicate, forged, corrupt), report failures, deadlines pass and the
coordinator restarts over the same SQLite file and blob folder; after every step the records
must still tell a consistent story:

* one slot per device per round attempt, and a device checking in again keeps its seat;
* a report is counted once: a round's ``reports`` is its REPORTED participants, each the
  token of exactly one accepted upload, and a second upload of that token is refused;
* nothing happens without a valid participation: a forged token, an unselected device or a
  corrupt update changes no record;
* committed model versions are never rewritten: each version's sha256, and its file's bytes,
  stay what they were when it was first seen;
* round attempts move only along ``ROUND_TRANSITIONS`` (plus the commit of an aggregating
  round), never out of a final state; ``rounds_committed`` and the model version never go
  back, and each round number is committed at most once.

The round logic alone, at the service: the same interleavings with the security layer in
front (enroll, signed check-ins, replays, stale proofs, revocations) are
tests/unit/security/test_secured_rounds_state_machine.py.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import CoordinatorError, Duplicate
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import ROUND_TRANSITIONS, FileBlobStore, SqlStore
from coordinator.storage.records import ParticipantRecord, RoundRecord
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import TensorInfo, numpy_dtype, sha256_hex
from core.types import (
    DeviceAttributes,
    ModelSpec,
    ParticipantState,
    RoundState,
    TaskSpec,
)

DEVICES = [f"d{i}" for i in range(6)]
ATTRS = DeviceAttributes()
SPEC = TaskSpec(
    name="stateful", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
    rounds=4, clients_per_round=3, min_reports=2, over_selection=1.0,
    round_deadline_s=30.0, selection_window_s=1.0,
)
#: Round transitions as seen between two steps: a step may take several (an aggregating
#: round commits inside the upload that completes it).
_REACHES = {s: set(ROUND_TRANSITIONS[s]) for s in RoundState}
_REACHES[RoundState.AGGREGATING].add(RoundState.COMMITTED)
for _ in RoundState:
    for _s, _next in _REACHES.items():
        _next |= {n for m in list(_next) for n in _REACHES[m]}


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _payload(infos: list[TensorInfo], value: float) -> bytes:
    return b"".join(np.full(i.shape, value, dtype=numpy_dtype(i.dtype)).tobytes() for i in infos)


@dataclass
class _Seen:
    """The records as read once for all the invariants of a step."""

    rounds: list[RoundRecord]
    participants: dict[int, list[ParticipantRecord]]


class RoundsUnderFire(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._seen: _Seen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="fedcoord-stateful-"))
        self.clock = ManualClock()
        self.store: SqlStore | None = None
        self.service = self._start()
        self.task_id = ""
        #: device -> (round attempt id, participation) of its latest seat.
        self.seats: dict[str, tuple[int, Participation]] = {}
        #: Token hashes of uploads the service accepted, and of devices that reported errors.
        self.accepted: set[str] = set()
        self.errored: set[str] = set()
        self.new_devices = 0
        self.versions: dict[int, str] = {}
        self.states: dict[int, RoundState] = {}
        self.committed = 0
        self.model_version = 0

    # -------------------------------------------------------------- life cycle

    def _start(self) -> CoordinatorService:
        self.store = SqlStore(f"sqlite:///{self.dir}/rounds.db")
        service = CoordinatorService(self.store, FileBlobStore(self.dir / "blobs"), self.clock,
                                     rng=random.Random(7),
                                     settings=CoordinatorSettings(max_chunk_bytes=64))
        service.recover()
        return service

    def teardown(self) -> None:
        self.service.close()
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def create_task(self) -> None:
        self.task_id = self.service.create_task(SPEC).record.task_id

    def _open_round(self) -> RoundRecord | None:
        assert self.store is not None
        return self.store.open_round_of(self.task_id)

    # -------------------------------------------------------------- rules

    @rule(device=st.sampled_from(DEVICES) | st.just("new"))
    def check_in(self, device: str) -> None:
        if device == "new":
            self.new_devices += 1
            device = f"new-{self.new_devices}"
        result = self.service.check_in(device, ATTRS, self.task_id)
        if result.outcome is not CheckInOutcome.ACCEPTED:
            return
        rnd = self._open_round()
        assert rnd is not None and rnd.round_number == result.round_number
        p = Participation(device, self.task_id, result.round_number, result.token)
        before = self.seats.get(device)
        if before is not None and before[0] == rnd.round_id:
            assert before[1] == p, "a device checking in again got a second seat"
        self.seats[device] = (rnd.round_id, p)

    @rule(devices=st.lists(st.sampled_from(DEVICES), min_size=1, unique=True))
    def devices_gather(self, devices: list[str]) -> None:
        """Devices check in, the selection window passes, they check in again (the shortest
        way to a seat)."""
        for device in devices:
            self.check_in(device)
        self.time_passes(1.1)
        for device in devices:
            self.check_in(device)

    @precondition(lambda self: self._live_seats())
    @rule(data=st.data(), value=st.floats(-0.5, 0.5, allow_nan=False))
    def upload(self, data: st.DataObject, value: float) -> None:
        self._upload_from(data.draw(st.sampled_from(self._live_seats())), value)

    @precondition(lambda self: self._live_seats())
    @rule(data=st.data(), value=st.floats(-0.5, 0.5, allow_nan=False))
    def uploads_arrive(self, data: st.DataObject, value: float) -> None:
        """Several seated devices upload one after the other (the way a round completes)."""
        for device in data.draw(st.lists(st.sampled_from(self._live_seats()), min_size=1)):
            self._upload_from(device, value)

    def _upload_from(self, device: str, value: float) -> None:
        _, p = self.seats[device]
        token = _token_hash(p.token)
        try:
            self._upload(p, value)
        except Duplicate:
            assert token in self.accepted or token in self.errored, "a first upload refused"
            return
        except CoordinatorError:
            return
        assert token not in self.accepted, f"a second upload of {device}'s seat was counted"
        assert token not in self.errored, f"{device} reported an error, then its update counted"
        self.accepted.add(token)

    @precondition(lambda self: self.seats)
    @rule(data=st.data(), how=st.sampled_from(["forged token", "other round", "unselected",
                                               "stale seat"]))
    def upload_without_a_valid_participation(self, data: st.DataObject, how: str) -> None:
        device = data.draw(st.sampled_from(sorted(self.seats)))
        _, p = self.seats[device]
        if how == "stale seat":  # a seat of an earlier attempt (before a deadline or restart)
            stale = sorted(set(self.seats) - set(self._live_seats()))
            if not stale:
                return
            _, p = self.seats[data.draw(st.sampled_from(stale))]
        elif how == "forged token":
            p = Participation(p.device_id, p.task_id, p.round_number, "x" * len(p.token))
        elif how == "other round":
            p = Participation(p.device_id, p.task_id, p.round_number + 1, p.token)
        else:
            p = Participation("never-checked-in", p.task_id, p.round_number, p.token)
        before = self._records()
        with pytest.raises(CoordinatorError):
            self._upload(p, 0.1)
        assert self._records() == before

    @precondition(lambda self: self.seats)
    @rule(data=st.data(), how=st.sampled_from(["hash", "short", "nan"]))
    def upload_corrupt(self, data: st.DataObject, how: str) -> None:
        device = data.draw(st.sampled_from(sorted(self.seats)))
        _, p = self.seats[device]
        try:
            plan = self.service.get_plan(p)
        except CoordinatorError:
            return
        infos = list(plan.update_tensors)
        payload = _payload(infos, float("nan") if how == "nan" else 0.1)
        declared = sha256_hex(payload)
        if how == "hash":
            declared = sha256_hex(payload + b"x")
        elif how == "short":
            payload = payload[:-4]
        header = UpdateHeader(participation=p, num_examples=10, tensors=infos,
                              total_bytes=sum(i.nbytes for i in infos),
                              sha256=declared, metrics={"train_loss": 1.0})
        reports = self._reports()
        with pytest.raises(CoordinatorError):
            upload = self.service.begin_upload(header)
            try:
                for i in range(0, len(payload), 64):
                    upload.write(payload[i:i + 64])
                self.service.finish_upload(upload)
            finally:
                self.service.abort_upload(upload)
        assert self._reports() == reports, "a corrupt update was counted"
        if how == "nan":
            self.errored.add(_token_hash(p.token))  # the device is out of the round

    @precondition(lambda self: self.seats)
    @rule(data=st.data())
    def report_failure(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(self.seats)))
        _, p = self.seats[device]
        try:
            self.service.report_status(p, {}, "out of battery")
        except CoordinatorError:
            return
        assert _token_hash(p.token) not in self.accepted, "an error after the report was taken"
        if _token_hash(p.token) not in self.accepted:
            self.errored.add(_token_hash(p.token))

    @rule(seconds=st.sampled_from([0.5, 1.1, 5.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.service.tick()

    @rule(now=st.integers(0, 3))
    def restart(self, now: int) -> None:
        if now:  # restarts one time in four: rounds need several steps to complete
            return
        self.service.close()
        assert self.store is not None
        self.store.close()
        self.service = self._start()

    # -------------------------------------------------------------- helpers

    def _upload(self, p: Participation, value: float) -> None:
        plan = self.service.get_plan(p)
        infos = list(plan.update_tensors)
        payload = _payload(infos, value)
        header = UpdateHeader(participation=p, num_examples=10, tensors=infos,
                              total_bytes=len(payload), sha256=sha256_hex(payload),
                              metrics={"train_loss": 1.0})
        upload = self.service.begin_upload(header)
        try:
            for i in range(0, len(payload), 64):
                upload.write(payload[i:i + 64])
            self.service.finish_upload(upload)
        except BaseException:
            self.service.abort_upload(upload)
            raise

    def _live_seats(self) -> list[str]:
        """Devices seated in the open round attempt."""
        rnd = self._open_round() if self.task_id else None
        return sorted(d for d, (round_id, _) in self.seats.items()
                      if rnd is not None and round_id == rnd.round_id)

    def _rounds(self) -> list[RoundRecord]:
        if self._seen is not None:
            return self._seen.rounds
        assert self.store is not None
        return self.store.list_rounds(self.task_id) if self.task_id else []

    def _participants(self, round_id: int) -> list[ParticipantRecord]:
        if self._seen is not None and round_id in self._seen.participants:
            return self._seen.participants[round_id]
        assert self.store is not None
        return self.store.list_participants(round_id)

    def _records(self) -> object:
        assert self.store is not None
        return (self._rounds(), [self._participants(r.round_id) for r in self._rounds()])

    def _reports(self) -> list[int]:
        return [r.reports for r in self._rounds()]

    # -------------------------------------------------------------- invariants

    @invariant()
    def records_tell_a_consistent_story(self) -> None:
        """Every check of :meth:`_checks` after every step, over one read of the rounds and
        their participants (each check reading them anew made this the suite's slowest
        test)."""
        rounds = self._rounds()
        self._seen = _Seen(rounds, {r.round_id: self._participants(r.round_id) for r in rounds})
        try:
            for check in self._checks():
                check()
        finally:
            self._seen = None

    def _checks(self) -> list[Callable[[], None]]:
        return [self.one_slot_per_device_per_round, self.a_report_is_counted_once,
                self.an_accepted_upload_stays_reported,
                self.no_effect_without_a_valid_participation,
                self.committed_versions_are_never_rewritten, self.rounds_move_only_forward]

    def one_slot_per_device_per_round(self) -> None:
        assert self.store is not None
        for r in self._rounds():
            devices = [p.device_id for p in self._participants(r.round_id)]
            assert len(devices) == len(set(devices)), f"round {r.round_id}: {devices}"
            assert r.selected == len(devices)
            assert r.selected <= SPEC.clients_per_round

    def a_report_is_counted_once(self) -> None:
        assert self.store is not None
        seen: list[str] = []
        for r in self._rounds():
            participants = self._participants(r.round_id)
            reported = [p for p in participants if p.state is ParticipantState.REPORTED]
            assert r.reports == len(reported), (r, reported)
            assert r.reports <= r.selected
            seen += [p.token_hash for p in reported]
        assert len(seen) == len(set(seen))

    def an_accepted_upload_stays_reported(self) -> None:
        assert self.store is not None
        records = [p for r in self._rounds() for p in self._participants(r.round_id)]
        for token in self.accepted:
            holders = [p for p in records if p.token_hash == token]
            assert len(holders) == 1 and holders[0].state is ParticipantState.REPORTED, holders

    def no_effect_without_a_valid_participation(self) -> None:
        """Every report is an upload the service accepted from the token's holder."""
        assert self.store is not None
        for r in self._rounds():
            for p in self._participants(r.round_id):
                if p.state is ParticipantState.REPORTED:
                    assert p.token_hash in self.accepted, f"{p.device_id} reported unseen"

    def committed_versions_are_never_rewritten(self) -> None:
        assert self.store is not None
        if not self.task_id:
            return
        for record in self.store.list_model_versions(self.task_id):
            first = self.versions.setdefault(record.version, record.sha256)
            assert record.sha256 == first, f"model version {record.version} was rewritten"
            data = b"".join(self.service.model_chunks(record, 1 << 16))
            assert sha256_hex(data) == first, f"model version {record.version}'s file changed"

    def rounds_move_only_forward(self) -> None:
        committed_numbers: list[int] = []
        for r in self._rounds():
            before = self.states.get(r.round_id)
            if before is not None and before is not r.state:
                assert r.state in _REACHES[before], f"round {r.round_id}: {before} -> {r.state}"
            self.states[r.round_id] = r.state
            if r.state is RoundState.COMMITTED:
                committed_numbers.append(r.round_number)
        assert len(committed_numbers) == len(set(committed_numbers))
        if not self.task_id:
            return
        assert self.store is not None
        task = self.store.get_task(self.task_id)
        assert task.rounds_committed >= self.committed
        assert task.model_version >= self.model_version
        assert task.rounds_committed == len(committed_numbers)
        self.committed, self.model_version = task.rounds_committed, task.model_version


RoundsUnderFire.TestCase.settings = settings(
    max_examples=10, stateful_step_count=45, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Tens of seconds: marked slow, so a worker starts it among the first (tests/conftest.py).
test_round_state_machine = pytest.mark.slow(RoundsUnderFire.TestCase)


def test_an_error_after_an_accepted_upload_changes_nothing() -> None:
    """Found by the state machine above (it rewrote d0's report to ERRORED and counted d0
    twice towards ending the round): d0 uploads, then reports an error; d4 is admitted as the
    round's third device. The error is refused, d0's report stands, the round waits for d4."""
    machine = RoundsUnderFire()
    try:
        machine.create_task()
        machine.devices_gather(["d0", "d1"])
        machine._upload_from("d0", 0.1)
        machine._upload_from("d1", 0.1)
        _, p = machine.seats["d0"]
        with pytest.raises(Duplicate):
            machine.service.report_status(p, {}, "out of battery")
        machine.an_accepted_upload_stays_reported()
        machine.check_in("d4")
        machine.time_passes(1.1)
        machine.check_in("d4")
        rounds = machine._rounds()
        assert rounds[0].state is not RoundState.COMMITTED, "ended without waiting for d4"
    finally:
        machine.teardown()
