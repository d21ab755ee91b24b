"""The engine without gRPC, on a ManualClock: every way an attempt can end,
and what the stream shows for it. Time moves only when a test moves it."""

from __future__ import annotations

import asyncio

import pytest

from enginekit import (
    BAD_REQUEST,
    RESET,
    SERVER_ERROR,
    Script,
    build_engine,
    end_of,
    fail,
    finish,
    hang,
    text,
    usage,
    wait,
)
from tokenrelay_server.core.breaker import BreakerSettings, BreakerState
from tokenrelay_server.core.limits import HubSettings, Timeouts
from tokenrelay_server.core.model import Chunk, Notice, RecoveryPolicy, Usage
from tokenrelay_server.engine.fanout import Subscription

# Timeouts that never fire in a test that waits on the clock for other reasons.
PATIENT = Timeouts(first_token_s=1_000, stall_s=1_000)
CLEAN = Script(text("The", " answer", " is", " here"), finish(usage=Usage(3, 4)))


def chunks(entries) -> list[Chunk]:
    return [e for e in entries if isinstance(e, Chunk)]


def notices(entries) -> list[Notice]:
    return [e for e in entries if isinstance(e, Notice)]


def text_of(entries) -> str:
    return "".join(c.text for c in chunks(entries))


async def test_a_clean_attempt_ends_complete_with_the_reported_usage() -> None:
    engine = build_engine({"m": [("p", [CLEAN])]})
    session = await engine.start()
    entries = await engine.run_to_end(session)
    end = end_of(entries)
    assert not end.partial and end.finish_reason == "stop"
    assert [c.seq for c in chunks(entries)] == [1, 2, 3, 4]
    assert text_of(entries) == "The answer is here"
    assert end.usage == Usage(prompt_tokens=3, completion_tokens=4)
    assert engine.providers["p"].open_streams == 0


async def test_a_failure_before_the_first_token_is_retried_after_the_backoff() -> None:
    engine = build_engine({"m": [("p", [Script(fail(SERVER_ERROR)), CLEAN])]})
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0.99)
    assert len(engine.providers["p"].requests) == 1  # waiting out the 1 s backoff
    await engine.clock.run_for(0.01)
    entries = await reader
    assert len(engine.providers["p"].requests) == 2
    assert [n.fault.code for n in notices(entries)] == ["HTTP_503"]
    assert not notices(entries)[0].fault.fatal
    assert not end_of(entries).partial


async def test_a_break_after_tokens_resumes_by_continuation_without_repeating() -> None:
    broken = Script(text("The", " answer"), fail(RESET))
    # The continuation repeats "answer" (a model that repeats itself): the
    # stitcher drops the overlap.
    continued = Script(text(" answer", " is", " here"), finish())
    engine = build_engine({"m": [("p", [broken, continued])]})
    session = await engine.start()
    entries = await engine.run_to_end(session)
    assert text_of(entries) == "The answer is here"
    assert [c.seq for c in chunks(entries)] == [1, 2, 3, 4]
    second = engine.providers["p"].requests[1]
    assert second.continuation == "The answer"
    assert second.attempt == 2
    assert [n.fault.code for n in notices(entries)] == ["ECONNRESET"]
    assert "resuming on p from seq 2" in notices(entries)[0].fault.message


async def test_a_silent_upstream_hits_the_first_token_timeout_on_the_clock() -> None:
    engine = build_engine({"m": [("p", [Script(hang()), CLEAN])]})
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(9.9)
    assert len(engine.providers["p"].requests) == 1
    await engine.clock.run_for(0.1)  # 10 s: the first-token timeout
    await engine.clock.run_for(1.0)  # the backoff
    entries = await reader
    assert [n.fault.code for n in notices(entries)] == ["FIRST_TOKEN_TIMEOUT"]
    assert engine.providers["p"].closed_streams == 2


async def test_a_stall_between_tokens_is_noticed_after_the_stall_timeout() -> None:
    stalls = Script(text("a", "b"), wait(4.9), text("c"), hang())
    engine = build_engine(
        {"m": [("p", [stalls])]}, config=None, settings=HubSettings(), max_streams=10
    )
    session = await engine.start(policy=RecoveryPolicy(max_retries=0))
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(4.9)  # a gap shorter than the stall timeout is fine
    await engine.clock.run_for(4.9)
    assert not reader.done()
    await engine.clock.run_for(0.1)  # 5 s since "c"
    entries = await reader
    end = end_of(entries)
    assert end.partial and end.error is not None and end.error.code == "STALL_TIMEOUT"
    assert text_of(entries) == "abc"


