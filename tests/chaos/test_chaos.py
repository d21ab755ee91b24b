"""The chaos suite in CI: 200 seeded runs over real HTTP and gRPC, 0 violations.

`tokenrelay chaos --runs N --seed S` runs any number the same way."""

from __future__ import annotations

import pytest

from tokenrelay_devtools.chaos import (
    CHAINS,
    Scenario,
    make_scenario,
    predict,
    run_chaos,
)


@pytest.mark.parametrize("seed", [11, 12], ids=["seed 11", "seed 12"])
async def test_a_hundred_seeded_fault_schedules_break_no_guarantee(seed: int) -> None:
    tally = await run_chaos(100, seed=seed, concurrency=8)
    assert tally.runs == 100
    assert tally.violations == []
    # The mix covers both outcomes and client-side resumes.
    assert tally.exact > 0 and tally.typed_partial > 0 and tally.resumed > 0


def scenario(alias: str, faults: tuple[str, ...], recoverable: tuple[bool, ...]) -> Scenario:
    codes = tuple(frozenset({"X"}) for _ in faults)
    return Scenario(0, alias, 20, faults, codes, recoverable, None)


@pytest.mark.parametrize(
    ("alias", "faults", "recoverable", "exact"),
    [
        ("c1", (), (), True),
        ("c1", ("http:500", "http:500", "ok"), (True, True, True), True),
        ("c1", ("http:500", "http:500", "http:500"), (True, True, True), False),
        ("c3", ("http:500", "http:500", "http:500", "ok"), (True,) * 4, True),
        ("c3", ("http:401", "ok"), (False, True), False),
        ("c1", ("eof@25",), (True,), True),
        ("c1", ("garbage@3",), (False,), False),
    ],
    ids=[
        "no faults is exact",
        "two retries then ok is exact",
        "a third failure on a one-provider chain is partial",
        "after the retries the next provider finishes",
        "a 401 ends it",
        "an eof after the whole budget is exact",
        "garbage mid-answer ends it",
    ],
)
def test_the_oracle_follows_the_policy(
    alias: str, faults: tuple[str, ...], recoverable: tuple[bool, ...], exact: bool
) -> None:
    prediction = predict(scenario(alias, faults, recoverable))
    assert prediction.exact_possible is exact
    assert bool(prediction.partial_codes) is not exact


def test_a_reset_may_lose_unread_tokens_so_both_outcomes_are_allowed() -> None:
    # 15 tokens then RST: the kernel may drop what the client had not read, so
    # garbage 9 tokens into the continuation may or may not come before token 21.
    prediction = predict(
        Scenario(
            0,
            "c1",
            21,
            ("reset@15", "garbage@9"),
            (frozenset({"ECONNRESET"}), frozenset({"MALFORMED_DATA"})),
            (True, False),
            None,
        )
    )
    assert prediction.exact_possible
    assert prediction.partial_codes == {"MALFORMED_DATA"}


def test_schedules_are_reproducible_from_the_seed() -> None:
    import random

    first = [make_scenario(random.Random(5), i) for i in range(20)]
    again = [make_scenario(random.Random(5), i) for i in range(20)]
    assert first == again
    assert {s.alias for s in first} <= set(CHAINS)


def agent(
    faults: tuple[str, ...], *, mode: str = "", calls: int = 1, reasoning: int = 0
) -> Scenario:
    codes = tuple(frozenset({"X"}) for _ in faults)
    return Scenario(0, "c1", 20, faults, codes, (True,) * len(faults), None, reasoning, mode, calls)


# With a tool the simulator sends 3 text events, then each call: its first
# event and its argument fragments.
FIRST_CALL = 3


@pytest.mark.parametrize(
    ("scenario_", "exact_calls", "codes"),
    [
        pytest.param(
            agent((f"reset@{FIRST_CALL + 2}",), mode="whole"),
            {1},
            set(),
            id="whole: a reset inside the arguments is recovered with the call whole",
        ),
        pytest.param(
            agent((f"drop@{FIRST_CALL + 2}",), mode="stream"),
            set(),
            {"TOOL_CALL_INTERRUPTED"},
            id="stream: a break inside the arguments ends interrupted",
        ),
        pytest.param(
            agent(("drop@3",), mode="stream"),
            {1},
            set(),
            id="stream: a break before the first piece of the call is recovered",
        ),
        pytest.param(
            agent(("drop@40",), mode="whole", calls=2),
            {1},
            set(),
            id="whole: a break inside the second call ends the turn with the first",
        ),
        pytest.param(
            agent(("garbage@5",), mode="stream"),
            set(),
            {"TOOL_CALL_INTERRUPTED"},
            id="stream: even a fatal fault inside a streamed call ends interrupted",
        ),
    ],
)
def test_the_oracle_follows_tool_calls(
    scenario_: Scenario, exact_calls: set[int], codes: set[str]
) -> None:
    prediction = predict(scenario_)
    assert set(prediction.exact_calls) == exact_calls
    assert set(prediction.partial_codes) == codes


def test_the_oracle_counts_reasoning_events_before_the_text() -> None:
    # 5 reasoning events, then 20 text events: "eof@24" breaks one token
    # short of the budget (recovered), "eof@25" after the whole text (exact).
    prediction = predict(agent(("eof@24", "eof@24", "eof@24"), calls=0, reasoning=5))
    assert prediction.partial_codes == {"X"}
    assert predict(agent(("eof@25",), calls=0, reasoning=5)).exact
