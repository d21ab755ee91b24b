"""LiveStats (obs/live.py), the per-chunk observer, fed engine events by hand:
gaps, recovery latency, delivered tokens, the windows `tokenrelay top` reads,
and nothing left behind per stream."""

from __future__ import annotations

import pytest

from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.model import End, Usage
from tokenrelay_server.engine.events import (
    AttemptEnded,
    ChunkStored,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
    TakenOver,
)
from tokenrelay_server.obs.live import RECENT_ACTIONS, HistogramCell, LiveStats

RESET = Fault(
    type=ErrorType.NETWORK,
    code="ECONNRESET",
    message="reset",
    retryable=True,
    suggested_action=SuggestedAction.RESUME,
)


def chunk(
    at: float, seq: int, tokens: int, *, stream: str = "s", provider: str = "p"
) -> ChunkStored:
    return ChunkStored(stream, "m", provider, seq, tokens, at)


def action(at: float, step: str = "resume", *, stream: str = "s") -> RecoveryAction:
    return RecoveryAction(stream, "m", step, RESET, "p", "q", 0.5, 3, at)


def failed(at: float, code: str = "ECONNRESET") -> AttemptEnded:
    fault = Fault(
        type=ErrorType.NETWORK,
        code=code,
        message="x",
        retryable=True,
        suggested_action=SuggestedAction.RETRY,
    )
    return AttemptEnded("s", "m", "p", "pm", 1, "failure", fault, 0, 0, 0, None, 0.1, at)


def ended(at: float, stream: str = "s") -> StreamEnded:
    end = End(finish_reason="stop", total_seq=3, text_sha256="", usage=Usage())
    return StreamEnded(stream, "m", end, 1, 1.0, at)


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        pytest.param(0.0005, "0.001", id="a value below every bound is in the first bucket"),
        pytest.param(0.001, "0.001", id="a value on a bound counts in that bound's bucket"),
        pytest.param(0.0011, "0.0025", id="a value just above a bound counts in the next"),
        pytest.param(99.0, "+Inf", id="a value above every bound counts only in +Inf"),
    ],
)  # fmt: skip
def test_histogram_cells_count_a_value_in_the_bucket_le_that_holds_it(
    value: float, bucket: str
) -> None:
    cell = HistogramCell((0.001, 0.0025, 1.0))
    cell.observe(value)
    pairs = cell.cumulative()
    first = next(le for le, count in pairs if count)  # cumulative: 0 below it, 1 from it on
    assert first == (bucket if bucket == "+Inf" else repr(float(bucket)))
    assert pairs[-1] == ("+Inf", 1) and cell.sum == value


def test_gaps_are_between_chunks_of_a_stream_and_the_first_chunk_has_none() -> None:
    live = LiveStats()
    live(StreamStarted("s", "m", 0.0))
    live(StreamStarted("t", "m", 0.0))
    live(chunk(1.0, 1, 1))
    live(chunk(1.5, 1, 1, stream="t"))  # another stream between: not a gap of s
    live(chunk(1.02, 2, 2))
    live(chunk(1.07, 3, 3))
    cell = live.cells[("m", "p")]
    assert cell.chunks == 4 and cell.tokens == 4
    assert cell.gaps.count == 2
    assert cell.gaps.sum == pytest.approx(0.07)


def test_the_chunk_after_recovery_actions_is_recovery_latency_from_the_first_action() -> None:
    live = LiveStats()
    live(StreamStarted("s", "m", 0.0))
    live(chunk(1.0, 1, 1))
    live(action(2.0, "resume"))
    live(action(3.0, "fallback"))  # the resume failed again: the same recovery
    live(chunk(3.5, 2, 2))
    live(chunk(3.6, 3, 3))
    assert set(live.recovery) == {"resume"}
    assert live.recovery["resume"].count == 1
    assert live.recovery["resume"].sum == pytest.approx(1.5)
    gaps = live.cells[("m", "p")].gaps
    assert gaps.count == 1 and gaps.sum == pytest.approx(0.1)  # not the 2.5 s recovery


def test_tokens_count_what_each_chunk_added_to_the_stream() -> None:
    live = LiveStats()
    live(StreamStarted("s", "m", 0.0))
    live(chunk(1.0, 1, 2))
    live(chunk(1.1, 2, 5, provider="q"))  # a fallback to q: 3 more tokens, from q
    assert live.cells[("m", "p")].tokens == 2
    assert live.cells[("m", "q")].tokens == 3


def test_after_a_takeover_the_first_chunk_is_takeover_latency_and_its_tokens_unknown() -> None:
    live = LiveStats()
    live(TakenOver("s", "m", 40, 10.0))
    live(chunk(10.25, 41, 100))
    live(chunk(10.3, 42, 101))
    assert live.recovery["takeover"].count == 1
    assert live.recovery["takeover"].sum == pytest.approx(0.25)
    assert live.cells[("m", "p")].tokens == 1  # the 100 restored tokens are not ours
    assert live.recent[-1].step == "takeover"


def test_tokens_per_second_covers_the_last_ten_seconds() -> None:
    live = LiveStats()
    live(StreamStarted("s", "m", 0.0))
    for second in range(20):
        live(chunk(100.0 + second, second + 1, (second + 1) * 3))
    # At 119.5 the window holds seconds 110..119: ten chunks of 3 tokens.
    assert live.tokens_per_second(119.5) == pytest.approx(3.0)
    assert live.tokens_per_second(125.0) == pytest.approx(1.2)  # 116..125: 116..119 had some
    assert live.tokens_per_second(500.0) == 0.0


def test_errors_per_minute_by_code_forget_what_is_older_than_a_minute() -> None:
    live = LiveStats()
    live(failed(10.0, "HTTP_500"))
    live(failed(30.0, "HTTP_500"))
    live(failed(65.0, "ECONNRESET"))
    assert live.errors_per_minute(65.0) == {"HTTP_500": 2, "ECONNRESET": 1}
    assert live.errors_per_minute(71.0) == {"HTTP_500": 1, "ECONNRESET": 1}
    assert live.errors_per_minute(200.0) == {}


def test_recent_actions_are_a_bounded_ring() -> None:
    live = LiveStats()
    for index in range(RECENT_ACTIONS + 5):
        live(action(float(index), stream=f"s{index}"))
    assert len(live.recent) == RECENT_ACTIONS
    assert live.recent[-1].stream_id == f"s{RECENT_ACTIONS + 4}"
    assert live.recent[0].code == "ECONNRESET" and live.recent[0].to_provider == "q"


def test_an_ended_stream_leaves_no_state_behind() -> None:
    live = LiveStats()
    for name in ("a", "b"):
        live(StreamStarted(name, "m", 0.0))
        live(chunk(1.0, 1, 1, stream=name))
        live(action(2.0, stream=name))
        live(ended(3.0, stream=name))
    assert live.tracked_streams == 0
