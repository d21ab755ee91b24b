"""What a store raises when it cannot do what it was asked (issue 9).

    TokenRelayError (core/errors.py)
     └── StoreError                  the stream store failed us
          ├── StoreUnavailable       unreachable past the retry window  → UNAVAILABLE
          ├── StreamFenced           another writer owns the stream now → UNAVAILABLE
          └── HeartbeatUnavailable   a replica's heartbeat could not be read or
                                     written (store/heartbeat.py): assume the
                                     owner lives; keep beating

Rules:
- Nothing from the Redis client escapes a store: a transient failure
  (connection lost, timed out, no pooled connection free, server loading) is
  retried within the store's retry window; past it, `StoreUnavailable`.
  A refusal of our own scripts becomes `StreamNotFound` / `ValueError` as in
  the memory store (base.py rules 6 and 7).
- `StreamFenced` is not a failure of the store: the stream was taken over by
  a writer with a higher epoch (DESIGN.md guarantee 5), and this writer must
  stop at once, write nothing more, and send its readers elsewhere.
"""

from __future__ import annotations

from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction, TokenRelayError


class StoreError(TokenRelayError):
    """Base of the store's own failures."""


class StoreUnavailable(StoreError):
    """The store did not answer within its retry window. Transient: retry the
    call later (another replica may reach it), or resume the stream with the
    latest resume token; what was delivered stays delivered."""


class StreamFenced(StoreError):
    """This writer's epoch is stale: another replica took the stream over.
    Stop generating it and write nothing more; readers resume (anywhere) and
    get the new owner's chunks."""


def store_unavailable_fault(message: str) -> Fault:
    """The error of a stream ended because its store stayed unreachable: a
    typed partial that the client resumes once the store is back."""
    return Fault(
        type=ErrorType.NETWORK,
        code="STORE_UNAVAILABLE",
        message=message,
        retryable=True,
        suggested_action=SuggestedAction.RESUME,
    )


__all__ = ["StoreError", "StoreUnavailable", "StreamFenced", "store_unavailable_fault"]
