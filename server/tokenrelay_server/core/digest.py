"""The two digests a StreamEnd carries, computed as chunks are stored.

- `text_sha256`: hex SHA-256 of the UTF-8 text of the answer-text chunks in
  seq order (reasoning and tool calls are not in it), as before issue 12.
- `chunks_sha256`: hex SHA-256 of every chunk in seq order, each as one
  record (relay.proto, StreamEnd.chunks_sha256):

      text:      "T" len(utf8) utf8
      reasoning: "R" len(utf8) utf8
      tool call: "C" index len(id) id len(name) name len(arguments) arguments

  where index and every len are 4-byte big-endian unsigned integers and
  strings are UTF-8. The lengths make the encoding unambiguous: no two
  different chunk sequences have the same records.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from tokenrelay_server.core.model import Chunk

U32 = struct.Struct(">I")  # every index and length of a record


def _string(value: str) -> bytes:
    data = value.encode()
    return U32.pack(len(data)) + data


def chunk_record(chunk: Chunk) -> bytes:
    """The bytes `chunks_sha256` takes for one chunk."""
    if chunk.kind == "tool_call":
        call = chunk.tool_call
        assert call is not None, "a tool_call chunk carries its ToolCallDelta"
        return (
            b"C"
            + U32.pack(call.index)
            + _string(call.id)
            + _string(call.name)
            + (_string(call.arguments))
        )
    return (b"R" if chunk.kind == "reasoning" else b"T") + _string(chunk.text)


class ChunkDigests:
    """Both digests of a stream so far; `add` each chunk in seq order."""

    __slots__ = ("_chunks", "_text")

    def __init__(self) -> None:
        self._text = hashlib.sha256()
        self._chunks = hashlib.sha256()

    def add(self, chunk: Chunk) -> None:
        if chunk.kind == "text":
            self._text.update(chunk.text.encode())
        self._chunks.update(chunk_record(chunk))

    def text_sha256(self) -> str:
        return self._text.hexdigest()

    def chunks_sha256(self) -> str:
        return self._chunks.hexdigest()

    @classmethod
    def of(cls, chunks: Iterable[Chunk]) -> ChunkDigests:
        digests = cls()
        for chunk in chunks:
            digests.add(chunk)
        return digests
