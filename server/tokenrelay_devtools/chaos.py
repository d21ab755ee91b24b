"""`tokenrelay chaos`: seeded random fault schedules against the real thing.

Every run starts one generation through a real gateway (real gRPC) whose
model alias is a chain of 1-3 HTTP providers (OpenAI and Anthropic formats)
pointing at the mock upstream (real HTTP). The run's fault schedule (one item
per upstream attempt: resets, stalls, slow first bytes, 429 with Retry-After,
529, 5xx, 401, garbage, mid-stream error events, EOF without finish, split
UTF-8, random chunking) goes to the mock upstream with the request; some runs
also drop the client connection at a random seq and resume.

An oracle walks the schedule with the gateway's policy (retries per provider,
then the next provider of the chain) and predicts the outcome: the clean text,
or a typed partial whose error is the fault that ended it. Each run is checked:

- seq contiguous from 1, nothing duplicated, across the drop and the resume;
- exact runs: the text equals the clean text and the End is not partial;
- partial runs: `partial=true`, a fatal error with the predicted code, and a
  text that is a prefix of the clean text;
- the digest matches the text; no generation or session is left behind.

Breakers and retry budgets are set out of reach here so the oracle stays
exact; they have their own tests on an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import build_settings, read_config_file
from tokenrelay_server.core.model import Message
from tokenrelay_server.core.stitch import Stitcher
from tokenrelay_server.upstream.sim import SimAnswer

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

CONFIG = """
[server]
detach_grace_s = 30

[recovery]
max_retries = {max_retries}
backoff_base_s = 0.001
backoff_cap_s = 0.01
retry_budget_ratio = 1000

