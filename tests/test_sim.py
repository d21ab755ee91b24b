"""The simulator's sans-IO core: determinism, continuation, fault scripts."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import NetworkError, RequestError
from tokenrelay_server.core.model import GenerationParams, Message, Tool, ToolCall, ToolChoice
from tokenrelay_server.upstream.base import (
    CONTINUE_INSTRUCTION,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from tokenrelay_server.upstream.sim import (
    ARGUMENT_FRAGMENT_CHARS,
    FaultStep,
    SimAnswer,
    SimEvent,
    SimProvider,
    SimSettings,
    parse_fault_script,
    plan_attempt,
    split_continuation,
)

PROMPT = (Message("user", "explain streams"),)


def test_the_same_conversation_gives_the_same_text() -> None:
    assert SimAnswer(PROMPT).text(100) == SimAnswer(PROMPT).text(100)


def test_seed_and_messages_change_the_text() -> None:
    base = SimAnswer(PROMPT).text(50)
    assert SimAnswer(PROMPT, seed="7").text(50) != base
    assert SimAnswer((Message("user", "something else"),)).text(50) != base


def test_a_clean_attempt_sends_max_tokens_pieces() -> None:
    plan = plan_attempt(PROMPT, max_tokens=42, attempt=1, settings=SimSettings())
    assert len(plan.pieces) == 42
    assert "".join(plan.pieces) == SimAnswer(PROMPT).text(42)
    assert plan.fault == FaultStep("ok")


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 120), cut=st.integers(0, 120), as_prefill=st.booleans())
def test_broken_and_continued_equals_clean(total: int, cut: int, as_prefill: bool) -> None:
    cut = min(cut, total)
    clean = SimAnswer(PROMPT).text(total)
    delivered = SimAnswer(PROMPT).text(cut)
    messages = (*PROMPT, Message("assistant", delivered))
    if not as_prefill:
        messages += (Message("user", CONTINUE_INSTRUCTION),)
    if not delivered:
        messages = PROMPT
    plan = plan_attempt(messages, max_tokens=total - cut, attempt=1, settings=SimSettings())
    assert delivered + "".join(plan.pieces) == clean


@settings(max_examples=40, deadline=None)
@given(total=st.integers(2, 80), data=st.data())
def test_a_prefix_cut_inside_a_token_continues_mid_token(total: int, data: st.DataObject) -> None:
    clean = SimAnswer(PROMPT).text(total)
    cut = data.draw(st.integers(1, len(clean) - 1))
    plan = plan_attempt(
        PROMPT, max_tokens=total, attempt=1, settings=SimSettings(), continuation=clean[:cut]
    )
    assert (clean[:cut] + "".join(plan.pieces)).startswith(clean)


def test_overlap_repeats_the_end_of_the_prefix() -> None:
    delivered = SimAnswer(PROMPT).text(10)
    plan = plan_attempt(
        PROMPT, max_tokens=5, attempt=1, settings=SimSettings(overlap=4), continuation=delivered
    )
    assert plan.pieces[0].startswith(delivered[-4:])
    assert delivered + "".join(plan.pieces)[4:] == SimAnswer(PROMPT).text(15)


def test_split_continuation_recognises_both_shapes() -> None:
    prefill = (*PROMPT, Message("assistant", "abc"))
    instructed = (*prefill, Message("user", CONTINUE_INSTRUCTION))
    assert split_continuation(prefill) == (PROMPT, "abc")
    assert split_continuation(instructed) == (PROMPT, "abc")
    assert split_continuation(PROMPT) == (PROMPT, "")


@pytest.mark.parametrize(
    ("script", "steps"),
    [
        ("", ()),
        ("ok", (FaultStep("ok"),)),
        ("reset@25,ok", (FaultStep("reset", 25), FaultStep("ok"))),
        (
            "stall@1, eof@2 ,garbage@0,http:429",
            (
                FaultStep("stall", 1),
                FaultStep("eof", 2),
                FaultStep("garbage", 0),
                FaultStep("http", 429),
            ),
        ),
    ],
    ids=["empty means always ok", "ok", "reset then ok", "every kind, spaces tolerated"],
)
def test_fault_scripts_parse(script: str, steps: tuple[FaultStep, ...]) -> None:
    assert parse_fault_script(script) == steps


@pytest.mark.parametrize(
    "script",
    [
        "boom",
        "reset",
        "reset@x",
        "http:200",
        "http:abc",
        "ok,,ok",
        "stall@-1",
        "reset@²",
        "reset@٣",
        "http:٤٢٩",
        "http:4²9",
        "eof@" + "9" * 4000,
    ],
    ids=[
        "unknown word",
        "missing count",
        "count not a number",
        "status not an error",
        "status not a number",
        "empty item",
        "negative count",
        "a superscript digit that isdigit accepts and int refuses",
        "an arabic-indic digit that int would read as three",
        "a status in arabic-indic digits",
        "a status with a superscript digit inside",
        "a count past int's digit limit",
    ],
)
def test_bad_fault_scripts_name_the_field_and_item(script: str) -> None:
    with pytest.raises(RequestError, match=r'metadata\["sim.faults"\]: item \d'):
        parse_fault_script(script)


def test_faults_apply_to_successive_attempts() -> None:
    settings_ = SimSettings(faults=parse_fault_script("reset@3,http:503"))
    first = plan_attempt(PROMPT, max_tokens=10, attempt=1, settings=settings_)
    second = plan_attempt(PROMPT, max_tokens=10, attempt=2, settings=settings_)
    third = plan_attempt(PROMPT, max_tokens=10, attempt=3, settings=settings_)
    assert (len(first.pieces), first.fault.kind) == (3, "reset")
    assert (len(second.pieces), second.fault) == (0, FaultStep("http", 503))
    assert (len(third.pieces), third.fault.kind) == (10, "ok")


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"sim.pace_ms": "-1"}, "sim.pace_ms"),
        ({"sim.overlap": "1.5"}, "sim.overlap"),
        ({"sim.overlap": "999"}, "sim.overlap"),
        ({"sim.pace_ms": "٣"}, "sim.pace_ms"),
        ({"sim.pace_ms": "²"}, "sim.pace_ms"),
        ({"sim.overlap": "٣"}, "sim.overlap"),
        ({"sim.retry_after_s": "1_0"}, "sim.retry_after_s"),
        ({"sim.retry_after_s": "nan"}, "sim.retry_after_s"),
        ({"sim.pace_ms": "1e3"}, "sim.pace_ms"),
        ({"sim.reasoning": "-1"}, "sim.reasoning"),
        ({"sim.tool_calls": "9"}, "sim.tool_calls"),
        ({"sim.preamble": "x"}, "sim.preamble"),
    ],
    ids=[
        "negative pace",
        "fractional overlap",
        "overlap too large",
        "a pace in arabic-indic digits",
        "a pace that is a superscript",
        "an overlap in arabic-indic digits",
        "a retry-after with an underscore",
        "a retry-after that is not a number",
        "a pace in exponent notation",
        "negative reasoning",
        "more tool calls than the simulator makes",
        "a preamble that is not a number",
    ],
)
def test_bad_sim_metadata_names_the_key(metadata: dict[str, str], field: str) -> None:
    with pytest.raises(RequestError, match=field):
        SimSettings.from_metadata(tuple(metadata.items()))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"sim.pace_ms": "20"}, SimSettings(pace_ms=20.0)),
        ({"sim.pace_ms": " 2.5 "}, SimSettings(pace_ms=2.5)),
        ({"sim.pace_ms": ".5"}, SimSettings(pace_ms=0.5)),
        ({"sim.overlap": "+3"}, SimSettings(overlap=3)),
        ({"sim.retry_after_s": "0"}, SimSettings(retry_after_s=0.0)),
        (
            {"sim.reasoning": "12", "sim.tool_calls": "2", "sim.preamble": "0"},
            SimSettings(reasoning=12, tool_calls=2, preamble=0),
        ),
    ],
    ids=[
        "a whole pace",
        "a decimal pace with spaces around",
        "a pace without a leading zero",
        "an overlap with a plus sign",
        "a zero retry-after",
        "reasoning, tool calls and a preamble",
    ],
)
def test_good_sim_metadata_in_ascii_digits_is_read(
    metadata: dict[str, str], expected: SimSettings
) -> None:
    assert SimSettings.from_metadata(tuple(metadata.items())) == expected


def test_an_echoed_fault_item_is_cut_short() -> None:
    with pytest.raises(RequestError) as caught:
        parse_fault_script("x" * 4000)
    assert len(str(caught.value)) < 300 and "4000 characters" in str(caught.value)


# --- agent turns: reasoning and tool calls (issue 12) -------------------------------------

WEATHER = Tool(
    "get_weather",
    "The weather",
    json.dumps(
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
        }
    ),
)
TIME = Tool("get_time")


def tool_calls_of(events: tuple[SimEvent, ...]) -> list[tuple[str, str, dict[str, object]]]:
    """(id, name, arguments) of each call, assembled from its events."""
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for event in events:
        if event.kind == "tool_call":
            if event.id:
                heads[event.index] = (event.id, event.name)
            calls.setdefault(event.index, []).append(event.text)
    return [(*heads[i], json.loads("".join(calls[i]))) for i in sorted(calls)]


def test_reasoning_comes_first_and_leaves_the_answer_text_as_it_was() -> None:
    plan = plan_attempt(PROMPT, max_tokens=20, attempt=1, settings=SimSettings(reasoning=6))
    kinds = [e.kind for e in plan.events]
    assert kinds == ["reasoning"] * 6 + ["text"] * 20
    assert "".join(plan.pieces) == SimAnswer(PROMPT).text(20)
    assert plan.usage.completion_tokens == 26


def test_a_request_that_offers_tools_is_a_tool_turn_with_a_short_preamble() -> None:
    plan = plan_attempt(PROMPT, max_tokens=50, attempt=1, settings=SimSettings(), tools=(WEATHER,))
    assert plan.finish_reason == "tool_calls"
    assert "".join(plan.pieces) == SimAnswer(PROMPT).text(3)
    ((call_id, name, arguments),) = tool_calls_of(plan.events)
    assert name == "get_weather" and call_id.startswith("call_")
    assert set(arguments) == {"city", "days", "unit"}
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert arguments["unit"] == "celsius"
    fragments = [e.text for e in plan.events if e.kind == "tool_call"][1:]
    assert len(fragments) > 3 and all(len(f) <= ARGUMENT_FRAGMENT_CHARS for f in fragments)


def test_tool_calls_are_the_same_for_the_same_conversation_and_differ_for_another() -> None:
    first = plan_attempt(
        PROMPT, max_tokens=None, attempt=1, settings=SimSettings(), tools=(WEATHER,)
    )
    again = plan_attempt(
        PROMPT, max_tokens=None, attempt=2, settings=SimSettings(), tools=(WEATHER,)
    )
    other = plan_attempt(
        (Message("user", "other"),),
        max_tokens=None,
        attempt=1,
        settings=SimSettings(),
        tools=(WEATHER,),
    )
    assert first.events == again.events
    assert tool_calls_of(first.events) != tool_calls_of(other.events)


@pytest.mark.parametrize(
    ("settings_", "choice", "names"),
    [
        pytest.param(
            SimSettings(tool_calls=3),
            None,
            ["get_weather", "get_time", "get_weather"],
            id="calls go round the tools",
        ),
        pytest.param(
            SimSettings(tool_calls=2),
            ToolChoice(tool_name="get_time"),
            ["get_time", "get_time"],
            id="a named tool is the one called",
        ),
        pytest.param(SimSettings(tool_calls=0), None, [], id="sim.tool_calls=0 answers with text"),
        pytest.param(
            SimSettings(), ToolChoice(mode="none"), [], id="tool choice none answers with text"
        ),
    ],
)
def test_which_tools_are_called(
    settings_: SimSettings, choice: ToolChoice | None, names: list[str]
) -> None:
    plan = plan_attempt(
        PROMPT,
        max_tokens=10,
        attempt=1,
        settings=settings_,
        tools=(WEATHER, TIME),
        tool_choice=choice,
    )
    assert [name for _, name, _ in tool_calls_of(plan.events)] == names
    assert plan.finish_reason == ("tool_calls" if names else "stop")
    if not names:
        assert "".join(plan.pieces) == SimAnswer(PROMPT).text(10)


def test_a_tool_without_parameters_is_called_with_the_empty_object() -> None:
    plan = plan_attempt(PROMPT, max_tokens=10, attempt=1, settings=SimSettings(), tools=(TIME,))
    assert tool_calls_of(plan.events)[0][2] == {}


def test_the_tool_result_turn_is_answered_with_text() -> None:
    first = plan_attempt(PROMPT, max_tokens=10, attempt=1, settings=SimSettings(), tools=(WEATHER,))
    ((call_id, name, arguments),) = tool_calls_of(first.events)
    conversation = (
        *PROMPT,
        Message(
            "assistant",
            "".join(first.pieces),
            tool_calls=(ToolCall(call_id, name, json.dumps(arguments)),),
        ),
        Message("tool", '{"celsius": 21}', tool_call_id=call_id),
    )
    final = plan_attempt(
        conversation, max_tokens=12, attempt=1, settings=SimSettings(), tools=(WEATHER,)
    )
    assert final.finish_reason == "stop"
    assert "".join(final.pieces) == SimAnswer(conversation).text(12)
    assert SimAnswer(conversation).text(12) != SimAnswer(PROMPT).text(12)
    # The arguments' spacing does not change the answer (Anthropic's input
    # object comes back written out again).
    respaced = (
        *conversation[:1],
        Message(
            "assistant",
            conversation[1].content,
            tool_calls=(ToolCall(call_id, name, json.dumps(arguments, indent=2)),),
        ),
        conversation[2],
    )
    assert SimAnswer(respaced).text(12) == SimAnswer(conversation).text(12)


def test_faults_count_every_kind_of_event_so_a_reset_lands_inside_the_arguments() -> None:
    settings_ = SimSettings(reasoning=2, faults=parse_fault_script("reset@7"))
    plan = plan_attempt(PROMPT, max_tokens=10, attempt=1, settings=settings_, tools=(WEATHER,))
    # 2 reasoning, 3 preamble text, the call's first event, 1 argument fragment
    assert [e.kind for e in plan.events] == ["reasoning"] * 2 + ["text"] * 3 + ["tool_call"] * 2
    assert plan.fault.kind == "reset"


def test_a_tool_turn_continued_after_its_preamble_makes_the_same_calls() -> None:
    clean = plan_attempt(PROMPT, max_tokens=30, attempt=1, settings=SimSettings(), tools=(WEATHER,))
    preamble = "".join(clean.pieces)
    for messages in (
        (*PROMPT, Message("assistant", preamble)),
        (*PROMPT, Message("assistant", preamble), Message("user", CONTINUE_INSTRUCTION)),
    ):
        continued = plan_attempt(
            messages, max_tokens=27, attempt=2, settings=SimSettings(), tools=(WEATHER,)
        )
        assert continued.pieces == ()
        assert tool_calls_of(continued.events) == tool_calls_of(clean.events)
    halfway = plan_attempt(
        PROMPT,
        max_tokens=30,
        attempt=2,
        settings=SimSettings(),
        tools=(WEATHER,),
        continuation=preamble[:5],
    )
    assert preamble[:5] + "".join(halfway.pieces) == preamble


def test_an_assistant_message_with_tool_calls_is_not_a_partial_answer() -> None:
    turn = (*PROMPT, Message("assistant", "Let me look.", tool_calls=(ToolCall("c", "f", "{}"),)))
    assert split_continuation(turn) == (turn, "")


async def test_the_in_process_simulator_streams_reasoning_and_tool_calls() -> None:
    request = ProviderRequest(
        model="sim",
        messages=PROMPT,
        params=GenerationParams(max_tokens=10),
        metadata=(("sim.reasoning", "2"),),
        tools=(WEATHER,),
    )
    deltas = [d async for d in SimProvider().stream(request)]
    assert [type(d) for d in deltas[:6]] == [ReasoningDelta] * 2 + [TextDelta] * 3 + [ToolCallDelta]
    head = deltas[5]
    assert isinstance(head, ToolCallDelta) and head.name == "get_weather" and head.id
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "tool_calls"


async def test_the_in_process_simulator_resets_inside_a_tool_call() -> None:
    request = ProviderRequest(
        model="sim",
        messages=PROMPT,
        params=GenerationParams(max_tokens=10),
        metadata=(("sim.faults", "reset@5"),),
        tools=(WEATHER,),
    )
    seen = []
    with pytest.raises(NetworkError):
        async for delta in SimProvider().stream(request):
            seen.append(delta)
    assert isinstance(seen[-1], ToolCallDelta) and seen[-1].index == 0


# --- pacing: an absolute schedule on the injected clock (issue 10) -------------------------------


def paced_request(pace_ms: str, max_tokens: int) -> ProviderRequest:
    return ProviderRequest(
        model="sim",
        messages=PROMPT,
        params=GenerationParams(max_tokens=max_tokens),
        metadata=(("sim.pace_ms", pace_ms),),
    )


async def settle(steps: int = 10) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def test_the_simulator_paces_token_k_at_start_plus_k_paces_however_late_it_wakes() -> None:
    # Each wake-up comes 7 ms late (a busy loop). Sleeping the full pace after
    # each token would put token k at k * 27 ms (37 tok/s for a 50 tok/s
    # pace); on an absolute schedule it is due at start + k * 20 ms.
    clock = ManualClock()
    provider = SimProvider(clock=clock)
    stream = provider.stream(paced_request("20", 100))
    started = clock.monotonic()
    for k in range(1, 101):
        following = asyncio.ensure_future(anext(stream))
        await settle()
        assert not following.done()  # it waits on the clock for token k
        due = clock.next_due()
        assert due == pytest.approx(started + k * 0.020, abs=1e-9), f"token {k}"
        clock.advance(due - clock.monotonic() + 0.007)
        delta = await following
        assert isinstance(delta, TextDelta)
    # 100 tokens in 2 s of the clock (+ the last wake-up's 7 ms): the nominal rate.
    assert clock.monotonic() - started == pytest.approx(2.007)
    rest = [delta async for delta in stream]
    assert isinstance(rest[-1], Finish)


async def test_tokens_already_due_after_a_long_stall_come_at_once_then_the_pace_resumes() -> None:
    clock = ManualClock()
    stream = SimProvider(clock=clock).stream(paced_request("20", 100))
    started = clock.monotonic()
    first = asyncio.ensure_future(anext(stream))
    await settle()
    clock.advance(0.5)  # the loop was stuck for half a second: 25 tokens are due
    assert isinstance(await first, TextDelta)
    for k in range(2, 26):
        due = asyncio.ensure_future(anext(stream))
        await settle()
        assert due.done(), f"token {k} was due and still waited"
        assert isinstance(due.result(), TextDelta)
    following = asyncio.ensure_future(anext(stream))
    await settle()
    assert not following.done()
    assert clock.next_due() == pytest.approx(started + 26 * 0.020, abs=1e-9)
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
    await stream.aclose()
