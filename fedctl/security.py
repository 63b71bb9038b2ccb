"""``fedctl tokens``, ``fedctl devices``, ``fedctl audit`` and ``fedctl whoami``: API tokens,
device enrollment and revocation, and the audit log.

``fedctl tokens create --db URL`` writes a token straight into a coordinator's database
(the operator on the coordinator's host, e.g. for the first admin token); every other
command goes through the admin API with the caller's token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedctl.credentials import parse_duration, save_token
from fedctl.errors import CliError, database_hint

if TYPE_CHECKING:
    from fedctl.admin import AdminClient

AdminFactory = Callable[[argparse.Namespace], "AdminClient"]
_admin: AdminFactory


def register(sub: Any, add_coordinator: Callable[[argparse.ArgumentParser], None],
             admin: AdminFactory) -> None:
    global _admin
    _admin = admin

    tokens = sub.add_parser("tokens", help="API tokens of engineers and tools").add_subparsers(
        dest="action", required=True)
    create = tokens.add_parser("create", help="create a token; prints it once on stdout")
    create.add_argument("--role", required=True, choices=["viewer", "launcher", "admin"])
    create.add_argument("--expires", default="never", help="e.g. 30d, 12h, never")
    create.add_argument("--label", default="", help="what the token is for")
    create.add_argument("--db", metavar="URL",
                        help="write into this coordinator database directly instead of "
                             "calling the admin API (the first admin token)")
    create.add_argument("--save", action="store_true",
                        help="also store it as this user's token file (mode 0600)")
    add_coordinator(create)
    create.set_defaults(func=cmd_tokens_create)
    ls = tokens.add_parser("list", help="tokens (never their secrets)")
    add_coordinator(ls)
    ls.set_defaults(func=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    add_coordinator(revoke)
    revoke.set_defaults(func=cmd_tokens_revoke)

    devices = sub.add_parser("devices", help="device enrollment").add_subparsers(
        dest="action", required=True)
    enroll = devices.add_parser("enroll", help="an enrollment token for up to --count devices")
    enroll.add_argument("--count", type=int, required=True, help="devices the token admits")
    enroll.add_argument("--expires", default="7d", help="e.g. 7d, 12h, never")
    enroll.add_argument("--label", default="", help="what the token is for")
    add_coordinator(enroll)
    enroll.set_defaults(func=cmd_devices_enroll)
    dls = devices.add_parser("list", help="enrolled devices")
    add_coordinator(dls)
    dls.set_defaults(func=cmd_devices_list)
    drevoke = devices.add_parser("revoke", help="revoke a device; refused at its next request")
    drevoke.add_argument("device_id")
    add_coordinator(drevoke)
    drevoke.set_defaults(func=cmd_devices_revoke)

    audit = sub.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--limit", type=int, default=50, help="entries to show")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    add_coordinator(audit)
    audit.set_defaults(func=cmd_audit)

    whoami = sub.add_parser("whoami", help="who the coordinator takes this token for")
    add_coordinator(whoami)
    whoami.set_defaults(func=cmd_whoami)


def _guard(call: Callable[[], Any]) -> Any:
    from fedctl.admin import AdminError

    try:
        return call()
    except AdminError as exc:
        raise CliError(str(exc)) from None


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_tokens_create(args: argparse.Namespace) -> int:
    expires = parse_duration(args.expires, "--expires")
    if args.db:
        token_id, secret = _create_locally(args.db, args.role, args.label, expires)
    else:
        with _admin(args) as client:
            token, secret = _guard(lambda: client.create_token(args.role, args.label, expires))
        token_id = token.token_id
    print(secret)
    where = f"; saved to {save_token(secret)}" if args.save else ""
    print(f"created {args.role} token {token_id} (shown once{where})", file=sys.stderr)
    return 0


def _create_locally(db_url: str, role: str, label: str, expires: int) -> tuple[str, str]:
    from coordinator.security.admin import AdminAuth
    from coordinator.security.audit import AuditLog
    from coordinator.security.roles import Role
    from coordinator.storage import StorageError, open_security_store, open_store

    try:
        store = open_store(db_url)
    except StorageError as exc:
        hint = database_hint(db_url) if isinstance(exc.__cause__, ImportError) else ""
        raise CliError(f"--db: {exc}{hint}") from None
    try:
        security = open_security_store(store)
        record, secret = AdminAuth(security, time.time).create_token(Role.parse(role), label,
                                                                     expires)
        AuditLog(security, time.time).record("local:fedctl", "CreateToken", record.token_id,
                                             "ok", f"role {role}, written to the database")
    except StorageError as exc:
        raise CliError(f"--db: {exc}") from None
    finally:
        store.close()
    return record.token_id, secret


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedctl.output import table_console

    with _admin(args) as client:
        tokens = _guard(client.list_tokens)
    table = Table(title="API tokens")
    for col in ("token_id", "role", "label", "created", "expires", "revoked"):
        table.add_column(col, overflow="fold")
    for t in tokens:
        table.add_row(t.token_id, t.role, t.label, _when(t.created_unix_ms),
                      _when(t.expires_unix_ms) if t.expires_unix_ms else "never",
                      "yes" if t.revoked else "")
    table_console().print(table)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        token = _guard(lambda: client.revoke_token(args.token_id))
    print(f"token {token.token_id} ({token.role}) revoked")
    return 0


def cmd_devices_enroll(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CliError("--count must be at least 1", exit_code=2)
    expires = parse_duration(args.expires, "--expires")
    with _admin(args) as client:
        resp = _guard(lambda: client.create_enrollment_token(args.count, expires, args.label))
    print(resp.secret)
    until = _when(resp.expires_unix_ms) if resp.expires_unix_ms else "never"
    print(f"enrollment token {resp.token_id}: up to {resp.max_devices} device(s), expires "
          f"{until} (shown once; agents take it with --enrollment-token)", file=sys.stderr)
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedctl.output import table_console

    with _admin(args) as client:
        devices = _guard(client.list_devices)
    table = Table(title="devices")
    for col in ("device_id", "enrolled", "enrollment token", "revoked"):
        table.add_column(col, overflow="fold")
    for d in devices:
        table.add_row(d.device_id, _when(d.enrolled_unix_ms), d.enrollment_token_id or "-",
                      _when(d.revoked_unix_ms) if d.revoked_unix_ms else "")
    table_console().print(table)
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        device = _guard(lambda: client.revoke_device(args.device_id))
    print(f"device {device.device_id} revoked")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        entries = _guard(lambda: client.list_audit(args.limit))
    if args.json:
        for e in entries:
            print(json.dumps({"id": e.entry_id, "at_unix_ms": e.at_unix_ms, "actor": e.actor,
                              "action": e.action, "target": e.target, "outcome": e.outcome,
                              "detail": e.detail}))
        return 0
    from rich.table import Table

    from fedctl.output import table_console

    table = Table(title="audit log (newest first)")
    for col in ("when", "actor", "action", "target", "outcome", "detail"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(_when(e.at_unix_ms), e.actor, e.action, e.target, e.outcome, e.detail)
    table_console().print(table)
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    with _admin(args) as client:
        actor, role = _guard(client.whoami)
    print(f"{actor} ({role})")
    return 0
