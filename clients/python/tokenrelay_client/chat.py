"""`tokenrelay chat PROMPT`: print an answer's tokens as they arrive.

The answer goes to stdout, nothing else: `tokenrelay chat hi > answer.txt`
captures exactly the verified text. Reconnects, notices and the closing
summary go to stderr, each on a line of its own. When stdout and stderr
reach the same screen or file (a terminal, `2>&1`), a notice that arrives in
the middle of an answer's line waits for that line to end, so it never
splits the answer: drop the `[...]` lines and the answer is intact.

The model's reasoning and its tool calls also go to stderr as they arrive:
reasoning on a `[reasoning]` line, dimmed on a terminal; each tool call on a
`[tool call NAME]` line with its arguments as they stream in. They wait for
the answer's line the same way.

Exit codes: 0 a complete, verified answer; 2 a partial answer (the gateway
gave up after some text; stdout holds what was produced); 1 no answer (the
gateway gave up before any text, a bad request, the gateway unreachable, a
digest mismatch, …).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from .client import RelayClient, ToolChoiceLike, ToolLike
from .credentials import PathLike
from .errors import ReconnectsExhausted, StreamFailed, TokenRelayClientError
from .events import Chunk, End, ErrorDetail, Notice, Reconnected, Reconnecting, Throttled

DIM, UNDIM = "\x1b[2m", "\x1b[22m"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PARTIAL = 2


def _same_destination(out: TextIO, err: TextIO) -> bool:
    """Whether stdout and stderr end up in one place (so their lines mix)."""
    try:
        return os.path.sameopenfile(out.fileno(), err.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True  # cannot tell (a test's buffers): assume one screen


def _wants_color(err: TextIO) -> bool:
    """Dim reasoning only on a terminal, and never with NO_COLOR set
    (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return err.isatty()
    except (AttributeError, ValueError):
        return False


class _Console:
    """The answer on `out`, everything else on `err`, never mixed in a line."""

    def __init__(self, out: TextIO, err: TextIO, *, color: bool | None = None) -> None:
        self._out = out
        self._err = err
        self._shared = _same_destination(out, err)
        self._color = _wants_color(err) if color is None else color
        self._mid_line = False  # the answer's current line has not ended
        self._held: list[str] = []  # stderr text waiting for the answer's line to end
        self._side: str | None = None  # the open stderr run: "reasoning", "tool 0", …
        self.wrote_text = False

    def answer(self, text: str) -> None:
        if not text:
            return
        self._end_side()
        self.wrote_text = True
        if self._held:
            # Let the held lines out where the answer's line ends.
            done, newline, rest = text.rpartition("\n")
            if newline:
                self._write_out(done + newline)
                self._release()
                text = rest
        if text:
            self._write_out(text)

    def line(self, text: str) -> None:
        """One line for stderr: now, or once the answer's line has ended."""
        self._end_side()
        self._to_err(text + "\n")

    def side(self, key: str, start: str, text: str, *, dim: bool = False) -> None:
        """Text that streams to stderr beside the answer (reasoning, a tool
        call's arguments): a run of the same `key` stays on one line, opened
        with `start`."""
        if key != self._side:
            self._end_side()
            self._side = key
            text = start + text
        if dim and self._color and text:
            text = DIM + text + UNDIM
        self._to_err(text)

    def end_answer(self) -> None:
        """The answer is over: end its line, then let held lines out."""
        self._end_side()
        if self.wrote_text:
            self._out.write("\n")
            self._out.flush()
            self.wrote_text = False
        self._mid_line = False
        self._release()

    def _end_side(self) -> None:
        if self._side is not None:
            self._side = None
            self._to_err("\n")

    def _to_err(self, text: str) -> None:
        if self._shared and self._mid_line:
            self._held.append(text)
            return
        self._err.write(text)
        self._err.flush()

    def _write_out(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
        self._mid_line = not text.endswith("\n")

    def _release(self) -> None:
        held, self._held = self._held, []
        self._err.write("".join(held))
        self._err.flush()


def _why(error: ErrorDetail | None) -> str:
    return f"{error.code}: {error.message}" if error is not None else "no reason given"


async def run_chat(
    target: str,
    prompt: str,
    *,
    model: str = "sim",
    metadata: dict[str, str] | None = None,
    max_tokens: int | None = None,
    max_reconnects: int = 3,
    connect_timeout_s: float = 2.0,
    backoff_base_s: float = 1.0,
    tools: Sequence[ToolLike] = (),
    tool_choice: ToolChoiceLike | None = None,
    tool_calls: str | None = None,
    api_key: str | None = None,
    tls_ca: PathLike | None = None,
    tls_client_cert: PathLike | None = None,
    tls_client_key: PathLike | None = None,
    client: RelayClient | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    color: bool | None = None,
) -> int:
    """Stream one answer to `prompt`; return the exit code (see module doc).

    `max_reconnects`, `connect_timeout_s` and `backoff_base_s` tune the
    RelayClient (see there; the defaults are its own). `tools` and
    `tool_choice` offer the model tools; `tool_calls` ("whole" or "stream")
    is the policy's tool-call mode. `api_key` and the `tls_*` files are the
    RelayClient's (credentials.py). `client`, `out`, `err` and `color` are
    for tests; by default a RelayClient for `target`, stdout and stderr,
    dimmed reasoning on a terminal.
    """
    console = _Console(out or sys.stdout, err or sys.stderr, color=color)
    own_client = client is None
    if client is None:
        try:
            client = RelayClient(
                target,
                max_reconnects=max_reconnects,
                connect_timeout_s=connect_timeout_s,
                backoff_base_s=backoff_base_s,
                api_key=api_key,
                tls_ca=tls_ca,
                tls_client_cert=tls_client_cert,
                tls_client_key=tls_client_key,
            )
        except ValueError as error:  # a TLS file that cannot be read, half a pair
            console.line(f"error: {error}")
            return EXIT_FAILED
    try:
        policy: Mapping[str, Any] | None = {"tool_calls": tool_calls} if tool_calls else None
        relay_stream = client.stream(
            model,
            [("user", prompt)],
            max_tokens=max_tokens,
            metadata=metadata,
            tools=tools,
            tool_choice=tool_choice,
            policy=policy,
        )
        end: End | None = None
        call_names: dict[int, str] = {}
        async for event in relay_stream:
            if isinstance(event, Chunk) and event.tool_call is not None:
                call = event.tool_call
                name = call_names.setdefault(call.index, call.name or f"#{call.index}")
                console.side(f"tool {call.index}", f"[tool call {name}] ", call.arguments)
            elif isinstance(event, Chunk) and event.kind == "reasoning":
                console.side("reasoning", "[reasoning] ", event.reasoning, dim=True)
            elif isinstance(event, Chunk):
                console.answer(event.text)
            elif isinstance(event, Reconnecting):
                # Before any StreamStarted there was no connection to lose.
                what, then = (
                    (f"connection lost at seq {event.last_seq}", "reconnecting")
                    if relay_stream.stream_id
                    else (f"cannot reach the gateway at {target}", "trying again")
                )
                console.line(
                    f"[{what}: {event.cause}; {then} in {event.delay_s:.1f} s, "
                    f"attempt {event.attempt}/{event.max_attempts}]"
                )
            elif isinstance(event, Reconnected):
                console.line(f"[reconnected, resuming after seq {event.last_seq}]")
            elif isinstance(event, Throttled):
                console.line(
                    f"[the gateway refused the start for now ({event.cause}); trying again "
                    f"in {event.delay_s:.1f} s as it advised, attempt "
                    f"{event.attempt}/{event.max_attempts}]"
                )
            elif isinstance(event, Notice):
                console.line(f"[notice {event.code}: {event.message}]")
            elif isinstance(event, End):
                end = event
    except ReconnectsExhausted as error:
        console.end_answer()
        console.line(f"error: the gateway at {target} is unreachable: {error}")
        if error.partial is not None and error.partial.resume_token:
            console.line(
                f"the stream may still be running; resume token {error.partial.resume_token}, "
                f"last seq {error.partial.last_seq}"
            )
        return EXIT_FAILED
    except StreamFailed as error:
        console.end_answer()
        console.line(f"error: {error}")
        return EXIT_FAILED
    except TokenRelayClientError as error:
        console.end_answer()
        console.line(f"error: {type(error).__name__}: {error}")
        return EXIT_FAILED
    finally:
        if own_client:
            await client.close()

    console.end_answer()
    assert end is not None  # the stream ends with End or raises
    if end.partial and end.total_seq == 0:
        # Nothing was produced: a failure, not a partial answer.
        console.line(f"error: the gateway gave up before any text: {_why(end.error)}")
        return EXIT_FAILED
    calls = len(relay_stream.tool_calls)
    summary = (
        f"— {end.total_seq} chunks, finish {end.finish_reason!r}, "
        + (f"{calls} tool call(s), " if calls else "")
        + f"sha256 {end.text_sha256[:12]}… {'verified' if end.verified else 'not verified'}, "
        f"{relay_stream.reconnects} reconnect(s)"
    )
    console.line(summary)
    if end.partial:
        console.line(f"partial answer: the gateway gave up ({_why(end.error)})")
        return EXIT_PARTIAL
    return EXIT_OK
