"""Observers see what the engine did, in order, and can never break it."""

from __future__ import annotations

import asyncio

from enginekit import RESET, Script, build_engine, end_of, fail, finish, hang, text
from tokenrelay_server.core.model import RecoveryPolicy
from tokenrelay_server.engine.events import (
    AttemptEnded,
    AttemptStarted,
    ChunkStored,
    EngineEvent,
    ReaderAttached,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
)


def kinds(events: list[EngineEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


async def test_a_stream_that_breaks_and_resumes_is_told_in_order() -> None:
    events: list[EngineEvent] = []
    engine = build_engine(
        {"m": [("p", [Script(text("a"), fail(RESET)), Script(text("b"), finish())])]},
        observers=[events.append],
    )
    await engine.run_to_end(await engine.start())
    assert kinds(events) == [
        "StreamStarted",
        "ReaderAttached",
        "AttemptStarted",
        "ChunkStored",
        "AttemptEnded",
        "RecoveryAction",
        "AttemptStarted",
        "ChunkStored",
        "AttemptEnded",
        "StreamEnded",
    ]
    first, second = [e for e in events if isinstance(e, AttemptEnded)]
    assert (first.outcome, first.fault.code if first.fault else None) == ("failure", "ECONNRESET")
    assert (second.outcome, second.fault) == ("success", None)
    [action] = [e for e in events if isinstance(e, RecoveryAction)]
    assert (action.step, action.from_provider, action.to_provider, action.at_seq) == (
        "resume",
        "p",
        "p",
        1,
    )
    started = [e for e in events if isinstance(e, AttemptStarted)]
    assert [s.continuation for s in started] == [False, True]
    assert [e.seq for e in events if isinstance(e, ChunkStored)] == [1, 2]
    [ended] = [e for e in events if isinstance(e, StreamEnded)]
    assert not ended.end.partial and ended.attempts == 2
    assert {e.stream_id for e in events if hasattr(e, "stream_id")} == {ended.stream_id}
    [attached] = [e for e in events if isinstance(e, ReaderAttached)]
    assert not attached.resumed
    assert isinstance(events[0], StreamStarted)


async def test_a_stopped_attempt_and_a_refused_one_are_told_as_such() -> None:
    events: list[EngineEvent] = []
    engine = build_engine({"m": [("p", [Script(text("a"), hang())])]}, observers=[events.append])
    session = await engine.start(policy=RecoveryPolicy(max_retries=0))
    reader = asyncio.create_task(engine.read_all(session))
    await engine.clock.run_for(0)
    await engine.hub.cancel(session, "")
    assert end_of(await reader).error.code == "CANCELLED"  # type: ignore[union-attr]
    [ended] = [e for e in events if isinstance(e, AttemptEnded)]
    assert ended.outcome == "stopped"


async def test_an_observer_that_raises_breaks_nothing() -> None:
    def broken(event: EngineEvent) -> None:
        raise RuntimeError("observer bug")

    seen: list[EngineEvent] = []
    engine = build_engine(
        {"m": [("p", [Script(text("a", "b"), finish())])]}, observers=[broken, seen.append]
    )
    entries = await engine.run_to_end(await engine.start())
    assert not end_of(entries).partial
    assert any(isinstance(e, StreamEnded) for e in seen)  # the next observer still ran


async def test_an_observer_that_needs_no_chunk_events_gets_none() -> None:
    class Lifecycle:
        observes_chunks = False

        def __init__(self) -> None:
            self.events: list[EngineEvent] = []

        def __call__(self, event: EngineEvent) -> None:
            self.events.append(event)

    lifecycle, everything = Lifecycle(), []
    engine = build_engine(
        {"m": [("p", [Script(text("a", "b"), finish())])]},
        observers=[lifecycle, everything.append],
    )
    await engine.run_to_end(await engine.start())
    assert not any(isinstance(e, ChunkStored) for e in lifecycle.events)
    assert any(isinstance(e, StreamEnded) for e in lifecycle.events)
    assert [e.seq for e in everything if isinstance(e, ChunkStored)] == [1, 2]
