"""An aggregator shard's rounds: the uploads it takes (each under a ticket the coordinator
signed) and the partial sums it hands back, one per round.

Lifecycle of a round (by :class:`~core.shards.RoundKey`)::

    (unknown) --begin_upload--> OPEN --collect--> COLLECTED --drop / expire--> (closed)
                                  |                                ^
                                  +----------drop / expire---------+

- OPEN: uploads are taken, checked (:mod:`.checks`), verified as they stream
  (:class:`~coordinator.rounds.uploads.SpooledUpload`: size, sha256, L2 norm) and folded in
  (:class:`~.accumulator.RoundSum`); the device is then reported, once.
- COLLECTED: :meth:`ShardState.collect` closed it to uploads (later ones are Late, an
  upload finishing now is Late), waited for the folds in flight and keeps the partial sum,
  which a retried collect gets again.
- closed: forgotten (:meth:`ShardState.drop`, or :meth:`ShardState.expire` once its latest
  ticket deadline is :data:`RETAIN_S` past). Its key is remembered until then, so an upload
  under a ticket still in time is Late instead of opening a round nobody collects.

A device's finished upload leaves a receipt: the same upload retried (same upload id and
sha256) gets the first answer, accepted or refused, instead of ALREADY_EXISTS. An update
refused for its content (non-finite, over ``max_update_l2_norm``) puts the device out of
the round, as on the coordinator.

Thread-safety: every method may be called from any thread. Bookkeeping happens under one
lock, held briefly; :meth:`ShardState.finish_upload` (reads the spool file) and
:meth:`ShardState.collect` (waits for folds) block, so a server calls them off its event
loop. Time comes from the injected clock.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.aggregator_shard.accumulator import RoundSum
from coordinator.aggregator_shard.checks import (
    check_deadline,
    check_header,
    check_upload_id,
    same_round_terms,
    verified_ticket,
)
from coordinator.rounds.clock import Clock
from coordinator.rounds.errors import (
    CoordinatorError,
    Duplicate,
    InvalidRequest,
    Late,
    NotFound,
    Unavailable,
    shown,
)
from coordinator.rounds.upload_checks import update_refusal
from coordinator.rounds.uploads import Receipt, SpooledUpload
from core.protocol import UpdateHeader
from core.shards import PartialSum, RoundKey, UploadTicket

#: A round is forgotten this long after its latest ticket's deadline, collected or not (the
#: coordinator collects well before; this bounds the memory of a coordinator that died).
RETAIN_S = 600.0


class ShardUpload:
    """An update being received: write its chunks, :meth:`verify` it once the stream
    ended, then :meth:`ShardState.finish_upload`; :meth:`ShardState.abort_upload` in every
    case (idempotent). A ``replay`` (a retry of an upload that was answered) takes no data
    and gets the first answer. Not thread-safe, except that :meth:`discard` may run while
    :meth:`verify` runs on another thread."""

    def __init__(self, header: UpdateHeader, ticket: UploadTicket,
                 spool: SpooledUpload | None, *, replay: Receipt | None = None) -> None:
        self.header = header
        self.ticket = ticket
        self.spool = spool
        self.replay = replay
        #: A retry of the same upload began while this one was open: this one cannot count.
        self.superseded = False
        #: Set (under the state's lock) by abort_upload: it can no longer count.
        self.aborted = False
        #: finish_upload runs: an abort_upload meanwhile (the call was cancelled) leaves the
        #: spool file to it, since the update may be read back right now.
        self.finishing = False
        self._norm: float | None = None

    @property
    def takes_data(self) -> bool:
        return self.replay is None

    @property
    def device_id(self) -> str:
        return self.ticket.device_id

    def write(self, chunk: bytes) -> None:
        """Raises InvalidRequest (a chunk over the ticket's max_chunk_bytes, or data for a
        replay) or TooLarge (more than the declared bytes)."""
        if self.spool is None:
            raise InvalidRequest("this upload was already answered; it takes no data")
        self.spool.write(chunk)

    def verify(self) -> float:
        """Ends the data: checks size and sha256 against the header (InvalidRequest) and
        returns the update's L2 norm (NaN or inf when a value is not finite). Closes the
        spool file, which may block on the disk: run it off the event loop."""
        if self._norm is None:
            assert self.spool is not None, "a replay has nothing to verify"
            self.spool.finish()
            self._norm = self.spool.l2_norm
        return self._norm

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


@dataclass(frozen=True)
class RoundProgress:
    """What a shard has of one round: the devices it accepted, in order, and whether the
    round was collected."""

    key: RoundKey
    reported: list[str]
    collected: bool


@dataclass(eq=False)
class _Round:
    first: UploadTicket
    sum: RoundSum
    #: Latest deadline of a ticket seen for the round; expiry counts from it.
    deadline: float
    reported: list[str] = field(default_factory=list)
    #: Devices whose update was refused for its content: out of the round.
    refused: set[str] = field(default_factory=set)
    receipts: dict[str, Receipt] = field(default_factory=dict)
    uploading: dict[str, ShardUpload] = field(default_factory=dict)
    #: Devices whose accepted update is being added on a worker thread.
    folding: set[str] = field(default_factory=set)
    collected: PartialSum | None = None
    closing: bool = False
    #: Why the sum cannot be trusted (a fold failed part-way); None while it can.
    broken: str | None = None


class ShardState:
    """The rounds of one shard (``index`` in the coordinator's ``--aggregator`` list),
    under the key it shares with its coordinator. Spool files go to ``spool_dir``."""

    def __init__(self, *, index: int, key: bytes, spool_dir: Path, clock: Clock) -> None:
        self.index = index
        self._key = key
        self._spool_dir = spool_dir
        self._clock = clock
        self._rounds: dict[RoundKey, _Round] = {}
        #: Rounds closed without a partial sum to keep (dropped, or collected with no
        #: upload), until their expiry time: uploads for them are Late.
        self._closed: dict[RoundKey, float] = {}
        self._lock = threading.Lock()
        self._folded = threading.Condition(self._lock)

    # ------------------------------------------------------------------ uploads

    def begin_upload(self, header: UpdateHeader) -> ShardUpload:
        """Checks an upload's header and opens its spool file; the caller streams the chunks
        into the returned upload (unless it is a replay).

        Raises:
            Unauthenticated: no ticket, or one that does not verify under the shard's key.
            NotSelected: a ticket for another shard, device, task or round.
            Late: the ticket's deadline passed, the round was collected or dropped, or the
                device's update was refused in this round.
            Duplicate: the device's update is in already, or it has another upload open,
                or its upload id was answered for another update.
            InvalidRequest: a header that does not fit its ticket (:func:`.checks.
                check_header`), or a ticket whose terms differ from the round's.
        """
        check_upload_id(header.upload_id)
        ticket = verified_ticket(header, key=self._key, shard=self.index)
        key = ticket.round_key
        device = ticket.device_id
        with self._lock:
            rnd = self._rounds.get(key)
            replay = self._receipt(rnd, header, device) if rnd is not None else None
            if replay is not None:
                return ShardUpload(header, ticket, None, replay=replay)
            check_deadline(ticket, self._clock.now())
            if key in self._closed or (rnd is not None and rnd.closing):
                raise Late(f"round {ticket.round_number} of task {shown(ticket.task_id)} was "
                           "collected: it takes no more uploads; check in again")
            if rnd is not None:
                same_round_terms(ticket, rnd.first)
                self._check_device(rnd, ticket)
            check_header(header, ticket)
            if rnd is None:
                rnd = self._rounds[key] = _Round(ticket, RoundSum(ticket), ticket.deadline)
            rnd.deadline = max(rnd.deadline, ticket.deadline)
            open_upload = rnd.uploading.get(device)
            if open_upload is not None:
                if not header.upload_id or open_upload.header.upload_id != header.upload_id:
                    raise Duplicate(f"device {shown(device)} already has an upload in "
                                    "progress")
                # The same upload retried while its first attempt still looks open (the
                # client gave up on it): the retry replaces it.
                open_upload.superseded = True
            path = self._spool_dir / f"{secrets.token_hex(12)}.upd"
            spool = SpooledUpload(path, declared_bytes=header.total_bytes,
                                  sha256=header.sha256, max_chunk_bytes=ticket.max_chunk_bytes)
            upload = ShardUpload(header, ticket, spool)
            rnd.uploading[device] = upload
            return upload

    def _check_device(self, rnd: _Round, ticket: UploadTicket) -> None:
        device, number = ticket.device_id, ticket.round_number
        if device in rnd.reported or device in rnd.folding:
            raise Duplicate(f"device {shown(device)} already reported for round {number}")
        if device in rnd.refused:
            raise Late(f"device {shown(device)} is out of round {number}: its update was "
                       "refused")

    @staticmethod
    def _receipt(rnd: _Round, header: UpdateHeader, device: str) -> Receipt | None:
        """The answer of the finished upload ``header`` retries (same upload id and hash);
        None if it retries none."""
        receipt = rnd.receipts.get(device)
        if not header.upload_id or receipt is None or receipt.upload_id != header.upload_id:
            return None
        if receipt.sha256 != header.sha256.lower():
            raise Duplicate(f"upload {header.upload_id} was already answered for another "
                            "update (its sha256 differs); an upload id names one update")
        return receipt

    def finish_upload(self, upload: ShardUpload) -> str:
        """Counts a verified update (:meth:`ShardUpload.verify`, done here when the caller
        has not) into its round's partial sum and returns the answer for the device: the
        update counts exactly when this returns. Reads the spool file: call it off the
        event loop.

        A replay gets its first attempt's answer. Raises InvalidRequest for a size or hash
        mismatch, non-finite values or an L2 norm over the ticket's max_update_l2_norm (the
        last two are remembered for retries, and the device is out of the round); Late if
        the round was collected or dropped meanwhile, or a retry replaced this upload;
        Duplicate if the device's update is in already. The spool file is removed in every
        case."""
        if upload.replay is not None:
            first = upload.replay.refusal
            if first is not None:
                raise type(first)(*first.args)
            return "update accepted (a retry of an upload that was accepted; counted once)"
        with self._lock:
            if upload.aborted:
                raise Late("this upload was abandoned (its call ended); it does not count")
            upload.finishing = True
        try:
            norm = upload.verify()
            ticket, device = upload.ticket, upload.device_id
            with self._lock:
                rnd = self._open_round_of(upload)
                if device in rnd.reported or device in rnd.folding:
                    raise Duplicate(f"device {shown(device)} already reported for round "
                                    f"{ticket.round_number}")
                refusal = update_refusal(norm, ticket.max_update_l2_norm)
                if refusal is not None:
                    rnd.refused.add(device)
                    self._remember(rnd, upload, refusal)
                    raise refusal
                rnd.folding.add(device)
            assert upload.spool is not None
            try:
                rnd.sum.fold(upload.spool.path, num_examples=upload.header.num_examples,
                             metrics=upload.header.metrics, norm=norm)
            except BaseException as exc:
                # Part of the update may be in the sum, uncounted: the sum is wrong for good.
                with self._lock:
                    rnd.broken = f"adding device {shown(device)}'s update failed ({exc!r:.200})"
                    rnd.folding.discard(device)
                    self._folded.notify_all()
                raise
            with self._lock:
                # One step: a collect waiting for the folds in flight sees the device named
                # in ``reported`` as soon as its update is in the sum, never one without
                # the other (a device in the sum but not named would escape the accounting).
                try:
                    rnd.folding.discard(device)
                    dropped = self._rounds.get(ticket.round_key) is not rnd
                    if not dropped:
                        rnd.reported.append(device)
                        self._remember(rnd, upload, None)
                finally:
                    self._folded.notify_all()
            if dropped:
                # Dropped while it was folded: nobody collects the sum it went into.
                raise Late(f"round {ticket.round_number} of task {shown(ticket.task_id)} "
                           "was closed while the update was added; it does not count")
        finally:
            with self._lock:
                upload.finishing = False
            self.abort_upload(upload)
        return "update accepted"

    def _open_round_of(self, upload: ShardUpload) -> _Round:
        ticket = upload.ticket
        rnd = self._rounds.get(ticket.round_key)
        if rnd is None or rnd.closing or rnd.uploading.get(upload.device_id) is not upload:
            if upload.superseded:
                raise Late("a retry of this upload replaced it")
            raise Late(f"round {ticket.round_number} of task {shown(ticket.task_id)} was "
                       "collected or dropped while the update was sent; it does not count")
        return rnd

    @staticmethod
    def _remember(rnd: _Round, upload: ShardUpload, refusal: CoordinatorError | None) -> None:
        if upload.header.upload_id:
            rnd.receipts[upload.device_id] = Receipt(
                upload.header.upload_id, upload.header.sha256.lower(), refusal)

    def abort_upload(self, upload: ShardUpload) -> None:
        """Drops an upload's data and its place in the round; idempotent, and harmless after
        :meth:`finish_upload`. While :meth:`finish_upload` runs on another thread (the
        call was cancelled meanwhile) it does nothing: that one cleans up when it ends."""
        with self._lock:
            upload.aborted = True
            if upload.finishing:
                return
            rnd = self._rounds.get(upload.ticket.round_key)
            if rnd is not None and rnd.uploading.get(upload.device_id) is upload:
                del rnd.uploading[upload.device_id]
        upload.discard()

    # ------------------------------------------------------------------ the coordinator's side

    def progress(self, keys: list[RoundKey]) -> list[RoundProgress]:
        """The rounds among ``keys`` this shard holds (others are left out)."""
        with self._lock:
            return [RoundProgress(key, list(rnd.reported), rnd.closing)
                    for key in keys if (rnd := self._rounds.get(key)) is not None]

    def collect(self, key: RoundKey) -> PartialSum:
        """Closes the round to uploads, waits for its folds in flight and returns its partial
        sum; called again, the same one. Blocks while folds run: call it off the event loop.

        Raises:
            NotFound: the shard took no upload for this round (its partial sum is empty);
                the round is closed all the same, so a late upload cannot open it.
            Unavailable: adding an update failed part-way (a disk error): the round's sum
                is wrong, and this shard's group of the round is lost.
        """
        with self._lock:
            rnd = self._rounds.get(key)
            if rnd is None:
                self._closed.setdefault(key, self._clock.now() + RETAIN_S)
                raise NotFound(f"this shard took no upload for round {key.round_id} of task "
                               f"{shown(key.task_id)}")
            rnd.closing = True
            self._folded.wait_for(lambda: not rnd.folding)
            if rnd.broken is not None:
                raise Unavailable(f"the partial sum of round {key.round_id} of task "
                                  f"{shown(key.task_id)} is lost: {rnd.broken}")
            if rnd.collected is None:
                rnd.collected = rnd.sum.partial(rnd.reported)
            return rnd.collected

    def drop(self, key: RoundKey) -> None:
        """Forgets a round (the coordinator committed or failed it); uploads for it are Late
        from now on. Dropping an unknown round is no error."""
        with self._lock:
            rnd = self._rounds.pop(key, None)
            expires = (rnd.deadline if rnd is not None else self._clock.now()) + RETAIN_S
            self._closed[key] = max(self._closed.get(key, 0.0), expires)
            self._folded.notify_all()

    def expire(self, now: float) -> list[RoundKey]:
        """Forgets the rounds whose latest ticket deadline is more than :data:`RETAIN_S`
        before ``now``; returns their keys."""
        with self._lock:
            gone = [k for k, rnd in self._rounds.items() if rnd.deadline + RETAIN_S < now]
            for key in gone:
                del self._rounds[key]
            for key in [k for k, until in self._closed.items() if until < now]:
                del self._closed[key]
            return gone

    def rounds(self) -> list[RoundKey]:
        """The keys of the rounds held now (open or collected)."""
        with self._lock:
            return sorted(self._rounds)
