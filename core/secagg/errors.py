"""Errors of secure aggregation. Everything :mod:`core.secagg` raises on bad input derives from
:class:`SecAggError` (itself a :class:`core.errors.CoreError`); the protocol's errors live
here, the primitives' beside their code (module in brackets)::

    SecAggError
     +-- SecAggParamError          settings cannot be made secure and correct (params)
     +-- ShamirError               shares too few, malformed or inconsistent (shamir)
     +-- CryptoError               bad key length, ciphertext fails authentication (keys)
     +-- SecAggRefused             device: the server's message breaks the protocol
     +-- SecAggAborted             server: the round cannot end in a correct sum; nothing
     |                             is released
     +-- SecAggRejected            server: one participant's message is not acceptable now;
          |                        nothing changed and the round goes on without it
          +-- SecAggDuplicate      the participant already sent this stage's message
          +-- SecAggWrongStage     the message belongs to a stage the round is not in
          +-- SecAggRoundFull      an advertisement after the round has all its participants

A bare :class:`SecAggRejected` is a malformed message or one from a sender the stage does not
expect (not a participant, left out of an earlier stage). Callers choose what to tell the
sender by the class, never by the message, which is written for a person.
"""

from __future__ import annotations

from core.errors import CoreError


class SecAggError(CoreError):
    """Root of the errors raised by :mod:`core.secagg`."""


class SecAggRefused(SecAggError):
    """The device refuses to continue: the server's message breaks the protocol."""


class SecAggAborted(SecAggError):
    """The round cannot produce a correct sum any more; nothing is released."""


class SecAggRejected(SecAggError):
    """One participant's message is not acceptable now; the round goes on without it."""


class SecAggDuplicate(SecAggRejected):
    """The participant already sent its message for this stage; the first one stands."""


class SecAggWrongStage(SecAggRejected):
    """The message belongs to another stage than the one the round is in."""


class SecAggRoundFull(SecAggRejected):
    """An advertisement arrived after the round already had all its participants."""


__all__ = [
    "SecAggAborted",
    "SecAggDuplicate",
    "SecAggError",
    "SecAggRefused",
    "SecAggRejected",
    "SecAggRoundFull",
    "SecAggWrongStage",
]
