"""The audit log: who did what, when, and how it ended. Fields are cut to a bounded length
and never hold a secret (callers pass ids, not tokens)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.storage import AuditRecord, SecurityStore, StorageError

log = logging.getLogger(__name__)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class AuditLog:
    def __init__(self, store: SecurityStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def record(self, actor: str, action: str, target: str, outcome: str,
               detail: str = "") -> None:
        """Appends one entry. A failing database is logged, not raised: the action it
        describes has already happened or been refused."""
        try:
            self._store.append_audit(self._clock(), _cut(actor, 100), _cut(action, 60),
                                     _cut(target, 200), _cut(outcome, 30), _cut(detail, 500))
        except StorageError:
            log.exception("audit entry lost: %s %s %s %s", actor, action, target, outcome)

    def entries(self, limit: int = 100) -> list[AuditRecord]:
        return self._store.list_audit(max(1, min(limit, 10_000)))
