"""`tokenrelay chaos`: seeded random fault schedules against the real thing.

Every run starts one generation through a real gateway (real gRPC) whose
model alias is a chain of 1-3 HTTP providers (OpenAI and Anthropic formats)
pointing at the mock upstream (real HTTP). The run's fault schedule (one item
per upstream attempt: resets, stalls, slow first bytes, 429 with Retry-After,
529, 5xx, 401, garbage, mid-stream error events, EOF without finish, split
UTF-8, random chunking) goes to the mock upstream with the request; some runs
also drop the client connection at a random seq and resume.

Agent turns are in the mix (issue 12): some runs stream reasoning first
(`sim.reasoning`), some offer a tool, so the answer is a short text and one
or two tool calls, relayed whole (policy.tool_calls WHOLE) or in pieces
(STREAM); fault positions count every event, so faults land inside the
reasoning and inside a call's arguments.

An oracle walks the schedule with the gateway's policy (retries per provider,
then the next provider of the chain) and predicts the outcome: the clean
answer (for a tool turn: with which of its calls), or a typed partial whose
error is the fault that ended it (TOOL_CALL_INTERRUPTED when it broke a call
being streamed). Each run is checked:

- seq contiguous from 1, nothing duplicated, across the drop and the resume;
- the kinds in order: reasoning first, then text, then tool calls; the
  reasoning shown is a prefix of the clean reasoning (never repeated);
- exact runs: the text equals the clean text, the End is not partial, and a
  tool turn ends "tool_calls" with the clean calls, each whole and valid;
- partial runs: `partial=true`, a fatal error with the predicted code, a text
  that is a prefix of the clean text, and no tool call but a prefix of a
  clean one (only a streamed call can be cut);
- both digests match what arrived; no generation or session is left behind.

Breakers and retry budgets are set out of reach here so the oracle stays
exact; they have their own tests on an injected clock.

Time: every run happens in a small universe of its own, one per concurrent
worker: a `ManualClock`, a gateway and a mock upstream on it, one scenario
at a time, and a `TimeKeeper` that moves the clock only when the stream
provably waits on time (a backoff, or an upstream answer that waits on its
clock or stalled, all of whose bytes the gateway took in). So the timeouts
are realistic (5 s stall, 30 s first token, backoffs of seconds, a detach
grace of an hour) and cost nothing, and a slow machine can never turn a
slow token into a false STALL_TIMEOUT: it only takes longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.mock_upstream import THINKING_TEXT, MockUpstream
from tokenrelay_devtools.timekeeper import TimeKeeper, keeping_time
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import build_settings, read_config_file
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Message, Tool
from tokenrelay_server.core.stitch import Stitcher
from tokenrelay_server.upstream.sim import DEFAULT_PREAMBLE, SimAnswer, SimSettings, plan_attempt

MAX_RETRIES = 2
PROVIDERS = ("oa1", "an1", "oa2", "an2")
CHAINS: dict[str, tuple[str, ...]] = {
    "c1": ("oa1",),
    "c2": ("an1",),
    "c3": ("oa1", "an1"),
    "c4": ("an1", "oa2"),
    "c5": ("oa1", "an1", "oa2"),
    "c6": ("an1", "oa2", "an2"),
}

# Fault items: (template, expected codes when it ends the stream, recoverable).
# {n} is replaced by a token count.
RECOVERABLE: tuple[tuple[str, frozenset[str]], ...] = (
    ("reset@{n}", frozenset({"ECONNRESET", "UNEXPECTED_EOF", "NETWORK_ERROR"})),
    ("reset_bytes@{b}", frozenset({"ECONNRESET", "UNEXPECTED_EOF", "NETWORK_ERROR"})),
    ("stall@{n}", frozenset({"STALL_TIMEOUT", "FIRST_TOKEN_TIMEOUT"})),
    ("eof@{n}", frozenset({"NO_FINISH_REASON"})),
    ("drop@{n}", frozenset({"UNEXPECTED_EOF", "ECONNRESET"})),
    ("http:429", frozenset({"HTTP_429", "RATE_LIMITED"})),
    ("http:529", frozenset({"HTTP_529", "OVERLOADED"})),
    ("http:500", frozenset({"HTTP_500", "PROVIDER_ERROR"})),
    ("http:502", frozenset({"HTTP_502", "PROVIDER_ERROR"})),
    ("http:503+retry_after:ms", frozenset({"HTTP_503", "PROVIDER_ERROR", "OVERLOADED"})),
    ("error@{n}:overloaded", frozenset({"OVERLOADED"})),
    ("error@{n}:rate_limit", frozenset({"RATE_LIMITED"})),
    ("html", frozenset({"WRONG_CONTENT_TYPE"})),
)
FATAL: tuple[tuple[str, frozenset[str]], ...] = (
    ("http:401", frozenset({"HTTP_401", "AUTHENTICATION_FAILED"})),
    ("http:400", frozenset({"HTTP_400", "INVALID_REQUEST"})),
    ("garbage@{n}", frozenset({"MALFORMED_DATA"})),
    ("error@{n}:invalid_request", frozenset({"INVALID_REQUEST"})),
)
CLEAN = ("ok", "ok+split_utf8", "ok+random_chunks", "ok+slow_first_byte@30", "ok+thinking")
MODIFIERS = ("", "", "", "+split_utf8", "+random_chunks")

# Realistic timers: on the manual clock they cost nothing. The grace, the
# lease and the first-message timeout are far beyond any run's time, so only
# a scenario's own faults make time pass. (A resume call opened after a drop
# waits for its first message on the same clock: with the default 10 s, two
# stalls that the time keeper jumped through while a busy loop had not read
# that message yet ended the call DEADLINE_EXCEEDED, once in 5,000 runs.)
CONFIG = """
[server]
detach_grace_s = 3600
lease_ttl_s = 3600
first_message_timeout_s = 3600

