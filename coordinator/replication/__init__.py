"""Coordinator replicas on one database: a leader lease decides which replica runs the
rounds; the others stand by, serve reads, and take over when the leader's lease expires
(:mod:`.leadership`; the lease and its fencing: :mod:`coordinator.storage.leases`)."""

from coordinator.replication.leadership import (
    LEASE_NAME,
    PROMOTION_FAILED_EXIT,
    Leadership,
    Role,
    new_holder_id,
)

__all__ = ["LEASE_NAME", "PROMOTION_FAILED_EXIT", "Leadership", "Role", "new_holder_id"]
