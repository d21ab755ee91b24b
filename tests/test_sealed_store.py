"""Redis values sealed at rest (issue 13: a canary prompt, answer, resume
secret and token leave 0 hits in Redis).

With resume secrets configured, the Redis store seals every stream value
(the meta, which holds the prompt, and each log entry) with store/seal.py,
bound to its stream. Over a real Redis: nothing readable is left in any key
of the gateway's prefix, what is read back is what was written, a value
moved to another stream does not open, and values written before sealing
was on stay readable.
"""

from __future__ import annotations

import grpc
import pytest
from redis.asyncio import Redis

from serverkit import (
    SECRET,
    RawCall,
    RelayFactory,
    chunks_of,
    end_of,
    resume_request,
    run_to_end,
    start_request,
    text_of,
)
from tokenrelay_server.api.server import STORE_SEAL_CONTEXT
from tokenrelay_server.core.model import (
    Chunk,
    GenerationParams,
    Message,
    RecoveryPolicy,
    StartRequest,
    StreamMeta,
)
from tokenrelay_server.store.redis import RedisStore
from tokenrelay_server.store.seal import SealBroken, Sealer

CANARY = "c4n4ry-5ea1ed"
PROMPT = f"{CANARY}-prompt: my password is hunter2"


def sealer(*secrets: str) -> Sealer:
    return Sealer(
        [(f"k{i}", s.encode()) for i, s in enumerate(secrets)], context=STORE_SEAL_CONTEXT
    )


def meta(stream_id: str) -> StreamMeta:
    request = StartRequest(
        model="sim",
        messages=(Message("user", PROMPT),),
        params=GenerationParams(max_tokens=8),
        policy=RecoveryPolicy(),
    )
    return StreamMeta(
        stream_id=stream_id, model="sim", created_at=0.0, checkpoint_interval=10, request=request
    )


def chunk(seq: int) -> Chunk:
    return Chunk(seq=seq, text=f"{CANARY}-answer-{seq} ", provider="sim", attempt=1)


async def dump(url: str, prefix: str) -> bytes:
    """Every key and value under the prefix, whatever its type."""
    client = Redis.from_url(url)
    out: list[bytes] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            out.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                out.append(await client.get(key) or b"")
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    out += [field, value]
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    out += [v for pair in fields.items() for v in pair]
            elif kind == "zset":
                out += [member for member, _ in await client.zrange(key, 0, -1, withscores=True)]
            elif kind == "set":
                out += list(await client.smembers(key))
            elif kind == "list":
                out += await client.lrange(key, 0, -1)
    finally:
        await client.aclose()
    return b"\n".join(out)


async def test_sealed_values_hold_nothing_readable_and_read_back_whole(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, sealer=sealer(SECRET))
    try:
        await store.create(meta("s1"))
        await store.append("s1", [chunk(1), chunk(2)])
        raw = await dump(redis_url, redis_prefix)
        assert CANARY.encode() not in raw and b"hunter2" not in raw
        assert (await store.get_meta("s1")) == meta("s1")
        assert await store.read("s1", after_seq=0) == [chunk(1), chunk(2)]
    finally:
        await store.close()


async def test_a_sealed_value_does_not_open_without_the_secret_or_in_another_stream(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, sealer=sealer(SECRET))
    plain = RedisStore.from_url(redis_url, prefix=redis_prefix)
    other = RedisStore.from_url(redis_url, prefix=redis_prefix, sealer=sealer("f" * 64))
    client = Redis.from_url(redis_url)
    try:
        await store.create(meta("s1"))
        await store.create(meta("s2"))
        await store.append("s1", [chunk(1)])
        with pytest.raises(SealBroken, match="no resume secret"):
            await plain.read("s1", after_seq=0)
        with pytest.raises(SealBroken):
            await other.get_meta("s1")
        # s1's sealed chunk, copied into s2's log: bound to s1, it fails.
        ((_, fields),) = await client.xrange(f"{redis_prefix}:{{s1}}:log")
        await client.xadd(f"{redis_prefix}:{{s2}}:log", {"e": fields[b"e"]}, id="1-0")
        with pytest.raises(SealBroken):
            await store.read("s2", after_seq=0)
    finally:
        await client.aclose()
        for each in (store, plain, other):
            await each.close()


async def test_values_written_before_sealing_stay_readable(
    redis_url: str, redis_prefix: str
) -> None:
    plain = RedisStore.from_url(redis_url, prefix=redis_prefix)
    sealed = RedisStore.from_url(redis_url, prefix=redis_prefix, sealer=sealer(SECRET))
    try:
        await plain.create(meta("old"))
        await plain.append("old", [chunk(1)])
        await sealed.append("old", [chunk(2)])  # a sealed entry after a plain one
        assert await sealed.get_meta("old") == meta("old")
        assert await sealed.read("old", after_seq=0) == [chunk(1), chunk(2)]
    finally:
        await plain.close()
        await sealed.close()


async def test_a_gateway_on_redis_leaves_no_canary_in_redis(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str
) -> None:
    relay = await relay_factory(store="redis", redis_url=redis_url, redis_prefix=redis_prefix)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        request = start_request(prompt=PROMPT, max_tokens=20, metadata={"sim.faults": "reset@8,ok"})
        call = RawCall(channel, request)
        first = await call.events_until(lambda e: e.chunk.seq == 5)
        call.cancel()  # the client goes away after chunk 5, then resumes
        token = first[0].started.resume_token
        rest = await run_to_end(channel, resume_request(token, 5))
    assert not end_of(rest).partial
    answer = text_of(first) + text_of(rest)
    assert next(c.seq for c in chunks_of(rest)) == 6
    raw = (await dump(redis_url, redis_prefix)).decode("utf-8", "replace")
    words = answer.split()
    runs = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    for canary in (PROMPT, CANARY, "hunter2", SECRET, token):
        assert canary not in raw
    assert [run for run in runs if run in raw] == []
    await relay.stop(grace=0.5)
