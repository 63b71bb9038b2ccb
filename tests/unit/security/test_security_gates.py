"""The device gate and admin auth as specifications, over an in-memory store and a clock the
test moves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.security.errors import PermissionDenied, RateLimited, Unauthenticated
from coordinator.security.roles import REQUIRED_ROLE, Role
from coordinator.security.service import Security
from coordinator.settings import EnrollmentPolicy, OidcSettings, SecuritySettings
from coordinator.storage import InMemorySecurityStore
from core.security.identity import DeviceKey
from core.security.ratelimit import Rate

PEER = "ipv4:10.0.0.1:5555"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def security(clock: Clock, **settings: object) -> Security:
    return Security(InMemorySecurityStore(), SecuritySettings(**settings),  # type: ignore[arg-type]
                    clock=clock)


def proof(key: DeviceKey, clock: Clock, purpose: str = "check-in", task: str = ""):  # type: ignore[no-untyped-def]
    return key.prove(purpose, task, timestamp_ms=int(clock.now * 1000))


# -- devices ----------------------------------------------------------------------------------


def test_open_enrollment_admits_any_key_once_and_checks_it_in() -> None:
    clock = Clock()
    sec = security(clock)
    key = DeviceKey.generate()
    assert sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER) == key.device_id
    assert sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER) == key.device_id
    assert sec.devices.authenticate_check_in(proof(key, clock), key.device_id, "", PEER) \
        == key.device_id
    assert [e.action for e in sec.audit.entries()] == ["Enroll"]  # one enrollment, one row


def test_a_check_in_of_a_key_never_enrolled_is_unauthenticated() -> None:
    clock = Clock()
    key = DeviceKey.generate()
    with pytest.raises(Unauthenticated, match="not enrolled"):
        security(clock).devices.authenticate_check_in(proof(key, clock), key.device_id, "", PEER)


def test_a_replayed_or_stale_check_in_is_unauthenticated() -> None:
    clock = Clock()
    sec = security(clock)
    key = DeviceKey.generate()
    sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER)
    once = proof(key, clock)
    sec.devices.authenticate_check_in(once, key.device_id, "", PEER)
    with pytest.raises(Unauthenticated, match="replayed"):
        sec.devices.authenticate_check_in(once, key.device_id, "", PEER)
    stale = key.prove("check-in", timestamp_ms=int((clock.now - 61) * 1000))
    with pytest.raises(Unauthenticated, match="timestamp"):
        sec.devices.authenticate_check_in(stale, key.device_id, "", PEER)


def test_a_revoked_device_is_refused_at_its_next_request() -> None:
    clock = Clock()
    sec = security(clock)
    key = DeviceKey.generate()
    sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER)
    sec.devices.require_active(key.device_id)
    sec.devices.revoke(key.device_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        sec.devices.require_active(key.device_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        sec.devices.authenticate_check_in(proof(key, clock), key.device_id, "", PEER)
    with pytest.raises(PermissionDenied, match="revoked"):
        sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER)


def test_token_enrollment_admits_at_most_the_tokens_count() -> None:
    clock = Clock()
    sec = security(clock, enrollment=EnrollmentPolicy.TOKEN)
    _, secret = sec.admin.create_enrollment_token(max_devices=2, expires_in_s=3600)
    keys = [DeviceKey.generate() for _ in range(3)]
    with pytest.raises(PermissionDenied, match="enrollment token"):
        sec.devices.enroll(proof(keys[0], clock, "enroll"), "", b"", PEER)
    for key in keys[:2]:
        sec.devices.enroll(proof(key, clock, "enroll"), secret, b"", PEER)
    with pytest.raises(PermissionDenied, match="2 device"):
        sec.devices.enroll(proof(keys[2], clock, "enroll"), secret, b"", PEER)
    forged = secret[:-4] + "AAAA"
    with pytest.raises(PermissionDenied, match="unknown enrollment token"):
        sec.devices.enroll(proof(keys[2], clock, "enroll"), forged, b"", PEER)


def test_an_expired_enrollment_token_enrolls_nobody() -> None:
    clock = Clock()
    sec = security(clock, enrollment=EnrollmentPolicy.TOKEN)
    _, secret = sec.admin.create_enrollment_token(max_devices=5, expires_in_s=60)
    clock.now += 61
    with pytest.raises(PermissionDenied, match="expired"):
        sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), secret, b"", PEER)


def test_the_allow_list_admits_listed_keys_and_ids_only(tmp_path: Path) -> None:
    clock = Clock()
    by_key, by_id, other = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# fleet A\n{by_key.public_key.hex()}\n{by_id.device_id}  # lab phone\n")
    sec = security(clock, enrollment=EnrollmentPolicy.ALLOW_LIST, allow_list=allow)
    for key in (by_key, by_id):
        sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER)
    with pytest.raises(PermissionDenied, match="allow-list"):
        sec.devices.enroll(proof(other, clock, "enroll"), "", b"", PEER)


def reject_unless_blob(request: object) -> bool:
    return getattr(request, "attestation", b"") == b"genuine"


def test_an_attestation_hook_decides_new_enrollments() -> None:
    clock = Clock()
    sec = security(clock, attestation_hook=f"{__name__}:reject_unless_blob")
    with pytest.raises(PermissionDenied, match="attestation"):
        sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), "", b"fake", PEER)
    sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), "", b"genuine", PEER)
    with pytest.raises(ValueError, match="module:function"):
        security(clock, attestation_hook="nonsense")


def test_check_ins_beyond_a_devices_rate_say_when_to_retry() -> None:
    clock = Clock()
    sec = security(clock, checkin_per_device=Rate(per_second=1.0, burst=2))
    key = DeviceKey.generate()
    sec.devices.enroll(proof(key, clock, "enroll"), "", b"", PEER)
    for _ in range(2):
        sec.devices.authenticate_check_in(proof(key, clock), key.device_id, "", PEER)
    with pytest.raises(RateLimited, match="retry after") as caught:
        sec.devices.authenticate_check_in(proof(key, clock), key.device_id, "", PEER)
    assert 0 < caught.value.retry_after_s <= 1.0


def test_one_address_is_limited_whatever_ports_and_keys_it_uses() -> None:
    clock = Clock()
    sec = security(clock, enroll_per_peer=Rate(per_second=0.1, burst=3))
    for port in range(3):
        sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), "", b"",
                           f"ipv4:10.0.0.1:{port}")
    with pytest.raises(RateLimited):
        sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), "", b"",
                           "ipv4:10.0.0.1:9")
    sec.devices.enroll(proof(DeviceKey.generate(), clock, "enroll"), "", b"", "ipv4:10.0.0.2:9")


def test_concurrent_transfers_per_address_are_capped() -> None:
    sec = security(Clock(), max_streams_per_peer=2)
    with sec.devices.stream("ipv4:1.1.1.1:1"), sec.devices.stream("ipv4:1.1.1.1:2"):
        with pytest.raises(RateLimited, match="in flight"):
            with sec.devices.stream("ipv4:1.1.1.1:3"):
                pass
        with sec.devices.stream("ipv4:2.2.2.2:1"):
            pass
    with sec.devices.stream("ipv4:1.1.1.1:4"):
        pass


# -- admin --------------------------------------------------------------------------------------


def test_an_api_token_authenticates_with_its_role_until_revoked_or_expired() -> None:
    clock = Clock()
    sec = security(clock)
    record, secret = sec.admin.create_token(Role.LAUNCHER, "ci", expires_in_s=3600)
    principal = sec.admin.authenticate(f"Bearer {secret}")
    assert principal.role is Role.LAUNCHER and principal.actor == f"token:{record.token_id}"
    clock.now += 3601
    with pytest.raises(Unauthenticated, match="expired"):
        sec.admin.authenticate(f"Bearer {secret}")
    _, other = sec.admin.create_token(Role.VIEWER)
    sec.admin.revoke_token(parse_id(other))
    with pytest.raises(Unauthenticated, match="revoked"):
        sec.admin.authenticate(f"Bearer {other}")


def parse_id(secret: str) -> str:
    return secret.split("_")[1]


@pytest.mark.parametrize("header,message", [
    (None, "needs credentials"),
    ("", "needs credentials"),
    ("Basic abc", "Bearer"),
    ("Bearer nonsense", "not a fedcoord API token"),
    ("Bearer fct_000000000000_" + "A" * 43, "unknown API token"),
])
def test_missing_or_bad_credentials_are_unauthenticated(header: str | None,
                                                        message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        security(Clock()).admin.authenticate(header)


@pytest.mark.parametrize("method,lowest", sorted(REQUIRED_ROLE.items()))
def test_every_admin_rpc_needs_its_role_and_no_less(method: str, lowest: Role) -> None:
    sec = security(Clock())
    for role in Role:
        principal = sec.admin.authenticate(f"Bearer {sec.admin.create_token(role)[1]}")
        if role >= lowest:
            sec.admin.authorize(principal, method)
        else:
            with pytest.raises(PermissionDenied, match=f"needs the role {lowest.label}"):
                sec.admin.authorize(principal, method)


def test_an_rpc_missing_from_the_role_table_is_refused_to_everyone() -> None:
    sec = security(Clock())
    admin = sec.admin.authenticate(f"Bearer {sec.admin.create_token(Role.ADMIN)[1]}")
    with pytest.raises(PermissionDenied):
        sec.admin.authorize(admin, "DropDatabase")


def test_the_bootstrap_admin_token_is_written_0600_once(tmp_path: Path) -> None:
    sec = security(Clock())
    path = tmp_path / "admin.token"
    assert sec.bootstrap_admin_token(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert sec.admin.authenticate(f"Bearer {path.read_text().strip()}").role is Role.ADMIN
    assert not sec.bootstrap_admin_token(tmp_path / "again.token")


def test_replicas_registering_one_token_file_at_once_all_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas read the same file while no admin token exists; the second's write
    conflicts with the first's: it starts anyway, with the token registered once."""
    store = InMemorySecurityStore()
    first, second = (Security(store, SecuritySettings(), clock=Clock()) for _ in range(2))
    path = tmp_path / "admin.token"
    assert first.bootstrap_admin_token(path)  # writes the file
    other = tmp_path / "other.token"
    other.write_text(path.read_text())
    other.chmod(0o600)
    checks = iter([False, True])  # no admin token at its check; one after its write
    monkeypatch.setattr(second.admin, "has_admin_token", lambda: next(checks))
    assert not second.bootstrap_admin_token(other)
    assert [t.label for t in store.list_api_tokens()] == ["bootstrap"]


