"""Where a fuzz case's choices come from.

The generator (generate.py) asks a `Draw` for every decision. `RandomDraw`
answers from a seeded `random.Random`; the hypothesis test adapts
`st.data()` to the same protocol, so the two fuzzers share one generator and
one vocabulary.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")

# Code points a protobuf string can hold: no lone surrogates (they cannot be
# encoded as UTF-8; invalid UTF-8 on the wire comes from mutated frames).
_TEXT_RANGES = ((0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x6FF), (0x1F300, 0x1F64F))


class Draw(Protocol):
    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        ...

    def roll(self, sides: int) -> int:
        """A fair roll in [0, sides): for how often a branch is taken."""
        ...

    def choice(self, options: Sequence[T]) -> T: ...

    def binary(self, max_size: int) -> bytes: ...

    def text(self, max_size: int) -> str: ...

    def floating(self) -> float: ...


class RandomDraw:
    """Choices from one `random.Random`: the same seed, the same case."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def integer(self, low: int, high: int) -> int:
        # Biased towards the ends, as hypothesis is: edges find bugs.
        roll = self._rng.random()
        if roll < 0.1:
            return low
        if roll < 0.2:
            return high
        return self._rng.randint(low, high)

    def roll(self, sides: int) -> int:
        return self._rng.randrange(sides)

    def choice(self, options: Sequence[T]) -> T:
        return options[self._rng.randrange(len(options))]

    def binary(self, max_size: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(0, max_size))

    def text(self, max_size: int) -> str:
        length = self._rng.randint(0, max_size)
        characters = []
        for _ in range(length):
            low, high = self.choice(_TEXT_RANGES)
            characters.append(chr(self._rng.randint(low, high)))
        return "".join(characters)

    def floating(self) -> float:
        special = [0.0, -0.0, 1.0, 2.0, 2.0001, -1.0, float("inf"), float("-inf"), float("nan")]
        if self._rng.random() < 0.5:
            return self.choice(special)
        return self._rng.uniform(-1e6, 1e6)
