"""`tokenrelay demo`: watch a token stream survive a dropped connection.

What it does, in about five seconds:

1. starts a gateway in-process on a free port (or uses `--target`);
2. puts a `FaultProxy` in front of it, so the connection can be cut for real;
3. streams a `sim` generation through the Python client, paced so you can
   follow the seq numbers;
4. after chunk `cut_after` arrives, resets the TCP connection (RST, as a
   network failure would);
5. the client notices, backs off, resumes with its latest resume token and
   last seq, and the chunks continue with no gap and no duplicate;
6. checks the end: the client verified the sha256 digest, the seqs are
   1..N, and the text equals an uninterrupted run of the same request.

On a terminal the display is live (rich); piped, it prints plain lines.
Returns 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from tokenrelay_client import (
    Checkpoint,
    Chunk,
    End,
    Notice,
    Reconnected,
    Reconnecting,
    RelayClient,
    Started,
    TokenRelayClientError,
)
from tokenrelay_devtools.netfault import FaultProxy

PROMPT = "Explain how a token stream survives a dropped connection."
MODEL = "sim"
SEED = "tokenrelay-demo"
LOG_LINES_SHOWN = 12
TEXT_TAIL_CHARS = 240
MIN_REDRAW_S = 1 / 12


@dataclass
class _LogEntry:
    at_s: float
    style: str
    what: str
    detail: str
    plain_only: bool = False


@dataclass
class DemoState:
    """Everything the display shows; the views only read it."""

    target: str
    via: str = ""
    stream_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    # (seq, connection number): connection 0 is the first call, 1 the first
    # reconnect, … so the display can colour the seqs each call delivered.
    seqs: list[tuple[int, int]] = field(default_factory=list)
    connection: int = 0
    cut_after_seq: int | None = None
    checkpoints: int = 0
    reconnects: int = 0
    duplicates_dropped: int = 0
    text: str = ""
    end: End | None = None
    checks: list[tuple[bool, str]] = field(default_factory=list)
    log: list[_LogEntry] = field(default_factory=list)
    finished: bool = False

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def add(self, style: str, what: str, detail: str = "") -> _LogEntry:
        entry = _LogEntry(self.elapsed_s(), style, what, detail)
        self.log.append(entry)
        return entry


# --- views ---------------------------------------------------------------------------


class PlainView:
    """No terminal: one line per log entry, as it happens."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._printed = 0

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, state: DemoState) -> None:
        for entry in state.log[self._printed :]:
            self._console.print(
                f"[{entry.at_s:6.2f}s] {entry.what:<12} {entry.detail}".rstrip(),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        self._printed = len(state.log)


class LiveView:
    """A terminal: one panel redrawn on every event."""

    _CONNECTION_STYLES = ("green", "cyan", "magenta", "yellow")

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, auto_refresh=False, transient=False)
        self._last_render = 0.0
        self._rendered_log = 0

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, state: DemoState) -> None:
        # Redraw on every log entry, otherwise (chunks) at most every
        # MIN_REDRAW_S: drawing the whole panel per chunk would slow the
        # client's reading down.
        now = time.monotonic()
        if len(state.log) == self._rendered_log and now - self._last_render < MIN_REDRAW_S:
            if not state.finished:
                return
        self._last_render = now
        self._rendered_log = len(state.log)
        self._live.update(self._render(state), refresh=True)

    def _render(self, state: DemoState) -> RenderableType:
        header = Table.grid(padding=(0, 2))
        header.add_column(style="bold")
        header.add_column()
        header.add_row("gateway", state.target)
        header.add_row("client →", f"{state.via} (a TCP proxy that can cut the connection)")
        header.add_row("stream", state.stream_id or "…")
        header.add_row(
            "chunks",
            f"{len(state.seqs)}   checkpoints {state.checkpoints}   "
            f"reconnects {state.reconnects}   duplicates dropped {state.duplicates_dropped}   "
            f"elapsed {state.elapsed_s():.1f} s",
        )

        cells: list[tuple[str, str]] = []
        previous_connection = 0
        for seq, connection in state.seqs:
            style = self._style(connection)
            if connection != previous_connection:
                previous_connection = connection
                cells.append(("✂", "bold red"))
                style = f"bold reverse {style}"
            cells.append((str(seq), style))
        if state.cut_after_seq is not None and previous_connection == 0:
            cells.append(("✂", "bold red"))
        seqs = _SeqGrid(cells)

        log = Table.grid(padding=(0, 1))
        log.add_column(justify="right", style="dim", no_wrap=True)
        log.add_column(no_wrap=True)
        log.add_column(overflow="fold")
        entries = [entry for entry in state.log if not entry.plain_only]
        for entry in entries[-LOG_LINES_SHOWN:]:
            log.add_row(f"{entry.at_s:5.2f}s", Text(entry.what, style=entry.style), entry.detail)

        tail = state.text[-TEXT_TAIL_CHARS:]
        text = Text(("…" if len(state.text) > len(tail) else "") + tail, style="dim")

        # One panel with rules between sections: nested panels render several
        # times over and make each redraw slow.
        parts: list[RenderableType] = [
            header,
            Rule("seq numbers as they arrive", align="left", style="dim"),
            seqs,
            Rule("what happened", align="left", style="dim"),
            log,
            Rule("text so far", align="left", style="dim"),
            text,
        ]
        if state.checks:
            verdict = Text()
            for index, (passed, what) in enumerate(state.checks):
                if index:
                    verdict.append("\n")
                verdict.append(
                    "✓ " if passed else "✗ ", style="bold green" if passed else "bold red"
                )
                verdict.append(what)
            parts += [Rule("checks", align="left", style="dim"), verdict]
        ok = all(passed for passed, _ in state.checks)
        border = "blue" if not state.finished else ("green" if ok else "red")
        return Panel(Group(*parts), title="tokenrelay demo", border_style=border)

    def _style(self, connection: int) -> str:
        return self._CONNECTION_STYLES[connection % len(self._CONNECTION_STYLES)]


