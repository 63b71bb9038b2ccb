"""The SecurityStore contract (devices, enrollment tokens, API tokens, audit), checked against
every implementation: in memory, SQLite, and PostgreSQL where FEDCOORD_TEST_POSTGRES_URL
names a scratch database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.storage import (
    ApiTokenRecord,
    Conflict,
    EnrollmentTokenRecord,
    InMemorySecurityStore,
    InMemoryStore,
    NotFound,
    SecurityStore,
    SqlStore,
    open_security_store,
)
from tests.contract.test_store_contract import _POSTGRES, _fresh_postgres

T0 = 1_700_000_000.0
KEY_A, KEY_B, KEY_C = b"a" * 32, b"b" * 32, b"c" * 32


@pytest.fixture(params=["memory", "sqlite", _POSTGRES])
def security(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecurityStore]:
    if request.param == "memory":
        yield InMemorySecurityStore()
        return
    url = (f"sqlite:///{tmp_path / 'coordinator.db'}" if request.param == "sqlite"
           else _fresh_postgres())
    store = SqlStore(url)
    yield store.security_store()
    store.close()


def token(token_id: str = "t1", max_devices: int = 2, expires_at: float | None = None
          ) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(token_id, "h" * 64, max_devices, 0, T0, expires_at)


def test_an_enrolled_key_reads_back_and_enrolling_it_again_changes_nothing(
        security: SecurityStore) -> None:
    record, new = security.enroll_device("dk-a", KEY_A, T0)
    assert new and record.public_key == KEY_A and not record.revoked
    again, new_again = security.enroll_device("dk-a", KEY_A, T0 + 5)
    assert not new_again and again == record == security.get_device("dk-a")


def test_an_id_enrolled_with_one_key_refuses_another(security: SecurityStore) -> None:
    security.enroll_device("dk-a", KEY_A, T0)
    with pytest.raises(Conflict):
        security.enroll_device("dk-a", KEY_B, T0)


def test_an_enrollment_token_admits_at_most_its_count_of_keys(security: SecurityStore) -> None:
    security.add_enrollment_token(token(max_devices=2))
    security.enroll_device("dk-a", KEY_A, T0, "t1")
    security.enroll_device("dk-b", KEY_B, T0, "t1")
    security.enroll_device("dk-a", KEY_A, T0, "t1")  # a repeat uses no token
    with pytest.raises(Conflict, match="2 device"):
        security.enroll_device("dk-c", KEY_C, T0, "t1")
    assert security.get_enrollment_token("t1").used == 2
    with pytest.raises(NotFound):
        security.get_device("dk-c")


def test_an_expired_or_unknown_token_enrolls_nobody(security: SecurityStore) -> None:
    security.add_enrollment_token(token(expires_at=T0 + 10))
    with pytest.raises(Conflict, match="expired"):
        security.enroll_device("dk-a", KEY_A, T0 + 10, "t1")
    with pytest.raises(NotFound):
        security.enroll_device("dk-a", KEY_A, T0, "nope")
    assert security.list_devices() == []


def test_revoking_a_device_keeps_the_first_revocation_time(security: SecurityStore) -> None:
    security.enroll_device("dk-a", KEY_A, T0)
    assert security.revoke_device("dk-a", T0 + 1).revoked_at == T0 + 1
    assert security.revoke_device("dk-a", T0 + 2).revoked_at == T0 + 1
    assert security.get_device("dk-a").revoked
    with pytest.raises(NotFound):
        security.revoke_device("dk-x", T0)


def test_api_tokens_are_listed_and_revoked(security: SecurityStore) -> None:
    security.add_api_token(ApiTokenRecord("a1", "h" * 64, "admin", "ops", T0))
    security.add_api_token(ApiTokenRecord("v1", "g" * 64, "viewer", "", T0 + 1, T0 + 100))
    with pytest.raises(Conflict):
        security.add_api_token(ApiTokenRecord("a1", "h" * 64, "admin", "", T0))
    assert [t.token_id for t in security.list_api_tokens()] == ["a1", "v1"]
    assert security.get_api_token("v1").expires_at == T0 + 100
    assert security.revoke_api_token("a1", T0 + 5).revoked_at == T0 + 5
    with pytest.raises(NotFound):
        security.get_api_token("zz")


def test_the_audit_log_lists_newest_first(security: SecurityStore) -> None:
    for i in range(5):
        security.append_audit(T0 + i, "token:a1", "CreateTask", f"task-{i}", "ok")
    entries = security.list_audit(limit=3)
    assert [e.target for e in entries] == ["task-4", "task-3", "task-2"]
    assert entries[0].entry_id > entries[1].entry_id


def test_two_devices_racing_for_a_tokens_last_use_leave_one_enrolled(
        security: SecurityStore) -> None:
    security.add_enrollment_token(token(max_devices=1))
    outcomes: list[str] = []

    def enroll(device_id: str, key: bytes) -> None:
        try:
            security.enroll_device(device_id, key, T0, "t1")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=enroll, args=(f"dk-{i}", bytes([i]) * 32))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 5
    assert len(security.list_devices()) == 1


def test_sql_security_records_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    first = SqlStore(url)
    first.security_store().enroll_device("dk-a", KEY_A, T0)
    first.close()
    again = SqlStore(url)
    assert open_security_store(again).get_device("dk-a").public_key == KEY_A
    again.close()
    assert isinstance(open_security_store(InMemoryStore()), InMemorySecurityStore)
