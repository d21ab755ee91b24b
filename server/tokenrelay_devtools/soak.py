"""A soak: a steady mix of streams against one gateway for minutes (or for a
number of operations), watching what the gateway holds (issue 13, item 8).

Workers run operations back to back, each drawn from a seeded mix:

- `clean`: a stream read to its end: seq contiguous from 1, the End's
  digest that of the text, not partial, the same text as every other stream
  of that prompt and length (the simulator is deterministic);
- `faulted`: the same with a recoverable fault script (`sim.faults`: resets,
  5xx, an EOF, a stall), which must come out whole and the same, or with a
  fatal one (a 4xx, garbage), which must end partial with its code and a
  prefix of the clean text;
- `drop`: a client that drops after some chunks and resumes on a new call
  with its token and last seq: exactly the rest, the same text;
- `cancel`: a `cancel` mid-stream: an End with finish_reason "cancelled";
- `bad`: an invalid start: INVALID_ARGUMENT with a message;
- `foreign`: a resume with a token signed by another secret, or edited
  (and, given a foreign tenant's key, this tenant's token with that key):
  PERMISSION_DENIED;
- `over_quota`: with every other worker paused, max_streams + 2 slow starts
  at once: at most max_streams admitted, the rest RESOURCE_EXHAUSTED with a
  message; then all cancelled;
- `unauthenticated` (only given an API key: the gateway has keys): a start
  with no key, a malformed one or one the gateway never issued:
  UNAUTHENTICATED with a message.

`SOAK_KEYED` / `SOAK_TENANTS` is the keyed gateway a soak starts itself
(bench/soak.py --keyed): two tenants' keys in [[auth.keys]], the soak's
tenant limited to `max_concurrent_streams = SOAK_TENANT_STREAMS` below the
gateway's max_streams, so the over-quota burst meets the tenant's quota
(QuotaExceeded) rather than the replica's shedding.

Anything else (UNKNOWN or INTERNAL anywhere, a status or an ending the
operation does not expect) is a violation. Every `report_every_s` (a minute)
or every `report_every_ops` operations it prints the gateway's RSS, asyncio
tasks, open fds, running and detached streams (the Admin overview) and the
violations so far; at the end the RSS slope after warm-up (a least-squares
line through the samples of the last 80 % of the run, MB per hour), and
whether tasks and fds came back to the baseline once every stream ended.

Synchronous grpc in threads, as the fuzzer (grpc/grpc#36066).
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.fuzz.generate import bearer, resign
from tokenrelay_devtools.fuzz.run import METHOD, Census, census

WEIGHTS = {
    "clean": 30,
    "faulted": 20,
    "drop": 15,
    "cancel": 10,
    "bad": 10,
    "foreign": 10,
    "over_quota": 2,
}
# Operations only a keyed run has (SoakSettings.api_key given).
KEYED_WEIGHTS = {"unauthenticated": 5}
ORDER = [*WEIGHTS, *KEYED_WEIGHTS]
PROMPTS = ["tell me about streams", "and about rivers", "what is a relay?", "hello"]
LENGTHS = [24, 48]
RECOVERABLE = [
    "reset@5,ok",
    "reset@3,reset@9,ok",
    "http:500,ok",
    "http:502,http:500,ok",
    "eof@6,ok",
    "stall@4,ok",
]
FATAL = {"http:400": "HTTP_400", "http:401": "HTTP_401", "garbage@4": "MALFORMED_DATA"}
BAD_STARTS: list[tuple[str, pb.StartGeneration]] = [
    ("empty model", pb.StartGeneration(model="", messages=[pb.Message(role="user", content="x")])),
    (
        "unknown model",
        pb.StartGeneration(model="nope", messages=[pb.Message(role="user", content="x")]),
    ),
    (
        "bad role",
        pb.StartGeneration(model="sim", messages=[pb.Message(role="wizard", content="x")]),
    ),
    ("no messages", pb.StartGeneration(model="sim")),
    (
        "max_tokens 0",
        pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content="x")],
            params=pb.GenerationParams(max_tokens=0),
        ),
    ),
    (
        "bad fault",
        pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content="x")],
            metadata={"sim.faults": "reset@²"},
        ),
    ),
]
CALL_GUARD_S = 60.0  # only against hanging
SETTLE_S = 60.0
SLACK = 2  # tasks and fds may sit this far above the baseline
FOREIGN_SECRET = b"a soak's foreign deployment secret"


@dataclass(frozen=True)
class SoakSettings:
    """The gateway a soak starts (or what it knows of a --target's)."""

    max_streams: int | None = 16
    # The gateway's store keeps connection pools (Redis): see SoakReport.fd_slack.
    pooled_store: bool = False
    api_key: str | None = None
    foreign_key: str | None = None


# The settings of a gateway the soak starts itself: short timers (a stall
# costs half a second), breakers and retry budgets out of reach (the faults
# are on purpose: a breaker opened by them would end clean streams partial),
# a detach grace long enough for a dropped client to come back, and a
# retention of a minute: the store keeps every stream that long, so with the
# default hour the RSS would measure the retention, not a leak (it levels
# off once the first minute's streams expire, well within the warm-up).
# No shedding on event-loop lag (max_loop_lag_ms 0): on a loaded machine it
# would refuse the soak's own starts; refusals are tested with max_streams.
SOAK_GATEWAY: dict[str, Any] = {
    "max_streams": 16,
    "max_loop_lag_ms": 0,
    "retention_s": 60,
    "detach_grace_s": 30,
    "stall_timeout_s": 0.5,
    "first_token_timeout_s": 2,
    "backoff_base_s": 0.01,
    "backoff_cap_s": 0.05,
    "retry_budget_ratio": 1000,
    "breaker_failure_threshold": 1_000_000,
    "breaker_failure_rate": 1.0,
    "log_level": "warning",
}

# The keyed gateway (bench/soak.py --keyed): room for more streams than the
# soak's tenant may run, so its quota is what a burst meets; the foreign
# tenant (whose key only ever tries to resume the soak's streams) is tighter.
SOAK_TENANT_STREAMS = 16
SOAK_KEYED: dict[str, Any] = {**SOAK_GATEWAY, "max_streams": 2 * SOAK_TENANT_STREAMS}
SOAK_TENANTS: dict[str, dict[str, Any]] = {
    "own": {"max_concurrent_streams": SOAK_TENANT_STREAMS, "tokens_per_minute": 100_000_000},
    "foreign": {"max_concurrent_streams": 4, "tokens_per_minute": 1_000_000, "models": ["sim"]},
}


@dataclass
class Sample:
    at_s: float
    ops: int
    census: Census


@dataclass
class SoakReport:
    ops: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    samples: list[Sample] = field(default_factory=list)
    baseline: Census | None = None
    after: Census | None = None
    admitted_max: int = 0  # the most over_quota ever got admitted at once
    refused_over_quota: int = 0
    seconds: float = 0.0
    warm_at_s: float = 0.0  # when the warm-up ended (the baseline was read)
    # How far above the baseline open fds may end. A store with connection
    # pools (Redis) may still open a connection for a concurrency peak the
    # warm-up did not reach (one per concurrent stream at most): the Soak
    # sets max_streams + SLACK for it; the memory store opens none.
    fd_slack: int = SLACK

    def _after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.at_s >= self.warm_at_s]

    @property
    def rss_slope_mb_per_h(self) -> float | None:
        """Least squares through the samples after warm-up."""
        points = [(s.at_s / 3600, s.census.rss_bytes / 1e6) for s in self._after_warmup()]
        if len(points) < 2:
            return None
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        spread = sum((x - mean_x) ** 2 for x, _ in points)
        if spread == 0:
            return None
        return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread

    @property
    def rss_growth_after_warmup(self) -> float | None:
        """RSS at the end over RSS right after warm-up, minus 1."""
        samples = self._after_warmup()
        if len(samples) < 2 or not samples[0].census.rss_bytes:
            return None
        return float(samples[-1].census.rss_bytes / samples[0].census.rss_bytes - 1)

    @property
    def back_at_baseline(self) -> bool:
        base, now = self.baseline, self.after
        return (
            base is not None
            and now is not None
            and now.streams == 0
            and now.attached == 0
            and now.tasks <= base.tasks + SLACK
            and now.open_fds <= base.open_fds + self.fd_slack
        )

    def summary(self) -> list[str]:
        slope = self.rss_slope_mb_per_h
        growth = self.rss_growth_after_warmup
        lines = [
            f"ops={sum(self.ops.values())} in {self.seconds:.0f} s: "
            + " ".join(f"{k}={v}" for k, v in sorted(self.ops.items())),
            "statuses: " + " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            f"over quota: at most {self.admitted_max} admitted at once, "
            f"{self.refused_over_quota} refused",
        ]
        if self.baseline is not None and self.after is not None:
            lines.append(f"baseline: {self.baseline.line()}")
            lines.append(f"after:    {self.after.line()}")
        lines.append(
            "rss slope after warm-up: "
            + (f"{slope:+.1f} MB/h" if slope is not None else "n/a (too few samples)")
            + (f", growth {growth * 100:+.1f} %" if growth is not None else "")
        )
        lines += [f"VIOLATION {v}" for v in self.violations[:50]]
        lines.append(
            f"violations={self.violation_count} back_at_baseline={self.back_at_baseline} "
            f"result={'PASS' if self.passed else 'FAIL'}"
        )
        return lines

    @property
    def passed(self) -> bool:
        return self.violation_count == 0 and self.back_at_baseline


