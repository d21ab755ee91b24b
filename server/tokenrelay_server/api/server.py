"""Assemble and run a gateway: store, providers, hub, gRPC server.

`RelayServer.start(settings)` is what the CLI, the demo, the benchmark and the
tests all use: a real grpc.aio server on a real port, with health checking
(SERVING when ready, NOT_SERVING while draining or while the store is
unreachable) and server reflection.

Observability (issue 11), each only when asked for:
- `metrics_port`: Prometheus /metrics (obs/metrics.py) on `metrics_host`;
- `admin_token`: the `tokenrelay.v1.Admin` service (api/admin.py);
- `admin_token`, or the Redis store (whose statistics every replica's Admin
  reads): every classified upstream error recorded for the error statistics
  (obs/error_recorder.py);
- always: one warning when a breaker opens (obs/breaker_log.py, a breaker
  listener).
With none of these the hub has no observer and the engine builds no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import secrets
import uuid
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenrelay.v1 import admin_pb2_grpc, relay_pb2, relay_pb2_grpc
from tokenrelay_server.api.admin import ADMIN_SERVICE, AdminServicer
from tokenrelay_server.api.auth import Authenticator
from tokenrelay_server.api.reflection import enable_server_reflection
from tokenrelay_server.api.servicer import RelayServicer
from tokenrelay_server.api.tls import ReloadableCredentials, TlsFiles
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.config.problems import ConfigError, ConfigProblem
from tokenrelay_server.config.settings import Settings, flag_of
from tokenrelay_server.core.breaker import BreakerListener, BreakerSettings
from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.limits import HubSettings, LagSettings, Timeouts
from tokenrelay_server.core.recovery import RecoveryConfig
from tokenrelay_server.core.retry import BackoffPolicy
from tokenrelay_server.engine.events import BreakerChanged, Observer, Observers
from tokenrelay_server.engine.hub import StreamHub
from tokenrelay_server.engine.loop_lag import LoopLagMonitor
from tokenrelay_server.engine.recovery_loop import Recovery
from tokenrelay_server.engine.resources import resident_bytes
from tokenrelay_server.engine.routing import Route, Router
from tokenrelay_server.engine.selection import UpstreamHealth
from tokenrelay_server.obs.breaker_log import warn_on_breaker_open
from tokenrelay_server.obs.error_recorder import ErrorRecorder
from tokenrelay_server.obs.live import LiveStats
from tokenrelay_server.obs.logs import StreamLog
from tokenrelay_server.obs.metrics import Metrics, MetricsEndpoint
from tokenrelay_server.obs.tracing import Tracing, span_exporter
from tokenrelay_server.store.base import ObservableStore, StreamStore
from tokenrelay_server.store.error_stats import ErrorStats, MemoryErrorStats
from tokenrelay_server.store.errors import StoreError
from tokenrelay_server.store.heartbeat import HasHeartbeats
from tokenrelay_server.store.keys import FileKeys, KeyRecord, KeyStore
from tokenrelay_server.store.memory import MemoryStore
from tokenrelay_server.store.quota import MemoryQuota, Quota
from tokenrelay_server.store.seal import Sealer
from tokenrelay_server.upstream.base import Provider
from tokenrelay_server.upstream.build import build_providers
from tokenrelay_server.upstream.sim import SimProvider

log = logging.getLogger(__name__)

RELAY_SERVICE = relay_pb2.DESCRIPTOR.services_by_name["Relay"].full_name


def build_router(
    settings: Settings,
    extra: Mapping[str, list[Route]] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> Router:
    """The configured aliases, plus model `sim` where `settings.sim_routable`
    (a configured alias named `sim` wins). The `sim` provider stays available
    to chains that name it.

    Timeouts: a provider's own, unless `--stall-timeout-s` /
    `--first-token-timeout-s` (flag or environment) was given, which beats
    every provider's; `sim` uses the server settings."""
    sim = SimProvider("sim", default_pace_ms=settings.sim_pace_ms, clock=clock or SystemClock())
    providers: dict[str, Provider] = {"sim": sim}
    timeouts: dict[str, Timeouts] = {
        "sim": Timeouts(
            first_token_s=settings.first_token_timeout_s, stall_s=settings.stall_timeout_s
        )
    }
    overrides = settings.timeout_overrides
    for name, config in settings.upstream.providers.items():
        timeouts[name] = Timeouts(
            first_token_s=overrides.get("first_token_timeout_s", config.first_token_timeout_s),
            stall_s=overrides.get("stall_timeout_s", config.stall_timeout_s),
        )
    if settings.upstream.providers:
        providers.update(
            build_providers(settings.upstream, os.environ if env is None else env, clock=clock)
        )
    routes: dict[str, list[Route]] = {}
    if settings.sim_routable:
        routes["sim"] = [Route(sim, "sim", timeouts["sim"])]
    for alias, route in settings.upstream.models.items():
        routes[alias] = [
            Route(providers[entry.provider], entry.model, timeouts[entry.provider])
            for entry in route.chain
        ]
    routes.update(extra or {})
    return Router(routes)


