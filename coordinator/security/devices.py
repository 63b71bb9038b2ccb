"""Device admission: enrollment of keys under the coordinator's policy, signed check-ins,
revocation, and the per-key / per-peer limits that bound what one party can take.

The attestation hook
--------------------
``SecuritySettings.attestation_hook = "package.module:function"`` names a callable that
receives an :class:`AttestationRequest` for every new enrollment (the device's key and id,
the blob the device sent in ``EnrollRequest.attestation`` -- e.g. an Android Key Attestation
certificate chain or an App Attest object -- and the peer address) and returns True to accept
the key. Exceptions and any other return refuse it (fail closed). The default,
:func:`none_required`, accepts every key.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.security.audit import AuditLog
from coordinator.security.errors import PermissionDenied, RateLimited, Unauthenticated
from coordinator.security.replay import ReplayCache
from coordinator.settings import EnrollmentPolicy, SecuritySettings
from coordinator.storage import Conflict, DeviceRecord, NotFound, SecurityStore
from core.security.bearer import matches, parse_secret
from core.security.identity import DEVICE_ID_PREFIX, DeviceProof, InvalidProof
from core.security.ratelimit import RateLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttestationRequest:
    device_id: str
    public_key: bytes
    attestation: bytes
    peer: str


AttestationHook = Callable[[AttestationRequest], bool]


def none_required(request: AttestationRequest) -> bool:
    """The default hook: no attestation is required."""
    return True


def load_attestation_hook(spec: str | None) -> AttestationHook:
    """The callable named ``module:function``; ValueError naming what is wrong."""
    if not spec:
        return none_required
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"attestation hook {spec!r}: expected module:function")
    try:
        hook = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"attestation hook {spec!r}: {exc}") from None
    if not callable(hook):
        raise ValueError(f"attestation hook {spec!r} is not callable")
    return hook  # type: ignore[no-any-return]


def read_allow_list(path: Path) -> frozenset[str]:
    """Device ids and hex public keys of an allow-list file (lower case)."""
    entries = set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        is_key = len(line) == 64 and all(c in "0123456789abcdef" for c in line)
        if not is_key and not line.startswith(DEVICE_ID_PREFIX):
            raise ValueError(f"{path}:{number}: expected a 64-hex-digit Ed25519 public key or "
                             f"a device id ({DEVICE_ID_PREFIX}...)")
        entries.add(line)
    return frozenset(entries)


class DeviceGate:
    """Thread-safe; the device records it reads are cached (revocations made through it take
    effect at the device's next request)."""

    def __init__(self, store: SecurityStore, settings: SecuritySettings, audit: AuditLog,
                 clock: Callable[[], float]) -> None:
        self._store = store
        self._settings = settings
        self._audit = audit
        self._clock = clock
        self._lock = threading.Lock()
        self._hook = load_attestation_hook(settings.attestation_hook)
        self._allow = (read_allow_list(settings.allow_list)
                       if settings.enrollment is EnrollmentPolicy.ALLOW_LIST
                       and settings.allow_list is not None else frozenset())
        if settings.enrollment is EnrollmentPolicy.ALLOW_LIST and settings.allow_list is None:
            raise ValueError("the allow-list enrollment policy needs an allow-list file")
        self._replays = ReplayCache(2 * settings.proof_window_s)
        self._per_device = RateLimiter(settings.checkin_per_device)
        self._per_peer = RateLimiter(settings.checkin_per_peer)
        self._enroll_per_peer = RateLimiter(settings.enroll_per_peer)
        self._devices: dict[str, DeviceRecord] = {}
        self._streams: dict[str, int] = {}

    # -- enrollment ----------------------------------------------------------------------

    def enroll(self, proof: DeviceProof, enrollment_token: str, attestation: bytes,
               peer: str) -> str:
        """The device id of the proof's key, enrolling it under the policy if it is new."""
        self._limit(self._enroll_per_peer, peer, "enrollments from this address")
        device_id = self._verified(proof, "enroll", "", "")
        known = self._record(device_id)
        if known is not None:
            if known.revoked:
                raise PermissionDenied(f"device {device_id} was revoked")
            return device_id
        token_id = self._admit(device_id, proof.public_key, enrollment_token)
        try:
            accepted = self._hook(AttestationRequest(device_id, proof.public_key,
                                                     attestation, peer)) is True
        except Exception:  # noqa: BLE001 - a failing hook refuses (fail closed)
            log.exception("attestation hook failed for %s", device_id)
            accepted = False
        if not accepted:
            self._audit.record(f"device:{device_id}", "Enroll", device_id, "PERMISSION_DENIED",
                               "attestation refused")
            raise PermissionDenied("the device's attestation was refused")
        try:
            record, new = self._store.enroll_device(device_id, proof.public_key,
                                                    self._clock(), token_id)
        except (Conflict, NotFound) as exc:
            self._audit.record(f"device:{device_id}", "Enroll", device_id,
                               "PERMISSION_DENIED", str(exc))
            raise PermissionDenied(f"enrollment refused: {exc}") from None
        with self._lock:
            self._devices[device_id] = record
        if new:
            self._audit.record(f"device:{device_id}", "Enroll", device_id, "ok",
                               f"policy {self._settings.enrollment.value}"
                               + (f", enrollment token {token_id}" if token_id else ""))
        return device_id

    def _admit(self, device_id: str, public_key: bytes, enrollment_token: str) -> str:
        """The enrollment token id to charge ("" for none); PermissionDenied if the policy
        refuses the key."""
        policy = self._settings.enrollment
        if policy is EnrollmentPolicy.OPEN:
            return ""
        if policy is EnrollmentPolicy.ALLOW_LIST:
            if device_id in self._allow or public_key.hex() in self._allow:
                return ""
            self._audit.record(f"device:{device_id}", "Enroll", device_id, "PERMISSION_DENIED",
                               "not on the allow-list")
            raise PermissionDenied("this device's key is not on the coordinator's allow-list")
        token_id = parse_secret(enrollment_token, "fce") if enrollment_token else None
        if token_id is None:
            raise PermissionDenied("this coordinator enrolls devices with an enrollment token "
                                   "(fedctl devices enroll); none or a malformed one was sent")
        try:
            token = self._store.get_enrollment_token(token_id)
        except NotFound:
            token = None
        if token is None or not matches(enrollment_token, token.secret_hash):
            self._audit.record(f"device:{device_id}", "Enroll", device_id, "PERMISSION_DENIED",
                               "unknown enrollment token")
            raise PermissionDenied("unknown enrollment token")
        return token_id

    # -- requests --------------------------------------------------------------------------

    def authenticate_check_in(self, proof: DeviceProof, claimed_id: str, task_id: str,
                              peer: str) -> str:
        """The device id a check-in may act for: a valid, fresh, unreplayed proof of an
        enrolled, unrevoked key, within the per-peer and per-device rates."""
        self._limit(self._per_peer, peer, "check-ins from this address")
        device_id = self._verified(proof, "check-in", claimed_id, task_id)
        self._limit(self._per_device, device_id, "check-ins of this device")
        self.require_active(device_id)
        return device_id

    def require_active(self, device_id: str) -> None:
        """PermissionDenied unless ``device_id`` is enrolled and not revoked."""
        record = self._record(device_id)
        if record is None:
            raise Unauthenticated("this device is not enrolled: call Enroll first")
        if record.revoked:
            raise PermissionDenied(f"device {device_id} was revoked")

    def revoke(self, device_id: str) -> DeviceRecord:
        record = self._store.revoke_device(device_id, self._clock())
        with self._lock:
            self._devices[device_id] = record
        return record

    def list_devices(self) -> list[DeviceRecord]:
        return self._store.list_devices()

    @contextlib.contextmanager
    def stream(self, peer: str) -> Iterator[None]:
        """Holds one of the peer's concurrent stream slots."""
        host = _host(peer)
        with self._lock:
            if self._streams.get(host, 0) >= self._settings.max_streams_per_peer:
                raise RateLimited(f"{self._settings.max_streams_per_peer} transfers from this "
                                  "address are in flight already", 1.0)
            self._streams[host] = self._streams.get(host, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._streams[host] - 1
                if left:
                    self._streams[host] = left
                else:
                    del self._streams[host]

    # -- helpers ---------------------------------------------------------------------------

    def _verified(self, proof: DeviceProof, purpose: str, claimed_id: str,
                  task_id: str) -> str:
        try:
            device_id = proof.verify(purpose, claimed_id, task_id)
        except InvalidProof as exc:
            raise Unauthenticated(str(exc)) from None
        now = self._clock()
        skew = abs(now - proof.timestamp_ms / 1000.0)
        if skew > self._settings.proof_window_s:
            raise Unauthenticated(f"the proof's timestamp is {skew:.0f} s away from the "
                                  f"coordinator's clock (allowed: "
                                  f"{self._settings.proof_window_s:.0f} s); check the clock")
        with self._lock:
            fresh = self._replays.first_use(proof.public_key + proof.nonce, now)
        if not fresh:
            raise Unauthenticated("replayed request: this proof's nonce was used before")
        return device_id

    def _record(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            record = self._devices.get(device_id)
        if record is not None:
            return record
        try:
            record = self._store.get_device(device_id)
        except NotFound:
            return None
        with self._lock:
            self._devices[device_id] = record
        return record

    def _limit(self, limiter: RateLimiter, key: str, what: str) -> None:
        key = _host(key) if limiter is not self._per_device else key
        with self._lock:
            wait = limiter.take(key, self._clock())
        if wait > 0:
            raise RateLimited(f"too many {what}", wait)


def _host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer
