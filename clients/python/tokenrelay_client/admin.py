"""`tokenrelay stats` and `tokenrelay top`: an operator's view of a gateway
through its Admin service (protos/tokenrelay/v1/admin.proto).

Both need the gateway's admin token (`--admin-token` or
TOKENRELAY_ADMIN_TOKEN), sent as `authorization: Bearer TOKEN`.

- `stats --period hour|day|week` prints the error statistics: one row per
  error type and code, most frequent first, with the average bytes and tokens
  received before the failure and how many were recoverable.
- `top` draws the replica's streams, tokens per second, errors per minute by
  code, breakers and recent recovery actions with rich, refreshing in place
  (the terminal's alternate screen, like top(1)) until Ctrl-C; when stdout is
  not a terminal it prints one snapshot and exits.

Exit codes: 0 done; 1 the gateway could not be asked (unreachable, no Admin
service, the token refused), with the reason on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import grpc
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenrelay.v1 import admin_pb2, admin_pb2_grpc, relay_pb2

PERIODS = {
    "hour": admin_pb2.STATS_PERIOD_HOUR,
    "day": admin_pb2.STATS_PERIOD_DAY,
    "week": admin_pb2.STATS_PERIOD_WEEK,
}
EXIT_OK = 0
EXIT_FAILED = 1
MAX_STREAMS_SHOWN = 12
MAX_ACTIONS_SHOWN = 10
STATE_NAMES = {
    admin_pb2.STREAM_STATE_RUNNING: "running",
    admin_pb2.STREAM_STATE_DETACHED: "detached",
    admin_pb2.STREAM_STATE_REMOTE: "remote",
    admin_pb2.STREAM_STATE_UNOWNED: "unowned",
    admin_pb2.STREAM_STATE_ENDED: "ended",
}


class AdminError(Exception):
    """The gateway could not be asked; the message says why and what to do."""


def _explain(target: str, error: grpc.aio.AioRpcError) -> AdminError:
    code, details = error.code(), error.details() or ""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return AdminError(
            f"the gateway at {target} refused the admin token ({details}); pass the "
            "gateway's --admin-token with --admin-token or TOKENRELAY_ADMIN_TOKEN"
        )
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return AdminError(
            f"the gateway at {target} serves no Admin service: start it with --admin-token "
            "(or TOKENRELAY_ADMIN_TOKEN)"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return AdminError(f"cannot reach the gateway at {target}: {details}")
    return AdminError(f"the gateway at {target} answered {code.name}: {details}")


class AdminClient:
    """The Admin calls `stats` and `top` make, with the token attached."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeout_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout_s = timeout_s
        # credentials: TLS (credentials.tls_credentials); None: plaintext.
        self._channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._channel.close()

    @contextlib.asynccontextmanager
    async def _asking(self) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as error:
            raise _explain(self.target, error) from None

    async def error_stats(self, period: str) -> admin_pb2.GetErrorStatsResponse:
        request = admin_pb2.GetErrorStatsRequest(period=PERIODS[period])
        async with self._asking():
            return await self._stub.GetErrorStats(
                request, metadata=self._metadata, timeout=self._timeout_s
            )

    async def overview(self) -> admin_pb2.Overview:
        async with self._asking():
            return await self._stub.GetOverview(
                admin_pb2.GetOverviewRequest(), metadata=self._metadata, timeout=self._timeout_s
            )

    async def streams(self) -> admin_pb2.ListStreamsResponse:
        async with self._asking():
            return await self._stub.ListStreams(
                admin_pb2.ListStreamsRequest(), metadata=self._metadata, timeout=self._timeout_s
            )


def _type_name(value: relay_pb2.ErrorType.ValueType) -> str:
    name = relay_pb2.ErrorType.Name(value) if value in relay_pb2.ErrorType.values() else ""
    return name.removeprefix("ERROR_TYPE_").lower() or str(int(value))


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{value / 60:.0f}m{value % 60:02.0f}s"
    return f"{value / 3600:.0f}h{value % 3600 / 60:02.0f}m"


# --- stats --------------------------------------------------------------------------------