[recovery]
max_retries = {max_retries}
backoff_base_s = 0.5
backoff_cap_s = 8
retry_budget_ratio = 1000

[breaker]
failure_threshold = 1000000
failure_rate = 1.0
{providers}
{models}
"""

PROMPT = "chaos, please"
STALL_TIMEOUT_S = 5
FIRST_TOKEN_TIMEOUT_S = 30
RETRY_AFTER_S = 1  # what the mock's 429/503/529 ask for
RUN_TIMEOUT_S = 60  # real seconds: a run that takes longer is a violation (a hang)
QUIET_TIMEOUT_S = 30  # real seconds for a universe to have nothing left after a run
TOOL = Tool(
    "lookup",
    "Looks something up",
    json.dumps(
        {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        }
    ),
)
REASONING = (0, 0, 0, 2, 5)  # sim.reasoning of a run
TOOL_MODES = ("", "", "whole", "stream")  # "" offers no tool
TOOL_CALL_MODES = {"whole": pb.TOOL_CALL_MODE_WHOLE, "stream": pb.TOOL_CALL_MODE_STREAM}


@dataclass(frozen=True)
class Scenario:
    index: int
    alias: str
    max_tokens: int
    faults: tuple[str, ...]
    codes: tuple[frozenset[str], ...]  # per fault item: the codes it may end with
    recoverable: tuple[bool, ...]
    drop_after: int | None  # the client drops after this seq, then resumes
    reasoning: int = 0  # reasoning deltas before the answer
    tool_mode: str = ""  # "whole" or "stream": the request offers TOOL; "": no tools
    tool_calls: int = 0  # calls the simulator makes in the tool turn

    def describe(self) -> str:
        drop = f" drop@{self.drop_after}" if self.drop_after else ""
        agent = f" reasoning={self.reasoning}" if self.reasoning else ""
        if self.tool_mode:
            agent += f" tools={self.tool_mode}x{self.tool_calls}"
        return f"run {self.index}: {self.alias} max_tokens={self.max_tokens}{agent} " + (
            f"faults={','.join(self.faults)}{drop}"
        )


@dataclass(frozen=True)
class CleanAnswer:
    """What an unbroken attempt of a scenario sends: its reasoning, its text,
    its tool calls (id, name, arguments) and how many events each call is."""

    reasoning: str
    text: str
    calls: tuple[tuple[str, str, str], ...]
    call_events: tuple[int, ...]


def _text_events(scenario: Scenario) -> int:
    """Text tokens of the whole answer: max_tokens, or a tool turn's preamble."""
    if scenario.tool_mode:
        return min(DEFAULT_PREAMBLE, scenario.max_tokens)
    return scenario.max_tokens


