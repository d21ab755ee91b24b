"""Rounds of the nemesis: in each, a handful of clients stream through the
replicas while the nemesis injects faults; then everything is healed, the
rig waits until nothing runs or is leased any more (or a generous bound
passes: what is left then is a violation), reads every stream's log from
Redis and hands it all to the checker.

Each round draws from `random.Random(f"{seed}:{round}")`: the plans, the
fault schedule and every client's choices are the seed's. (What the
processes do under them is not deterministic: the seed reproduces the
schedule, not the interleaving.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc.aio
import redis.asyncio as aioredis

from tokenrelay_devtools.nemesis.checker import (
    check_clean_text,
    check_round,
    is_transport_failure,
)
from tokenrelay_devtools.nemesis.clients import (
    Channels,
    ClientSettings,
    plan_streams,
    run_client,
)
from tokenrelay_devtools.nemesis.faults import (
    ALL_FAULTS,
    REDIS_FAULTS,
    FaultKind,
    Nemesis,
    Progress,
    schedule,
)
from tokenrelay_devtools.nemesis.history import (
    ClientRecord,
    Leftovers,
    StoredStream,
    Violation,
)
from tokenrelay_devtools.nemesis.rig import RESUME_SECRET, Rig, RigSettings
from tokenrelay_server.api.server import store_sealer
from tokenrelay_server.config.settings import Settings
from tokenrelay_server.core.model import LogEntry
from tokenrelay_server.store.codec import decode_entry, encode_entry
from tokenrelay_server.store.redis import open_value


@dataclass
class NemesisSettings:
    rounds: int = 10
    seed: int = 1
    replicas: int = 3
    redis_url: str | None = None  # None: a throwaway redis-server (Redis faults need one)
    cluster: bool = False  # a throwaway 3-master Redis Cluster instead
    streams: int = 8  # per round
    faults: int = 3  # per round
    kinds: tuple[FaultKind, ...] = ALL_FAULTS
    lease_ttl_s: float = 2.0
    quiesce_timeout_s: float = 60.0  # real seconds; what is still there after it is a violation
    client: ClientSettings = field(default_factory=ClientSettings)
    server: dict[str, object] = field(default_factory=dict)  # extra [server] keys


@dataclass
class RoundResult:
    index: int
    streams: int
    faults: list[str]
    injected: Counter[str]
    skipped: Counter[str]
    violations: list[Violation]
    anomalies: list[Violation]  # check_clean_text: answers that are not the clean one
    outcomes: Counter[str]  # per stream: complete, partial:CODE, no-end
    statuses: Counter[str]  # per call that ended with a status: its code (transport: +"~")
    calls: int


@dataclass
class Summary:
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def streams(self) -> int:
        return sum(r.streams for r in self.rounds)

    @property
    def violations(self) -> list[tuple[int, Violation]]:
        return [(r.index, v) for r in self.rounds for v in r.violations]

    @property
    def anomalies(self) -> list[tuple[int, Violation]]:
        return [(r.index, v) for r in self.rounds for v in r.anomalies]

    def total(self, what: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for result in self.rounds:
            out.update(getattr(result, what))
        return out


async def run_nemesis(
    settings: NemesisSettings,
    workdir: Path,
    on_round: Callable[[RoundResult], None] = lambda result: None,
) -> Summary:
    kinds = settings.kinds
    if settings.redis_url:
        # Never pause, kill or restart a Redis the rig does not own.
        kinds = tuple(k for k in kinds if k not in REDIS_FAULTS) or ("kill",)
    rig_settings = RigSettings(
        replicas=settings.replicas,
        redis_url=settings.redis_url,
        cluster=settings.cluster,
        lease_ttl_s=settings.lease_ttl_s,
        server=dict(settings.server),
    )
    summary = Summary()
    seen: set[str] = set()  # stream ids of earlier rounds
    async with Rig(rig_settings, workdir) as rig:
        channels = Channels(rig.addresses)
        try:
            for index in range(settings.rounds):
                rng = random.Random(f"{settings.seed}:{index}")
                result = await run_round(rig, channels, index, rng, settings, kinds, seen)
                summary.rounds.append(result)
                on_round(result)
        finally:
            await channels.close()
    return summary


async def run_round(
    rig: Rig,
    channels: Channels,
    index: int,
    rng: random.Random,
    settings: NemesisSettings,
    kinds: Sequence[FaultKind],
    seen: set[str],
) -> RoundResult:
    """One round; `seen` holds the stream ids of earlier rounds (any other
    stream in the store is this round's: known to a client, or an orphan)."""
    plans = plan_streams(
        rng, prefix=f"r{index}", count=settings.streams, replicas=len(rig.replicas)
    )
    records = [ClientRecord(plan.name, plan.expected_text()) for plan in plans]
    faults = schedule(
        rng,
        replicas=len(rig.replicas),
        total_chunks=sum(plan.max_tokens for plan in plans),
        lease_ttl_s=settings.lease_ttl_s,
        kinds=kinds,
        count=settings.faults,
    )
    progress = Progress()
    nemesis = Nemesis(rig, progress)
    done = asyncio.Event()
    client_rngs = [random.Random(rng.random()) for _ in plans]

    async def clients() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for plan, record, client_rng in zip(plans, records, client_rngs, strict=True):
                    client = run_client(
                        plan, record, channels, client_rng, progress.add, settings.client
                    )
                    group.create_task(client)
        finally:
            done.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(nemesis.run(faults, done))
        group.create_task(clients())
    await rig.heal()
    stream_ids = sorted({r.stream_id for r in records if r.stream_id})
    leftovers = await quiesce(rig, stream_ids, settings.quiesce_timeout_s)
    orphans = sorted(await stream_ids_in_store(rig) - seen - set(stream_ids))
    stored = await read_streams(rig, [*stream_ids, *orphans])
    seen.update(stored)
    violations = check_round(records, stored, leftovers)
    anomalies = check_clean_text(records, stored)
    if violations or anomalies:
        dump_round(
            rig.workdir / f"round-{index}.json", index, records, stored, violations + anomalies
        )
    return RoundResult(
        index=index,
        streams=len(plans),
        faults=nemesis.applied,
        injected=nemesis.injected,
        skipped=nemesis.skipped,
        violations=violations,
        anomalies=anomalies,
        outcomes=Counter(_outcome(record) for record in records),
        statuses=Counter(
            call.status.code + ("~" if is_transport_failure(call.status) else "")
            for record in records
            for call in record.calls
            if call.status is not None
        ),
        calls=sum(len(record.calls) for record in records),
    )


def _outcome(record: ClientRecord) -> str:
    for call in record.calls:
        if call.end is not None:
            return f"partial:{call.end.error_code}" if call.end.partial else "complete"
    return "no-end"


async def quiesce(rig: Rig, stream_ids: Sequence[str], timeout_s: float) -> Leftovers:
    """Wait until no replica runs any of `stream_ids` and none is leased;
    what is still there after `timeout_s` is returned."""
    wanted = set(stream_ids)
    deadline = time.monotonic() + timeout_s
    client = rig.redis_client(socket_timeout=5)
    try:
        while True:
            running: list[tuple[int, str, str]] = []
            leased: list[tuple[str, str]] = []
            try:
                running = [info for info in await rig.running_streams() if info[1] in wanted]
                for stream_id in stream_ids:
                    owner = await client.get(rig.stream_keys(stream_id)["lease"])
                    if owner is not None:
                        leased.append((stream_id, _text(owner)))
            except (grpc.aio.AioRpcError, aioredis.RedisError, OSError) as exc:
                # A replica or Redis still coming back: ask again.
                running = [(-1, "?", f"could not ask: {type(exc).__name__}")]
            if not running and not leased:
                return Leftovers()
            if time.monotonic() >= deadline:
                return Leftovers(running=tuple(running), leased=tuple(leased))
            await asyncio.sleep(0.05)  # a condition poll
    finally:
        await client.aclose()


async def stream_ids_in_store(rig: Rig) -> set[str]:
    """Every stream the store holds under the rig's prefix."""
    client = rig.redis_client()
    found: set[str] = set()
    try:
        async for key in client.scan_iter(match=f"{rig.prefix}:{{*}}:meta", count=1000):
            name = _text(key)
            found.add(name[name.index("{") + 1 : name.index("}")])
    finally:
        await client.aclose()
    return found


async def read_streams(rig: Rig, stream_ids: Sequence[str]) -> dict[str, StoredStream]:
    """Every stream's log and lease, straight from Redis (not through a replica;
    the values are sealed with the replicas' resume secret)."""
    sealer = store_sealer(Settings(resume_secret=RESUME_SECRET))
    client = rig.redis_client()
    stored: dict[str, StoredStream] = {}
    try:
        for stream_id in stream_ids:
            keys = rig.stream_keys(stream_id)
            if not await client.exists(keys["meta"]):
                stored[stream_id] = StoredStream(stream_id, None)
                continue
            items = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys["log"]))
            entries: list[LogEntry] = [
                decode_entry(open_value(fields[b"e"], stream_id, sealer)) for _, fields in items
            ]
            owner = await client.get(keys["lease"])
            stored[stream_id] = StoredStream(
                stream_id, tuple(entries), None if owner is None else _text(owner)
            )
    finally:
        await client.aclose()
    return stored


