"""SqlSecurityStore: the :class:`SecurityStore` in the round store's database (same engine,
its own tables, created when it first opens). Each method is one transaction; the token row
an enrollment uses is locked for it (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), so two devices can never both take a token's last use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from coordinator.storage.errors import Conflict, NotFound, StorageError
from coordinator.storage.security import (
    ApiTokenRecord,
    AuditRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    SecurityStore,
    check_token_usable,
)

metadata = sa.MetaData()

enrollment_tokens_table = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("max_devices", sa.Integer, nullable=False),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
    sa.Column("label", sa.Text, nullable=False),
    sa.CheckConstraint("used >= 0 AND used <= max_devices", name="ck_enrollment_used"),
)

devices_table = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("enrolled_at", sa.Double, nullable=False),
    sa.Column("enrollment_token_id", sa.String(32), nullable=False),
    sa.Column("revoked_at", sa.Double, nullable=True),
)

api_tokens_table = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.CheckConstraint("role IN ('viewer', 'launcher', 'admin')", name="ck_api_tokens_role"),
)

audit_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("entry_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)


class SqlSecurityStore(SecurityStore):
    def __init__(self, engine: Engine, url_for_errors: str) -> None:
        self._engine = engine
        self._url = url_for_errors
        try:
            metadata.create_all(engine)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot create the security tables in {self._url}: "
                               f"{type(exc).__name__}") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise Conflict(f"the database refused the write: {type(exc.orig).__name__}") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"database {self._url} failed: {type(exc).__name__}") from exc

    # -- devices -----------------------------------------------------------------------

    def enroll_device(self, device_id: str, public_key: bytes, now: float,
                      enrollment_token_id: str = "") -> tuple[DeviceRecord, bool]:
        with self._tx() as conn:
            row = conn.execute(sa.select(devices_table).where(
                devices_table.c.device_id == device_id)).mappings().first()
            if row is not None:
                existing = _device(row)
                if existing.public_key != bytes(public_key):
                    raise Conflict(f"device {device_id} is enrolled with another key")
                return existing, False
            if enrollment_token_id:
                t = enrollment_tokens_table
                token_row = conn.execute(
                    sa.select(t).where(t.c.token_id == enrollment_token_id).with_for_update()
                ).mappings().first()
                if token_row is None:
                    raise NotFound(f"no enrollment token {enrollment_token_id}")
                check_token_usable(_enrollment(token_row), now)
                conn.execute(t.update().where(t.c.token_id == enrollment_token_id)
                             .values(used=t.c.used + 1))
            record = DeviceRecord(device_id, bytes(public_key), now, enrollment_token_id)
            conn.execute(devices_table.insert().values(
                device_id=device_id, public_key=bytes(public_key), enrolled_at=now,
                enrollment_token_id=enrollment_token_id, revoked_at=None))
            return record, True

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(devices_table).where(
                devices_table.c.device_id == device_id)).mappings().first()
        if row is None:
            raise NotFound(f"no enrolled device {device_id}")
        return _device(row)

    def list_devices(self) -> list[DeviceRecord]:
        d = devices_table
        with self._tx() as conn:
            rows = conn.execute(sa.select(d).order_by(d.c.enrolled_at, d.c.device_id)).mappings()
            return [_device(r) for r in rows]

    def revoke_device(self, device_id: str, now: float) -> DeviceRecord:
        d = devices_table
        with self._tx() as conn:
            conn.execute(d.update().where(d.c.device_id == device_id, d.c.revoked_at.is_(None))
                         .values(revoked_at=now))
            row = conn.execute(sa.select(d).where(d.c.device_id == device_id)).mappings().first()
        if row is None:
            raise NotFound(f"no enrolled device {device_id}")
        return _device(row)

    # -- enrollment tokens -----------------------------------------------------------------

    def add_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        with self._tx() as conn:
            conn.execute(enrollment_tokens_table.insert().values(**_fields(token)))

    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord:
        t = enrollment_tokens_table
        with self._tx() as conn:
            row = conn.execute(sa.select(t).where(t.c.token_id == token_id)).mappings().first()
        if row is None:
            raise NotFound(f"no enrollment token {token_id}")
        return _enrollment(row)

    # -- API tokens ------------------------------------------------------------------------

    def add_api_token(self, token: ApiTokenRecord) -> None:
        with self._tx() as conn:
            conn.execute(api_tokens_table.insert().values(**_fields(token)))

    def get_api_token(self, token_id: str) -> ApiTokenRecord:
        t = api_tokens_table
        with self._tx() as conn:
            row = conn.execute(sa.select(t).where(t.c.token_id == token_id)).mappings().first()
        if row is None:
            raise NotFound(f"no API token {token_id}")
        return ApiTokenRecord(**row)

    def list_api_tokens(self) -> list[ApiTokenRecord]:
        t = api_tokens_table
        with self._tx() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.created_at, t.c.token_id)).mappings()
            return [ApiTokenRecord(**r) for r in rows]

    def revoke_api_token(self, token_id: str, now: float) -> ApiTokenRecord:
        t = api_tokens_table
        with self._tx() as conn:
            conn.execute(t.update().where(t.c.token_id == token_id, t.c.revoked_at.is_(None))
                         .values(revoked_at=now))
            row = conn.execute(sa.select(t).where(t.c.token_id == token_id)).mappings().first()
        if row is None:
            raise NotFound(f"no API token {token_id}")
        return ApiTokenRecord(**row)

    # -- audit -----------------------------------------------------------------------------

    def append_audit(self, at: float, actor: str, action: str, target: str, outcome: str,
                     detail: str = "") -> AuditRecord:
        values = dict(at=at, actor=actor, action=action, target=target, outcome=outcome,
                      detail=detail)
        with self._tx() as conn:
            entry_id = conn.execute(
                audit_table.insert().values(**values).returning(audit_table.c.entry_id)
            ).scalar_one()
        return AuditRecord(entry_id=entry_id, **values)  # type: ignore[arg-type]

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        a = audit_table
        with self._tx() as conn:
            rows = conn.execute(sa.select(a).order_by(a.c.entry_id.desc()).limit(max(0, limit)))
            return [AuditRecord(**r) for r in rows.mappings()]


def _fields(record: Any) -> dict[str, Any]:
    return dict(vars(record))


def _device(row: sa.RowMapping) -> DeviceRecord:
    return DeviceRecord(device_id=row["device_id"], public_key=bytes(row["public_key"]),
                        enrolled_at=row["enrolled_at"],
                        enrollment_token_id=row["enrollment_token_id"],
                        revoked_at=row["revoked_at"])


def _enrollment(row: sa.RowMapping) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(**row)