def clean_answer(scenario: Scenario) -> CleanAnswer:
    """The simulator's clean answer to the scenario's request (the model the
    gateway is tested against, not the gateway)."""
    plan = plan_attempt(
        (Message("user", PROMPT),),
        max_tokens=scenario.max_tokens,
        attempt=1,
        settings=SimSettings(reasoning=scenario.reasoning, tool_calls=scenario.tool_calls or None),
        tools=(TOOL,) if scenario.tool_mode else (),
    )
    calls: dict[int, list[str]] = {}
    events: dict[int, int] = {}
    for event in plan.events:
        if event.kind == "tool_call":
            call = calls.setdefault(event.index, ["", "", ""])
            call[0] = call[0] or event.id
            call[1] = call[1] or event.name
            call[2] += event.text
            events[event.index] = events.get(event.index, 0) + 1
    return CleanAnswer(
        reasoning="".join(e.text for e in plan.events if e.kind == "reasoning"),
        text="".join(plan.pieces),
        calls=tuple((c[0], c[1], c[2]) for _, c in sorted(calls.items())),
        call_events=tuple(count for _, count in sorted(events.items())),
    )


@dataclass(frozen=True)
class Prediction:
    """The outcomes the policy allows. A TCP reset may destroy data the client
    had not read yet (the kernel drops it on RST), so after `reset@N` anywhere
    from 0 to N tokens arrived, and both outcomes can be right."""

    exact_possible: bool
    partial_codes: frozenset[str] = frozenset()  # the codes a partial end may carry
    # A tool turn that ends complete: how many of its calls it may end with
    # (after a complete call the turn is over, whatever breaks later).
    exact_calls: frozenset[int] = frozenset()

    @property
    def exact(self) -> bool:
        return self.exact_possible and not self.partial_codes


@dataclass
class Tally:
    runs: int = 0
    exact: int = 0
    typed_partial: int = 0
    resumed: int = 0
    violations: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def line(self) -> str:
        seconds = self.seconds or time.perf_counter() - self.started
        return (
            f"runs={self.runs} exact={self.exact} typed-partial={self.typed_partial} "
            f"client-resumes={self.resumed} violations={len(self.violations)} "
            f"({seconds:.1f} s)"
        )


def make_scenario(rng: random.Random, index: int) -> Scenario:
    alias = rng.choice(sorted(CHAINS))
    max_tokens = rng.randint(8, 48)
    reasoning = rng.choice(REASONING)
    tool_mode = rng.choice(TOOL_MODES)
    tool_calls = rng.randint(1, 2) if tool_mode else 0
    shape = Scenario(index, alias, max_tokens, (), (), (), None, reasoning, tool_mode, tool_calls)
    # Fault positions count every event of an attempt: reasoning, text, and
    # each call's first event and argument fragments.
    events = reasoning + _text_events(shape) + sum(clean_answer(shape).call_events)
    faults: list[str] = []
    codes: list[frozenset[str]] = []
    recoverable: list[bool] = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.15:
            faults.append(rng.choice(CLEAN))
            codes.append(frozenset())
            recoverable.append(True)
            break
        pool = FATAL if roll < 0.25 else RECOVERABLE
        template, expected = rng.choice(pool)
        n = rng.randint(0, events - 1)
        # reset_bytes stays inside the first event, so no text has arrived.
        item = template.format(n=n, b=rng.randint(1, 60))
        if template.startswith(("reset", "eof", "drop")):
            item += rng.choice(MODIFIERS)
        faults.append(item)
        codes.append(expected)
        recoverable.append(pool is RECOVERABLE)
    drop_after = rng.randint(1, max_tokens - 1) if rng.random() < 0.3 else None
    return Scenario(
        index,
        alias,
        max_tokens,
        tuple(faults),
        tuple(codes),
        tuple(recoverable),
        drop_after,
        reasoning,
        tool_mode,
        tool_calls,
    )