def build_recovery(
    settings: Settings,
    clock: Clock,
    rng: random.Random | None = None,
    *,
    observe: Observers | None = None,
    listeners: tuple[BreakerListener, ...] = (),
) -> Recovery:
    """The shared recovery context: one UpstreamHealth (breakers, budgets,
    scores) per replica, the policy, the clock and the jitter source. Breaker
    changes go to `listeners` and to `observe` as BreakerChanged events."""
    if observe:
        events = observe
        listeners = (
            *listeners,
            lambda change: events(BreakerChanged(change, clock.monotonic())),
        )
    return Recovery(
        health=UpstreamHealth(
            clock=clock,
            listeners=listeners,
            breaker_settings=BreakerSettings(
                failure_threshold=settings.breaker_failure_threshold,
                cooldown_s=settings.breaker_cooldown_s,
                failure_rate=settings.breaker_failure_rate,
                min_calls=settings.breaker_min_calls,
                window_s=settings.breaker_window_s,
            ),
            retry_budget_ratio=settings.retry_budget_ratio,
        ),
        config=RecoveryConfig(
            max_retries=settings.max_retries,
            allow_fallback=settings.allow_fallback,
            allow_partial=settings.allow_partial,
            resume_on_malformed=settings.resume_on_malformed,
            backoff=BackoffPolicy(
                base_s=settings.backoff_base_s,
                cap_s=settings.backoff_cap_s,
                jitter=settings.jitter,
            ),
            selection=settings.selection,
        ),
        clock=clock,
        rng=rng or random.Random(),
    )


# What the Redis store's sealer derives its keys for (store/seal.py).
STORE_SEAL_CONTEXT = b"tokenrelay redis store values v1"


def store_sealer(settings: Settings) -> Sealer | None:
    """What seals the Redis store's values at rest: the resume secrets (every
    replica has them). Without configured ones tokens die with the process
    anyway, and the values stay plain."""
    keys = [(kid, secret.encode()) for kid, secret in settings.resume_keys]
    return Sealer(keys, context=STORE_SEAL_CONTEXT) if keys else None


def build_store(settings: Settings, clock: Clock) -> StreamStore:
    if settings.store == "redis":
        from tokenrelay_server.store.redis import RedisStore

        sealer = store_sealer(settings)

        return RedisStore.from_url(
            settings.redis_url,
            retention_s=settings.retention_s,
            prefix=settings.redis_prefix,
            clock=clock,
            cluster=settings.redis_cluster,
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
            retry_window_s=settings.store_retry_window_s,
            group_commit_max_entries=settings.redis_group_commit_max_entries,
            group_commit_max_wait_s=settings.redis_group_commit_max_wait_ms / 1000,
            sealer=sealer,
        )
    return MemoryStore(retention_s=settings.retention_s, clock=clock)


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_open_gateway(settings: Settings) -> None:
    """With no API key configured, serve only on loopback unless told otherwise."""
    if settings.requires_keys or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise ConfigError(
        [
            ConfigProblem(
                "",
                f"no API key is configured, so the gateway would be open to anyone who reaches "
                f"{settings.host}; add [[auth.keys]] (or --auth-store redis and "
                "`tokenrelay keys add`), listen on a loopback address, or pass "
                f"{flag_of('allow_unauthenticated')}",
                None,
                flag_of("host"),
            )
        ]
    )


def build_key_store(settings: Settings) -> KeyStore | None:
    """Where API keys are looked up; None: the gateway is open (no key configured)."""
    if settings.auth_store == "redis":
        from tokenrelay_server.store.tenants_redis import RedisKeys

        return RedisKeys.from_url(settings.redis_url, prefix=settings.redis_prefix)
    if settings.auth.keys:
        return FileKeys(
            KeyRecord(id=entry.id, tenant=entry.tenant, sha256=entry.sha256)
            for entry in settings.auth.keys
        )
    return None


def build_quota(settings: Settings, clock: Clock) -> Quota:
    """Per-tenant quotas: in Redis with the Redis store (shared by every
    replica, slots living with the leases), else in this process."""
    if settings.store == "redis":
        from tokenrelay_server.store.quota import RedisQuota

        return RedisQuota.from_url(
            settings.redis_url, prefix=settings.redis_prefix, slot_ttl_s=settings.lease_ttl_s
        )
    return MemoryQuota(clock)


