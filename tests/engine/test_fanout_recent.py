"""A live log lets go of its chunk objects once it ended and nobody reads
live (engine/fanout.py over core/compact_log.py), not at the End itself."""

from __future__ import annotations

from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Chunk, End, StreamMeta
from tokenrelay_server.engine.fanout import LocalLog, Subscription
from tokenrelay_server.store.memory import MemoryStore


async def live_log() -> LocalLog:
    store = MemoryStore(clock=ManualClock())
    await store.create(
        StreamMeta(stream_id="s", model="sim", created_at=0.0, checkpoint_interval=10)
    )
    return LocalLog("s", store)


def chunks(count: int) -> list[Chunk]:
    return [Chunk(seq=s, text=f"t{s} ", provider="p", attempt=1) for s in range(1, count + 1)]


async def test_the_objects_stay_while_a_reader_is_attached_and_go_when_it_leaves() -> None:
    log = await live_log()
    reader = Subscription()
    log.attach(reader)
    written = chunks(20)
    await log.append(written)
    await log.append([End(finish_reason="stop", total_seq=20, text_sha256=log.digest())])
    assert log.entries.chunk(20) is written[-1]  # still the writer's object
    log.detach(reader)
    assert log.entries.chunk(20) is not written[-1]  # rebuilt from the buffer now
    assert log.entries.chunk(20) == written[-1]


async def test_an_unread_log_lets_go_at_its_end() -> None:
    log = await live_log()
    written = chunks(5)
    await log.append(written)
    assert log.entries.chunk(5) is written[-1]
    await log.append([End(finish_reason="stop", total_seq=5, text_sha256=log.digest())])
    assert log.entries.chunk(5) is not written[-1]