def _tokens_sent(item: str) -> tuple[int, bool] | None:
    """(events an attempt sends before its fault, whether a TCP reset may
    destroy some of them); None when the attempt sends the whole answer."""
    lossy = "reset" in item
    for part in item.split("+"):
        kind, at, rest = part.partition("@")
        if at and kind in ("reset", "stall", "eof", "garbage", "drop", "error", "shape"):
            return int(rest.split(":")[0]), lossy
        if part.startswith(("http:", "html", "reset_bytes@")):
            return 0, False
    return None


def _emitted(tokens: SimAnswer, delivered: int, arrived: int) -> int:
    """Chunks a failed attempt leaves: a continuation's start is held by the
    stitcher until it can tell new text from a repeat, and what is still held
    when the attempt breaks is dropped (the next attempt writes it again)."""
    if not delivered or not arrived:
        return arrived
    stitcher = Stitcher(tokens.text(delivered))
    return sum(len(stitcher.feed(tokens.token(i))) for i in range(delivered, delivered + arrived))


def predict(scenario: Scenario, max_retries: int = MAX_RETRIES) -> Prediction:
    """Walk the schedule as the recovery policy does (without breakers or
    budgets): retries per provider, then the next provider of the chain,
    counting delivered text tokens (once the budget is delivered the answer is
    whole, whatever breaks after). Every state a reset's data loss allows is
    followed.

    An attempt sends its events in this order: the reasoning (shown only by
    the first attempt that shows anything, but sent by every one), on an
    Anthropic continuation the prefill's trimmed whitespace again, the text
    still to come, then each tool call (its first event and its fragments).
    Of the calls that arrived, all but the last are complete (the next one
    started); the last is complete only at the finish. A failed attempt with
    a complete call ends the turn with those calls; one whose call is being
    streamed (STREAM) ends TOOL_CALL_INTERRUPTED; a call held whole (WHOLE)
    was never shown, so the attempt counts as failing after its text."""
    chain = CHAINS[scenario.alias]
    tokens = SimAnswer((Message("user", PROMPT),))
    clean = clean_answer(scenario)
    text_total = _text_events(scenario)
    streamed = scenario.tool_mode == "stream"
    exact_possible = False
    exact_calls: set[int] = set()
    partial_codes: set[str] = set()

    def complete(calls: int) -> None:
        nonlocal exact_possible
        exact_possible = True
        if scenario.tool_mode:
            exact_calls.add(calls)

    states = {(0, 0, 0)}  # (provider, retries, delivered text tokens)
    for attempt, item in enumerate(scenario.faults):
        sent = _tokens_sent(item)
        following: set[tuple[int, int, int]] = set()
        for provider, retries, delivered in states:
            if sent is None:
                complete(len(clean.calls))
                continue
            count, lossy = sent
            remaining = text_total - delivered
            # An Anthropic prefill loses trailing whitespace; the model writes
            # it again first and the adapter drops it: one event, no chunk.
            repeated = int(
                delivered > 0
                and chain[provider].startswith("an")
                and not tokens.token(delivered - 1).strip()
            )
            heads = []  # where each call's first event is
            position = scenario.reasoning + repeated + remaining
            for events in clean.call_events:
                heads.append(position)
                position += events
            for arrived in range(count + 1) if lossy else (count,):
                text = min(max(arrived - scenario.reasoning - repeated, 0), remaining)
                started = sum(arrived > head for head in heads)
                # A tool call's first piece makes the stitcher let its text go.
                emitted = text if started else _emitted(tokens, delivered, text)
                total = delivered + emitted
                complete_calls = max(started - 1, 0)
                if streamed and started:
                    partial_codes.add("TOOL_CALL_INTERRUPTED")
                elif complete_calls:
                    complete(complete_calls)
                elif not scenario.tool_mode and total >= scenario.max_tokens:
                    complete(0)
                elif not scenario.recoverable[attempt]:
                    partial_codes |= scenario.codes[attempt]
                elif retries < max_retries:
                    following.add((provider, retries + 1, total))
                elif provider + 1 < len(chain):
                    following.add((provider + 1, 0, total))
                else:
                    partial_codes |= scenario.codes[attempt]
        states = following
    if states:
        complete(len(clean.calls))  # attempts past the schedule are clean
    return Prediction(exact_possible, frozenset(partial_codes), frozenset(exact_calls))


