"""The simulator's sans-IO core: determinism, continuation, fault scripts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.core.errors import RequestError
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.base import CONTINUE_INSTRUCTION
from tokenrelay_server.upstream.sim import (
    FaultStep,
    SimAnswer,
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
    ],
    ids=[
        "a whole pace",
        "a decimal pace with spaces around",
        "a pace without a leading zero",
        "an overlap with a plus sign",
        "a zero retry-after",
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
