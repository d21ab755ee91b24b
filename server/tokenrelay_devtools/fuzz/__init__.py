"""Fuzzing the gateway's edge (issue 13, item 7).

- `draw.py`: where the choices come from: a seeded `random.Random`
  (`RandomDraw`, for `bench/fuzz.py` and the CI run: case *i* of seed *S* is
  the same on every machine) or hypothesis (tests/test_fuzz_requests.py adapts
  its `data.draw` to the same protocol), so one generator serves both.
- `generate.py`: requests drawn from the contract's descriptors (oneofs,
  proto3 optionals, repeated fields, maps, unknown enum values, empty and huge
  strings, integer edges, nested messages), 1-4 frames per call, some of them
  raw mutated bytes; the call's credentials (valid, missing, malformed,
  unknown, foreign keys) and resume tokens (valid, tampered, foreign, expired).
- `run.py`: plays cases against a gateway over a real port (frames sent as
  they are, through identity serializers), tallies the statuses, checks each
  outcome and, afterwards, that the gateway is back where it started (the
  Admin overview's streams and asyncio tasks, health).
- `corpus.py`: cases that once failed, stored as JSON and replayed in CI.
"""