def chunk_records(chunks: list[pb.TokenChunk]) -> bytes:
    """StreamEnd.chunks_sha256's records, from relay.proto's comment."""

    def sized(value: str) -> bytes:
        data = value.encode()
        return len(data).to_bytes(4, "big") + data

    out = bytearray()
    for chunk in chunks:
        kind = chunk.WhichOneof("content")
        if kind == "tool_call":
            call = chunk.tool_call
            out += b"C" + call.index.to_bytes(4, "big") + sized(call.id) + sized(call.name)
            out += sized(call.arguments)
        elif kind == "reasoning":
            out += b"R" + sized(chunk.reasoning)
        else:
            out += b"T" + sized(chunk.text)
    return bytes(out)


_KIND_ORDER = {"reasoning": 0, "text": 1, "tool_call": 2}


def _agent_problems(
    scenario: Scenario, chunks: list[pb.TokenChunk], end: pb.StreamEnd, prediction: Prediction
) -> list[str]:
    """What is wrong with a run's reasoning and tool calls ([] when nothing)."""
    problems: list[str] = []
    clean = clean_answer(scenario)
    kinds = [_KIND_ORDER[chunk.WhichOneof("content") or "text"] for chunk in chunks]
    if kinds != sorted(kinds):
        problems.append("chunks out of order (reasoning, then text, then tool calls)")
    reasoning = "".join(chunk.reasoning for chunk in chunks)
    if not any(
        (prefix + clean.reasoning).startswith(reasoning) for prefix in ("", *THINKING_TEXT.values())
    ):
        problems.append(f"reasoning {reasoning[:40]!r} is not a prefix of the clean reasoning")
    pieces = [chunk.tool_call for chunk in chunks if chunk.WhichOneof("content") == "tool_call"]
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, ["", "", ""])
        call[0] = call[0] or piece.id
        call[1] = call[1] or piece.name
        call[2] += piece.arguments
    assembled = [tuple(call) for _, call in sorted(calls.items())]
    if not scenario.tool_mode:
        if pieces:
            problems.append("tool calls in a stream that offered no tool")
        return problems
    if not end.partial:
        if end.finish_reason != "tool_calls":
            problems.append(f"finish_reason {end.finish_reason!r}, not 'tool_calls'")
        if len(assembled) not in prediction.exact_calls:
            problems.append(
                f"{len(assembled)} tool call(s); expected {sorted(prediction.exact_calls)}"
            )
        if assembled != list(clean.calls[: len(assembled)]):
            problems.append("the tool calls are not the clean ones")
        if scenario.tool_mode == "whole" and len(pieces) != len(assembled):
            problems.append("a tool call held whole came in pieces")
        for _, _, arguments in assembled:
            try:
                json.loads(arguments)
            except ValueError:
                problems.append(f"tool call arguments are not JSON: {arguments[:40]!r}")
        return problems
    if pieces and scenario.tool_mode == "whole":
        problems.append("a partial WHOLE stream showed a tool call")
    for index, (call_id, name, arguments) in enumerate(assembled):
        want_id, want_name, want_arguments = clean.calls[index]
        if (call_id, name) != (want_id, want_name) or not want_arguments.startswith(arguments):
            problems.append(f"tool call {index} is not a prefix of the clean one")
    return problems