def dump_round(
    path: Path,
    index: int,
    records: Sequence[ClientRecord],
    stored: Mapping[str, StoredStream],
    found: Sequence[Violation],
) -> None:
    """What the checker saw of a round's broken streams, as JSON: the
    violations, and for each stream they name, every client call and the
    stored log (entries in the store's own JSON form)."""
    named = {v.stream.split("(")[0] for v in found}

    def involved(stream_id: str) -> bool:
        return bool(stream_id) and stream_id[:12] in named

    streams = {
        stream_id: {
            "lease_owner": stream.lease_owner,
            "log": None
            if stream.entries is None
            else [json.loads(encode_entry(e)) for e in stream.entries],
        }
        for stream_id, stream in stored.items()
        if involved(stream_id)
    }
    clients = [dataclasses.asdict(r) for r in records if involved(r.stream_id) or r.name in named]
    report = {
        "round": index,
        "violations": [dataclasses.asdict(v) for v in found],
        "clients": clients,
        "streams": streams,
    }
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


__all__ = [
    "NemesisSettings",
    "RoundResult",
    "Summary",
    "dump_round",
    "quiesce",
    "read_streams",
    "run_nemesis",
    "run_round",
]  # fmt: skip


# --- what bench/nemesis.py prints --------------------------------------------------------


