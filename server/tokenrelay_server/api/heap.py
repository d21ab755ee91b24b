"""The collector's side of a long-running gateway (issue 10).

A paced stream's inter-token jitter was mostly the pauses of Python's
cyclic collector. A full (generation-2) collection walks every tracked
object; after start-up most of them are the imported modules' functions,
classes and dicts (~95,000 on the gateway), which never become garbage, and
with the default thresholds a few hundred streams starting and ending set
one off every second or two. `tune_collector`, called once the server is up:

- freezes the start-up heap (`gc.freeze`): a full collection then walks only
  what streams create;
- makes full collections ten times rarer (the third threshold 10 -> 100:
  one full collection per 100 generation-1 collections, not 10), so a
  stream sees one far less often. Young collections keep their defaults:
  frequent short pauses (~1-2 ms) are what a 10 ms jitter bound can absorb,
  rare long ones are not.

Measured with `bench/redis_speed.py --only paced` (memory store, 250-350
streams at 50 tok/s): the longest pause of a level was 28-65 ms, from 1-3
full collections, before; 3-5 ms, with none, after.
"""

from __future__ import annotations

import gc

FULL_COLLECTION_EVERY = 100  # generation-1 collections (CPython's default: 10)


def tune_collector() -> int:
    """Collect once, freeze what is left (the start-up heap) and space out
    full collections; returns how many objects are frozen. Once per process,
    after start-up: a frozen object is never collected (a cycle in it stays
    in memory), so a process that keeps starting servers (the tests) must
    not call it."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    return gc.get_freeze_count()
