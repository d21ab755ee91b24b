"""Agent turns in the engine (issue 12), without gRPC, on a ManualClock:
tool calls held whole or streamed, what a break inside one does, and
reasoning across a break. Every stream's seq is contiguous and its End's
digests are those of the chunks it stored."""

from __future__ import annotations

import json

import pytest

from enginekit import (
    RESET,
    Script,
    build_engine,
    call,
    call_done,
    end_of,
    fail,
    finish,
    text,
    think,
)
from tokenrelay_server.core.digest import ChunkDigests
from tokenrelay_server.core.model import (
    Chunk,
    End,
    GenerationParams,
    LogEntry,
    Message,
    Notice,
    RecoveryPolicy,
    StartRequest,
    StreamMeta,
    Tool,
    ToolCallDelta,
)

TOOLS = (Tool("get_weather", "The weather now", '{"type": "object"}'),)
WHOLE = RecoveryPolicy()
STREAM = RecoveryPolicy(tool_calls="stream")
ARGS = ('{"city": ', '"Zür', 'ich"}')


def chunks(entries: list[LogEntry]) -> list[Chunk]:
    return [e for e in entries if isinstance(e, Chunk)]


def notices(entries: list[LogEntry]) -> list[Notice]:
    return [e for e in entries if isinstance(e, Notice)]


def calls(entries: list[LogEntry]) -> list[ToolCallDelta]:
    return [c.tool_call for c in chunks(entries) if c.tool_call is not None]


def answer(entries: list[LogEntry]) -> str:
    return "".join(c.text for c in chunks(entries) if c.kind == "text")


def reasoning(entries: list[LogEntry]) -> str:
    return "".join(c.text for c in chunks(entries) if c.kind == "reasoning")


def checked_end(entries: list[LogEntry]) -> End:
    """The End, after checking seq is contiguous and both digests match."""
    stored = chunks(entries)
    assert [c.seq for c in stored] == list(range(1, len(stored) + 1))
    end = end_of(entries)
    digests = ChunkDigests.of(stored)
    assert (end.total_seq, end.text_sha256, end.chunks_sha256) == (
        len(stored),
        digests.text_sha256(),
        digests.chunks_sha256(),
    )
    return end


async def run(scripts: list[Script], policy: RecoveryPolicy = WHOLE) -> tuple[list[LogEntry], list]:
    engine = build_engine({"m": [("p", scripts)]})
    session = await engine.start(policy=policy, tools=TOOLS)
    entries = await engine.run_to_end(session)
    assert engine.providers["p"].open_streams == 0
    return entries, engine.providers["p"].requests


# --- WHOLE: a tool call is shown once, complete and valid ------------------------------------


async def test_a_tool_call_is_held_and_released_whole_at_the_finish() -> None:
    entries, requests = await run(
        [
            Script(
                text("Let me", " check."), call(0, "c1", "get_weather", *ARGS), finish("tool_calls")
            )
        ]
    )
    assert answer(entries) == "Let me check."
    assert calls(entries) == [ToolCallDelta(0, "c1", "get_weather", '{"city": "Zürich"}')]
    end = checked_end(entries)
    assert (end.finish_reason, end.partial) == ("tool_calls", False)
    assert requests[0].tools == TOOLS  # the provider was offered the tools


async def test_a_reset_inside_the_arguments_is_recovered_with_one_whole_call() -> None:
    broken = Script(text("Let me", " check."), call(0, "c1", "get_weather", '{"ci'), fail(RESET))
    # The continuation carries on the text (here: nothing more) and calls again.
    continued = Script(call(0, "c2", "get_weather", *ARGS), finish("tool_calls"))
    entries, requests = await run([broken, continued])
    assert [c.kind for c in chunks(entries)] == ["text", "text", "tool_call"]
    (whole,) = calls(entries)
    assert (whole.id, json.loads(whole.arguments)) == ("c2", {"city": "Zürich"})
    assert [n.fault.code for n in notices(entries)] == ["ECONNRESET"]
    assert requests[1].continuation == "Let me check."
    assert requests[1].tools == TOOLS
    assert checked_end(entries).finish_reason == "tool_calls"


