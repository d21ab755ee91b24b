"""Log entries and stream metadata for store-level tests (the group commit,
the watcher): the smallest values the stores accept."""

from __future__ import annotations

from tokenrelay_server.core.model import Chunk, End, StreamMeta


def chunk(seq: int) -> Chunk:
    return Chunk(seq=seq, text=f"t{seq} ", provider="sim", attempt=1)


def end(total_seq: int) -> End:
    return End(finish_reason="stop", total_seq=total_seq, text_sha256="0" * 64)


def meta(stream_id: str) -> StreamMeta:
    return StreamMeta(stream_id=stream_id, model="sim", created_at=0.0, checkpoint_interval=10)
