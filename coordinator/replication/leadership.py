"""Leadership: one coordinator replica of several on one database runs the rounds.

A :class:`Leadership` campaigns for the leader lease (:mod:`coordinator.storage.leases`) on a
thread of its own, so a busy event loop never delays a renewal:

* as a **standby** it tries to take the lease every ``poll_s``; it gets it once the
  leader's lease has expired (the leader died, hung, or lost the database) or was released
  (the leader stopped);
* as the **leader** it renews the lease every ``ttl_s / 3``. When a renewal finds the lease
  moved on (a newer epoch), or no renewal has succeeded for ``ttl_s`` (so the lease may
  have expired), the leadership is **lost**, for good: the process must stop leading at
  once. Its writes are fenced anyway (the store checks the epoch in each write's
  transaction), so a deposed leader that has not noticed yet can commit nothing.

A second thread (the watch) judges the ``ttl_s`` without renewal by the clock alone, so a
renewal that blocks (a database that stopped answering) cannot keep a leader leading past
its lease; the lease calls' own waits are bounded too (:meth:`SqlStore.leases
<coordinator.storage.sql.SqlStore.leases>`).

Timing: a killed leader's lease expires at most ``ttl_s`` after its last renewal, and a
standby takes it within ``poll_s`` after that.

The callbacks run on the lease thread: ``on_elected(lease)`` once, when the lease is taken;
``on_lost(reason)`` once, when it is lost (on the lease thread or the watch).
Thread-safe properties report the state.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from coordinator.storage.errors import StorageError
from coordinator.storage.leases import Fence, LeaseRecord, SqlLeases

log = logging.getLogger(__name__)

#: The lease every replica of one database campaigns for.
LEASE_NAME = "coordinator"
#: The exit status of a replica that was elected but could not take over (``fedctl
#: coordinator serve``): a supervisor counts it as a failed start (``fedctl cluster up``).
PROMOTION_FAILED_EXIT = 3


class Role(enum.Enum):
    STANDBY = "standby"
    LEADER = "leader"
    #: Leadership was lost (or the campaign stopped): this process leads no more.
    ENDED = "ended"


def new_holder_id() -> str:
    """An id unique to this process: host, pid and a random suffix (a restarted process on
    a recycled pid is another holder)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class Leadership:
    def __init__(
        self,
        leases: SqlLeases,
        *,
        address: str,
        on_elected: Callable[[LeaseRecord], None],
        on_lost: Callable[[str], None],
        ttl_s: float = 3.0,
        poll_s: float | None = None,
        name: str = LEASE_NAME,
        holder: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``address``: where this replica serves (told to devices and operators that reach
        a standby). ``ttl_s``: how long a lease outlives its holder's last renewal.
        ``poll_s``: a standby's period (default: a quarter of ``ttl_s``, at most 0.25 s)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._leases = leases
        self.address = address
        self.name = name
        self.holder = holder or new_holder_id()
        self.ttl_s = ttl_s
        self.poll_s = poll_s if poll_s is not None else min(0.25, ttl_s / 4)
        self.renew_s = ttl_s / 3
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._role = Role.STANDBY
        self._lease: LeaseRecord | None = None
        self._seen: LeaseRecord | None = None
        self._renewed_at = 0.0
        self._failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: threading.Thread | None = None

    # -- state (thread-safe) ------------------------------------------------------------

    @property
    def role(self) -> Role:
        with self._lock:
            return self._role

    @property
    def fence(self) -> Fence | None:
        """The fence of the lease this replica holds (None unless leading)."""
        with self._lock:
            if self._role is not Role.LEADER or self._lease is None:
                return None
            return Fence(self.name, self._lease.epoch, ttl_s=self.ttl_s)

    @property
    def leader_address(self) -> str | None:
        """The leader's address as last seen (this replica's own when it leads); None when
        no live leader was seen."""
        with self._lock:
            if self._role is Role.LEADER:
                return self.address
            if self._seen is None or self._seen.expired:
                return None
            return self._seen.address

    # -- the campaign -------------------------------------------------------------------

    def start(self) -> None:
        """Campaigns on a daemon thread until :meth:`stop` or the leadership is lost."""
        self._thread = threading.Thread(target=self._run, name="fedcoord-lease", daemon=True)
        self._watch = threading.Thread(target=self._watch_expiry, name="fedcoord-lease-watch",
                                       daemon=True)
        self._thread.start()
        self._watch.start()

    def stop(self, *, release: bool) -> None:
        """Ends the campaign and closes the leases; ``release``: a leader lets its lease
        expire now, so a standby takes over without waiting for the expiry (call it once
        this process has stopped writing). Leadership ends either way; ``on_lost`` is not
        called."""
        self._stop.set()
        for thread in (self._thread, self._watch):
            if thread is not None and thread is not threading.current_thread():
                # A lease call waits about ttl/3 at most (the lease's connections).
                thread.join(timeout=self.ttl_s)
        with self._lock:
            lease = self._lease if self._role is Role.LEADER else None
            self._role = Role.ENDED
        if release and lease is not None:
            try:
                self._leases.release(self.name, self.holder, lease.epoch)
            except StorageError as exc:
                log.warning("could not release the leader lease (it expires in at most "
                            "%.1f s): %s", self.ttl_s, exc)
        self._leases.close()

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.step()
            except Exception:  # noqa: BLE001 - a bug must not end the campaign silently
                log.exception("leader lease step failed")
                delay = self.poll_s
            if self.role is Role.ENDED:
                return

    def _watch_expiry(self) -> None:
        while not self._stop.wait(min(self.poll_s, self.ttl_s / 10)):
            self.check_expiry()
            if self.role is Role.ENDED:
                return

    def check_expiry(self) -> bool:
        """Loses the leadership when no renewal has succeeded for ``ttl_s``, whatever the
        lease thread is doing (what the watch runs; tests call it directly). Returns whether
        this replica still leads."""
        with self._lock:
            if self._role is not Role.LEADER:
                return False
            silent = self._monotonic() - self._renewed_at
        if silent < self.ttl_s:
            return True
        self._lose(f"the leader lease was not renewed for {silent:.1f} s (ttl "
                   f"{self.ttl_s:g} s; the database does not answer in time): another "
                   "replica may hold it now")
        return False

    def step(self) -> float:
        """One campaign step (what the thread runs; tests call it directly): returns the
        seconds until the next one."""
        role = self.role
        if role is Role.STANDBY:
            return self._campaign()
        if role is Role.LEADER:
            return self._renew()
        return self.poll_s

    def _campaign(self) -> float:
        started = self._monotonic()  # the lease expires a ttl after a time past this
        try:
            lease = self._leases.acquire(self.name, self.holder, self.address, self.ttl_s)
        except StorageError as exc:
            self._database_failing(exc)
            return self.poll_s
        self._failing_since = None
        if lease.holder != self.holder:
            with self._lock:
                self._seen = lease
            return self.poll_s
        with self._lock:
            if self._stop.is_set():  # stopped meanwhile: hand it straight back
                self._role = Role.ENDED
            else:
                self._role = Role.LEADER
                self._lease = lease
                self._renewed_at = started
        if self.role is Role.ENDED:
            with contextlib.suppress(StorageError):  # else it expires after the ttl
                self._leases.release(self.name, self.holder, lease.epoch)
            return self.poll_s
        log.warning("this replica (%s) now holds the leader lease, epoch %d", self.address,
                    lease.epoch)
        self._on_elected(lease)
        return self.renew_s

    def _renew(self) -> float:
        with self._lock:
            lease = self._lease
            renewed_at = self._renewed_at
        assert lease is not None
        started = self._monotonic()
        try:
            kept = self._leases.renew(self.name, self.holder, lease.epoch, self.ttl_s)
        except StorageError as exc:
            if self._monotonic() - renewed_at >= self.ttl_s:
                self._lose(f"the leader lease could not be renewed for {self.ttl_s:g} s "
                           f"(another replica may hold it now): {exc}")
                return self.poll_s
            log.warning("leader lease renewal failed (retrying): %s", exc)
            return min(self.poll_s, self.renew_s)
        if self.role is not Role.LEADER:  # the watch gave up while the renewal waited
            return self.poll_s
        if not kept:
            self._lose(f"the leader lease (epoch {lease.epoch}) has passed to another "
                       "replica")
            return self.poll_s
        if started - renewed_at >= self.ttl_s:
            # Renewed, but only after the lease may have expired: another replica may have
            # led meanwhile (it would have bumped the epoch, and renew() said no), so this
            # is safe; it says the process stalls.
            log.warning("the leader lease was renewed %.1f s after the previous renewal "
                        "(ttl %.1f s): this process stalls", started - renewed_at,
                        self.ttl_s)
        with self._lock:
            self._renewed_at = started
        return self.renew_s

    def _lose(self, reason: str) -> None:
        """Ends the leadership and calls ``on_lost``, once (the lease thread and the watch
        may both get here)."""
        with self._lock:
            if self._role is not Role.LEADER:
                return
            self._role = Role.ENDED
        log.error("leadership lost: %s", reason)
        self._on_lost(reason)

    def _database_failing(self, exc: StorageError) -> None:
        now = self._monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("cannot reach the database to campaign for the leader lease: %s", exc)