class Call:
    """One Relay.Stream call whose requests are sent one by one."""

    def __init__(
        self,
        channel: grpc.Channel,
        first: pb.StreamRequest,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._outbox: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._outbox.put(first)
        stream = channel.stream_stream(
            METHOD,
            request_serializer=pb.StreamRequest.SerializeToString,
            response_deserializer=pb.StreamEvent.FromString,
        )
        self.call = stream(self._requests(), timeout=CALL_GUARD_S, metadata=metadata or None)
        self.events: Iterator[pb.StreamEvent] = iter(self.call)

    def _requests(self) -> Iterator[pb.StreamRequest]:
        while (request := self._outbox.get()) is not None:
            yield request

    def send(self, request: pb.StreamRequest) -> None:
        self._outbox.put(request)

    def until(self, stop: Callable[[pb.StreamEvent], bool]) -> list[pb.StreamEvent]:
        seen = []
        for event in self.events:
            seen.append(event)
            if stop(event):
                return seen
        return seen

    def rest(self) -> list[pb.StreamEvent]:
        return list(self.events)

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


def start(prompt: str, max_tokens: int, pace_ms: int, **metadata: str) -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content=prompt)],
            params=pb.GenerationParams(max_tokens=max_tokens),
            metadata={"sim.pace_ms": str(pace_ms), **metadata},
        )
    )