def test_oidc_jwts_of_the_configured_issuer_carry_their_role(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    clock = Clock()
    sec = security(clock, oidc=OidcSettings("https://id.example", "fedcoord", jwks))

    def token(**claims: object) -> str:
        body = {"iss": "https://id.example", "aud": "fedcoord", "sub": "ana",
                "exp": int(time.time()) + 60, "fedcoord_role": "launcher", **claims}
        return jwt.encode(body, private, algorithm="ES256", headers={"kid": "k1"})

    principal = sec.admin.authenticate(f"Bearer {token()}")
    assert principal.actor == "oidc:ana" and principal.role is Role.LAUNCHER
    with pytest.raises(Unauthenticated, match="Audience"):
        sec.admin.authenticate(f"Bearer {token(aud='other')}")
    with pytest.raises(Unauthenticated, match="Expired"):
        sec.admin.authenticate(f"Bearer {token(exp=int(time.time()) - 10)}")
    with pytest.raises(PermissionDenied, match="role"):
        sec.admin.authenticate(f"Bearer {token(fedcoord_role='root')}")
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"iss": "https://id.example", "aud": "fedcoord", "sub": "eve",
                         "exp": int(time.time()) + 60, "fedcoord_role": "admin"},
                        stranger, algorithm="ES256", headers={"kid": "k1"})
    with pytest.raises(Unauthenticated, match="Signature"):
        sec.admin.authenticate(f"Bearer {forged}")


def test_a_provisioned_admin_token_file_is_registered_by_its_hash(tmp_path: Path) -> None:
    from core.security.bearer import new_secret

    path = tmp_path / "admin.token"
    secret = new_secret("fct").secret
    path.write_text(secret + "\n")
    path.chmod(0o644)
    sec = security(Clock())
    with pytest.raises(ValueError, match="owner only"):
        sec.bootstrap_admin_token(path)
    path.chmod(0o600)
    assert sec.bootstrap_admin_token(path)
    assert sec.admin.authenticate(f"Bearer {secret}").role is Role.ADMIN
    assert secret not in repr(sec.admin.list_tokens())