def stats_table(stats: admin_pb2.GetErrorStatsResponse, period: str) -> RenderableType:
    if not stats.rows:
        return Text(f"no errors in the last {period}")
    table = Table(
        title=f"errors in the last {period}: {stats.total}",
        title_justify="left",
        box=None,
        header_style="bold",
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("type", "left"),
        ("code", "left"),
        ("count", "right"),
        ("avg bytes", "right"),
        ("avg tokens", "right"),
        ("recoverable", "right"),
        ("providers", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "providers")
    for row in stats.rows:
        table.add_row(
            _type_name(row.type),
            row.code,
            str(row.count),
            f"{row.avg_bytes_received:.0f}",
            f"{row.avg_tokens_received:.1f}",
            str(row.recoverable_count),
            ", ".join(row.providers),
        )
    return table


async def run_stats(
    target: str,
    token: str,
    period: str,
    console: Console,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    try:
        async with AdminClient(target, token, credentials=credentials) as client:
            stats = await client.error_stats(period)
    except AdminError as error:
        Console(stderr=True).print(f"error: {error}", markup=False, highlight=False)
        return EXIT_FAILED
    console.print(stats_table(stats, period))
    return EXIT_OK


# --- top ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    overview: admin_pb2.Overview
    streams: admin_pb2.ListStreamsResponse


async def take_snapshot(client: AdminClient) -> Snapshot:
    overview, streams = await asyncio.gather(client.overview(), client.streams())
    return Snapshot(overview, streams)


def top_view(target: str, snapshot: Snapshot | None, problem: str = "") -> RenderableType:
    if snapshot is None:
        return Text(f"tokenrelay top — {target}\n\n{problem or 'connecting…'}")
    o = snapshot.overview
    header = Text()
    header.append(f"tokenrelay top — {target} (replica {o.replica_id})\n", style="bold")
    header.append(
        f"streams: {o.streams_running} running, {o.streams_detached} detached   "
        f"clients attached: {o.attached_clients}   "
        f"tokens/s: {o.tokens_per_second:.1f}"
    )
    if problem:
        header.append(f"\n{problem}", style="red")
    parts: list[RenderableType] = [header]

    errors = Table(title="errors/min by code", title_justify="left", box=None)
    errors.add_column("code")
    errors.add_column("count", justify="right")
    for item in o.errors_last_minute:
        errors.add_row(item.code, str(item.count))
    if not o.errors_last_minute:
        errors.add_row("(none)", "")
    breakers = Table(title="breakers", title_justify="left", box=None)
    breakers.add_column("provider")
    breakers.add_column("model")
    breakers.add_column("state")
    for breaker in o.breakers:
        style = "green" if breaker.state == "closed" else "red"
        breakers.add_row(breaker.provider, breaker.upstream_model, Text(breaker.state, style=style))
    side_by_side = Table.grid(padding=(0, 4))
    side_by_side.add_row(errors, breakers)
    parts.append(side_by_side)

    actions = Table(title="recent recovery actions", title_justify="left", box=None)
    for name in ("ago", "step", "code", "from → to", "seq", "stream"):
        actions.add_column(name, justify="right" if name in ("ago", "seq") else "left")
    for action in list(o.recent_actions)[:MAX_ACTIONS_SHOWN]:
        route = f"{action.from_provider} → {action.to_provider}" if action.from_provider else ""
        actions.add_row(
            _seconds(action.seconds_ago),
            action.step,
            action.code,
            route,
            str(action.at_seq),
            action.stream_id[:12],
        )
    if not o.recent_actions:
        actions.add_row("", "(none)", "", "", "", "")
    parts.append(actions)

    streams = Table(title="streams (oldest first)", title_justify="left", box=None)
    for name in ("stream", "model", "state", "seq", "age", "clients", "attempts", "phase"):
        streams.add_column(
            name, justify="right" if name in ("seq", "clients", "attempts") else "left"
        )
    listed = list(snapshot.streams.streams)
    for info in listed[:MAX_STREAMS_SHOWN]:
        streams.add_row(
            info.stream_id[:12],
            info.model,
            STATE_NAMES.get(info.state, "?"),
            str(info.last_seq),
            _seconds(info.age_seconds),
            str(info.attached_clients),
            str(info.attempts),
            info.phase,
        )
    if len(listed) > MAX_STREAMS_SHOWN:
        streams.add_row(f"… {len(listed) - MAX_STREAMS_SHOWN} more", *[""] * 7)
    if not listed:
        streams.add_row("(none)", *[""] * 7)
    parts.append(streams)
    return Group(*parts)


async def run_top(
    target: str,
    token: str,
    console: Console,
    *,
    interval_s: float = 1.0,
    rounds: int | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    """On a terminal: refresh in place every `interval_s` until Ctrl-C (or
    `rounds` refreshes). Otherwise: one snapshot."""
    async with AdminClient(
        target, token, timeout_s=max(interval_s, 2.0), credentials=credentials
    ) as client:
        if not console.is_terminal:
            try:
                snapshot = await take_snapshot(client)
            except AdminError as error:
                Console(stderr=True).print(f"error: {error}", markup=False, highlight=False)
                return EXIT_FAILED
            console.print(top_view(target, snapshot))
            return EXIT_OK
        last: Snapshot | None = None
        with Live(top_view(target, None), console=console, screen=True, auto_refresh=False) as live:
            done = 0
            while rounds is None or done < rounds:
                problem = ""
                try:
                    last = await take_snapshot(client)
                except AdminError as error:
                    problem = f"{error} (retrying)"
                live.update(top_view(target, last, problem), refresh=True)
                done += 1
                await asyncio.sleep(interval_s)
    return EXIT_OK