def chunks(events: list[pb.StreamEvent]) -> list[pb.TokenChunk]:
    return [e.chunk for e in events if e.HasField("chunk")]


def text(events: list[pb.StreamEvent]) -> str:
    return "".join(c.text for c in chunks(events))


def ends(events: list[pb.StreamEvent]) -> list[pb.StreamEnd]:
    return [e.end for e in events if e.HasField("end")]


class Violation(Exception):
    pass


class Soak:
    def __init__(
        self,
        target: str,
        admin_token: str,
        *,
        settings: SoakSettings,
        seed: int = 1,
        concurrency: int = 6,
        print_line: Callable[[str], None] = print,
    ) -> None:
        self.target = target
        self.admin_token = admin_token
        self.settings = settings
        self.seed = seed
        self.concurrency = concurrency
        self.print_line = print_line
        self.report = SoakReport()
        if settings.pooled_store:
            self.report.fd_slack = (settings.max_streams or 16) + SLACK
        self._channels = [grpc.insecure_channel(target) for _ in range(max(concurrency // 3, 1))]
        self._admin = grpc.insecure_channel(target)
        self._lock = threading.Lock()
        self._references: dict[tuple[str, int], str] = {}
        self._tokens: list[str] = []
        self._gate = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._began = time.monotonic()
        self._done_ops = 0
        self._claimed = 0
        self._last_print = -1e9
        weights = {k: v for k, v in WEIGHTS.items() if k != "over_quota" or settings.max_streams}
        if settings.api_key:
            weights.update(KEYED_WEIGHTS)
        self._kinds = [kind for kind, weight in weights.items() for _ in range(weight)]

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(self.settings.api_key),) if self.settings.api_key else ()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._admin.close()

    # -- bookkeeping ----------------------------------------------------------------

    def violation(self, what: str) -> None:
        with self._lock:
            self.report.violation_count += 1
            if len(self.report.violations) < 200:
                self.report.violations.append(what)

    def status(self, code: str) -> None:
        with self._lock:
            self.report.statuses[code] += 1

    def sample(self) -> Sample:
        now = census(self._admin, self.admin_token)
        with self._lock:
            taken = Sample(time.monotonic() - self._began, self._done_ops, now)
            self.report.samples.append(taken)
        return taken

    def print_sample(self, sample: Sample) -> None:
        c = sample.census
        self._last_print = sample.at_s
        minutes, seconds = divmod(int(sample.at_s), 60)
        self.print_line(
            f"[{minutes:02d}:{seconds:02d}] ops={sample.ops} rss={c.rss_bytes / 2**20:.1f}MiB "
            f"tasks={c.tasks} fds={c.open_fds} running={c.running} detached={c.detached} "
            f"violations={self.report.violation_count}"
        )

    def reference(self, channel: grpc.Channel, prompt: str, max_tokens: int) -> str:
        """The clean text of (prompt, max_tokens), from the first clean stream of it."""
        key = (prompt, max_tokens)
        with self._lock:
            known = self._references.get(key)
        if known is not None:
            return known
        call = Call(channel, start(prompt, max_tokens, 0), self._metadata)
        try:
            events = call.rest()
        finally:
            call.close()
        self.check_whole(events, None, "reference")
        with self._lock:
            return self._references.setdefault(key, text(events))

    def check_whole(self, events: list[pb.StreamEvent], expected: str | None, what: str) -> None:
        if not events or not events[0].HasField("started"):
            raise Violation(f"{what}: no started event")
        seqs = [c.seq for c in chunks(events)]
        if seqs != list(range(1, len(seqs) + 1)):
            raise Violation(f"{what}: seq not contiguous: {seqs[:10]}…")
        found = ends(events)
        if len(found) != 1:
            raise Violation(f"{what}: {len(found)} ends")
        end = found[0]
        answer = text(events)
        if end.partial:
            raise Violation(f"{what}: partial ({end.error.code})")
        if end.text_sha256 != hashlib.sha256(answer.encode()).hexdigest():
            raise Violation(f"{what}: the digest is not the text's")
        if expected is not None and answer != expected:
            raise Violation(f"{what}: the text differs from the clean stream's")
        with self._lock:
            self._tokens.append(events[0].started.resume_token)
            del self._tokens[:-32]

    # -- operations -----------------------------------------------------------------

    def op_clean(self, rng: random.Random, channel: grpc.Channel) -> None:
        prompt, length = rng.choice(PROMPTS), rng.choice(LENGTHS)
        expected = self.reference(channel, prompt, length)
        call = Call(channel, start(prompt, length, rng.choice([0, 1, 2])), self._metadata)
        try:
            self.check_whole(call.rest(), expected, "clean")
        finally:
            call.close()

    def op_faulted(self, rng: random.Random, channel: grpc.Channel) -> None:
        prompt, length = rng.choice(PROMPTS), rng.choice(LENGTHS)
        expected = self.reference(channel, prompt, length)
        if rng.random() < 0.75:
            faults = rng.choice(RECOVERABLE)
            call = Call(channel, start(prompt, length, 1, **{"sim.faults": faults}), self._metadata)
            try:
                self.check_whole(call.rest(), expected, f"faulted {faults}")
            finally:
                call.close()
            return
        faults, code = rng.choice(sorted(FATAL.items()))
        call = Call(channel, start(prompt, length, 1, **{"sim.faults": faults}), self._metadata)
        try:
            events = call.rest()
        finally:
            call.close()
        found = ends(events)
        if len(found) != 1 or not found[0].partial or found[0].error.code != code:
            raise Violation(f"faulted {faults}: expected a partial end with {code}, got {found}")
        if not expected.startswith(text(events)):
            raise Violation(f"faulted {faults}: the partial text is not a prefix of the clean one")

    def op_drop(self, rng: random.Random, channel: grpc.Channel) -> None:
        prompt, length = rng.choice(PROMPTS), rng.choice(LENGTHS)
        expected = self.reference(channel, prompt, length)
        drop_after = rng.randint(1, length // 2)
        call = Call(channel, start(prompt, length, 3), self._metadata)
        try:
            seen = call.until(lambda e: e.HasField("chunk") and e.chunk.seq == drop_after)
        finally:
            call.close()  # the client goes away; the generation runs on, detached
        token = seen[0].started.resume_token
        for event in seen:
            if event.HasField("checkpoint"):
                token = event.checkpoint.resume_token
        resume = pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=drop_after))
        again = Call(rng.choice(self._channels), resume, self._metadata)
        try:
            rest = again.rest()
        finally:
            again.close()
        got = [c.seq for c in chunks(rest)]
        if got != list(range(drop_after + 1, drop_after + 1 + len(got))):
            raise Violation(f"drop: the resume after {drop_after} got seqs {got[:5]}…")
        whole = text(seen) + text(rest)
        found = ends(rest)
        if len(found) != 1 or found[0].partial or whole != expected:
            raise Violation(f"drop after {drop_after}: the resumed answer is not the clean one")

    def op_cancel(self, rng: random.Random, channel: grpc.Channel) -> None:
        call = Call(channel, start(rng.choice(PROMPTS), 2000, 5), self._metadata)
        after = rng.randint(1, 5)
        try:
            call.until(lambda e: e.HasField("chunk") and e.chunk.seq == after)
            call.send(pb.StreamRequest(cancel=pb.Cancel(reason="soak")))
            found = ends(call.rest())
        finally:
            call.close()
        if len(found) != 1 or found[0].finish_reason != "cancelled":
            raise Violation(f"cancel: expected an end with finish_reason cancelled, got {found}")

    def expect_refusal(
        self,
        channel: grpc.Channel,
        request: pb.StreamRequest,
        expected: grpc.StatusCode,
        what: str,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        call = Call(channel, request, self._metadata if metadata is None else metadata)
        try:
            events = call.rest()
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            details: str = error.details() or ""
            self.status(code.name)
            if code != expected or not details.strip():
                raise Violation(
                    f"{what}: {code.name} {details[:120]!r}, not {expected.name}"
                ) from None
            return
        finally:
            call.close()
        raise Violation(f"{what}: accepted ({len(events)} events), not {expected.name}")

    def op_bad(self, rng: random.Random, channel: grpc.Channel) -> None:
        what, request = rng.choice(BAD_STARTS)
        self.expect_refusal(
            channel,
            pb.StreamRequest(start=request),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bad {what}",
        )

    def op_foreign(self, rng: random.Random, channel: grpc.Channel) -> None:
        with self._lock:
            token = rng.choice(self._tokens) if self._tokens else None
        if token is None:
            self.reference(channel, PROMPTS[0], LENGTHS[0])
            self.op_clean(rng, channel)
            return
        how = rng.choice(
            ["foreign", "tampered", "tenant"]
            if self.settings.foreign_key
            else ["foreign", "tampered"]
        )
        metadata = None
        if how == "foreign":
            token = resign(token, FOREIGN_SECRET)
        elif how == "tampered":
            index = rng.randrange(len(token))
            token = token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1 :]
        else:
            assert self.settings.foreign_key is not None
            metadata = (bearer(self.settings.foreign_key),)
        request = pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=0))
        self.expect_refusal(
            channel, request, grpc.StatusCode.PERMISSION_DENIED, f"{how} token", metadata
        )

    def op_unauthenticated(self, rng: random.Random, channel: grpc.Channel) -> None:
        how, metadata = rng.choice(
            [
                ("no key", ()),
                ("a malformed key", (("authorization", "Bearer not a key"),)),
                ("another scheme", (("authorization", f"Basic {self.settings.api_key}"),)),
                ("an unknown key", (bearer("trk_" + rng.randbytes(32).hex()),)),
            ]
        )
        self.expect_refusal(
            channel,
            start(rng.choice(PROMPTS), LENGTHS[0], 0),
            grpc.StatusCode.UNAUTHENTICATED,
            f"a start with {how}",
            metadata,
        )

    def op_over_quota(self, rng: random.Random, channel: grpc.Channel) -> None:
        """max_streams + 2 slow starts at once, every other operation paused.

        Streams of the operations before may still be ending when this
        begins (a reader gets the End before the generation leaves), so it
        first waits for the gateway to be idle. Admitted streams are then
        cancelled; only those that end "cancelled" were alive together, and
        they must be at most max_streams. Whatever happens, every admitted
        stream is cancelled before the calls close: left to their detach
        grace they would hold every slot."""
        limit = self.settings.max_streams
        assert limit is not None
        idle = self._settled(Census(0, 0, 0, 1 << 30, 0, 1 << 30), within_s=10.0).streams == 0
        calls = [
            Call(
                self._channels[i % len(self._channels)],
                start(PROMPTS[0], 100_000, 50),
                self._metadata,
            )
            for i in range(limit + 2)
        ]
        admitted: list[Call] = []
        refused = 0
        problems: list[str] = []
        try:
            for call in calls:
                try:
                    first = next(call.events)
                except grpc.RpcError as error:
                    code: grpc.StatusCode = error.code()
                    self.status(code.name)
                    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not error.details():
                        problems.append(f"{code.name} {error.details()!r}")
                    else:
                        refused += 1
                    continue
                if first.HasField("started"):
                    admitted.append(call)
            for call in admitted:
                call.send(pb.StreamRequest(cancel=pb.Cancel(reason="soak: over quota")))
            together = 0
            for call in admitted:
                found = ends(call.rest())
                if len(found) == 1 and found[0].finish_reason == "cancelled":
                    together += 1
                elif len(found) != 1 or not found[0].partial:
                    problems.append(f"an admitted stream ended {found}")
        finally:
            for call in calls:
                call.close()
        with self._lock:
            self.report.admitted_max = max(self.report.admitted_max, together)
            self.report.refused_over_quota += refused
        if together > limit:
            problems.append(f"{together} streams were running at once, the limit is {limit}")
        if idle and refused < 2:
            problems.append(f"{limit + 2} starts on an idle gateway, only {refused} refused")
        if problems:
            raise Violation("over quota: " + "; ".join(problems))

    # -- the run --------------------------------------------------------------------

    def _enter(self, exclusive: bool) -> None:
        with self._gate:
            if exclusive:
                while self._exclusive:
                    self._gate.wait()
                self._exclusive = True
                while self._active:
                    self._gate.wait()
            else:
                while self._exclusive:
                    self._gate.wait()
            self._active += 1

    def _leave(self, exclusive: bool) -> None:
        with self._gate:
            self._active -= 1
            if exclusive:
                self._exclusive = False
            self._gate.notify_all()

    def run_one(self, rng: random.Random, channel: grpc.Channel, index: int) -> None:
        """Operation `index` (1-based): the first ones go through every kind
        once, so a short run covers the whole mix; then the mix decides."""
        kinds = sorted(set(self._kinds), key=ORDER.index)
        kind = kinds[index - 1] if index <= len(kinds) else rng.choice(self._kinds)
        exclusive = kind == "over_quota"
        self._enter(exclusive)
        try:
            getattr(self, f"op_{kind}")(rng, channel)
        except Violation as violation:
            self.violation(str(violation))
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            self.status(code.name)
            self.violation(f"{kind}: {code.name} {(error.details() or '')[:200]!r}")
        finally:
            self._leave(exclusive)
        with self._lock:
            self.report.ops[kind] += 1
            self._done_ops += 1

    def run(
        self,
        *,
        minutes: float | None = None,
        operations: int | None = None,
        report_every_s: float = 60.0,
        report_every_ops: int | None = None,
        sample_every_s: float = 10.0,
    ) -> SoakReport:
        """Until `minutes` have passed or `operations` are done.

        The first 20 % (at least one of each kind of operation) is the
        warm-up: caches, pools (a Redis connection pool grows to what the
        load needs) and the allocator settle there. The baseline is read
        when the warm-up's streams have all ended; the RSS slope is fitted
        to the samples after it."""
        assert (minutes is None) != (operations is None)
        self._began = time.monotonic()
        self.print_sample(self.sample())
        if operations is not None:
            warm = max(len(set(self._kinds)), operations // 5)
            self._phase(
                operations=min(warm, operations),
                until=None,
                **self._every(report_every_ops, report_every_s, sample_every_s),
            )
            idle = Census(0, 0, 0, 1 << 30, 0, 1 << 30)
            self.report.baseline = self._settled(idle, within_s=SETTLE_S)
            self.report.warm_at_s = time.monotonic() - self._began
            self._phase(
                operations=operations,
                until=None,
                **self._every(report_every_ops, report_every_s, sample_every_s),
            )
        else:
            assert minutes is not None
            self._phase(
                operations=None,
                until=self._began + 0.2 * minutes * 60,
                **self._every(report_every_ops, report_every_s, sample_every_s),
            )
            idle = Census(0, 0, 0, 1 << 30, 0, 1 << 30)
            self.report.baseline = self._settled(idle, within_s=SETTLE_S)
            self.report.warm_at_s = time.monotonic() - self._began
            self.print_line(f"warm-up done; baseline: {self.report.baseline.line()}")
            self._phase(
                operations=None,
                until=self._began + minutes * 60,
                **self._every(report_every_ops, report_every_s, sample_every_s),
            )
        self.report.seconds = time.monotonic() - self._began
        self.print_sample(self.sample())
        assert self.report.baseline is not None
        self.report.after = self._settled(self.report.baseline, within_s=SETTLE_S)
        return self.report

    @staticmethod
    def _every(
        report_every_ops: int | None, report_every_s: float, sample_every_s: float
    ) -> dict[str, Any]:
        return {
            "report_every_ops": report_every_ops,
            "report_every_s": report_every_s,
            "sample_every_s": sample_every_s,
        }

    def _phase(
        self,
        *,
        operations: int | None,
        until: float | None,
        report_every_ops: int | None,
        report_every_s: float,
        sample_every_s: float,
    ) -> None:
        """Workers run operations until `self._claimed` reaches `operations`
        or the monotonic time `until`."""
        claim_lock = threading.Lock()

        def next_op() -> int | None:
            with claim_lock:
                if operations is not None and self._claimed >= operations:
                    return None
                if until is not None and time.monotonic() >= until:
                    return None
                self._claimed += 1
                return self._claimed

        def worker(number: int) -> None:
            rng = random.Random(f"{self.seed}:{number}:{self._claimed}")
            channel = self._channels[number % len(self._channels)]
            while (index := next_op()) is not None:
                self.run_one(rng, channel, index)
                if report_every_ops and index % report_every_ops == 0:
                    self.print_sample(self.sample())

        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(sample_every_s):
                taken = self.sample()
                if taken.at_s - self._last_print >= report_every_s - 0.5:
                    self.print_sample(taken)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(self.concurrency)]
        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        watcher.join()

    def _settled(self, baseline: Census, within_s: float) -> Census:
        """The census once no stream runs and tasks and fds are back within
        SLACK of `baseline` (or the last one read after `within_s`)."""
        give_up = time.monotonic() + within_s
        while True:
            now = census(self._admin, self.admin_token)
            if (
                now.streams == 0
                and now.attached == 0
                and now.tasks <= baseline.tasks + SLACK
                and now.open_fds <= baseline.open_fds + self.report.fd_slack
            ) or time.monotonic() > give_up:
                return now
            time.sleep(0.2)
