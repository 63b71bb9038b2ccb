"""What a shard checks of an upload's header before it takes a byte: the ticket (signed by
the coordinator, for this shard, device, task and round, not past its deadline) and the
header's agreement with it. Pure functions; each refusal names what was wrong.

==================================================  ==========================================
Refusal                                             Error (gRPC status)
==================================================  ==========================================
no ticket, a bad signature, a malformed ticket      Unauthenticated (UNAUTHENTICATED)
a ticket for another shard, device, task or round   NotSelected (PERMISSION_DENIED)
the ticket's deadline passed                        Late (FAILED_PRECONDITION)
size, example count, hash, tensors, metrics         InvalidRequest (INVALID_ARGUMENT)
==================================================  ==========================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from coordinator.rounds.errors import InvalidRequest, Late, NotSelected, shown
from coordinator.rounds.upload_checks import check_metrics
from coordinator.security.errors import Unauthenticated
from core.protocol import UNCLIPPED_METRIC, UpdateHeader
from core.shards import TicketError, UploadTicket, tensors_digest, verify_ticket

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def verified_ticket(header: UpdateHeader, *, key: bytes, shard: int) -> UploadTicket:
    """The header's ticket, once it verifies under ``key`` and was issued for this
    ``shard`` and for the device, task and round the header names.

    Raises:
        Unauthenticated: no ticket, or one that does not verify (forged, altered, malformed).
        NotSelected: a genuine ticket for another shard, device, task or round.
    """
    if header.ticket is None:
        raise Unauthenticated("an upload to an aggregator shard carries the upload ticket of "
                              "its plan (GetPlanResponse.shard_upload.ticket); this one has none")
    try:
        ticket = verify_ticket(header.ticket, key)
    except TicketError as exc:
        raise Unauthenticated(str(exc)) from None
    p = header.participation
    if ticket.shard != shard:
        raise NotSelected(f"this upload ticket is for aggregator shard {ticket.shard}; this is "
                          f"shard {shard}: upload to the address of the plan's shard_upload")
    if ticket.device_id != p.device_id:
        raise NotSelected(f"this upload ticket was issued to device {shown(ticket.device_id)}, "
                          f"not to {shown(p.device_id)}")
    if ticket.task_id != p.task_id or ticket.round_number != p.round_number:
        raise NotSelected(f"this upload ticket is for round {ticket.round_number} of task "
                          f"{shown(ticket.task_id)}, not round {p.round_number} of task "
                          f"{shown(p.task_id)}")
    return ticket


def check_deadline(ticket: UploadTicket, now: float) -> None:
    """Raises Late once ``ticket``'s deadline passed."""
    if now > ticket.deadline:
        raise Late(f"round {ticket.round_number} of task {shown(ticket.task_id)} took uploads "
                   f"until its deadline, {now - ticket.deadline:.1f} s ago; check in again")


def check_upload_id(upload_id: str) -> None:
    if upload_id and not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidRequest(f"upload_id must be 16-64 characters of A-Z, a-z, 0-9, _ and -, "
                             f"got {shown(upload_id)}")


def check_header(header: UpdateHeader, ticket: UploadTicket) -> None:
    """Raises InvalidRequest unless the header fits its ticket: the update is ``values``
    float32 (``4 x values`` bytes) in the plan's tensors (the ticket's digest), between
    1 and ``max_num_examples`` examples, a sha256 of 64 hex digits, and metrics the ticket
    allows (:func:`check_ticket_metrics`)."""
    expected = 4 * ticket.values
    if header.total_bytes != expected:
        raise InvalidRequest(f"header declares {header.total_bytes} bytes but this round's "
                             f"update is {ticket.values} float32 values ({expected} bytes)")
    if tensors_digest(header.tensors) != ticket.tensors:
        raise InvalidRequest("the header's tensors are not this round's update layout (the "
                             "model's tensors: names, dtypes and shapes, in the plan's order)")
    if not 1 <= header.num_examples <= ticket.max_num_examples:
        raise InvalidRequest(f"num_examples must be between 1 and {ticket.max_num_examples}, "
                             f"got {header.num_examples}")
    if not _SHA256.fullmatch(header.sha256):
        raise InvalidRequest("sha256 must be the 64 hex digits of the update's SHA-256, "
                             f"got {len(header.sha256)} characters")
    check_ticket_metrics(header.metrics, ticket)


def check_ticket_metrics(metrics: Mapping[str, float], ticket: UploadTicket) -> None:
    """Metrics as the coordinator's aggregators take them: with ``clear_metrics`` any valid
    metric but adaptive clipping's bit; without, none but that bit, which must then be 0 or
    1 under ``adaptive_clipping`` and is refused otherwise."""
    bit = metrics.get(UNCLIPPED_METRIC)
    if ticket.clear_metrics:
        if bit is not None:
            raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} is only sent under adaptive "
                                 "clipping")
        check_metrics(metrics)
        return
    extra = sorted(set(metrics) - {UNCLIPPED_METRIC})
    if extra:
        raise InvalidRequest("this task withholds per-device metrics (differential privacy); "
                             f"the report carried {', '.join(shown(m) for m in extra[:4])}")
    if ticket.adaptive_clipping and bit not in (0.0, 1.0):
        raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} must be 0 or 1 under adaptive "
                             f"clipping, got {bit}")
    if not ticket.adaptive_clipping and bit is not None:
        raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} is only sent under adaptive "
                             "clipping")


def same_round_terms(ticket: UploadTicket, first: UploadTicket) -> None:
    """Raises InvalidRequest unless ``ticket`` folds in as the round's ``first`` ticket did
    (the coordinator signs one set of terms per round; two would not add up)."""
    terms = ("values", "mode", "weight_cap", "clip_norm", "clear_metrics",
             "adaptive_clipping", "max_update_l2_norm")
    differing = [t for t in terms if getattr(ticket, t) != getattr(first, t)]
    if differing:
        raise InvalidRequest(f"this upload ticket's {', '.join(differing)} differ from the "
                             f"other tickets of round {ticket.round_number}")
