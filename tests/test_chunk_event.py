"""The per-token StreamEvent (api/servicer.py `chunk_event`): written into the
event's own submessage for text chunks, it must be the very message the
general path builds, for every kind of chunk and any text (an empty text
included: the `content` oneof still says text)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenrelay.v1 import relay_pb2
from tokenrelay_server.api.servicer import chunk_event, chunk_to_proto
from tokenrelay_server.core.model import Chunk, ToolCallDelta

texts = st.text(max_size=40)
tool_calls = st.builds(
    ToolCallDelta,
    index=st.integers(0, 5),
    id=texts,
    name=texts,
    arguments=texts,
)
chunks = st.one_of(
    st.builds(
        Chunk,
        seq=st.integers(1, 2**31),
        text=texts,
        provider=texts,
        attempt=st.integers(1, 50),
        tokens_so_far=st.integers(0, 2**31),
        kind=st.sampled_from(["text", "reasoning"]),
    ),
    st.builds(
        Chunk,
        seq=st.integers(1, 2**31),
        text=st.just(""),
        provider=texts,
        attempt=st.integers(1, 50),
        kind=st.just("tool_call"),
        tool_call=tool_calls,
    ),
)


@given(chunks)
def test_the_per_token_event_is_the_general_paths_message(chunk: Chunk) -> None:
    fast = chunk_event(chunk)
    general = relay_pb2.StreamEvent(chunk=chunk_to_proto(chunk))
    assert fast == general
    assert fast.SerializeToString() == general.SerializeToString()
    assert fast.chunk.WhichOneof("content") == {"text": "text", "reasoning": "reasoning"}.get(
        chunk.kind, "tool_call"
    )
