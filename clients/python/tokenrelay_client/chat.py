"""`tokenrelay chat PROMPT`: print an answer's tokens as they arrive.

The answer goes to stdout, nothing else: `tokenrelay chat hi > answer.txt`
captures exactly the verified text. Reconnects, notices and the closing
summary go to stderr.

Exit codes: 0 a complete, verified answer; 2 a partial answer (the gateway
gave up; stdout holds what was produced); 1 no answer (a bad request, the
gateway unreachable, a digest mismatch, …).
"""

from __future__ import annotations

import sys
from typing import TextIO

from .client import RelayClient
from .errors import ReconnectsExhausted, StreamFailed, TokenRelayClientError
from .events import Chunk, End, Notice, Reconnected, Reconnecting

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PARTIAL = 2


async def run_chat(
    target: str,
    prompt: str,
    *,
    model: str = "sim",
    metadata: dict[str, str] | None = None,
    max_tokens: int | None = None,
    client: RelayClient | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Stream one answer to `prompt`; return the exit code (see module doc).

    `client`, `out` and `err` are for tests; by default a RelayClient for
    `target` with its default reconnect policy, stdout and stderr.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    own_client = client is None
    client = client or RelayClient(target)
    wrote_text = False  # stdout gets a final newline when it got any text
    mid_line = False  # the terminal cursor is after answer text

    def to_stderr(line: str) -> None:
        nonlocal mid_line
        if mid_line:
            # Keep stderr lines off the answer's line on a shared terminal.
            out.flush()
            err.write("\n")
            mid_line = False
        err.write(line + "\n")
        err.flush()

    try:
        relay_stream = client.stream(
            model, [("user", prompt)], max_tokens=max_tokens, metadata=metadata
        )
        end: End | None = None
        async for event in relay_stream:
            if isinstance(event, Chunk):
                out.write(event.text)
                out.flush()
                wrote_text = mid_line = True
            elif isinstance(event, Reconnecting):
                to_stderr(
                    f"[connection lost at seq {event.last_seq}: {event.cause}; "
                    f"reconnecting in {event.delay_s:.1f} s, "
                    f"attempt {event.attempt}/{event.max_attempts}]"
                )
            elif isinstance(event, Reconnected):
                to_stderr(f"[reconnected, resuming after seq {event.last_seq}]")
            elif isinstance(event, Notice):
                to_stderr(f"[notice {event.code}: {event.message}]")
            elif isinstance(event, End):
                end = event
    except ReconnectsExhausted as error:
        _end_line(out, wrote_text)
        err.write(f"error: the gateway at {target} is unreachable: {error}\n")
        if error.partial is not None and error.partial.resume_token:
            err.write(
                f"the stream may still be running; resume token {error.partial.resume_token}, "
                f"last seq {error.partial.last_seq}\n"
            )
        return EXIT_FAILED
    except StreamFailed as error:
        _end_line(out, wrote_text)
        err.write(f"error: {error}\n")
        return EXIT_FAILED
    except TokenRelayClientError as error:
        _end_line(out, wrote_text)
        err.write(f"error: {type(error).__name__}: {error}\n")
        return EXIT_FAILED
    finally:
        if own_client:
            await client.close()

    _end_line(out, wrote_text)
    assert end is not None  # the stream ends with End or raises
    summary = (
        f"— {end.total_seq} chunks, finish {end.finish_reason!r}, "
        f"sha256 {end.text_sha256[:12]}… {'verified' if end.verified else 'not verified'}, "
        f"{relay_stream.reconnects} reconnect(s)"
    )
    if end.partial:
        why = f"{end.error.code}: {end.error.message}" if end.error else "no reason given"
        err.write(f"{summary}\npartial answer: the gateway gave up ({why})\n")
        return EXIT_PARTIAL
    err.write(summary + "\n")
    return EXIT_OK


def _end_line(out: TextIO, wrote_text: bool) -> None:
    if wrote_text:
        out.write("\n")
        out.flush()
