"""Errors of the security layer; the transport maps each to one gRPC status.

SecurityError
 +-- Unauthenticated   UNAUTHENTICATED     no, bad, expired or replayed credentials
 +-- PermissionDenied  PERMISSION_DENIED   a role too low, a revoked device, a refused enrollment
 +-- RateLimited       RESOURCE_EXHAUSTED  over a rate or concurrency limit; says when to retry
"""

from __future__ import annotations


class SecurityError(Exception):
    """The message is shown to the caller: it never echoes unbounded input or a secret."""


class Unauthenticated(SecurityError):
    pass


class PermissionDenied(SecurityError):
    pass


class RateLimited(SecurityError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


def short(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters for an error message (input is untrusted)."""
    return text if len(text) <= limit else text[:limit] + "..."
