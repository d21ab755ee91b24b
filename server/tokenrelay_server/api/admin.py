"""The `tokenrelay.v1.Admin` servicer (protos/tokenrelay/v1/admin.proto).

Served only when the gateway has an admin token (api/server.py registers it
then, and lists it in reflection). Every call must carry the metadata
`authorization: Bearer TOKEN`, compared in constant time
(`hmac.compare_digest`); otherwise UNAUTHENTICATED, with a message that
says what is missing and never repeats what was sent.

Error statistics come from the store's `ErrorStats` (the whole
deployment's, with Redis); streams and the overview from this replica's hub,
its upstream health and `LiveStats`.
"""

from __future__ import annotations

import hmac
import logging
from typing import TypeVar

import grpc

from tokenrelay.v1 import admin_pb2, admin_pb2_grpc
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.engine.generation import Generation
from tokenrelay_server.engine.hub import StreamHub
from tokenrelay_server.obs.error_recorder import ErrorRecorder
from tokenrelay_server.obs.live import LiveStats
from tokenrelay_server.obs.process import census
from tokenrelay_server.obs.state import breaker_states
from tokenrelay_server.store.error_stats import ErrorStats, Period

log = logging.getLogger(__name__)

ADMIN_SERVICE: str = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
MAX_STREAM_ID_CHARS = 256
PERIODS = {
    admin_pb2.STATS_PERIOD_HOUR: Period.HOUR,
    admin_pb2.STATS_PERIOD_DAY: Period.DAY,
    admin_pb2.STATS_PERIOD_WEEK: Period.WEEK,
}

