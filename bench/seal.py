"""What sealing a store value at rest costs (store/seal.py), against the
codec work every stored chunk already pays, measured in the same run.

    .venv/bin/python bench/seal.py [--size 100] [--number 20000] [--repeat 5]

Per value of `--size` bytes (a stored chunk's JSON is about 100): seal,
open, and seal + open (AES-256-GCM, a random nonce each), and, as the
ceiling it is compared with, a chunk's `encode_entry` + `decode_entry` (the
JSON a stored chunk costs today). The best of `--repeat` timeit runs of
`--number` each, in µs per value; the ratio says how much sealing adds to
what storing a chunk already spends on encoding it. The last line is the
same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import timeit
from collections.abc import Callable

from tokenrelay_server.core.model import Chunk
from tokenrelay_server.store.codec import decode_entry, encode_entry
from tokenrelay_server.store.seal import Sealer


def best_us(statement: Callable[[], object], number: int, repeat: int) -> float:
    runs = timeit.repeat(statement, number=number, repeat=repeat)
    return min(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    sealer = Sealer([("k2", os.urandom(32)), ("k1", os.urandom(32))], context=b"stream-log")
    stream_id = os.urandom(16).hex().encode()
    value = os.urandom(args.size)
    sealed_value = sealer.seal(value, aad=stream_id)
    assert sealer.open(sealed_value, aad=stream_id) == value
    # A chunk whose stored JSON is about --size bytes.
    bare = len(encode_entry(Chunk(seq=1234, text="", provider="sim", attempt=1)))
    chunk = Chunk(seq=1234, text="x" * max(args.size - bare, 1), provider="sim", attempt=1)
    encoded = encode_entry(chunk)

    seal_us = best_us(lambda: sealer.seal(value, aad=stream_id), args.number, args.repeat)
    open_us = best_us(lambda: sealer.open(sealed_value, aad=stream_id), args.number, args.repeat)
    both_us = best_us(
        lambda: sealer.open(sealer.seal(value, aad=stream_id), aad=stream_id),
        args.number,
        args.repeat,
    )
    codec_us = best_us(lambda: decode_entry(encode_entry(chunk)), args.number, args.repeat)
    print(
        f"value {args.size} B, sealed {len(sealed_value)} B "
        f"(+{len(sealed_value) - args.size} B: header, nonce, tag)"
    )
    print(f"seal          {seal_us:6.2f} µs")
    print(f"open          {open_us:6.2f} µs")
    print(f"seal + open   {both_us:6.2f} µs")
    print(
        f"ceiling: a chunk's encode_entry + decode_entry ({len(encoded)} B JSON) {codec_us:6.2f} µs"
    )
    print(f"ratio seal+open / codec: {both_us / codec_us:.2f}")
    summary = {
        "size": args.size,
        "sealed_size": len(sealed_value),
        "seal_us": round(seal_us, 3),
        "open_us": round(open_us, 3),
        "seal_open_us": round(both_us, 3),
        "codec_us": round(codec_us, 3),
        "ratio": round(both_us / codec_us, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
