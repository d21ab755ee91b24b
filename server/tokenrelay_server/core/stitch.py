"""Seamless text across a continuation.

A model asked to continue a partial answer often repeats its last few
characters. The `Stitcher` holds back the start of the continuation until it
knows the longest suffix of the delivered text (within `window` characters,
at least `min_overlap`) that the continuation starts with, drops that much,
and passes everything else through untouched. Sans-IO: text in, text out.
"""

from __future__ import annotations


def overlap_length(delivered: str, continuation: str, *, window: int, min_overlap: int) -> int:
    """The longest k (min_overlap ≤ k ≤ window) with delivered[-k:] ==
    continuation[:k]; 0 when there is none."""
    longest = min(window, len(delivered), len(continuation))
    for k in range(longest, min_overlap - 1, -1):
        if delivered.endswith(continuation[:k]):
            return k
    return 0


class Stitcher:
    """Feed the continuation's deltas; get back the pieces to emit.

    Pieces keep the provider's delta boundaries (a chunk stays one delta, so
    chunk counts still track tokens); only the repeated characters are cut
    from the front. When the continuation breaks while its start is still
    held, the held text is dropped: it may be a repeat, and the next attempt
    continues from what was delivered and writes it again."""

    def __init__(self, delivered: str, *, window: int = 256, min_overlap: int = 4) -> None:
        self._tail = delivered[-window:] if window else ""
        self._window = min(window, len(self._tail))
        self._min_overlap = max(min_overlap, 1)
        self._held: list[str] = []
        self._held_text = ""
        self._decided = self._window < self._min_overlap
        self.trimmed = 0  # characters dropped as repeated

    @property
    def decided(self) -> bool:
        """The overlap is settled: from now on every piece passes as it is."""
        return self._decided

    def feed(self, text: str) -> list[str]:
        """Pieces to emit now ([] while the start is still undecided)."""
        if self._decided:
            return [text] if text else []
        self._held.append(text)
        self._held_text += text
        if self._could_grow():
            return []
        return self._release()

    def finish(self) -> list[str]:
        """The continuation ended: emit whatever is still held."""
        if self._decided:
            return []
        return self._release()

    def _could_grow(self) -> bool:
        """Whether a longer overlap than the held text can already prove is
        still possible: some suffix of the tail longer than the held text
        starts with all of it."""
        held = self._held_text
        if len(held) >= self._window:
            return False
        for k in range(len(held) + 1, self._window + 1):
            if self._tail[-k:].startswith(held):
                return True
        return False

    def _release(self) -> list[str]:
        self._decided = True
        cut = overlap_length(
            self._tail, self._held_text, window=self._window, min_overlap=self._min_overlap
        )
        self.trimmed = cut
        out: list[str] = []
        for piece in self._held:
            if cut >= len(piece):
                cut -= len(piece)
                continue
            out.append(piece[cut:])
            cut = 0
        self._held, self._held_text = [], ""
        return out
