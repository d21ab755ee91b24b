"""The engine without gRPC: a hub on a ManualClock and an in-memory store,
with providers that play a script per attempt.

A `Script` is what one upstream attempt does, step by step:

    Script(text("Hel", "lo"), finish())           two deltas, then a clean finish
    Script(text("a", "b"), fail(RESET))           two deltas, then a reset
    Script(hang())                                nothing, ever (a timeout must notice)
    Script(text("a"), wait(5), text("b"), ...)    a pause of 5 s on the clock
    Script(think("hm"), call(0, "c1", "f", '{"a"', ': 1}'), finish("tool_calls"))
                                                  reasoning, then a tool call in pieces

`ScriptedProvider` plays attempt k's script (the last one repeats) and
records every request it got and whether its stream was closed, so a test
can check what the engine asked for and that nothing was left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenrelay_server.core import classify
from tokenrelay_server.core.breaker import BreakerSettings
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import Fault, upstream_error
from tokenrelay_server.core.limits import HubSettings, Timeouts
from tokenrelay_server.core.model import (
    End,
    GenerationParams,
    LogEntry,
    Message,
    RecoveryPolicy,
    StartRequest,
    Tool,
    Usage,
)
from tokenrelay_server.core.recovery import RecoveryConfig
from tokenrelay_server.core.retry import BackoffPolicy
from tokenrelay_server.engine.events import Observer, Observers
from tokenrelay_server.engine.hub import Session, StreamHub
from tokenrelay_server.engine.recovery_loop import Recovery
from tokenrelay_server.engine.routing import Route, Router
from tokenrelay_server.engine.selection import UpstreamHealth
from tokenrelay_server.store.memory import MemoryStore
from tokenrelay_server.upstream.base import (
    Delta,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)

RESET = classify.connection_reset()
SERVER_ERROR = classify.classify_http_status(503)
BAD_REQUEST = classify.classify_http_status(400)


@dataclass(frozen=True)
class Step:
    kind: str  # text | think | call | call_done | usage | finish | fail | wait | hang
    texts: tuple[str, ...] = ()
    call: ToolCallDelta | None = None
    seconds: float = 0.0
    fault: Fault | None = None
    reason: str = "stop"
    usage: Usage | None = None


def text(*pieces: str) -> Step:
    return Step("text", texts=pieces)


def think(*pieces: str) -> Step:
    return Step("think", texts=pieces)


def call(index: int, id_: str, name: str, *fragments: str) -> Step:
    """A tool call: a first piece with the id and name, then the fragments."""
    return Step("call", texts=fragments, call=ToolCallDelta(index, id_, name))


def call_done(index: int) -> Step:
    return Step("call_done", call=ToolCallDelta(index))


def wait(seconds: float) -> Step:
    return Step("wait", seconds=seconds)


def hang() -> Step:
    return Step("hang")


def fail(fault: Fault) -> Step:
    return Step("fail", fault=fault)


def usage(completion_tokens: int, prompt_tokens: int = 0) -> Step:
    return Step("usage", usage=Usage(prompt_tokens, completion_tokens))


def finish(reason: str = "stop", usage: Usage | None = None) -> Step:
    return Step("finish", reason=reason, usage=usage)


@dataclass(frozen=True)
class Script:
    steps: tuple[Step, ...]

    def __init__(self, *steps: Step) -> None:
        object.__setattr__(self, "steps", steps)


@dataclass
class ScriptedProvider:
    """A provider that plays `scripts[attempt k]` (the last one repeats)."""

    name: str
    scripts: list[Script]
    clock: ManualClock
    requests: list[ProviderRequest] = field(default_factory=list)
    open_streams: int = 0
    closed_streams: int = 0

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
        self.requests.append(request)
        self.open_streams += 1
        try:
            for step in script.steps:
                if step.kind == "text":
                    for piece in step.texts:
                        await asyncio.sleep(0)
                        yield TextDelta(piece)
                elif step.kind == "think":
                    for piece in step.texts:
                        await asyncio.sleep(0)
                        yield ReasoningDelta(piece)
                elif step.kind == "call":
                    assert step.call is not None
                    yield step.call
                    for piece in step.texts:
                        await asyncio.sleep(0)
                        yield ToolCallDelta(step.call.index, arguments=piece)
                elif step.kind == "call_done":
                    assert step.call is not None
                    yield ToolCallDone(step.call.index)
                elif step.kind == "usage":
                    assert step.usage is not None
                    yield UsageReport(step.usage)
                elif step.kind == "finish":
                    yield Finish(step.reason, step.usage)
                    return
                elif step.kind == "fail":
                    assert step.fault is not None
                    raise upstream_error(step.fault)
                elif step.kind == "wait":
                    await self.clock.sleep(step.seconds)
                elif step.kind == "hang":
                    await asyncio.Event().wait()
        finally:
            self.open_streams -= 1
            self.closed_streams += 1

    async def aclose(self) -> None:
        return None


TIMEOUTS = Timeouts(first_token_s=10.0, stall_s=5.0)


@dataclass
class Engine:
    """A hub with scripted providers behind model aliases."""

    clock: ManualClock
    store: MemoryStore
    hub: StreamHub
    health: UpstreamHealth
    providers: dict[str, ScriptedProvider]

    async def start(
        self,
        model: str = "m",
        *,
        max_tokens: int | None = None,
        policy: RecoveryPolicy | None = None,
        deadline_s: float | None = None,
        idempotency_key: str = "",
        tools: tuple[Tool, ...] = (),
    ) -> Session:
        request = StartRequest(
            model=model,
            messages=(Message("user", "hello"),),
            params=GenerationParams(max_tokens=max_tokens),
            policy=policy or RecoveryPolicy(),
            idempotency_key=idempotency_key,
            tools=tools,
        )
        return await self.hub.start(request, deadline_s=deadline_s)

    async def read_all(self, session: Session) -> list[LogEntry]:
        """Everything the session reads, to the End (time must be moved
        separately when the stream waits on it)."""
        entries: list[LogEntry] = []
        try:
            async with contextlib.aclosing(self.hub.follow(session)) as batches:
                async for batch in batches:
                    entries += batch
        finally:
            self.hub.release(session)  # as the servicer does
        return entries

    async def run_to_end(self, session: Session, *, step_s: float = 1.0) -> list[LogEntry]:
        """Read the session to its End, moving the clock `step_s` at a time
        whenever the stream waits on it."""
        reader = asyncio.create_task(self.read_all(session))
        while not reader.done():
            await self.clock.run_for(step_s)
        return reader.result()


def build_engine(
    chains: dict[str, list[tuple[str, list[Script]]]],
    *,
    timeouts: Timeouts = TIMEOUTS,
    config: RecoveryConfig | None = None,
    breaker: BreakerSettings | None = None,
    settings: HubSettings | None = None,
    observers: Sequence[Observer] = (),
    **hub_settings: Any,
) -> Engine:
    """`chains`: alias → [(provider name, its scripts)]; a provider named in
    several chains is one provider."""
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    providers: dict[str, ScriptedProvider] = {}
    routes: dict[str, list[Route]] = {}
    for alias, chain in chains.items():
        routes[alias] = []
        for name, scripts in chain:
            provider = providers.setdefault(name, ScriptedProvider(name, scripts, clock))
            routes[alias].append(Route(provider, f"{name}-model", timeouts))
    health = UpstreamHealth(
        clock=clock, breaker_settings=breaker or BreakerSettings(), retry_budget_ratio=1000.0
    )
    recovery = Recovery(
        health=health,
        config=config or RecoveryConfig(backoff=BackoffPolicy(base_s=1.0, jitter=0.0)),
        clock=clock,
        rng=random.Random(0),
    )
    hub = StreamHub(
        store=store,
        router=Router(routes),
        clock=clock,
        recovery=recovery,
        settings=settings or HubSettings(**hub_settings),
        replica_id="replica-test",
        observers=Observers(observers),
    )
    return Engine(clock, store, hub, health, providers)


def end_of(entries: list[LogEntry]) -> End:
    ends = [e for e in entries if isinstance(e, End)]
    assert len(ends) == 1, ends
    return ends[0]
