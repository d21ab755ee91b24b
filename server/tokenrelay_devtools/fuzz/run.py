"""Playing fuzz cases against a gateway over a real port, and judging them.

Each case is one `Relay.Stream` call: its metadata, its frames sent as they
are (identity serializers, so mutated and random bytes reach the server as
such), a half-close, then the answer read until it ends or for
`events_per_call` events (a long valid stream: that is enough; the call is
then cancelled, as a client that drops). Synchronous grpc in threads: grpc's
asyncio client reports INTERNAL "Internal error from Core" instead of the
server's status when the server ends a call while frames are still being
written (grpc/grpc#36066), and this is about what the server answers.

What must hold for every call (`problems`): never UNKNOWN or INTERNAL; a
message on every status but OK, and a short one (nothing echoed whole); no
call left hanging until the client's guard deadline; a tampered, foreign,
forged or expired resume token never opens a stream; and, when the gateway
has keys (the fuzzer was given `api_key`), a call with a missing, malformed,
unknown or second key never opens one, nor another tenant's key a resume of
this tenant's stream.

And once all calls are done (`FuzzReport.passed`): the gateway's streams and
attached calls back at what they were before, its asyncio tasks at most
`TASK_SLACK` above (read from the Admin overview), health SERVING, and a
clean stream still coming out whole.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tokenrelay.v1 import admin_pb2, admin_pb2_grpc
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.fuzz.draw import RandomDraw
from tokenrelay_devtools.fuzz.generate import (
    BAD_CREDENTIALS,
    FOREIGN_KEY,
    REFUSED_TOKENS,
    VALID,
    FuzzCase,
    Material,
    bearer,
    fuzz_case,
)
from tokenrelay_devtools.gateway import serving

METHOD = "/tokenrelay.v1.Relay/Stream"
HEALTH_SERVICES = ("", "tokenrelay.v1.Relay")
EVENTS_PER_CALL = 200
HANG_GUARD_S = 20.0  # only against hanging; nothing judges how long a call took
MAX_DETAILS_CHARS = 2_000
TASK_SLACK = 2
SETTLE_S = 30.0
CLIENT_ERROR = "CLIENT_ERROR"  # the client library refused to send the case


@dataclass(frozen=True)
class Outcome:
    code: str  # a grpc.StatusCode name, or CLIENT_ERROR
    details: str
    started: bool  # the call got a `started` event: a stream was opened


def _identity(raw: bytes) -> bytes:
    return raw


def play(
    channel: grpc.Channel,
    case: FuzzCase,
    *,
    events_per_call: int = EVENTS_PER_CALL,
    hang_guard_s: float = HANG_GUARD_S,
) -> Outcome:
    """Send the case's frames, half-close, read; the server's status (OK for
    a stream that ended, or that was read far enough)."""
    started = False
    try:
        call = channel.stream_stream(
            METHOD, request_serializer=_identity, response_deserializer=pb.StreamEvent.FromString
        )(iter(case.frames), timeout=hang_guard_s, metadata=case.metadata or None)
    except (ValueError, TypeError) as error:
        return Outcome(CLIENT_ERROR, str(error), False)
    try:
        for read, event in enumerate(call, start=1):
            started = started or event.HasField("started")
            if read >= events_per_call:
                break
        return Outcome("OK", "", started)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        return Outcome(code.name, details, started)
    finally:
        call.cancel()


def problems(case: FuzzCase, outcome: Outcome, *, expect_auth: bool) -> list[str]:
    """What is wrong with how the gateway answered this case (nothing: [])."""
    found: list[str] = []
    if outcome.code in ("INTERNAL", "UNKNOWN"):
        found.append(f"{outcome.code}: {outcome.details[:300]}")
    if outcome.code == "DEADLINE_EXCEEDED":
        found.append(f"the call hung until the client's guard deadline: {outcome.details[:200]}")
    if outcome.code not in ("OK", CLIENT_ERROR):
        if not outcome.details.strip():
            found.append(f"{outcome.code} without a message")
        elif len(outcome.details) >= MAX_DETAILS_CHARS:
            found.append(f"{outcome.code} echoes too much: {len(outcome.details)} characters")
    token_kind = case.first_token_kind
    if outcome.started and token_kind in REFUSED_TOKENS:
        found.append(f"a {token_kind} resume token opened a stream")
    if expect_auth and outcome.started:
        if case.credential in BAD_CREDENTIALS:
            found.append(f"a call with {case.credential} opened a stream")
        if case.credential == FOREIGN_KEY and token_kind == VALID:
            found.append("another tenant's key resumed this tenant's stream")
    return found


# --- the gateway's state --------------------------------------------------------------


@dataclass(frozen=True)
class Census:
    """What the Admin overview says the gateway holds."""

    running: int
    detached: int
    attached: int
    tasks: int
    rss_bytes: int
    open_fds: int

    @property
    def streams(self) -> int:
        return self.running + self.detached

    def line(self) -> str:
        return (
            f"streams running={self.running} detached={self.detached} "
            f"attached={self.attached} tasks={self.tasks} "
            f"rss={self.rss_bytes / 2**20:.1f}MiB fds={self.open_fds}"
        )


def census(channel: grpc.Channel, admin_token: str) -> Census:
    overview = admin_pb2_grpc.AdminStub(channel).GetOverview(
        admin_pb2.GetOverviewRequest(), metadata=(bearer(admin_token),), timeout=10
    )
    return Census(
        running=overview.streams_running,
        detached=overview.streams_detached,
        attached=overview.attached_clients,
        tasks=overview.asyncio_tasks,
        rss_bytes=overview.rss_bytes,
        open_fds=overview.open_fds,
    )


def healthy(channel: grpc.Channel) -> bool:
    return all(serving(channel, name, timeout_s=10) for name in HEALTH_SERVICES)


def clean_start(max_tokens: int) -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content="tell me about streams")],
            params=pb.GenerationParams(max_tokens=max_tokens),
            metadata={"sim.pace_ms": "0"},
        )
    )


def clean_stream(
    channel: grpc.Channel, api_key: str | None, max_tokens: int = 3
) -> list[pb.StreamEvent]:
    """A clean stream read to its end (raises on any failure)."""
    metadata = (bearer(api_key),) if api_key else None
    call = pb_stub(channel)(
        iter([clean_start(max_tokens)]), timeout=HANG_GUARD_S, metadata=metadata
    )
    events = list(call)
    return events


def pb_stub(
    channel: grpc.Channel,
) -> grpc.StreamStreamMultiCallable[pb.StreamRequest, pb.StreamEvent]:
    return channel.stream_stream(
        METHOD,
        request_serializer=pb.StreamRequest.SerializeToString,
        response_deserializer=pb.StreamEvent.FromString,
    )


def stream_whole(events: Sequence[pb.StreamEvent], max_tokens: int) -> bool:
    return bool(
        events
        and events[-1].HasField("end")
        and events[-1].end.total_seq == max_tokens
        and not events[-1].end.partial
    )


def settle(
    channel: grpc.Channel, admin_token: str, baseline: Census, within_s: float = SETTLE_S
) -> Census:
    """The census once the gateway is back at `baseline` (or the last one
    read when it is not within `within_s`: the report then says so)."""
    give_up = time.monotonic() + within_s
    while True:
        now = census(channel, admin_token)
        if back_at(baseline, now) or time.monotonic() > give_up:
            return now
        time.sleep(0.1)


def back_at(baseline: Census, now: Census) -> bool:
    return (
        now.streams <= baseline.streams
        and now.attached <= baseline.attached
        and now.tasks <= baseline.tasks + TASK_SLACK
    )


# --- a run ----------------------------------------------------------------------------


@dataclass
class Failure:
    index: int
    case: FuzzCase
    outcome: Outcome
    problems: list[str]

    def line(self) -> str:
        return f"FAIL case {self.index}: {'; '.join(self.problems)} ({self.case.describe()})"


@dataclass
class FuzzReport:
    calls: int = 0
    tally: Counter[str] = field(default_factory=Counter)
    by_first: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    baseline: Census | None = None
    after: Census | None = None
    healthy_after: bool = False
    clean_after: bool = False
    clean_error: str = ""
    server_errors: list[str] = field(default_factory=list)
    # A few distinct messages of each status, for the tally.
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def leaks(self) -> list[str]:
        if self.baseline is None or self.after is None:
            return []
        base, now = self.baseline, self.after
        found = []
        if now.streams > base.streams:
            found.append(f"{now.streams - base.streams} stream(s) left registered")
        if now.attached > base.attached:
            found.append(f"{now.attached - base.attached} call(s) left attached")
        if now.tasks > base.tasks + TASK_SLACK:
            found.append(f"{now.tasks - base.tasks} asyncio task(s) above the baseline")
        return found

    @property
    def passed(self) -> bool:
        return (
            not self.failures
            and not self.leaks
            and self.healthy_after
            and self.clean_after
            and not self.server_errors
        )

    def lines(self) -> list[str]:
        out = [f"calls={self.calls}"]
        for code, count in sorted(self.tally.items()):
            out.append(f"  {code:<20} {count}")
            out += [f"      e.g. {example}" for example in self.examples.get(code, [])]
        out.append(
            "by first frame: " + " ".join(f"{k}={v}" for k, v in sorted(self.by_first.items()))
        )
        out += [failure.line() for failure in self.failures[:50]]
        if len(self.failures) > 50:
            out.append(f"... and {len(self.failures) - 50} more failures")
        if self.baseline is not None and self.after is not None:
            out.append(f"before: {self.baseline.line()}")
            out.append(f"after:  {self.after.line()}")
        else:
            out.append("census: not read (no admin token)")
        out += [f"LEAK {leak}" for leak in self.leaks]
        out.append(f"health SERVING after: {self.healthy_after}")
        out.append(
            f"a clean stream whole after: {self.clean_after}"
            + (f" ({self.clean_error})" if self.clean_error else "")
        )
        out += [f"SERVER ERROR {line}" for line in self.server_errors[:20]]
        out.append(
            f"unknown={self.tally['UNKNOWN']} internal={self.tally['INTERNAL']} "
            f"failures={len(self.failures)} leaks={len(self.leaks)} "
            f"result={'PASS' if self.passed else 'FAIL'}"
        )
        return out


def case_of(seed: int, index: int, material: Material) -> FuzzCase:
    """Case `index` of `seed`: the same on every run (given the same material)."""
    return fuzz_case(RandomDraw(random.Random(f"{seed}:{index}")), material)


def fetch_tokens(channel: grpc.Channel, api_key: str | None, count: int = 3) -> list[str]:
    """Resume tokens of finished clean streams of `api_key`'s tenant."""
    tokens = []
    for max_tokens in range(3, 3 + count):
        events = clean_stream(channel, api_key, max_tokens)
        tokens.append(events[0].started.resume_token)
        tokens += [e.checkpoint.resume_token for e in events if e.HasField("checkpoint")]
    return tokens