def build_error_stats(settings: Settings, clock: Clock) -> ErrorStats:
    """Where the error statistics go: beside the stream log (Redis: shared by
    every replica, under the same prefix), or in memory."""
    if settings.store == "redis":
        from tokenrelay_server.store.error_stats_redis import RedisErrorStats

        return RedisErrorStats.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            clock=clock,
            cluster=settings.redis_cluster,
            pool_timeout_s=settings.redis_pool_timeout_s,
        )
    return MemoryErrorStats(clock=clock)


async def _store_answers(store: StreamStore) -> bool:
    """Whether the store answers; asked twice, so that one killed connection
    (the probe's own) is not an outage."""
    for _ in range(2):
        try:
            await store.ping()
        except StoreError:
            continue
        return True
    return False


class RelayServer:
    """A running gateway."""

    def __init__(
        self,
        *,
        settings: Settings,
        server: grpc.aio.Server,
        hub: StreamHub,
        tokens: ResumeTokens,
        health_servicer: health.aio.HealthServicer,
        providers: list[Provider],
        port: int,
        owns_store: bool,
        guard: asyncio.Task[None] | None = None,
        heartbeat: asyncio.Task[None] | None = None,
        lag_monitor: asyncio.Task[None] | None = None,
        store_available: bool = True,
        tracing: Tracing | None = None,
        recorder: ErrorRecorder | None,
        live: LiveStats | None = None,
        metrics: Metrics | None = None,
        metrics_endpoint: MetricsEndpoint | None = None,
        authenticator: Authenticator | None = None,
        key_store: KeyStore | None = None,
        quota: Quota | None = None,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.key_store = key_store
        self.quota = quota
        self.hub = hub
        self.tokens = tokens
        self.port = port
        self.recorder = recorder
        self.live = live
        self.metrics = metrics
        self._metrics_endpoint = metrics_endpoint
        self._server = server
        self._health = health_servicer
        self._providers = providers
        self._owns_store = owns_store
        self._guard = guard
        self._heartbeat = heartbeat
        self._lag_monitor = lag_monitor
        self.tracing = tracing  # None with --otel-exporter none
        self._stopped = False
        self._store_available = store_available
        self._probe: asyncio.Task[None] | None = None
        self.tls: ReloadableCredentials | None = None  # None: a plaintext port

    def reload_certificates(self) -> None:
        """Read the TLS files again (SIGHUP): new connections get the new
        certificate, open ones keep theirs (api/tls.py). Raises TlsFilesError,
        changing nothing, when they do not load; a plaintext port ignores it."""
        if self.tls is not None:
            self.tls.reload()

    @property
    def error_stats(self) -> ErrorStats | None:
        """Where this replica records errors (None: it does not)."""
        return None if self.recorder is None else self.recorder.stats

    @property
    def metrics_port(self) -> int | None:
        """Where /metrics is served (None: not served)."""
        return None if self._metrics_endpoint is None else self._metrics_endpoint.port

    @property
    def metrics_url(self) -> str | None:
        if self._metrics_endpoint is None:
            return None
        host = self.settings.metrics_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self._metrics_endpoint.port}/metrics"

    async def set_store_available(self, available: bool) -> None:
        """What the store's health probe reports: while the store cannot be
        reached, health is NOT_SERVING (load balancers send new streams
        elsewhere) and tokenrelay_store_up is 0 (the TokenrelayStoreUnavailable
        alert); SERVING and 1 again when it answers. Draining wins."""
        self._store_available = available
        self.hub.store_available = available
        if self.metrics is not None:
            self.metrics.set_store_available(available)
        if self._stopped or self.hub.draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if available
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", RELAY_SERVICE):
            await self._health.set(service, status)

    @property
    def store_available(self) -> bool:
        return self._store_available

    async def probe_store(self) -> None:
        """Ask the store every `store_probe_interval_s` whether it answers and
        report changes (`set_store_available`); owned by the server (started
        with it, cancelled when it stops). Real time: an outage is."""
        store = self.hub.store
        while True:
            await asyncio.sleep(self.settings.store_probe_interval_s)
            available = await _store_answers(store)
            if available != self._store_available:
                log.warning(
                    "%s is %s", store.label, "reachable again" if available else "unreachable"
                )
                await self.set_store_available(available)

    @property
    def address(self) -> str:
        host = self.settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @classmethod
    async def start(
        cls,
        settings: Settings | None = None,
        *,
        store: StreamStore | None = None,
        clock: Clock | None = None,
        routes: Mapping[str, list[Route]] | None = None,
        observers: Sequence[Observer] = (),
        lag_clock: Clock | None = None,
        reuse_port: bool = False,
    ) -> RelayServer:
        """Assemble and start a gateway. `observers` get every engine event
        (engine/events.py) after the gateway's own: the tracer (when
        `otel_exporter` is not "none"), the lifecycle log lines, live stats,
        metrics and the error statistics recorder (when asked for).
        `lag_clock` is the loop-lag monitor's (default: the real clock, even
        when `clock` is a test's: loop lag is real time). `reuse_port`: bind
        with SO_REUSEPORT, so that the other workers of `serve --workers N`
        share the port (api/workers.py); off, a port in use is an error."""
        settings = settings or Settings()
        check_open_gateway(settings)
        # Checked before anything is built: a mistake is a configuration error
        # (TlsFilesError) and nothing was started.
        tls_files = TlsFiles.of(settings)
        tls = None if tls_files is None else ReloadableCredentials(tls_files)
        replica_id = uuid.uuid4().hex[:12]
        tracing = (
            Tracing(span_exporter(settings.otel_exporter), replica_id=replica_id)
            if settings.otel_exporter != "none"
            else None
        )
        clock = clock or SystemClock()
        live = LiveStats() if settings.metrics_port is not None or settings.admin_token else None
        metrics = Metrics(live) if live is not None and settings.metrics_port is not None else None
        # Errors are recorded where someone can read them: by this replica's
        # Admin, or, in the shared Redis, by any replica's.
        recorder = (
            ErrorRecorder(
                build_error_stats(settings, clock),
                clock,
                on_dropped=None if metrics is None else metrics.error_stats_dropped.inc,
            )
            if settings.admin_token or settings.store == "redis"
            else None
        )
        # Only what is asked for observes: with no observer that wants chunks,
        # the engine builds no event per chunk (the log lines need none).
        own: list[Observer] = [] if tracing is None else [tracing.observer]
        own.append(StreamLog(log_content=settings.log_content))
        for observer in (live, metrics, recorder):
            if observer is not None:
                own.append(observer)
        observe = Observers([*own, *observers])
        # Without a configured secret, tokens die with this process; the CLI
        # warns about it right after the "listening" line.
        resume_keys = [(kid, secret.encode()) for kid, secret in settings.resume_keys] or [
            ("k0", secrets.token_urlsafe(32).encode())
        ]
        owns_store = store is None
        if store is None:
            store = build_store(settings, clock)
        if metrics is not None and isinstance(store, ObservableStore):
            store.append_observer = metrics.observe_append
        router = build_router(settings, routes, clock=clock)
        # Twice the retention: a token outlives its stream, so a stream past
        # retention is NOT_FOUND rather than an expired token.
        tokens = ResumeTokens(resume_keys, ttl_s=2 * settings.retention_s, clock=clock)
        key_store = build_key_store(settings)
        authenticator = Authenticator(key_store, settings.auth, clock=clock)
        quota = build_quota(settings, clock)
        loop_lag = (
            LoopLagMonitor(
                lag_clock or SystemClock(),
                LagSettings(
                    threshold_s=settings.max_loop_lag_ms / 1000,
                    window_s=settings.loop_lag_window_s,
                ),
            )
            if settings.max_loop_lag_ms
            else None
        )
        hub = StreamHub(
            loop_lag=loop_lag,
            quota=quota,
            store=store,
            router=router,
            clock=clock,
            recovery=build_recovery(
                settings, clock, observe=observe, listeners=(warn_on_breaker_open,)
            ),
            observers=observe,
            replica_id=replica_id,
            heartbeats=store.heartbeats if isinstance(store, HasHeartbeats) else None,
            settings=HubSettings(
                detach_grace_s=settings.detach_grace_s,
                checkpoint_interval=settings.checkpoint_interval,
                max_streams=settings.max_streams,
                max_stream_bytes=settings.max_response_bytes,
                lease_ttl_s=settings.lease_ttl_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                heartbeat_ttl_s=settings.heartbeat_ttl_s,
                max_memory_bytes=int(settings.max_memory_mb * (1 << 20)),
                memory_check_interval_s=settings.memory_check_interval_s,
                shed_retry_after_s=settings.shed_retry_after_s,
            ),
        )
        limits = settings.request_limits
        # A frame past max_request_bytes is refused by gRPC itself with
        # RESOURCE_EXHAUSTED before it is decoded ([limits], issue 13).
        server = grpc.aio.server(
            interceptors=None if tracing is None else [tracing.server_interceptor()],
            options=[
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        relay_pb2_grpc.add_RelayServicer_to_server(
            RelayServicer(
                hub,
                tokens,
                max_prompt_bytes=settings.max_prompt_bytes,
                limits=limits,
                clock=clock,
                first_message_timeout_s=settings.first_message_timeout_s,
                allow_partial=settings.allow_partial,
                auth=authenticator,
            ),
            server,
        )
        services = [RELAY_SERVICE, health.SERVICE_NAME]
        if settings.admin_token:
            assert recorder is not None  # an Admin token turns the recorder on
            admin_pb2_grpc.add_AdminServicer_to_server(
                AdminServicer(
                    token=settings.admin_token,
                    hub=hub,
                    live=live or LiveStats(),
                    error_stats=recorder.stats,
                    recorder=recorder,
                    clock=clock,
                ),
                server,
            )
            services.append(ADMIN_SERVICE)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # Both reflection protocols (v1 and v1alpha): api/reflection.py.
        enable_server_reflection(services, server)
        try:
            address = f"{settings.host}:{settings.port}"
            port = (
                server.add_insecure_port(address)
                if tls is None
                else server.add_secure_port(address, tls.credentials)
            )
        except RuntimeError as error:
            if tracing is not None:
                await tracing.shutdown()
            raise OSError(f"cannot listen on {settings.host}:{settings.port}: {error}") from None
        endpoint: MetricsEndpoint | None = None
        if metrics is not None:
            metrics.bind(hub)
            endpoint = MetricsEndpoint(metrics)
            try:
                await endpoint.start(settings.metrics_host, settings.metrics_port or 0)
            except OSError:
                await server.stop(None)
                raise
        # The first heartbeat before the first stream: a lease of this replica
        # never names a replica without one (others would take it over). A
        # store that cannot be reached now is retried by the keeper.
        try:
            await hub.beat()
        except Exception as error:  # typed by the store
            log.warning("first heartbeat not written: %s", error)
        heartbeat = asyncio.create_task(hub.keep_heartbeat(), name="heartbeat")
        await server.start()
        if recorder is not None:
            recorder.start()
        # A store that does not answer at start: NOT_SERVING until it does.
        store_available = await _store_answers(store)
        hub.store_available = store_available
        if metrics is not None:
            metrics.set_store_available(store_available)
        for service in ("", RELAY_SERVICE):
            await health_servicer.set(
                service,
                health_pb2.HealthCheckResponse.SERVING
                if store_available
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        providers = router.providers()
        guard = (
            asyncio.create_task(hub.guard_memory(resident_bytes), name="memory guard")
            if settings.max_memory_mb
            else None
        )
        lag_monitor = (
            asyncio.create_task(loop_lag.run(), name="loop lag monitor")
            if loop_lag is not None
            else None
        )
        relay = cls(
            guard=guard,
            heartbeat=heartbeat,
            lag_monitor=lag_monitor,
            store_available=store_available,
            settings=settings,
            server=server,
            hub=hub,
            tokens=tokens,
            health_servicer=health_servicer,
            providers=providers,
            port=port,
            owns_store=owns_store,
            tracing=tracing,
            recorder=recorder,
            live=live,
            metrics=metrics,
            metrics_endpoint=endpoint,
            authenticator=authenticator,
            key_store=key_store,
            quota=quota,
        )
        relay.tls = tls
        relay._probe = asyncio.create_task(relay.probe_store(), name="store probe")
        return relay

    async def drain_and_stop(self) -> None:
        """The SIGTERM path: NOT_SERVING, no new streams, let open ones finish
        for `drain_grace_s`, then UNAVAILABLE to the rest, then stop."""
        if self._stopped:
            return
        await self._health.enter_graceful_shutdown()
        await self.hub.drain(self.settings.drain_grace_s)
        await self.stop(grace=1.0)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop now: end local generations, close the server and the store."""
        if self._stopped:
            return
        self._stopped = True
        self.hub.draining = True
        for task in (self._guard, self._lag_monitor, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._health.enter_graceful_shutdown()
        await self.hub.close()
        await self._server.stop(grace)
        if self._heartbeat is not None:
            # After the generations ended: until then they are ours.
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            with contextlib.suppress(Exception):
                await self.hub.stop_heartbeat()
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.stop()
        for provider in self._providers:
            await provider.aclose()
        if self.recorder is not None:
            await self.recorder.stop()
            await self.recorder.stats.close()
        if self._owns_store:
            await self.hub.store.close()
        if self.key_store is not None:
            await self.key_store.close()
        if self.quota is not None:
            await self.quota.close()
        if self.tracing is not None:
            await self.tracing.shutdown()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
