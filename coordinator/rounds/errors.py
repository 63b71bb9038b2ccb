"""Errors of the round logic. The transport maps each class to one gRPC status code.

CoordinatorError
 +-- InvalidRequest        INVALID_ARGUMENT     bad task spec, malformed update, metrics the
 |                                            task does not take (DP, SecAgg: none in clear)
 +-- NotFound              NOT_FOUND            unknown task, model version
 +-- NotSelected           PERMISSION_DENIED    device not selected / wrong token
 +-- Duplicate             ALREADY_EXISTS       a second update or SecAgg message of a device
 +-- TooLarge              RESOURCE_EXHAUSTED   update over the task's size limit
 +-- Late                  FAILED_PRECONDITION  round closed, task not running
 +-- DataMismatch          FAILED_PRECONDITION  a task whose model or declared data does not
 |                                            fit the data its population reported
 +-- Unavailable           UNAVAILABLE          the coordinator cannot serve this right now

Messages never echo client input unbounded: ids and names pass through :func:`shown`.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of the coordinator's domain errors; the message is shown to the caller."""


class InvalidRequest(CoordinatorError):
    pass


class NotFound(CoordinatorError):
    pass


class NotSelected(CoordinatorError):
    pass


class Duplicate(CoordinatorError):
    pass


class TooLarge(CoordinatorError):
    pass


class Late(CoordinatorError):
    pass


class DataMismatch(CoordinatorError):
    """A task does not fit the data its devices have: refused at launch (the task is fine
    as written; the population is not what it expects)."""


class Unavailable(CoordinatorError):
    pass


#: Characters of a client-supplied string an error message shows.
SHOWN_CHARS = 40


def shown(value: str) -> str:
    """``value`` (client input: an id, a name) as an error message may show it: quoted, at
    most :data:`SHOWN_CHARS` characters, and the length when it was cut."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"
