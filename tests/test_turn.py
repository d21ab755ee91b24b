"""The turn shaper (core/turn.py): what an attempt's deltas become for the
client, one table row per rule, and what the client was shown of tool calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay_server.core.errors import DataError
from tokenrelay_server.core.model import Chunk, ToolCallDelta, ToolCallMode
from tokenrelay_server.core.stitch import Stitcher
from tokenrelay_server.core.turn import Piece, TurnShaper, TurnState, json_object_problem

Event = tuple[object, ...]


def T(text: str) -> Event:
    return ("text", text)


def R(text: str) -> Event:
    return ("reasoning", text)


def C(index: int, arguments: str = "", id_: str = "", name: str = "") -> Event:
    return ("call", ToolCallDelta(index, id_, name, arguments))


def DONE(index: int) -> Event:
    return ("done", index)


FINISH: Event = ("finish",)


def play(
    events: list[Event],
    *,
    mode: ToolCallMode = "whole",
    show_reasoning: bool = True,
    delivered: str = "",
    state: TurnState | None = None,
) -> tuple[list[Piece], TurnState]:
    """Feed `events`; every returned piece counts as shown, as the engine does."""
    state = state or TurnState(mode)
    shaper = TurnShaper(
        state,
        show_reasoning=show_reasoning,
        stitcher=Stitcher(delivered) if delivered else None,
    )
    out: list[Piece] = []
    for event in events:
        if event[0] == "text":
            pieces = shaper.text(str(event[1]))
        elif event[0] == "reasoning":
            pieces = shaper.reasoning(str(event[1]))
        elif event[0] == "call":
            assert isinstance(event[1], ToolCallDelta)
            pieces = shaper.tool_call(event[1])
        elif event[0] == "done":
            pieces = shaper.tool_call_done(int(event[1]))  # type: ignore[call-overload]
        else:
            pieces = shaper.finish()
        for piece in pieces:
            state.shown(piece)
        out += pieces
    return out, state


def text(value: str) -> Piece:
    return Piece("text", value)


def call(index: int, id_: str, name: str, arguments: str, deltas: int = 1) -> Piece:
    return Piece("tool_call", tool_call=ToolCallDelta(index, id_, name, arguments), deltas=deltas)


WHOLE_ROWS = [
    pytest.param(
        [T("Hel"), T("lo"), FINISH],
        [text("Hel"), text("lo")],
        id="text passes through keeping the provider's deltas",
    ),
    pytest.param(
        [R("hmm"), T("42"), FINISH],
        [Piece("reasoning", "hmm"), text("42")],
        id="reasoning is shown by the attempt that starts the stream",
    ),
    pytest.param(
        [T("Sure."), C(0, "", "c1", "f"), C(0, '{"a"'), C(0, ": 1}"), FINISH],
        [text("Sure."), call(0, "c1", "f", '{"a": 1}', deltas=3)],
        id="a call is held to the finish and released whole, counting its deltas",
    ),
    pytest.param(
        [C(0, "{}", "c1", "f"), C(1, "", "c2", "g"), C(1, '{"x": []}'), FINISH],
        [call(0, "c1", "f", "{}"), call(1, "c2", "g", '{"x": []}', deltas=2)],
        id="the next call's first piece completes the one before",
    ),
    pytest.param(
        [C(0, '{"a": 1}', "c1", "f"), DONE(0)],
        [call(0, "c1", "f", '{"a": 1}')],
        id="the provider closing the call's block releases it before the finish",
    ),
    pytest.param(
        [C(0, "", "c1", "f"), FINISH],
        [call(0, "c1", "f", "{}")],
        id="a call whose arguments never came has the empty object",
    ),
    pytest.param(
        [C(0, "{", "c1", "f"), C(0, "}", "c1", "f"), FINISH],
        [call(0, "c1", "f", "{}", deltas=2)],
        id="an id and name repeated on every piece are taken once",
    ),
    pytest.param(
        [C(0, "{}", "c1", "f"), T("Done."), FINISH],
        [call(0, "c1", "f", "{}"), text("Done.")],
        id="text after a call completes the call first",
    ),
    pytest.param(
        [C(0, '{"a":', "c1", "f"), C(0, "1")],
        [],
        id="a call the attempt broke inside shows nothing",
    ),
    pytest.param(
        [C(0, "{}", "c1", "f"), DONE(3), C(0, "")],
        [],
        id="the end of another call's block does not release the held one",
    ),
]


@pytest.mark.parametrize(("events", "expected"), WHOLE_ROWS)
def test_whole_mode(events: list[Event], expected: list[Piece]) -> None:
    assert play(events)[0] == expected


STREAM_ROWS = [
    pytest.param(
        [T("Sure."), C(0, "", "c1", "f"), C(0, '{"a"'), C(0, ""), C(0, ": 1}"), FINISH],
        [
            text("Sure."),
            call(0, "c1", "f", ""),
            call(0, "", "", '{"a"'),
            call(0, "", "", ": 1}"),
        ],
        id="every piece goes out as it arrives and an empty one is dropped",
    ),
    pytest.param(
        [C(0, "not json", "c1", "f"), FINISH],
        [call(0, "c1", "f", "not json")],
        id="nothing is checked: the client asked for the provider's pieces",
    ),
]


@pytest.mark.parametrize(("events", "expected"), STREAM_ROWS)
def test_stream_mode(events: list[Event], expected: list[Piece]) -> None:
    assert play(events, mode="stream")[0] == expected


@pytest.mark.parametrize(
    ("events", "problem"),
    [
        pytest.param([C(0, '{"a": ', "c1", "f"), FINISH], "not JSON", id="cut JSON"),
        pytest.param([C(0, "[1]", "c1", "f"), FINISH], "an array", id="an array"),
        pytest.param([C(0, '{"a": NaN}', "c1", "f"), FINISH], "NaN", id="NaN, which JSON lacks"),
        pytest.param([C(0, "{}", "c1", ""), FINISH], "no tool name", id="a call with no name"),
        pytest.param(
            [C(0, "{", "c1", "f"), C(1, "{}", "c2", "g")],
            "not JSON",
            id="the next call starting completes a broken one",
        ),
    ],
)
def test_a_complete_call_that_is_not_usable_is_invalid_tool_arguments(
    events: list[Event], problem: str
) -> None:
    with pytest.raises(DataError) as caught:
        play(events)
    fault = caught.value.fault
    assert (fault.code, fault.retryable) == ("INVALID_TOOL_ARGUMENTS", True)
    assert problem in fault.message


def test_a_continuation_drops_reasoning_and_stitches_the_text() -> None:
    pieces, _ = play(
        [R("let me"), R(" think"), T("stream surv"), T("ives")],
        show_reasoning=False,
        delivered="The stream",
    )
    # The model repeated "stream" (the stitcher drops it) and thought again (dropped).
    assert "".join(p.text for p in pieces) == " survives"
    assert all(p.kind == "text" for p in pieces)


def test_text_held_by_the_stitcher_goes_out_before_a_tool_call() -> None:
    pieces, _ = play(
        [T("o"), C(0, "{}", "c1", "f"), FINISH], show_reasoning=False, delivered="Hello"
    )
    assert [p.kind for p in pieces] == ["text", "tool_call"]
    assert pieces[0].text == "o"


def test_reasoning_does_not_count_toward_the_answer() -> None:
    assert not Piece("reasoning", "x").counts_toward_answer
    assert Piece("text", "x").counts_toward_answer
    assert call(0, "c", "f", "{}").counts_toward_answer


# --- what was shown: TurnState ------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "mode", "complete", "open_call"),
    [
        pytest.param(
            [C(0, "{}", "c1", "f"), C(1, "{", "c2", "g")],
            "whole",
            1,
            None,
            id="whole: a released call is complete; a held one was never shown",
        ),
        pytest.param(
            [C(0, "{", "c1", "f")],
            "stream",
            0,
            0,
            id="stream: a call shown in part is open",
        ),
        pytest.param(
            [C(0, "{}", "c1", "f"), C(1, "{", "c2", "g")],
            "stream",
            1,
            1,
            id="stream: the next call's piece completes the one before",
        ),
        pytest.param(
            [C(0, "{}", "c1", "f"), DONE(0)],
            "stream",
            1,
            None,
            id="stream: the end of its block completes the call",
        ),
        pytest.param(
            [C(0, "{}", "c1", "f"), T("ok")],
            "stream",
            1,
            None,
            id="stream: text after the call completes it",
        ),
        pytest.param(
            [C(0, "{}", "c1", "f"), FINISH],
            "stream",
            1,
            None,
            id="stream: the finish completes the call",
        ),
        pytest.param(
            [C(0, "", "", "")],
            "stream",
            0,
            None,
            id="stream: a call nothing was shown of is not open",
        ),
    ],
)
def test_what_the_client_was_shown_of_tool_calls(
    events: list[Event], mode: ToolCallMode, complete: int, open_call: int | None
) -> None:
    _, state = play(events, mode=mode)
    assert (state.complete_calls, state.open_call) == (complete, open_call)


def tool_chunk(seq: int, index: int, arguments: str) -> Chunk:
    return Chunk(
        seq, "", "p", 1, kind="tool_call", tool_call=ToolCallDelta(index, "", "", arguments)
    )


@pytest.mark.parametrize(
    ("chunks", "mode", "complete", "open_call"),
    [
        pytest.param(
            [Chunk(1, "hi", "p", 1)], "stream", 0, None, id="a log of text has no tool calls"
        ),
        pytest.param(
            [tool_chunk(1, 0, "{}"), tool_chunk(2, 1, "{}")],
            "whole",
            2,
            None,
            id="whole: every stored call is complete",
        ),
        pytest.param(
            [tool_chunk(1, 0, '{"a"'), tool_chunk(2, 0, ": 1}")],
            "stream",
            1,
            None,
            id="stream: a last call whose arguments are whole JSON is taken for complete",
        ),
        pytest.param(
            [tool_chunk(1, 0, "{}"), tool_chunk(2, 1, '{"a"')],
            "stream",
            1,
            1,
            id="stream: a last call cut mid-arguments is open",
        ),
    ],
)
def test_the_state_a_stored_log_shows(
    chunks: list[Chunk], mode: ToolCallMode, complete: int, open_call: int | None
) -> None:
    state = TurnState.restored(mode, chunks)
    assert (state.complete_calls, state.open_call) == (complete, open_call)


@given(
    st.lists(st.text(alphabet='{}[]":, a1', max_size=4), min_size=1, max_size=6),
    st.integers(0, 6),
)
def test_a_whole_call_is_its_pieces_joined_whichever_way_they_were_cut(
    pieces: list[str], cut: int
) -> None:
    arguments = "".join(pieces)
    events = [C(0, p, "c1", "f") for p in pieces] + [FINISH]
    valid = json_object_problem(arguments or "{}") is None
    if not valid:
        with pytest.raises(DataError):
            play(events)
        return
    shown, _ = play(events)
    assert shown == [call(0, "c1", "f", arguments or "{}", deltas=len(pieces))]
    # Cut anywhere before the finish: nothing of it was shown.
    assert play(events[: min(cut, len(pieces))])[0] == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param('{"a": [1, {"b": null}]}', None, id="an object"),
        pytest.param("  {}  ", None, id="whitespace around an object"),
        pytest.param("", "not JSON", id="nothing"),
        pytest.param('"{}"', "a string", id="a string holding an object"),
        pytest.param("1e999", "a number", id="a number"),
        pytest.param('{"a": Infinity}', "Infinity", id="Infinity, which JSON lacks"),
        pytest.param("{} {}", "not JSON", id="two objects"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested", id="nesting past the limit"),
    ],
)
def test_json_object_problem(text: str, problem: str | None) -> None:
    found = json_object_problem(text)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