async def test_cancel_during_an_attempt_closes_the_upstream_and_ends_partial() -> None:
    engine = build_engine({"m": [("p", [Script(text("a", "b"), hang())])]})
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0)
    await engine.hub.cancel(session, "user pressed stop")
    entries = await reader
    end = end_of(entries)
    assert end.partial and end.finish_reason == "cancelled"
    assert end.error is not None and "user pressed stop" in end.error.message
    assert text_of(entries) == "ab"
    assert end.usage.completion_tokens == 2  # the cut attempt never reported: its deltas
    provider = engine.providers["p"]
    assert provider.open_streams == 0 and provider.closed_streams == 1


async def test_cancel_during_the_backoff_makes_no_further_attempt() -> None:
    engine = build_engine({"m": [("p", [Script(fail(SERVER_ERROR)), CLEAN])]})
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0.5)
    await engine.hub.cancel(session, "")
    entries = await reader
    assert end_of(entries).error.code == "CANCELLED"  # type: ignore[union-attr]
    await engine.clock.run_for(10)
    assert len(engine.providers["p"].requests) == 1


async def test_the_callers_deadline_ends_the_generation_on_the_clock() -> None:
    engine = build_engine(
        {"m": [("p", [Script(text("a"), wait(100), finish())])]}, timeouts=PATIENT
    )
    session = await engine.start(deadline_s=30)
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(29.9)
    assert not reader.done()
    await engine.clock.run_for(0.1)
    end = end_of(await reader)
    assert end.error is not None and end.error.code == "DEADLINE_EXCEEDED"


async def test_a_detached_generation_stops_after_the_grace_period() -> None:
    engine = build_engine(
        {"m": [("p", [Script(text("a"), hang())])]}, detach_grace_s=60, timeouts=PATIENT
    )
    session = await engine.start()
    generation = session.generation
    assert generation is not None
    await engine.clock.run_for(0)
    engine.hub.release(session)  # the client went away
    await engine.clock.run_for(59.9)
    assert not generation.finished.is_set()
    await engine.clock.run_for(0.1)
    assert generation.finished.is_set()
    assert generation.end is not None and generation.end.error is not None
    assert generation.end.error.code == "CLIENT_GONE"
    assert generation.upstream_cancelled


async def test_a_reader_that_comes_back_within_the_grace_keeps_it_running() -> None:
    engine = build_engine(
        {"m": [("p", [Script(text("a"), wait(100), text("b"), finish())])]},
        detach_grace_s=60,
        timeouts=PATIENT,
    )
    session = await engine.start()
    generation = session.generation
    assert generation is not None
    await engine.clock.run_for(0)
    engine.hub.release(session)
    await engine.clock.run_for(30)
    again = await engine.hub.resume(session.stream_id, 1)
    entries = await engine.run_to_end(again, step_s=10)
    assert not end_of(entries).partial
    assert text_of(entries) == "b"


async def test_a_probe_stopped_midway_frees_the_half_open_breaker() -> None:
    # Issue 8, defect 1: a cancelled probe used to keep the slot forever.
    engine = build_engine(
        {"m": [("p", [Script(fail(SERVER_ERROR)), Script(text("a"), hang()), CLEAN])]},
        breaker=BreakerSettings(failure_threshold=1, cooldown_s=1),
    )
    breaker = engine.health.breaker(engine.hub.router.resolve("m")[0])
    first = await engine.start(policy=RecoveryPolicy(max_retries=0, allow_fallback=False))
    assert end_of(await engine.run_to_end(first)).error.code == "HTTP_503"  # type: ignore[union-attr]
    assert breaker.state is BreakerState.OPEN
    await engine.clock.run_for(1)  # the cool-down
    probe = await engine.start()
    reader = asyncio.create_task(engine.read_all(probe))
    await engine.clock.run_for(0)
    assert breaker.state is BreakerState.PROBING
    await engine.hub.cancel(probe, "")
    await reader
    assert breaker.state is BreakerState.HALF_OPEN
    after = await engine.start()
    entries = await engine.run_to_end(after)
    assert not end_of(entries).partial
    assert breaker.state is BreakerState.CLOSED