def chaos_config(base_url: str, max_retries: int = MAX_RETRIES) -> str:
    providers = "".join(
        f'\n[providers.{name}]\nkind = "{"openai" if name.startswith("oa") else "anthropic"}"\n'
        f'base_url = "{base_url}"\nforward_sim_headers = true\n'
        f"stall_timeout_s = {STALL_TIMEOUT_S}\nfirst_token_timeout_s = {FIRST_TOKEN_TIMEOUT_S}\n"
        for name in PROVIDERS
    )
    models = "".join(
        f"\n[models.{alias}]\nchain = ["
        + ", ".join(f'{{ provider = "{p}", model = "m-{p}" }}' for p in chain)
        + "]\n"
        for alias, chain in CHAINS.items()
    )
    return CONFIG.format(max_retries=max_retries, providers=providers, models=models)


@dataclass
class Universe:
    """One gateway and one mock upstream on a ManualClock of their own, with
    a time keeper; one scenario at a time runs in it."""

    clock: ManualClock
    upstream: MockUpstream
    server: RelayServer
    keeper: TimeKeeper
    stub: pbg.RelayAsyncStub

    def leftovers(self) -> str:
        """What is still running ("" when nothing)."""
        hub = self.server.hub
        left = {
            "generations": hub.running_generations,
            "sessions": hub.attached_sessions,
            "upstream requests": self.upstream.active_requests,
        }
        return ", ".join(f"{count} {what}" for what, count in left.items() if count)

    async def quiet(self) -> str:
        """Wait (boundedly) until nothing of the last run is left; what is
        left after the bound ("" when nothing)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(QUIET_TIMEOUT_S):
                while self.leftovers():  # noqa: ASYNC110 (plain counters: nothing to await)
                    await asyncio.sleep(0.001)
        return self.leftovers()


@contextlib.asynccontextmanager
async def chaos_universe() -> AsyncIterator[Universe]:
    """A mock upstream and a gateway configured against it, on one ManualClock."""
    clock = ManualClock()
    upstream = MockUpstream(clock=clock)
    await upstream.start("127.0.0.1", 0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "chaos.toml"
            path.write_text(chaos_config(upstream.base_url))
            # No shedding on event-loop lag: the mock, the gateway and the
            # clients share one loop here, and a run must not depend on how
            # busy the machine is.
            settings = build_settings(
                {
                    **read_config_file(path),
                    "port": 0,
                    "resume_secret": "chaos-secret-0123456789",
                    "max_loop_lag_ms": 0,
                }
            )
        server = await RelayServer.start(settings, clock=clock)
        try:
            async with (
                grpc.aio.insecure_channel(server.address) as channel,
                keeping_time(clock, server, upstream) as keeper,
            ):
                stub: pbg.RelayAsyncStub = pbg.RelayStub(channel)  # an aio channel: the async stub
                yield Universe(clock, upstream, server, keeper, stub)
        finally:
            await server.stop(grace=1.0)
    finally:
        await upstream.stop()


def _start(scenario: Scenario) -> pb.StreamRequest:
    metadata = {
        "sim.faults": ",".join(scenario.faults) or "ok",
        "sim.retry_after_s": str(RETRY_AFTER_S),
    }
    if scenario.reasoning:
        metadata["sim.reasoning"] = str(scenario.reasoning)
    start = pb.StartGeneration(
        model=scenario.alias,
        messages=[pb.Message(role="user", content=PROMPT)],
        params=pb.GenerationParams(max_tokens=scenario.max_tokens),
    )
    if scenario.tool_mode:
        metadata["sim.tool_calls"] = str(scenario.tool_calls)
        start.tools.append(
            pb.Tool(
                name=TOOL.name, description=TOOL.description, parameters_json=TOOL.parameters_json
            )
        )
        start.policy.tool_calls = TOOL_CALL_MODES[scenario.tool_mode]
    start.metadata.update(metadata)
    return pb.StreamRequest(start=start)


async def read_call(
    stub: pbg.RelayAsyncStub, first: pb.StreamRequest, stop_after_seq: int | None
) -> list[pb.StreamEvent]:
    """Read a call to its end, or until chunk `stop_after_seq` (then drop it)."""

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield first
        await asyncio.Event().wait()  # keep the call open; cancelled when we leave

    call = stub.Stream(requests())
    events: list[pb.StreamEvent] = []
    try:
        async for event in call:
            events.append(event)
            if event.HasField("end"):
                break
            if stop_after_seq is not None and event.chunk.seq == stop_after_seq:
                break
    finally:
        call.cancel()
    return events


async def run_scenario(stub: pbg.RelayAsyncStub, scenario: Scenario) -> tuple[list[str], str, bool]:
    """(violations, outcome "exact"/"partial", whether the client resumed)."""
    problems: list[str] = []
    events = await read_call(stub, _start(scenario), scenario.drop_after)
    resumed = False
    if not events or not events[-1].HasField("end"):
        token = events[0].started.resume_token
        last = max((e.chunk.seq for e in events if e.HasField("chunk")), default=0)
        events += await read_call(
            stub, pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last)), None
        )
        resumed = True
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    seqs = [c.seq for c in chunks]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"seq not contiguous from 1: {seqs}")
    ends = [e.end for e in events if e.HasField("end")]
    if len(ends) != 1:
        return [*problems, f"expected one end, got {len(ends)}"], "broken", resumed
    end = ends[0]
    text = "".join(c.text for c in chunks)
    clean = clean_answer(scenario).text
    if end.text_sha256 != hashlib.sha256(text.encode()).hexdigest():
        problems.append("digest does not match the text")
    if end.chunks_sha256 != hashlib.sha256(chunk_records(chunks)).hexdigest():
        problems.append("chunks_sha256 does not match the chunks")
    if end.total_seq != len(chunks):
        problems.append(f"total_seq {end.total_seq} but {len(chunks)} chunks")
    prediction = predict(scenario)
    problems += _agent_problems(scenario, chunks, end, prediction)
    if not end.partial:
        if not prediction.exact_possible:
            problems.append("expected a typed partial, got a complete answer")
        elif text != clean:
            problems.append("text differs from the clean text")
        return problems, "exact", resumed
    if not prediction.partial_codes:
        problems.append(f"expected the clean text, got partial {end.error.code}")
    elif not end.error.fatal or end.error.code not in prediction.partial_codes:
        expected = sorted(prediction.partial_codes)
        problems.append(f"expected a fatal error in {expected}, got {end.error.code}")
    if not clean.startswith(text):
        problems.append("partial text is not a prefix of the clean text")
    return problems, "partial", resumed


async def run_chaos(
    runs: int, *, seed: int = 0, concurrency: int = 8, progress: bool = False
) -> Tally:
    rng = random.Random(seed)
    scenarios = [make_scenario(rng, index) for index in range(runs)]
    tally = Tally()
    queue: asyncio.Queue[Scenario] = asyncio.Queue()
    for scenario in scenarios:
        queue.put_nowait(scenario)

    async def worker(universe: Universe) -> None:
        while not queue.empty():
            scenario = queue.get_nowait()
            try:
                async with asyncio.timeout(RUN_TIMEOUT_S):
                    problems, outcome, resumed = await run_scenario(universe.stub, scenario)
            except Exception as error:  # a crash is a violation, not an abort
                problems, outcome, resumed = [f"crashed: {error!r}"], "broken", False
            # Nothing may be left behind: the generation ended, every call
            # detached, every upstream request answered.
            left = await universe.quiet()
            if left:
                problems.append(f"left running after the run: {left}")
            tally.runs += 1
            tally.resumed += resumed
            if outcome == "exact":
                tally.exact += 1
            elif outcome == "partial":
                tally.typed_partial += 1
            tally.violations += [f"{scenario.describe()}: {p}" for p in problems]
            if progress and tally.runs % 100 == 0:
                print(tally.line(), flush=True)

    async with contextlib.AsyncExitStack() as stack:
        universes = [
            await stack.enter_async_context(chaos_universe())
            for _ in range(max(1, min(concurrency, runs)))
        ]
        async with asyncio.TaskGroup() as group:
            for universe in universes:
                group.create_task(worker(universe))
    tally.seconds = time.perf_counter() - tally.started
    return tally