class _SeqGrid:
    """Seq numbers in fixed-width cells, as many per line as fit."""

    CELL = 4

    def __init__(self, cells: list[tuple[str, str]]) -> None:
        self._cells = cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        per_line = max(1, options.max_width // self.CELL)
        for start in range(0, len(self._cells), per_line):
            line = Text()
            for label, style in self._cells[start : start + per_line]:
                line.append(label.rjust(self.CELL - 1), style=style)
                line.append(" ")
            yield line


# --- the demo ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """How the demo's clients call a --target gateway (issue 13): its API key
    and TLS files, as RelayClient takes them."""

    api_key: str | None = None
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_client_cert is not None

    def options(self, target: str, *, via_proxy: bool) -> dict[str, Any]:
        """RelayClient keywords. Through the fault proxy the client dials the
        proxy's address but must check the certificate for the gateway's own
        host name (the proxy passes TLS through untouched)."""
        options: dict[str, Any] = {
            "api_key": self.api_key,
            "tls_ca": self.tls_ca,
            "tls_client_cert": self.tls_client_cert,
            "tls_client_key": self.tls_client_key,
        }
        if via_proxy and self.tls:
            host = target.rsplit(":", 1)[0].strip("[]")
            options["channel_options"] = [("grpc.ssl_target_name_override", host)]
        return options


async def run_demo(
    target: str | None = None,
    *,
    tokens: int = 120,
    pace_ms: float = 25.0,
    cut_after: int = 40,
    console: Console | None = None,
    backoff_base_s: float = 1.0,
    credentials: ClientCredentials | None = None,
) -> int:
    """Run the demo; 0 when every check passed, 1 otherwise. `credentials`:
    how to call a `target` gateway (its API key, TLS)."""
    credentials = credentials or ClientCredentials()
    if not 0 < cut_after < tokens:
        raise ValueError(f"cut_after must be between 1 and tokens-1 ({tokens - 1})")
    console = console or Console()
    server = None
    if target is None:
        # Imported here: `tokenrelay demo --target` needs no server code paths.
        from tokenrelay_server.api.server import RelayServer
        from tokenrelay_server.config.settings import Settings

        try:
            server = await RelayServer.start(Settings(port=0))
        except OSError as error:
            console.print(f"cannot start an in-process gateway: {error}")
            return 1
        target = server.address
    state = DemoState(target=target if server is None else f"{target} (in-process)")
    ok = False
    try:
        async with FaultProxy.for_target(target) as proxy:
            state.via = proxy.address
            view: LiveView | PlainView = (
                LiveView(console) if console.is_terminal else PlainView(console)
            )
            with view:
                state.add(
                    "bold", "demo", f"gateway {state.target}, client connects via {proxy.address}"
                )
                view.update(state)
                ok = await _stream_and_check(
                    state,
                    view.update,
                    proxy,
                    target,
                    tokens=tokens,
                    pace_ms=pace_ms,
                    cut_after=cut_after,
                    backoff_base_s=backoff_base_s,
                    credentials=credentials,
                )
                state.finished = True
                view.update(state)
    finally:
        if server is not None:
            await server.stop(grace=1.0)
    return 0 if ok else 1


async def _stream_and_check(
    state: DemoState,
    refresh: Callable[[DemoState], None],
    proxy: FaultProxy,
    target: str,
    *,
    tokens: int,
    pace_ms: float,
    cut_after: int,
    backoff_base_s: float,
    credentials: ClientCredentials,
) -> bool:
    metadata = {"sim.pace_ms": f"{pace_ms:g}", "sim.seed": SEED}
    seqs: list[int] = []
    announce_next_chunk = False
    async with RelayClient(
        proxy.address,
        backoff_base_s=backoff_base_s,
        **credentials.options(target, via_proxy=True),
    ) as client:
        relay_stream = client.stream(
            MODEL, [("user", PROMPT)], max_tokens=tokens, metadata=metadata
        )
        try:
            async for event in relay_stream:
                if isinstance(event, Started):
                    state.stream_id = event.stream_id
                    if event.resumed:
                        state.add(
                            "cyan",
                            "resumed",
                            f"the server replays from seq {relay_stream.last_seq + 1}",
                        )
                    else:
                        state.add(
                            "green",
                            "started",
                            f"stream {event.stream_id}, {tokens} tokens at {pace_ms:g} ms",
                        )
                elif isinstance(event, Chunk):
                    if announce_next_chunk and seqs:
                        announce_next_chunk = False
                        state.add(
                            "cyan",
                            "continues",
                            f"seq {event.seq} follows seq {seqs[-1]}: no gap, no duplicate",
                        )
                    seqs.append(event.seq)
                    state.seqs.append((event.seq, state.connection))
                    state.text = relay_stream.text
                    if event.seq == cut_after:
                        cut = proxy.cut_all()
                        state.cut_after_seq = event.seq
                        state.add(
                            "bold red",
                            "✂ cut",
                            f"reset {cut} TCP connection(s) after seq {event.seq} (RST)",
                        )
                elif isinstance(event, Checkpoint):
                    state.checkpoints += 1
                    # Progress for the plain view; the live view has the seq panel.
                    state.add(
                        "dim", "checkpoint", f"seq {event.seq} stored; fresh resume token"
                    ).plain_only = True
                elif isinstance(event, Reconnecting):
                    state.add(
                        "yellow",
                        "reconnecting",
                        f"attempt {event.attempt}/{event.max_attempts} in {event.delay_s:.2f} s, "
                        f"from seq {event.last_seq}; cause: {event.cause}",
                    )
                elif isinstance(event, Reconnected):
                    state.connection += 1
                    state.reconnects += 1
                    announce_next_chunk = True
                    state.add(
                        "yellow",
                        "reconnected",
                        f"attempt {event.attempt}, resuming after seq {event.last_seq}",
                    )
                elif isinstance(event, Notice):
                    state.add("magenta", "notice", f"{event.code}: {event.message}")
                elif isinstance(event, End):
                    state.end = event
                    state.add(
                        "bold green" if not event.partial else "bold red",
                        "end",
                        f"finish {event.finish_reason!r}, total_seq {event.total_seq}, "
                        f"sha256 {event.text_sha256[:16]}… verified by the client",
                    )
                state.duplicates_dropped = relay_stream.duplicates_dropped
                refresh(state)
        except TokenRelayClientError as error:
            state.add("bold red", "failed", f"{type(error).__name__}: {error}")
            state.checks.append((False, f"the stream completed ({type(error).__name__})"))
            refresh(state)
            return False

        state.add("dim", "checking", "running the same request uninterrupted to compare")
        refresh(state)
        try:
            # Straight to the gateway, no proxy, no pacing: the reference text.
            async with RelayClient(
                target, **credentials.options(target, via_proxy=False)
            ) as reference_client:
                reference = await reference_client.generate(
                    MODEL,
                    [("user", PROMPT)],
                    max_tokens=tokens,
                    metadata={"sim.pace_ms": "0", "sim.seed": SEED},
                )
            reference_text: str | None = reference.text
        except TokenRelayClientError as error:
            state.add("bold red", "reference failed", str(error))
            reference_text = None

    end = state.end
    assert end is not None  # the loop ends with End or returns above
    state.checks = [
        (True, f"sha256 digest verified by the client: {end.text_sha256}"),
        (
            seqs == list(range(1, len(seqs) + 1)),
            f"seqs 1..{len(seqs)} contiguous, each exactly once "
            f"({relay_stream.duplicates_dropped} duplicate(s) dropped)",
        ),
        (
            not end.partial and end.total_seq == tokens,
            f"complete: {end.total_seq} of {tokens} chunks",
        ),
        (state.reconnects >= 1, f"survived the cut with {state.reconnects} reconnect(s)"),
        (
            reference_text == relay_stream.text,
            "same text as an uninterrupted run of the same request",
        ),
    ]
    passed = all(ok for ok, _ in state.checks)
    for ok, what in state.checks:
        # The live view shows the checks in their own panel.
        state.add("bold green" if ok else "bold red", "✓" if ok else "✗", what).plain_only = True
    state.add(
        "bold green" if passed else "bold red",
        "done" if passed else "FAILED",
        f"{len(seqs)} chunks, {state.reconnects} reconnect(s), {state.elapsed_s():.1f} s",
    )
    refresh(state)
    return passed