async def test_a_reset_inside_a_call_before_any_text_is_a_plain_retry() -> None:
    broken = Script(call(0, "c1", "get_weather", '{"ci'), fail(RESET))
    entries, requests = await run(
        [broken, Script(call(0, "c2", "get_weather", *ARGS), finish("tool_calls"))]
    )
    assert requests[1].continuation == ""
    assert [c.id for c in calls(entries)] == ["c2"]
    assert checked_end(entries).finish_reason == "tool_calls"


async def test_the_end_of_a_call_block_releases_it_so_a_later_break_ends_the_turn() -> None:
    script = Script(call(0, "c1", "get_weather", *ARGS), call_done(0), fail(RESET))
    entries, requests = await run([script])
    assert len(requests) == 1  # nothing is continued past a shown tool call
    assert [c.id for c in calls(entries)] == ["c1"]
    end = checked_end(entries)
    assert (end.finish_reason, end.partial) == ("tool_calls", False)
    (notice,) = notices(entries)
    assert notice.fault.code == "ECONNRESET" and not notice.fault.fatal
    assert "the turn ends with the 1 complete tool call(s)" in notice.fault.message


async def test_a_break_inside_a_second_call_ends_the_turn_with_the_first() -> None:
    script = Script(
        call(0, "c1", "get_weather", *ARGS), call(1, "c2", "get_weather", '{"ci'), fail(RESET)
    )
    entries, requests = await run([script])
    assert len(requests) == 1
    assert [c.id for c in calls(entries)] == ["c1"]  # the second was never shown
    assert checked_end(entries).finish_reason == "tool_calls"


async def test_arguments_that_are_not_json_are_never_shown_and_the_call_is_made_again() -> None:
    bad = Script(
        text("Checking."), call(0, "c1", "get_weather", '{"city": Zür}'), finish("tool_calls")
    )
    good = Script(call(0, "c2", "get_weather", *ARGS), finish("tool_calls"))
    entries, requests = await run([bad, good])
    assert [c.id for c in calls(entries)] == ["c2"]
    assert [n.fault.code for n in notices(entries)] == ["INVALID_TOOL_ARGUMENTS"]
    assert requests[1].continuation == "Checking."
    assert checked_end(entries).finish_reason == "tool_calls"


# --- STREAM: pieces as they arrive; a cut call ends the stream ---------------------------------


async def test_stream_mode_relays_every_piece_and_ends_with_tool_calls() -> None:
    entries, _ = await run(
        [Script(text("Ok."), call(0, "c1", "get_weather", *ARGS), finish("tool_calls"))], STREAM
    )
    pieces = calls(entries)
    assert [p.arguments for p in pieces] == ["", *ARGS]
    assert (pieces[0].id, pieces[0].name) == ("c1", "get_weather")
    assert checked_end(entries).finish_reason == "tool_calls"


async def test_stream_mode_a_reset_inside_a_call_ends_partial_and_is_never_continued() -> None:
    broken = Script(text("Ok."), call(0, "c1", "get_weather", '{"ci'), fail(RESET))
    entries, requests = await run([broken, Script(text("never"), finish())], STREAM)
    assert len(requests) == 1
    end = checked_end(entries)
    assert end.partial and end.finish_reason == "error"
    assert end.error is not None and end.error.code == "TOOL_CALL_INTERRUPTED"
    assert end.error.retryable and "ECONNRESET" in end.error.message
    assert [p.arguments for p in calls(entries)] == ["", '{"ci']


async def test_stream_mode_a_reset_after_a_closed_call_ends_the_turn_complete() -> None:
    script = Script(call(0, "c1", "get_weather", *ARGS), call_done(0), fail(RESET))
    entries, requests = await run([script], STREAM)
    assert len(requests) == 1
    end = checked_end(entries)
    assert (end.finish_reason, end.partial) == ("tool_calls", False)


async def test_stream_mode_a_reset_before_any_tool_call_is_recovered_as_usual() -> None:
    broken = Script(text("The", " answer"), fail(RESET))
    continued = Script(text(" is", " here"), finish())
    entries, requests = await run([broken, continued], STREAM)
    assert answer(entries) == "The answer is here"
    assert requests[1].continuation == "The answer"
    assert not checked_end(entries).partial


# --- reasoning across a break -------------------------------------------------------------------


async def test_reasoning_is_relayed_before_the_answer() -> None:
    entries, _ = await run(
        [Script(think("Hm,", " rain?"), text("Take", " an umbrella."), finish())]
    )
    assert [c.kind for c in chunks(entries)] == ["reasoning", "reasoning", "text", "text"]
    assert (reasoning(entries), answer(entries)) == ("Hm, rain?", "Take an umbrella.")
    assert not checked_end(entries).partial


