"""How fedctl logs: ``text`` (the default: time, level, logger, message) or ``json`` (one
JSON object a line, for log pipelines).

A JSON line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``, plus ``task``, ``round`` and ``stage`` when the call passed them
(``log.info("...", extra={"task": task_id, "round": n})``; ``task_id`` and
``round_number`` are read as ``task`` and ``round``), and ``exception`` with the traceback
when there is one.
"""

from __future__ import annotations

import enum
import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Record attributes (set through ``extra=``) copied into a JSON line, by the key written.
_CONTEXT = (("task", ("task", "task_id")), ("round", ("round", "round_number")),
            ("stage", ("stage",)))


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring for its keys)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, attributes in _CONTEXT:
            for attribute in attributes:
                value = getattr(record, attribute, None)
                if value is not None and value != "":
                    line[key] = value if isinstance(value, (int, float, str)) else str(value)
                    break
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def configure(*, verbose: bool, log_format: LogFormat = LogFormat.TEXT) -> None:
    """Sets the root logger up: INFO with ``verbose``, else WARNING. Text leaves a root
    logger that already has handlers alone (as :func:`logging.basicConfig` does: tests
    capture logs there); JSON replaces its handlers (so it can follow a first call made
    before a command's settings were known)."""
    level = logging.INFO if verbose else logging.WARNING
    if log_format is LogFormat.TEXT:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
