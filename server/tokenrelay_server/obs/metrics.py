"""Prometheus metrics of one gateway replica (prometheus_client).

Three sources, one registry per server (never the library's global default
registry: tests run several gateways in one process):

- events that happen a few times per stream (starts, ends, attempts,
  errors, recovery actions, client resumes, takeovers, time to first token)
  go to prometheus_client counters and histograms as they happen
  (`Metrics.__call__`, an engine observer);
- the per-chunk path (chunks, tokens, inter-token gaps, recovery latency)
  is counted by `LiveStats` (obs/live.py) in plain cells, and the store's
  appends (`observe_append`, the hook of store/base.py `ObservableStore`) in
  two `HistogramCell`s: the collector turns them into families at scrape
  time, so a chunk pays no lock and no label lookup;
- state (generations running and detached, attached calls, breaker states,
  usable chain entries per alias, breaker transitions) is read from the hub
  and the upstream health at scrape time (`_StateCollector`).

/metrics is served by aiohttp on the gateway's own event loop
(`MetricsEndpoint`), so the collector reads the hub's dicts on the thread
that changes them. Label values are bounded: model aliases, provider and
upstream model names from the configuration, error types and codes (a fixed
set, core/classify.py), outcomes, steps, states. Never a stream id, a prompt
or a key.

    tokenrelay_streams_started_total{model}
    tokenrelay_streams_ended_total{model, outcome}       complete | partial | cancelled
    tokenrelay_stream_errors_total{type, code, fatal}    StreamErrors sent on streams:
                                                         notices (fatal="false") and
                                                         final errors (fatal="true")
    tokenrelay_chunks_total{model, provider}
    tokenrelay_tokens_total{model, provider}             delivered to clients
    tokenrelay_upstream_attempts_total{provider, upstream_model, outcome}
                                                         success | failure | refused | stopped
    tokenrelay_errors_total{type, code, provider}        every classified error of an attempt
    tokenrelay_recovery_actions_total{step, provider}    retry | resume | fallback
    tokenrelay_client_resumes_total{model}
    tokenrelay_takeovers_total{model}
    tokenrelay_breaker_state{provider, upstream_model, state}   1 for the current state
    tokenrelay_breaker_transitions_total{provider, upstream_model, state}
    tokenrelay_model_usable_routes{model}                chain entries whose breaker lets
                                                         calls through (0: none)
    tokenrelay_generations{state}                        running | detached
    tokenrelay_attached_calls
    tokenrelay_time_to_first_token_seconds{provider, upstream_model}
    tokenrelay_inter_token_gap_seconds{model, provider}
    tokenrelay_recovery_latency_seconds{step}            retry | resume | fallback | takeover
    tokenrelay_store_append_seconds, tokenrelay_store_append_entries
    tokenrelay_store_up                                  0 while the store is unreachable
    tokenrelay_error_stats_dropped_total                 records the error statistics lost
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tokenrelay_server.core.breaker import BreakerState
from tokenrelay_server.core.errors import ErrorType
from tokenrelay_server.engine.events import (
    AttemptEnded,
    AttemptStarted,
    ChunkStored,
    EngineEvent,
    ReaderAttached,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
    TakenOver,
)
from tokenrelay_server.engine.hub import StreamHub
from tokenrelay_server.obs.live import HistogramCell, LiveStats
from tokenrelay_server.obs.state import breaker_states, usable_routes

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
APPEND_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)

ATTEMPT_OUTCOMES = ("success", "failure", "refused", "stopped")
ERROR_OUTCOMES = frozenset({"failure", "refused"})


def type_label(error_type: ErrorType) -> str:
    return error_type.name.lower()


def stream_outcome(event: StreamEnded) -> str:
    if not event.end.partial:
        return "complete"
    return "cancelled" if event.end.finish_reason == "cancelled" else "partial"


class Metrics:
    """The metrics of one replica: an engine observer, the store's append
    hook and a registry to expose. `bind(hub)` adds the state read at scrape
    time."""

    # Chunks are LiveStats' (engine/events.py Observers: an observer that says
    # False gets no ChunkStored).
    observes_chunks = False

    def __init__(self, live: LiveStats) -> None:
        self.live = live
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.streams_started = Counter(
            "tokenrelay_streams_started",
            "Streams (generations) started on this replica.",
            ["model"],
            registry=registry,
        )
        self.streams_ended = Counter(
            "tokenrelay_streams_ended",
            "Streams whose End this replica wrote: complete, partial (the gateway gave up) "
            "or cancelled (by a client).",
            ["model", "outcome"],
            registry=registry,
        )
        self.stream_errors = Counter(
            "tokenrelay_stream_errors",
            "StreamErrors sent on streams: notices of failures the gateway recovers from "
            '(fatal="false") and the errors streams ended with (fatal="true").',
            ["type", "code", "fatal"],
            registry=registry,
        )
        self.attempts = Counter(
            "tokenrelay_upstream_attempts",
            "Upstream attempts by how they ended: success, failure, refused (an open "
            "breaker: no call made) or stopped (cancel, deadline, shutdown).",
            ["provider", "upstream_model", "outcome"],
            registry=registry,
        )
        self.errors = Counter(
            "tokenrelay_errors",
            "Classified errors of upstream attempts (what the error statistics record).",
            ["type", "code", "provider"],
            registry=registry,
        )
        self.recovery_actions = Counter(
            "tokenrelay_recovery_actions",
            "Recovery actions: retry, resume (by continuation), fallback; provider is the "
            "one that failed.",
            ["step", "provider"],
            registry=registry,
        )
        self.client_resumes = Counter(
            "tokenrelay_client_resumes",
            "Calls that resumed a stream (a resume token, or a repeated idempotency key).",
            ["model"],
            registry=registry,
        )
        self.takeovers = Counter(
            "tokenrelay_takeovers",
            "Streams this replica took over from a replica that stopped generating them.",
            ["model"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "tokenrelay_time_to_first_token_seconds",
            "From the start of an upstream attempt to its first token.",
            ["provider", "upstream_model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.store_up = Gauge(
            "tokenrelay_store_up",
            "1 while the stream store answers, 0 while this replica cannot reach it "
            "(health NOT_SERVING).",
            registry=registry,
        )
        self.store_up.set(1)
        self.error_stats_dropped = Counter(
            "tokenrelay_error_stats_dropped",
            "Error records the error statistics could not store (the store failed).",
            registry=registry,
        )
        self.append_seconds = HistogramCell(APPEND_BUCKETS)
        self.append_entries = HistogramCell(BATCH_BUCKETS)
        self._state = _StateCollector(self)
        registry.register(self._state)
        ProcessCollector(registry=registry)

    def bind(self, hub: StreamHub) -> None:
        """Read generations, calls and breakers from `hub` at scrape time."""
        self._state.hub = hub

    # -- the store's hook (store/base.py AppendObserver) --------------------------------

    def observe_append(self, entries: int, seconds: float) -> None:
        # Once per append (per chunk until appends are batched): inlined
        # HistogramCell.observe.
        cell = self.append_seconds
        cell.counts[bisect.bisect_left(cell.bounds, seconds)] += 1
        cell.sum += seconds
        cell = self.append_entries
        cell.counts[bisect.bisect_left(cell.bounds, entries)] += 1
        cell.sum += entries

    def set_store_available(self, available: bool) -> None:
        self.store_up.set(1 if available else 0)

    # -- the engine observer -------------------------------------------------------------

    def __call__(self, event: EngineEvent) -> None:
        kind = type(event)
        if kind is ChunkStored or kind is AttemptStarted:
            return  # the hot path is LiveStats'; an attempt counts when it ends
        if isinstance(event, AttemptEnded):
            self._attempt_ended(event)
        elif isinstance(event, StreamStarted):
            self.streams_started.labels(event.model).inc()
        elif isinstance(event, StreamEnded):
            self.streams_ended.labels(event.model, stream_outcome(event)).inc()
            error = event.end.error
            if event.end.partial and error is not None:
                self.stream_errors.labels(type_label(error.type), error.code, "true").inc()
        elif isinstance(event, RecoveryAction):
            fault = event.fault
            self.recovery_actions.labels(event.step, event.from_provider).inc()
            self.stream_errors.labels(type_label(fault.type), fault.code, "false").inc()
        elif isinstance(event, ReaderAttached):
            if event.resumed:
                self.client_resumes.labels(event.model).inc()
        elif isinstance(event, TakenOver):
            self.takeovers.labels(event.model).inc()

    def _attempt_ended(self, event: AttemptEnded) -> None:
        self.attempts.labels(event.provider, event.upstream_model, event.outcome).inc()
        fault = event.fault
        if fault is not None and event.outcome in ERROR_OUTCOMES:
            self.errors.labels(type_label(fault.type), fault.code, event.provider).inc()
        if event.first_token_s is not None:
            self.time_to_first_token.labels(event.provider, event.upstream_model).observe(
                event.first_token_s
            )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(
    name: str,
    documentation: str,
    labels: list[str],
    cells: Iterable[tuple[list[str], HistogramCell]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, cell in cells:
        family.add_metric(values, cell.cumulative(), sum_value=cell.sum)
    return family


class _StateCollector(Collector):
    """Families made at scrape time from LiveStats, the store hook's cells,
    the hub and the upstream health."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.hub: StreamHub | None = None

    def describe(self) -> list[Metric]:
        # Nothing to check at registration: the names are ours alone.
        return []

    def collect(self) -> Iterator[Metric]:
        live = self._metrics.live
        cells = sorted(live.cells.items())
        chunks = CounterMetricFamily(
            "tokenrelay_chunks", "Chunks stored and shown to clients.", labels=["model", "provider"]
        )
        tokens = CounterMetricFamily(
            "tokenrelay_tokens",
            "Tokens delivered to clients (what Checkpoint.token_count counts).",
            labels=["model", "provider"],
        )
        for (model, provider), cell in cells:
            chunks.add_metric([model, provider], cell.chunks)
            tokens.add_metric([model, provider], cell.tokens)
        yield chunks
        yield tokens
        yield _histogram(
            "tokenrelay_inter_token_gap_seconds",
            "Time between two chunks of a stream from the same run of attempts (a gap "
            "after a recovery action is recovery latency instead).",
            ["model", "provider"],
            ((list(key), cell.gaps) for key, cell in cells),
        )
        yield _histogram(
            "tokenrelay_recovery_latency_seconds",
            "From a recovery action (retry, resume, fallback) or a takeover to the "
            "stream's next stored chunk.",
            ["step"],
            (([step], cell) for step, cell in sorted(live.recovery.items())),
        )
        yield _histogram(
            "tokenrelay_store_append_seconds",
            "How long one durable append to the stream store took.",
            [],
            [([], self._metrics.append_seconds)],
        )
        yield _histogram(
            "tokenrelay_store_append_entries",
            "Log entries written by one append (a batch).",
            [],
            [([], self._metrics.append_entries)],
        )
        if self.hub is not None:
            yield from self._hub_state(self.hub)

    def _hub_state(self, hub: StreamHub) -> Iterator[Metric]:
        generations = hub.generations()
        attended = sum(1 for generation in generations if generation.log.attended)
        running = GaugeMetricFamily(
            "tokenrelay_generations",
            "Generations this replica runs: running (a client attached) or detached "
            "(nobody attached: the grace period runs).",
            labels=["state"],
        )
        running.add_metric(["running"], attended)
        running.add_metric(["detached"], len(generations) - attended)
        yield running
        yield GaugeMetricFamily(
            "tokenrelay_attached_calls",
            "Calls attached to a stream on this replica.",
            value=len(hub.sessions()),
        )
        health = hub.recovery.health
        state = GaugeMetricFamily(
            "tokenrelay_breaker_state",
            "The circuit breaker of each chain entry: 1 for its current state.",
            labels=["provider", "upstream_model", "state"],
        )
        for (provider, model), current in sorted(breaker_states(hub).items()):
            for each in BreakerState:
                state.add_metric([provider, model, str(each)], 1 if each is current else 0)
        yield state
        usable = GaugeMetricFamily(
            "tokenrelay_model_usable_routes",
            "Entries of a model alias's chain whose breaker lets calls through; 0: no "
            "provider is available for the alias.",
            labels=["model"],
        )
        for alias, count in sorted(usable_routes(hub).items()):
            usable.add_metric([alias], count)
        yield usable
        breakers = health.breakers()
        names = {f"{provider}/{model}": (provider, model) for provider, model in breakers}
        transitions = CounterMetricFamily(
            "tokenrelay_breaker_transitions",
            "Changes of state of each circuit breaker, by the state it changed to.",
            labels=["provider", "upstream_model", "state"],
        )
        for (name, after), count in sorted(health.transitions.items()):
            provider, model = names.get(name, (name, ""))
            transitions.add_metric([provider, model, after], count)
        yield transitions


class MetricsEndpoint:
    """GET /metrics on the gateway's event loop (aiohttp)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise OSError(
                f"cannot serve metrics on {host}:{port} (--metrics-host/--metrics-port): "
                f"{error.strerror or error}"
            ) from None
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        return self.port

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
