"""Prometheus metrics over real ports: a gateway with --metrics-port serves
/metrics (aiohttp on its own loop), and what it counts agrees with what the
clients saw, after a chaos run over real HTTP providers and after streams
that exercise the breaker, detaching and the store's health."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scrape import scrape
from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    eventually,
    generation_of,
    produce,
    run_to_end,
    start_request,
)
from tokenrelay.v1 import admin_pb2, admin_pb2_grpc
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.chaos import PROMPT, Scenario, chaos_config, make_scenario, read_call
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_devtools.timekeeper import keeping_time
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import build_settings, read_config_file
from tokenrelay_server.core.clock import ManualClock

ADMIN_TOKEN = "admin-token-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


async def test_metrics_are_not_served_unless_a_port_is_given(relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    assert relay.metrics is None and relay.metrics_url is None and relay.live is None
    # Only the lifecycle log lines observe the engine: it builds no event per chunk.
    assert not relay.hub.observe.chunks and relay.error_stats is None


async def test_a_clean_stream_is_counted_from_start_to_end(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(metrics_port=0)
    assert relay.metrics_url is not None
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=12))
    assert events[-1].end.total_seq == 12
    samples = await scrape(relay.metrics_url)
    assert samples.get("tokenrelay_streams_started_total", model="sim") == 1
    assert samples.get("tokenrelay_streams_ended_total", model="sim", outcome="complete") == 1
    assert samples.get("tokenrelay_chunks_total", model="sim", provider="sim") == 12
    assert samples.get("tokenrelay_tokens_total", model="sim", provider="sim") == 12
    assert (
        samples.get(
            "tokenrelay_upstream_attempts_total",
            provider="sim",
            upstream_model="sim",
            outcome="success",
        )
        == 1
    )
    ttft = {"provider": "sim", "upstream_model": "sim"}
    assert samples.get("tokenrelay_time_to_first_token_seconds_count", **ttft) == 1
    gaps = {"model": "sim", "provider": "sim"}
    assert samples.get("tokenrelay_inter_token_gap_seconds_count", **gaps) == 11
    assert samples.get("tokenrelay_inter_token_gap_seconds_bucket", le="+Inf", **gaps) == 11
    # One append per chunk, one for the End (checkpoints are not log entries).
    assert samples.get("tokenrelay_store_append_entries_count") == 13
    assert samples.get("tokenrelay_store_append_entries_sum") == 13
    assert samples.get("tokenrelay_store_append_seconds_count") == 13
    assert samples.get("tokenrelay_store_up") == 1
    assert samples.total("tokenrelay_errors_total") == 0
    assert samples.get("tokenrelay_generations", state="running") == 0
    assert samples.get("tokenrelay_attached_calls") == 0
    assert samples.get("process_resident_memory_bytes") > 0


async def test_two_gateways_in_one_process_count_apart(relay_factory: RelayFactory) -> None:
    first = await relay_factory(metrics_port=0)
    second = await relay_factory(metrics_port=0)
    async with grpc.aio.insecure_channel(first.address) as channel:
        await run_to_end(channel, start_request(max_tokens=3))
    assert first.metrics_url is not None and second.metrics_url is not None
    assert (await scrape(first.metrics_url)).total("tokenrelay_streams_started_total") == 1
    assert (await scrape(second.metrics_url)).total("tokenrelay_streams_started_total") == 0


async def test_no_stream_id_or_prompt_becomes_a_label(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(metrics_port=0, max_retries=1, backoff_base_s=0)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(
            channel,
            start_request(prompt="a secret prompt", metadata={"sim.faults": "reset@2,http:500"}),
        )
    stream_id = events[0].started.stream_id
    assert relay.metrics_url is not None
    text = (await scrape(relay.metrics_url)).text
    assert stream_id not in text and "secret" not in text
    assert events[0].started.resume_token not in text


# --- a chaos run: the counters agree with the clients -------------------------------------


def chaos_start(scenario: Scenario) -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model=scenario.alias,
            messages=[pb.Message(role="user", content=PROMPT)],
            params=pb.GenerationParams(max_tokens=scenario.max_tokens),
            metadata={"sim.faults": ",".join(scenario.faults) or "ok", "sim.retry_after_s": "0"},
        )
    )


class ClientView:
    """What the clients of a chaos run saw, added up."""

    def __init__(self) -> None:
        self.streams = 0
        self.chunks = 0
        self.complete = 0
        self.partial = 0
        self.resumes = 0
        self.notices: Counter[str] = Counter()  # StreamError events (fatal=false)
        self.final_errors: Counter[str] = Counter()  # the End's error of a partial

    def add(self, events: list[pb.StreamEvent], resumed: bool) -> None:
        self.streams += 1
        self.resumes += resumed
        self.chunks += sum(1 for e in events if e.HasField("chunk"))
        for event in events:
            if event.HasField("error"):
                assert not event.error.fatal
                self.notices[event.error.code] += 1
        [end] = [e.end for e in events if e.HasField("end")]
        if end.partial:
            self.partial += 1
            self.final_errors[end.error.code] += 1
        else:
            self.complete += 1


async def run_one(stub: pbg.RelayStub, scenario: Scenario, view: ClientView) -> None:
    events = await read_call(stub, chaos_start(scenario), scenario.drop_after)
    resumed = False
    if not events[-1].HasField("end"):
        token = events[0].started.resume_token
        last = max((e.chunk.seq for e in events if e.HasField("chunk")), default=0)
        resume = pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last))
        events += await read_call(stub, resume, None)
        resumed = True
    view.add(events, resumed)


CHAOS_RUNS = 80


@dataclass
class ChaosGateway:
    server: RelayServer
    upstream: MockUpstream

    def leftovers(self) -> int:
        hub = self.server.hub
        return hub.running_generations + hub.attached_sessions + self.upstream.active_requests


@contextlib.asynccontextmanager
async def chaos_gateway(tmp_path: Path) -> AsyncIterator[ChaosGateway]:
    """The chaos tool's providers, chains and realistic timers (the mock
    upstream, real HTTP, both formats) behind a gateway with metrics and
    Admin on, as in a chaos universe: the gateway and the mock on one
    ManualClock, moved by a time keeper only when the stream provably waits
    on time, so a slow machine never turns a slow token into a stall."""
    clock = ManualClock()
    upstream = MockUpstream(clock=clock)
    await upstream.start("127.0.0.1", 0)
    try:
        path = tmp_path / "chaos.toml"
        path.write_text(chaos_config(upstream.base_url))
        settings = build_settings(
            {
                **read_config_file(path),
                "port": 0,
                "resume_secret": "chaos-secret-0123456789",
                "max_loop_lag_ms": 0,  # as in the chaos universe
                "metrics_port": 0,
                "admin_token": ADMIN_TOKEN,
            }
        )
        server = await RelayServer.start(settings, clock=clock)
        try:
            async with keeping_time(clock, server, upstream):
                yield ChaosGateway(server, upstream)
        finally:
            await server.stop(grace=1.0)
    finally:
        await upstream.stop()


async def test_after_a_chaos_run_the_counters_agree_with_what_the_clients_saw(
    tmp_path: Path,
) -> None:
    rng = random.Random(11)
    scenarios = [make_scenario(rng, index) for index in range(CHAOS_RUNS)]
    view = ClientView()
    async with chaos_gateway(tmp_path) as gateway:
        server = gateway.server
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pbg.RelayStub(channel)
            # One run at a time, as in a chaos universe: the time keeper is
            # exact for one stream, and nothing of a run may be left when the
            # next one starts (its generation, its calls, its upstream request).
            async with asyncio.timeout(120):
                for scenario in scenarios:
                    await run_one(stub, scenario, view)
                    await eventually(lambda: gateway.leftovers() == 0)
            assert server.metrics_url is not None
            samples = await scrape(server.metrics_url)
            stats = await admin_pb2_grpc.AdminStub(channel).GetErrorStats(
                admin_pb2.GetErrorStatsRequest(period=admin_pb2.STATS_PERIOD_HOUR), metadata=AUTH
            )
    # The run must have exercised what is being checked.
    assert view.partial and view.resumes and sum(view.notices.values()) > CHAOS_RUNS // 2

    assert samples.total("tokenrelay_streams_started_total") == view.streams == CHAOS_RUNS
    assert samples.total("tokenrelay_chunks_total") == view.chunks
    assert samples.total("tokenrelay_streams_ended_total", outcome="complete") == view.complete
    assert samples.total("tokenrelay_streams_ended_total", outcome="partial") == view.partial
    assert samples.total("tokenrelay_streams_ended_total", outcome="cancelled") == 0
    assert samples.total("tokenrelay_client_resumes_total") == view.resumes
    # Every StreamError a client got, by code: notices and final errors.
    assert samples.by("tokenrelay_stream_errors_total", "code", fatal="false") == dict(view.notices)
    assert samples.by("tokenrelay_stream_errors_total", "code", fatal="true") == dict(
        view.final_errors
    )
    # Every recovery action told the clients with a notice.
    assert samples.total("tokenrelay_recovery_actions_total") == sum(view.notices.values())
    # Upstream errors: each one a client saw, plus those after which the
    # answer was already complete (max_tokens delivered: nothing to tell).
    upstream = samples.by("tokenrelay_errors_total", "code")
    seen = view.notices + view.final_errors
    assert all(upstream.get(code, 0) >= count for code, count in seen.items()), (upstream, seen)
    assert 0 <= sum(upstream.values()) - seen.total() <= view.complete
    assert samples.total("tokenrelay_upstream_attempts_total", outcome="failure") == sum(
        upstream.values()
    )
    # The error statistics recorded the same errors.
    assert {row.code: row.count for row in stats.rows} == upstream
    assert stats.total == sum(upstream.values())
    assert samples.get("tokenrelay_generations", state="running") == 0
    assert samples.get("tokenrelay_generations", state="detached") == 0
    assert server.live is not None and server.live.tracked_streams == 0


# --- breakers, generations, the store -----------------------------------------------------


async def test_an_open_breaker_shows_in_state_transitions_usable_routes_and_refusals(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(
        metrics_port=0, breaker_failure_threshold=1, breaker_cooldown_s=3600, max_retries=0
    )
    assert relay.metrics_url is not None
    before = await scrape(relay.metrics_url)
    entry = {"provider": "sim", "upstream_model": "sim"}
    assert before.get("tokenrelay_breaker_state", state="closed", **entry) == 1
    assert before.get("tokenrelay_model_usable_routes", model="sim") == 1
    async with grpc.aio.insecure_channel(relay.address) as channel:
        failed = await run_to_end(channel, start_request(metadata={"sim.faults": "http:500"}))
        refused = await run_to_end(channel, start_request())
    assert failed[-1].end.error.code == "HTTP_500"
    assert refused[-1].end.error.code == "BREAKER_OPEN"
    after = await scrape(relay.metrics_url)
    assert after.get("tokenrelay_breaker_state", state="open", **entry) == 1
    assert after.get("tokenrelay_breaker_state", state="closed", **entry) == 0
    assert after.get("tokenrelay_breaker_transitions_total", state="open", **entry) == 1
    assert after.get("tokenrelay_model_usable_routes", model="sim") == 0
    assert after.get("tokenrelay_upstream_attempts_total", outcome="refused", **entry) == 1
    assert after.get("tokenrelay_upstream_attempts_total", outcome="failure", **entry) == 1
    assert after.by("tokenrelay_errors_total", "code") == {"HTTP_500": 1, "BREAKER_OPEN": 1}
    assert after.get("tokenrelay_streams_ended_total", model="sim", outcome="partial") == 2


async def test_generations_count_as_running_while_attended_and_detached_after(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(metrics_port=0, clock=clock, **QUIET)
    assert relay.metrics_url is not None
    url = relay.metrics_url
    async with grpc.aio.insecure_channel(relay.address) as channel:
        # PACED: one chunk, then it waits, attended and then detached.
        call = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 1)
        await call.events_until(lambda e: e.HasField("chunk"))
        attached = await scrape(url)
        assert attached.get("tokenrelay_generations", state="running") == 1
        assert attached.get("tokenrelay_attached_calls") == 1
        call.cancel()
        await eventually(lambda: relay.hub.attached_sessions == 0)
        detached = await scrape(url)
    assert detached.get("tokenrelay_generations", state="running") == 0
    assert detached.get("tokenrelay_generations", state="detached") == 1
    assert detached.get("tokenrelay_attached_calls") == 0


async def health_of(relay: RelayServer) -> int:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="tokenrelay.v1.Relay"))
        return int(reply.status)


async def test_an_unreachable_store_is_not_serving_and_store_up_zero(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(metrics_port=0)
    assert relay.metrics_url is not None
    await relay.set_store_available(False)
    assert await health_of(relay) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (await scrape(relay.metrics_url)).get("tokenrelay_store_up") == 0
    await relay.set_store_available(True)
    assert await health_of(relay) == health_pb2.HealthCheckResponse.SERVING
    assert (await scrape(relay.metrics_url)).get("tokenrelay_store_up") == 1


async def test_a_metrics_port_in_use_is_refused_naming_the_flag_and_nothing_listens(
    relay_factory: RelayFactory,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="--metrics-port") as error:
            await relay_factory(metrics_port=port)
    assert f"127.0.0.1:{port}" in str(error.value)


async def test_only_get_metrics_is_served(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(metrics_port=0)
    assert relay.metrics_url is not None
    async with httpx.AsyncClient() as client:
        other = await client.get(relay.metrics_url.removesuffix("metrics") + "other")
        post = await client.post(relay.metrics_url)
    assert other.status_code == 404 and post.status_code == 405


async def test_a_breaker_opening_logs_one_structured_warning_per_outage(
    relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Threshold 1 and no cool-down: every failure opens it, and the next
    # call is its half-open probe.
    relay = await relay_factory(breaker_failure_threshold=1, breaker_cooldown_s=0, max_retries=0)
    caplog.set_level("INFO")
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for faults in ("http:500", "http:500", "ok", "http:500"):
            # trip; the probe fails (re-opens: the same outage); closes; trips again
            await run_to_end(channel, start_request(metadata={"sim.faults": faults}))
    # It opened three times (two trips and a failed probe) in two outages.
    assert relay.hub.recovery.health.transitions[("sim/sim", "open")] == 3
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "breaker_opened"]
    assert len(warnings) == 2
    for record in warnings:
        assert record.levelname == "WARNING"
        assert (record.provider, record.upstream_model) == ("sim", "sim")  # type: ignore[attr-defined]
        assert record.state_before == "closed" and record.trigger == "trip"  # type: ignore[attr-defined]
        assert "circuit breaker sim/sim opened" in record.getMessage()
