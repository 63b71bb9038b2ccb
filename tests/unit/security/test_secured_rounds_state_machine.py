"""The round state machine and the security layer together, under random interleavings:
the rounds of test_round_state_machine, with every device a key that enrolls, checks in
with signed proofs through the device gate (what the transport's interceptor does before
the service sees a check-in), and may be revoked; forged ids, replayed or stale proofs and
keys never enrolled are thrown in; restarts rebuild the gate over the same database.

Beyond the invariants of the plain machine (one slot per device per round, a report counted
once, committed versions never rewritten, rounds only forward):

* one slot per key: every seat belongs to an enrolled key's id;
* no unauthenticated effect: a refused check-in (forged id, replay, stale proof, unknown
  key, over its rate) changes no record;
* a revoked device gains nothing: every call it makes is refused, so it takes no seat by a
  check-in and makes no report after its revocation. (A device revoked while it waited in a
  selection window may still be drawn from it; that seat is inert, a dropout.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from coordinator.rounds.service import CoordinatorService
from coordinator.security.errors import SecurityError, Unauthenticated
from coordinator.security.service import Security
from core.protocol import CheckInOutcome, Participation
from core.security.identity import DeviceKey, DeviceProof
from core.types import DeviceAttributes, ParticipantState
from tests.unit.coordinator.test_round_state_machine import DEVICES, RoundsUnderFire

PEER = "ipv4:10.1.1.1:4242"
ATTRS = DeviceAttributes()


def _key_for(name: str) -> DeviceKey:
    """The same key for the same name in every example: device ids decide orderings (which
    device a sorted draw picks, who is selected), so random keys made Hypothesis's replays
    draw from different lists."""
    seed = hashlib.sha256(f"secured-rounds/{name}".encode()).digest()
    return DeviceKey(Ed25519PrivateKey.from_private_bytes(seed))


class SecuredRounds(RoundsUnderFire):
    def __init__(self) -> None:
        self.keys = {name: _key_for(name) for name in DEVICES}
        self.security: Security | None = None
        super().__init__()
        self.enrolled: set[str] = set()
        #: Device id -> (round id, participant count at revocation) of its revocation.
        self.revoked: dict[str, dict[int, tuple[int, bool]]] = {}
        self.last_proof: dict[str, DeviceProof] = {}

    def _start(self) -> CoordinatorService:
        service = super()._start()
        assert self.store is not None
        self.security = Security(self.store.security_store(), clock=self.clock.now)
        return service

    def _proof(self, key: DeviceKey, purpose: str, *, age_s: float = 0.0) -> DeviceProof:
        return key.prove(purpose, self.task_id if purpose == "check-in" else "",
                         timestamp_ms=int((self.clock.now() - age_s) * 1000))

    def _id(self, name: str) -> str:
        return self.keys[name].device_id

    # -------------------------------------------------------------- rules

    @rule(name=st.sampled_from(DEVICES))
    def enroll(self, name: str) -> None:
        assert self.security is not None
        try:
            device_id = self.security.devices.enroll(self._proof(self.keys[name], "enroll"),
                                                     "", b"", PEER)
        except SecurityError:
            assert self._id(name) in self.revoked
            return
        assert device_id == self._id(name)
        self.enrolled.add(device_id)

    @rule(device=st.sampled_from(DEVICES) | st.just("new"))
    def check_in(self, device: str) -> None:
        """A signed check-in through the gate; only what it lets through reaches the
        service."""
        assert self.security is not None
        if device == "new":
            self.new_devices += 1
            device = f"new-{self.new_devices}"
            self.keys[device] = _key_for(device)
        key = self.keys[device]
        proof = self._proof(key, "check-in")
        self.last_proof[device] = proof
        before = self._records()
        try:
            device_id = self.security.devices.authenticate_check_in(proof, key.device_id,
                                                                    self.task_id, PEER)
        except SecurityError:
            assert self._records() == before
            assert key.device_id not in self.enrolled or key.device_id in self.revoked \
                or self._rate_limited(key)
            return
        assert device_id in self.enrolled and device_id not in self.revoked
        result = self.service.check_in(device_id, ATTRS, self.task_id)
        if result.outcome is not CheckInOutcome.ACCEPTED:
            return
        rnd = self._open_round()
        assert rnd is not None
        p = Participation(device_id, self.task_id, result.round_number, result.token)
        seat = self.seats.get(device)
        if seat is not None and seat[0] == rnd.round_id:
            assert seat[1] == p, "a device checking in again got a second seat"
        self.seats[device] = (rnd.round_id, p)

    def _rate_limited(self, key: DeviceKey) -> bool:
        assert self.security is not None
        try:
            self.security.devices.authenticate_check_in(self._proof(key, "check-in"),
                                                        key.device_id, self.task_id, PEER)
        except SecurityError as exc:
            return "too many" in str(exc)
        return False

    @rule(devices=st.lists(st.sampled_from(DEVICES), min_size=1, unique=True))
    def devices_gather(self, devices: list[str]) -> None:
        for name in devices:
            self.enroll(name)
        super().devices_gather(devices)

    @precondition(lambda self: self.last_proof)
    @rule(data=st.data(), how=st.sampled_from(["replay", "stale", "forged id", "unknown key"]))
    def attack(self, data: st.DataObject, how: str) -> None:
        assert self.security is not None
        name = data.draw(st.sampled_from(sorted(self.last_proof)))
        key = self.keys[name]
        claimed = key.device_id
        if how == "replay":
            proof = self.last_proof[name]
        elif how == "stale":
            proof = self._proof(key, "check-in", age_s=3600)
        elif how == "forged id":
            victim = data.draw(st.sampled_from(DEVICES))
            if self._id(victim) == claimed:
                return
            proof, claimed = self._proof(key, "check-in"), self._id(victim)
        else:
            proof = self._proof(DeviceKey.generate(), "check-in")
            claimed = ""
        before = self._records()
        # A revoked device may be turned away as revoked before its proof is looked at;
        # anyone else is refused as unauthenticated.
        refusal = SecurityError if claimed in self.revoked else Unauthenticated
        with pytest.raises(refusal):
            self.security.devices.authenticate_check_in(proof, claimed, self.task_id, PEER)
        assert self._records() == before

    @precondition(lambda self: self.enrolled - set(self.revoked))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        assert self.security is not None and self.store is not None
        device_id = data.draw(st.sampled_from(sorted(self.enrolled - set(self.revoked))))
        self.security.devices.revoke(device_id)
        self.revoked[device_id] = {
            r.round_id: self._participation_of(r.round_id, device_id) for r in self._rounds()}

    def _participation_of(self, round_id: int, device_id: str) -> tuple[int, bool]:
        assert self.store is not None
        mine = [p for p in self._participants(round_id) if p.device_id == device_id]
        return len(mine), any(p.state is ParticipantState.REPORTED for p in mine)

    def _upload_from(self, device: str, value: float) -> None:
        """Uploads pass the gate first, as every participant call does."""
        assert self.security is not None
        _, p = self.seats[device]
        try:
            self.security.devices.require_active(p.device_id)
        except SecurityError:
            assert p.device_id in self.revoked, f"{p.device_id} refused, never revoked"
            return  # the call never reaches the service
        assert p.device_id not in self.revoked, f"revoked {p.device_id} passed the gate"
        super()._upload_from(device, value)

    # -------------------------------------------------------------- invariants

    def _checks(self) -> list[Callable[[], None]]:
        """The plain machine's invariants, then these two (all run after every step)."""
        return [*super()._checks(), self.one_slot_per_key, self.revoked_devices_gain_nothing]

    def one_slot_per_key(self) -> None:
        assert self.store is not None
        for r in self._rounds():
            for p in self._participants(r.round_id):
                assert p.device_id in self.enrolled, f"{p.device_id} has a seat, never enrolled"

    def revoked_devices_gain_nothing(self) -> None:
        for device_id, at_revocation in self.revoked.items():
            for r in self._rounds():
                _, reported = self._participation_of(r.round_id, device_id)
                _, was_reported = at_revocation.get(r.round_id, (0, False))
                assert reported <= was_reported, f"{device_id} reported after its revocation"


SecuredRounds.TestCase.settings = settings(
    max_examples=6, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Tens of seconds: marked slow, so a worker starts it among the first (tests/conftest.py).
test_secured_rounds = pytest.mark.slow(SecuredRounds.TestCase)