[breaker]
failure_threshold = 1000000
failure_rate = 1.0
{providers}
{models}
"""

PROMPT = "chaos, please"


@dataclass(frozen=True)
class Scenario:
    index: int
    alias: str
    max_tokens: int
    faults: tuple[str, ...]
    codes: tuple[frozenset[str], ...]  # per fault item: the codes it may end with
    recoverable: tuple[bool, ...]
    drop_after: int | None  # the client drops after this seq, then resumes

    def describe(self) -> str:
        drop = f" drop@{self.drop_after}" if self.drop_after else ""
        return f"run {self.index}: {self.alias} max_tokens={self.max_tokens} " + (
            f"faults={','.join(self.faults)}{drop}"
        )


@dataclass(frozen=True)
class Prediction:
    """The outcomes the policy allows. A TCP reset may destroy data the client
    had not read yet (the kernel drops it on RST), so after `reset@N` anywhere
    from 0 to N tokens arrived, and both outcomes can be right."""

    exact_possible: bool
    partial_codes: frozenset[str] = frozenset()  # the codes a partial end may carry

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
        n = rng.randint(0, max_tokens - 1)
        # reset_bytes stays inside the first event, so no text has arrived.
        item = template.format(n=n, b=rng.randint(1, 60))
        if template.startswith(("reset", "eof", "drop")):
            item += rng.choice(MODIFIERS)
        faults.append(item)
        codes.append(expected)
        recoverable.append(pool is RECOVERABLE)
    drop_after = rng.randint(1, max_tokens - 1) if rng.random() < 0.3 else None
    return Scenario(
        index, alias, max_tokens, tuple(faults), tuple(codes), tuple(recoverable), drop_after
    )


def _tokens_sent(item: str) -> tuple[int, bool] | None:
    """(text events an attempt sends before its fault, whether a TCP reset may
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
    counting delivered tokens (once the budget is delivered the answer is
    whole, whatever breaks after). Every state a reset's data loss allows is
    followed."""
    chain = CHAINS[scenario.alias]
    tokens = SimAnswer((Message("user", PROMPT),))
    exact_possible = False
    partial_codes: set[str] = set()
    states = {(0, 0, 0)}  # (provider, retries, delivered)
    for attempt, item in enumerate(scenario.faults):
        sent = _tokens_sent(item)
        following: set[tuple[int, int, int]] = set()
        for provider, retries, delivered in states:
            if sent is None:
                exact_possible = True
                continue
            count, lossy = sent
            remaining = scenario.max_tokens - delivered
            # An Anthropic prefill loses trailing whitespace; the model writes
            # it again first and the adapter drops it: one event, no chunk.
            repeated = int(
                delivered > 0
                and chain[provider].startswith("an")
                and not tokens.token(delivered - 1).strip()
            )
            most = max(min(count, remaining + repeated) - repeated, 0)
            for arrived in range(most + 1) if lossy else (most,):
                total = delivered + _emitted(tokens, delivered, arrived)
                if total >= scenario.max_tokens:
                    exact_possible = True
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
        exact_possible = True  # attempts past the schedule are clean
    return Prediction(exact_possible, frozenset(partial_codes))


def chaos_config(base_url: str, max_retries: int = MAX_RETRIES) -> str:
    providers = "".join(
        f'\n[providers.{name}]\nkind = "{"openai" if name.startswith("oa") else "anthropic"}"\n'
        f'base_url = "{base_url}"\nforward_sim_headers = true\n'
        "stall_timeout_s = 0.25\nfirst_token_timeout_s = 3\n"
        for name in PROVIDERS
    )
    models = "".join(
        f"\n[models.{alias}]\nchain = ["
        + ", ".join(f'{{ provider = "{p}", model = "m-{p}" }}' for p in chain)
        + "]\n"
        for alias, chain in CHAINS.items()
    )
    return CONFIG.format(max_retries=max_retries, providers=providers, models=models)


@contextlib.asynccontextmanager
async def chaos_rig() -> AsyncIterator[tuple[RelayServer, MockUpstream]]:
    """A mock upstream and a gateway configured against it."""
    upstream = MockUpstream()
    await upstream.start("127.0.0.1", 0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "chaos.toml"
            path.write_text(chaos_config(upstream.base_url))
            settings = build_settings(
                {**read_config_file(path), "port": 0, "resume_secret": "chaos-secret-0123456789"}
            )
        server = await RelayServer.start(settings)
        try:
            yield server, upstream
        finally:
            await server.stop(grace=1.0)
    finally:
        await upstream.stop()


def _start(scenario: Scenario) -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model=scenario.alias,
            messages=[pb.Message(role="user", content=PROMPT)],
            params=pb.GenerationParams(max_tokens=scenario.max_tokens),
            metadata={"sim.faults": ",".join(scenario.faults) or "ok", "sim.retry_after_s": "0"},
        )
    )


async def _read(
    stub: pbg.RelayStub, first: pb.StreamRequest, stop_after_seq: int | None
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


async def run_scenario(stub: pbg.RelayStub, scenario: Scenario) -> tuple[list[str], str, bool]:
    """(violations, outcome "exact"/"partial", whether the client resumed)."""
    problems: list[str] = []
    events = await _read(stub, _start(scenario), scenario.drop_after)
    resumed = False
    if not events or not events[-1].HasField("end"):
        token = events[0].started.resume_token
        last = max((e.chunk.seq for e in events if e.HasField("chunk")), default=0)
        events += await _read(
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
    clean = SimAnswer((Message("user", PROMPT),)).text(scenario.max_tokens)
    if end.text_sha256 != hashlib.sha256(text.encode()).hexdigest():
        problems.append("digest does not match the text")
    if end.total_seq != len(chunks):
        problems.append(f"total_seq {end.total_seq} but {len(chunks)} chunks")
    prediction = predict(scenario)
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
    async with chaos_rig() as (server, upstream):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pbg.RelayStub(channel)
            queue: asyncio.Queue[Scenario] = asyncio.Queue()
            for scenario in scenarios:
                queue.put_nowait(scenario)

            async def worker() -> None:
                while not queue.empty():
                    scenario = queue.get_nowait()
                    try:
                        async with asyncio.timeout(60):
                            problems, outcome, resumed = await run_scenario(stub, scenario)
                    except Exception as error:  # a crash is a violation, not an abort
                        problems, outcome, resumed = [f"crashed: {error!r}"], "broken", False
                    tally.runs += 1
                    tally.resumed += resumed
                    if outcome == "exact":
                        tally.exact += 1
                    elif outcome == "partial":
                        tally.typed_partial += 1
                    tally.violations += [f"{scenario.describe()}: {p}" for p in problems]
                    if progress and tally.runs % 100 == 0:
                        print(tally.line(), flush=True)

            async with asyncio.TaskGroup() as group:
                for _ in range(concurrency):
                    group.create_task(worker())
        # Nothing may be left behind: every generation ended, every call detached.
        async with asyncio.timeout(30):
            while server.hub.running_generations or server.hub.attached_sessions:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await upstream.wait_idle()
    tally.seconds = time.perf_counter() - tally.started
    return tally