async def test_every_breaker_open_ends_typed_without_calling_the_provider() -> None:
    engine = build_engine(
        {"m": [("p", [Script(fail(SERVER_ERROR))])]},
        breaker=BreakerSettings(failure_threshold=1, cooldown_s=30),
    )
    first = await engine.start(policy=RecoveryPolicy(max_retries=0))
    await engine.run_to_end(first)
    second = await engine.start()
    end = end_of(await engine.run_to_end(second))
    assert end.error is not None and end.error.code == "BREAKER_OPEN"
    assert len(engine.providers["p"].requests) == 1


async def test_retries_spent_fall_back_to_the_next_provider_and_continue() -> None:
    engine = build_engine(
        {
            "m": [
                ("p", [Script(text("The"), fail(RESET)), Script(fail(RESET))]),
                ("q", [Script(text(" answer"), finish())]),
            ]
        }
    )
    session = await engine.start(policy=RecoveryPolicy(max_retries=1))
    entries = await engine.run_to_end(session)
    assert text_of(entries) == "The answer"
    assert [c.provider for c in chunks(entries)] == ["p", "q"]
    assert engine.providers["q"].requests[0].continuation == "The"
    assert [n.suggested_action.name for n in (x.fault for x in notices(entries))] == [
        "RESUME",
        "FALLBACK",
    ]


async def keep_time_by_phase(engine, session) -> list[tuple[str, int]]:
    """Read the session to its End as a time keeper would: whenever the
    generation is in "backoff", move the clock to its next timer. Returns
    each (phase, attempts) seen."""
    generation = engine.hub.generation(session.stream_id)
    assert generation is not None
    reader = asyncio.create_task(engine.read_all(session))
    seen: list[tuple[str, int]] = []
    while not reader.done():
        now = (generation.phase, generation.attempts)
        if not seen or seen[-1] != now:
            seen.append(now)
        due = engine.clock.next_due()
        if generation.phase == "backoff" and due is not None:
            engine.clock.advance(due - engine.clock.monotonic())
        await asyncio.sleep(0)
    await reader
    return seen


async def test_the_backoff_phase_means_a_timer_and_a_fallback_has_none() -> None:
    # A time keeper moves a manual clock when the generation is in "backoff".
    # A fallback (no delay) used to show "backoff" for a loop step too, and
    # the keeper then moved the clock to whatever timer came next (here the
    # lease renewal, 3.3 s on).
    engine = build_engine(
        {
            "m": [
                ("p", [Script(fail(SERVER_ERROR)), Script(fail(RESET))]),
                ("q", [CLEAN]),
            ]
        },
        timeouts=PATIENT,
    )
    started = engine.clock.monotonic()
    session = await engine.start(policy=RecoveryPolicy(max_retries=1))
    # p fails, a retry after the 1 s backoff, p fails again, the fallback to q.
    seen = await keep_time_by_phase(engine, session)
    assert [phase for phase in seen if phase[0] == "backoff"] == [("backoff", 1)]
    assert engine.clock.monotonic() - started == 1.0
    assert [len(engine.providers[name].requests) for name in "pq"] == [2, 1]


async def test_a_failure_the_provider_caused_not_opens_no_breaker_for_others() -> None:
    # Issue 8, defect 9: a request the provider rightly refused (400) says
    # nothing about the provider's health.
    engine = build_engine(
        {"m": [("p", [Script(fail(BAD_REQUEST))])]},
        breaker=BreakerSettings(failure_threshold=1),
    )
    breaker = engine.health.breaker(engine.hub.router.resolve("m")[0])
    for _ in range(5):
        end = end_of(await engine.run_to_end(await engine.start()))
        assert end.error is not None and end.error.code == "HTTP_400"
    assert breaker.state is BreakerState.CLOSED


async def test_the_token_budget_spans_continuations_in_tokens_not_chunks() -> None:
    # Issue 8, defect 3: two tokens per delta. A clean answer teaches the
    # gateway the ratio; a broken one then continues with the right budget.
    two_per_delta = Script(text("a b ", "c d "), finish(usage=Usage(1, 4)))
    engine = build_engine(
        {
            "m": [
                (
                    "p",
                    [
                        two_per_delta,
                        Script(text("e f ", "g h "), fail(RESET)),
                        Script(text("i j "), finish(usage=Usage(1, 2))),
                    ],
                )
            ]
        }
    )
    learn = await engine.start(max_tokens=4)
    end = end_of(await engine.run_to_end(learn))
    assert end.usage.completion_tokens == 4 and end.total_seq == 2
    session = await engine.start(max_tokens=6)
    entries = await engine.run_to_end(session)
    end = end_of(entries)
    continuation = engine.providers["p"].requests[-1]
    assert continuation.params.max_tokens == 2  # 6 asked, 4 delivered in 2 chunks
    assert [c.tokens_so_far for c in chunks(entries)] == [2, 4, 6]
    assert end.total_seq == 3
    assert end.usage.completion_tokens == 4 + 2