Request = TypeVar("Request")
Response = TypeVar("Response")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        token: str,
        hub: StreamHub,
        live: LiveStats,
        error_stats: ErrorStats,
        recorder: ErrorRecorder | None,
        clock: Clock,
    ) -> None:
        self._token = f"Bearer {token}".encode()
        self._hub = hub
        self._live = live
        self._error_stats = error_stats
        self._recorder = recorder
        self._clock = clock

    async def _authorize(self, context: grpc.aio.ServicerContext[Request, Response]) -> None:
        given = [
            value for key, value in context.invocation_metadata() or () if key == "authorization"
        ]
        if not given:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Admin calls need the metadata `authorization: Bearer TOKEN`, with the "
                "gateway's admin token (--admin-token / TOKENRELAY_ADMIN_TOKEN)",
            )
        value = given[-1]
        raw = value if isinstance(value, bytes) else value.encode()
        if len(given) > 1 or not hmac.compare_digest(raw, self._token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the authorization metadata does not carry the gateway's admin token "
                "(expected `Bearer TOKEN`, once)",
            )

    # -- error statistics -------------------------------------------------------------

    async def GetErrorStats(
        self,
        request: admin_pb2.GetErrorStatsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.GetErrorStatsRequest, admin_pb2.GetErrorStatsResponse
        ],
    ) -> admin_pb2.GetErrorStatsResponse:
        await self._authorize(context)
        period = PERIODS.get(request.period)
        if period is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"period: {request.period} is not a period; use STATS_PERIOD_HOUR, "
                "STATS_PERIOD_DAY or STATS_PERIOD_WEEK",
            )
        try:
            if self._recorder is not None:
                await self._recorder.flush()
            rows = await self._error_stats.summary(period)
        except Exception as error:
            log.warning("Admin.GetErrorStats: the error statistics cannot be read: %s", error)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the error statistics cannot be read: the store does not answer; retry later",
            )
        return admin_pb2.GetErrorStatsResponse(
            period=request.period,
            total=sum(row.count for row in rows),
            rows=[
                admin_pb2.ErrorStatsRow(
                    type=int(row.type),  # type: ignore[arg-type]
                    code=row.code,
                    count=row.count,
                    avg_bytes_received=row.avg_bytes_received,
                    avg_tokens_received=row.avg_tokens_received,
                    recoverable_count=row.recoverable,
                    providers=row.providers,
                )
                for row in rows
            ],
        )

    # -- streams ------------------------------------------------------------------------

    def _local_info(self, generation: Generation) -> admin_pb2.StreamInfo:
        readers = generation.log.readers
        return admin_pb2.StreamInfo(
            stream_id=generation.stream_id,
            model=generation.meta.model,
            owner=self._hub.replica_id,
            last_seq=generation.last_seq,
            age_seconds=max(self._clock.wall() - generation.meta.created_at, 0.0),
            attached_clients=readers,
            state=admin_pb2.STREAM_STATE_RUNNING if readers else admin_pb2.STREAM_STATE_DETACHED,
            attempts=generation.attempts,
            phase=generation.phase,
        )

    async def ListStreams(
        self,
        request: admin_pb2.ListStreamsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListStreamsRequest, admin_pb2.ListStreamsResponse
        ],
    ) -> admin_pb2.ListStreamsResponse:
        await self._authorize(context)
        generations = sorted(
            self._hub.generations(), key=lambda g: (g.meta.created_at, g.stream_id)
        )
        return admin_pb2.ListStreamsResponse(
            replica_id=self._hub.replica_id,
            streams=[self._local_info(generation) for generation in generations],
        )

    async def GetStream(
        self,
        request: admin_pb2.GetStreamRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetStreamRequest, admin_pb2.StreamInfo],
    ) -> admin_pb2.StreamInfo:
        await self._authorize(context)
        stream_id = request.stream_id
        if not stream_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream_id is required")
        if len(stream_id) > MAX_STREAM_ID_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream_id is longer than {MAX_STREAM_ID_CHARS} characters",
            )
        generation = self._hub.generation(stream_id)
        if generation is not None:
            return self._local_info(generation)
        store = self._hub.store
        try:
            meta = await store.get_meta(stream_id)
            tail = await store.tail(stream_id) if meta is not None else None
            owner = await store.lease_owner(stream_id) if tail is not None else None
        except Exception as error:
            log.warning("Admin.GetStream: the store cannot be read: %s", error)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the stream store does not answer; retry later"
            )
        if meta is None or tail is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "no such stream: it expired or never existed (stream ids are "
                "StreamStarted.stream_id)",
            )
        generation = self._hub.generation(stream_id)  # a takeover may have begun meanwhile
        if generation is not None:
            return self._local_info(generation)
        if tail.ended:
            state, owner = admin_pb2.STREAM_STATE_ENDED, None
        elif owner is not None:
            state = admin_pb2.STREAM_STATE_REMOTE
        else:
            state = admin_pb2.STREAM_STATE_UNOWNED
        return admin_pb2.StreamInfo(
            stream_id=stream_id,
            model=meta.model,
            owner=owner or "",
            last_seq=tail.last_seq,
            age_seconds=max(self._clock.wall() - meta.created_at, 0.0),
            attached_clients=sum(1 for s in self._hub.sessions() if s.stream_id == stream_id),
            state=state,
        )

    # -- the overview -----------------------------------------------------------------

    async def GetOverview(
        self,
        request: admin_pb2.GetOverviewRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetOverviewRequest, admin_pb2.Overview],
    ) -> admin_pb2.Overview:
        await self._authorize(context)
        hub = self._hub
        now = self._clock.monotonic()
        generations = hub.generations()
        running = sum(1 for generation in generations if generation.log.attended)
        errors = sorted(
            self._live.errors_per_minute(now).items(), key=lambda item: (-item[1], item[0])
        )
        process = census()
        return admin_pb2.Overview(
            replica_id=hub.replica_id,
            streams_running=running,
            streams_detached=len(generations) - running,
            attached_clients=len(hub.sessions()),
            tokens_per_second=self._live.tokens_per_second(now),
            errors_last_minute=[
                admin_pb2.CodeCount(code=code, count=count) for code, count in errors
            ],
            breakers=[
                admin_pb2.BreakerInfo(provider=provider, upstream_model=model, state=str(state))
                for (provider, model), state in sorted(breaker_states(hub).items())
            ],
            recent_actions=[
                admin_pb2.RecoveryActionInfo(
                    seconds_ago=max(now - action.at, 0.0),
                    stream_id=action.stream_id,
                    model=action.model,
                    step=action.step,
                    code=action.code,
                    from_provider=action.from_provider,
                    to_provider=action.to_provider,
                    at_seq=action.at_seq,
                    delay_seconds=action.delay_s,
                )
                for action in reversed(self._live.recent)
            ],
            asyncio_tasks=process.asyncio_tasks,
            rss_bytes=process.rss_bytes,
            open_fds=process.open_fds,
        )