class Fuzzer:
    """Runs cases against one gateway and keeps the report."""

    def __init__(
        self,
        target: str,
        material: Material,
        *,
        admin_token: str | None = None,
        concurrency: int = 8,
        corpus_out: Path | None = None,
        server_errors: Callable[[], list[str]] | None = None,
    ) -> None:
        self.target = target
        self.material = material
        self.admin_token = admin_token
        self.concurrency = concurrency
        self.corpus_out = corpus_out
        self._server_errors = server_errors
        self.expect_auth = material.api_key is not None
        self.report = FuzzReport()
        self._lock = threading.Lock()
        # Several connections: one HTTP/2 connection's flow control would
        # make the threads wait on each other.
        self._channels = [grpc.insecure_channel(target) for _ in range(max(concurrency // 4, 1))]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def begin(self) -> None:
        """Tokens to fuzz with, and the census before any case."""
        channel = self._channels[0]
        if not self.material.tokens:
            self.material.tokens = fetch_tokens(channel, self.material.api_key)
        if self.admin_token:
            first = census(channel, self.admin_token)
            idle = Census(0, 0, 0, first.tasks, first.rss_bytes, first.open_fds)
            # The warm-up streams are done; wait for their tasks to go.
            self.report.baseline = settle(channel, self.admin_token, idle, within_s=5.0)

    def run_case(self, index: int, case: FuzzCase) -> None:
        channel = self._channels[index % len(self._channels)]
        outcome = play(channel, case)
        found = problems(case, outcome, expect_auth=self.expect_auth)
        with self._lock:
            self.report.calls += 1
            self.report.tally[outcome.code] += 1
            if outcome.code != "OK":
                examples = self.report.examples.setdefault(outcome.code, [])
                example = outcome.details[:100]
                if len(examples) < 3 and example not in examples:
                    examples.append(example)
            self.report.by_first[case.first.partition(":")[0]] += 1
            if found:
                failure = Failure(index, case, outcome, found)
                self.report.failures.append(failure)
                if self.corpus_out is not None:
                    self.corpus_out.mkdir(parents=True, exist_ok=True)
                    path = self.corpus_out / f"case-{index}-{outcome.code.lower()}.json"
                    path.write_text(case.dumps())

    def run(self, cases: Iterable[tuple[int, FuzzCase]]) -> None:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for future in [pool.submit(self.run_case, index, case) for index, case in cases]:
                future.result()

    def finish(self) -> FuzzReport:
        channel = self._channels[0]
        report = self.report
        if self.admin_token and report.baseline is not None:
            report.after = settle(channel, self.admin_token, report.baseline)
        report.healthy_after = healthy(channel)
        try:
            events = clean_stream(channel, self.material.api_key)
            report.clean_after = stream_whole(events, 3)
            if not report.clean_after:
                report.clean_error = f"it ended {events[-1] if events else 'with no event'}"
        except grpc.RpcError as error:
            report.clean_after = False
            report.clean_error = f"{error.code().name}: {error.details()}"
        if self._server_errors is not None:
            report.server_errors = self._server_errors()
        return report


def fuzz(
    target: str,
    *,
    count: int,
    seed: int,
    material: Material,
    admin_token: str | None = None,
    concurrency: int = 8,
    corpus_out: Path | None = None,
    server_errors: Callable[[], list[str]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    fuzzer = Fuzzer(
        target,
        material,
        admin_token=admin_token,
        concurrency=concurrency,
        corpus_out=corpus_out,
        server_errors=server_errors,
    )
    try:
        fuzzer.begin()
        batch = 500
        for first in range(0, count, batch):
            indexes = range(first, min(first + batch, count))
            fuzzer.run((index, case_of(seed, index, material)) for index in indexes)
            if progress is not None:
                progress(fuzzer.report.calls)
        return fuzzer.finish()
    finally:
        fuzzer.close()


def replay(
    target: str,
    cases: Sequence[FuzzCase],
    *,
    material: Material,
    admin_token: str | None = None,
    server_errors: Callable[[], list[str]] | None = None,
) -> FuzzReport:
    """Play stored cases (a corpus) one at a time."""
    fuzzer = Fuzzer(
        target, material, admin_token=admin_token, concurrency=1, server_errors=server_errors
    )
    try:
        fuzzer.begin()
        fuzzer.run(enumerate(cases))
        return fuzzer.finish()
    finally:
        fuzzer.close()