async def test_usage_sums_every_attempt() -> None:
    broken = Script(text("a", "b"), fail(RESET))
    rest = Script(text("c"), usage(completion_tokens=1, prompt_tokens=9), finish())
    engine = build_engine({"m": [("p", [broken, rest])]})
    end = end_of(await engine.run_to_end(await engine.start()))
    assert end.usage == Usage(prompt_tokens=9, completion_tokens=3)


async def test_the_stream_size_cap_counts_every_attempt() -> None:
    # Issue 8, defect 11: max_response_bytes bounds what one stream holds.
    a, b, c, d = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)
    engine = build_engine(
        {"m": [("p", [Script(text(a, b), fail(RESET)), Script(text(c, d), finish())])]},
        max_stream_bytes=100,
    )
    entries = await engine.run_to_end(await engine.start())
    end = end_of(entries)
    assert end.partial and end.error is not None and end.error.code == "RESPONSE_TOO_LARGE"
    assert len(text_of(entries).encode()) <= 100
    assert engine.providers["p"].open_streams == 0


async def test_a_stopped_generation_still_writes_its_end_for_later_readers() -> None:
    engine = build_engine({"m": [("p", [Script(text("a"), hang())])]})
    session = await engine.start()
    await engine.clock.run_for(0)
    await engine.hub.cancel(session, "")
    await engine.read_all(session)
    again = await engine.hub.resume(session.stream_id, 0)
    replay = await engine.read_all(again)
    assert text_of(replay) == "a"
    assert end_of(replay).error.code == "CANCELLED"  # type: ignore[union-attr]


async def test_admission_never_passes_max_streams_under_concurrent_starts() -> None:
    engine = build_engine({"m": [("p", [Script(hang())])]}, max_streams=3)
    results = await asyncio.gather(*(engine.start() for _ in range(9)), return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(admitted) == 3 and len(refused) == 6
    assert {type(r).__name__ for r in refused} == {"Overloaded"}
    assert engine.hub.running_generations == 3
    await engine.hub.close()


async def test_drain_waits_its_grace_on_the_clock_then_ends_what_runs() -> None:
    engine = build_engine({"m": [("p", [Script(text("a"), hang())])]})
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    drain = asyncio.create_task(engine.hub.drain(10))
    await engine.clock.run_for(9.9)
    assert not drain.done()
    await engine.clock.run_for(0.1)
    await drain
    with pytest.raises(Exception, match="shutting down"):
        await reader
    assert engine.hub.running_generations == 0


async def test_a_cancel_sent_through_the_store_reaches_the_owner_at_its_next_renewal() -> None:
    engine = build_engine({"m": [("p", [Script(text("a"), hang())])]}, lease_ttl_s=9)
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0)
    await engine.store.request_cancel(session.stream_id, "from elsewhere")
    await engine.clock.run_for(2.9)
    assert not reader.done()
    await engine.clock.run_for(0.1)  # lease renewal every ttl / 3
    end = end_of(await reader)
    assert end.error is not None and "from elsewhere" in end.error.message


async def test_a_slow_reader_never_slows_the_generation() -> None:
    engine = build_engine({"m": [("p", [Script(text(*"abcdefghij"), finish())])]})
    session = await engine.start()
    generation = session.generation
    assert generation is not None
    await engine.clock.run_for(0)
    assert generation.finished.is_set()  # nobody read a thing yet
    entries = await engine.read_all(session)
    assert text_of(entries) == "abcdefghij"


async def test_a_subscription_failed_by_the_edge_ends_only_that_read() -> None:
    engine = build_engine({"m": [("p", [Script(text("a"), wait(10), finish())])]}, timeouts=PATIENT)
    session = await engine.start()
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0)
    session.subscription.fail(ValueError("bad message"))
    with pytest.raises(ValueError, match="bad message"):
        await reader
    other = await engine.hub.resume(session.stream_id, 0)
    assert not end_of(await engine.run_to_end(other)).partial
    assert isinstance(Subscription(), Subscription)