def _counts(counter: Counter[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"


def describe_round(result: RoundResult) -> str:
    return (
        f"round {result.index}: streams={result.streams} calls={result.calls} "
        f"faults=[{', '.join(result.faults)}] outcomes: {_counts(result.outcomes)} "
        f"statuses: {_counts(result.statuses)} violations={len(result.violations)}"
        + (f" anomalies={len(result.anomalies)}" if result.anomalies else "")
    )


def describe_summary(summary: Summary) -> list[str]:
    violations = summary.violations
    kinds: Counter[str] = Counter(v.kind for _, v in violations)
    lines = [
        f"rounds={len(summary.rounds)} streams={summary.streams} "
        f"calls={sum(r.calls for r in summary.rounds)}",
        f"faults injected: {_counts(summary.total('injected'))}",
        f"faults skipped (target already down): {_counts(summary.total('skipped'))}",
        f"outcomes: {_counts(summary.total('outcomes'))}",
        f"statuses seen (~: grpc's own for a broken transport): "
        f"{_counts(summary.total('statuses'))}",
        f"violations={len(violations)} {_counts(kinds)}",
    ]
    lines += [f"VIOLATION round {index}: {v.describe()}" for index, v in violations]
    anomalies = summary.anomalies
    anomaly_kinds: Counter[str] = Counter(a.kind for _, a in anomalies)
    lines.append(
        f"anomalies (answers that are not the clean one; not an issue-9 promise, see "
        f"checker.check_clean_text)={len(anomalies)} {_counts(anomaly_kinds)}"
    )
    lines += [f"ANOMALY round {index}: {a.describe()}" for index, a in anomalies]
    return lines
