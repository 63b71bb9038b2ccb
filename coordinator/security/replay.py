"""Nonces seen within the proof window: a proof whose nonce is here is a replay."""

from __future__ import annotations

from collections import deque


class ReplayCache:
    """Remembers each nonce until ``window_s`` after it was seen; proofs older than the
    window are refused by their timestamp, so forgetting then is safe. Memory is bounded by
    the check-in rate limits times the window."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._seen: dict[bytes, float] = {}
        self._order: deque[tuple[float, bytes]] = deque()

    def first_use(self, key: bytes, now: float) -> bool:
        """True (and remembered) when ``key`` was not seen within the window."""
        while self._order and self._order[0][0] <= now:
            expires, old = self._order.popleft()
            if self._seen.get(old) == expires:
                del self._seen[old]
        if key in self._seen:
            return False
        expires = now + self._window_s
        self._seen[key] = expires
        self._order.append((expires, key))
        return True

    def __len__(self) -> int:
        return len(self._seen)
