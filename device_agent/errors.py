"""Errors of the device agent.

AgentError
 +-- Rejected        the coordinator answered with a non-retryable status (code + message)
 |    +-- RoundOver  FAILED_PRECONDITION / PERMISSION_DENIED: the round moved on; check in again
 +-- Unreachable     retries exhausted while the coordinator was unreachable
 +-- BadPayload      a download did not match its declared size or hash
 +-- BudgetExhausted local DP: this round's update would take the device past its budget
 +-- Declined        the device cannot run the task (its model does not build or fit the
                     device's data): it declines it for good
"""

from __future__ import annotations


class AgentError(Exception):
    pass


class Rejected(AgentError):
    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        self.code = code
        self.message = message
        #: When a rate-limited answer (RESOURCE_EXHAUSTED) said to come back.
        self.retry_after_s = retry_after_s
        super().__init__(f"{code}: {message}")


class RoundOver(Rejected):
    pass


class Unreachable(AgentError):
    pass


class BadPayload(AgentError):
    pass


class BudgetExhausted(AgentError):
    """The update was trained but is not sent: sending it would take this device's local-DP
    epsilon past the task's budget. The device takes no further part in the task."""


class Declined(AgentError):
    """The device cannot run the task: its model does not build here or does not fit this
    device's data. The device reports it (a decline, with this message as the reason) and
    takes no further part in the task; its other tasks go on."""