async def test_a_break_inside_reasoning_keeps_what_was_shown_and_continues_the_answer() -> None:
    broken = Script(think("Hm,", " rain"), fail(RESET))
    # Providers cannot continue a thinking block: the next attempt thinks
    # again from the start. The client saw "Hm, rain" and never sees it twice.
    again = Script(think("Hm,", " rain?", " yes"), text("Take", " an umbrella."), finish())
    entries, requests = await run([broken, again])
    assert reasoning(entries) == "Hm, rain"
    assert answer(entries) == "Take an umbrella."
    assert requests[1].continuation == ""  # no answer text to prefill yet
    assert not checked_end(entries).partial


async def test_a_break_in_the_answer_after_reasoning_prefills_only_the_answer() -> None:
    broken = Script(think("Hm."), text("Take", " an"), fail(RESET))
    again = Script(think("Hm."), text(" umbrella."), finish())
    entries, requests = await run([broken, again])
    assert requests[1].continuation == "Take an"  # reasoning is not in the prefill
    assert (reasoning(entries), answer(entries)) == ("Hm.", "Take an umbrella.")
    assert not checked_end(entries).partial


async def test_reasoning_does_not_count_toward_the_callers_token_budget() -> None:
    engine = build_engine({"m": [("p", [Script(think("a", "b", "c"), text("x", "y"), finish())])]})
    session = await engine.start(max_tokens=2)
    entries = await engine.run_to_end(session)
    assert [c.tokens_so_far for c in chunks(entries)] == [0, 0, 0, 1, 2]


@pytest.mark.parametrize(
    ("policy", "arguments", "finish_reason", "error"),
    [
        pytest.param(WHOLE, '{"a": 1}', "tool_calls", None, id="a whole call: the turn is over"),
        pytest.param(
            STREAM, '{"a": 1}', "tool_calls", None, id="a streamed call whose JSON is whole"
        ),
        pytest.param(
            STREAM, '{"a": ', "error", "TOOL_CALL_INTERRUPTED", id="a streamed call cut mid-way"
        ),
    ],
)
async def test_a_takeover_after_a_shown_tool_call_continues_nothing(
    policy: RecoveryPolicy, arguments: str, finish_reason: str, error: str | None
) -> None:
    # Another replica stored the stream up to a tool call and died (its
    # lease lapsed): this one takes it over from the store.
    engine = build_engine({"m": [("p", [Script(text("never"), finish())])]})
    request = StartRequest(
        model="m", messages=(Message("user", "hello"),), policy=policy, tools=TOOLS
    )
    meta = StreamMeta("st-dead", "m", 0.0, 10, request=request)
    await engine.store.create(meta)
    shown = ToolCallDelta(0, "c1", "get_weather", arguments)
    await engine.store.append(
        "st-dead",
        [
            Chunk(1, "Checking.", "p", 1),
            Chunk(2, "", "p", 1, kind="tool_call", tool_call=shown),
        ],
    )
    session = await engine.hub.resume("st-dead", 0)
    entries = await engine.run_to_end(session)
    assert engine.providers["p"].requests == []  # nothing was asked of the provider
    end = checked_end(entries)
    assert end.finish_reason == finish_reason
    assert (end.error.code if end.error is not None else None) == error


async def test_a_takeover_after_the_last_token_of_max_tokens_asks_for_no_more() -> None:
    # The owner stored the 3rd token of max_tokens = 3 and died before its
    # End: the answer is complete; continuing would add a 4th token.
    engine = build_engine({"m": [("p", [Script(text(" more"), finish())])]})
    request = StartRequest(
        model="m", messages=(Message("user", "hello"),), params=GenerationParams(max_tokens=3)
    )
    meta = StreamMeta("st-full", "m", 0.0, 10, request=request)
    await engine.store.create(meta)
    await engine.store.append(
        "st-full",
        [
            Chunk(seq, word, "p", 1, tokens_so_far=seq)
            for seq, word in enumerate(["a", " b", " c"], 1)
        ],
    )
    session = await engine.hub.resume("st-full", 0)
    entries = await engine.run_to_end(session)
    assert engine.providers["p"].requests == []
    end = checked_end(entries)
    assert (end.finish_reason, end.total_seq, end.partial) == ("length", 3, False)
