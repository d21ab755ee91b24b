"""Fault's typed helpers: with_context's keywords and the stored form."""

from __future__ import annotations

import dataclasses

import pytest

from tokenrelay_server.core.errors import ErrorType, Fault, FaultChanges, SuggestedAction

EVERY_FIELD_SET = Fault(
    type=ErrorType.TIMEOUT,
    code="stall",
    message="no token for 30 s",
    retryable=True,
    suggested_action=SuggestedAction.FALLBACK,
    fatal=False,
    bytes_received=1234,
    tokens_received=56,
    provider="openai",
    attempt=3,
    retry_after_s=1.5,
)


def test_with_context_can_change_every_field_of_a_fault():
    assert set(FaultChanges.__annotations__) == {f.name for f in dataclasses.fields(Fault)}


def test_with_context_changes_only_what_it_is_given():
    changed = EVERY_FIELD_SET.with_context(provider="anthropic", attempt=4)
    assert changed == dataclasses.replace(EVERY_FIELD_SET, provider="anthropic", attempt=4)


def test_the_stored_form_of_a_fault_reads_back_equal():
    assert Fault.from_json(EVERY_FIELD_SET.to_json()) == EVERY_FIELD_SET


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("attempt", None, id="a stored count that is null is a TypeError"),
        pytest.param("type", [1], id="a stored enum that is not a number is a TypeError"),
        pytest.param("retry_after_s", {}, id="a stored retry_after that is a table is a TypeError"),
    ],
)
def test_a_stored_fault_whose_number_is_not_a_number_is_refused(field, value):
    raw = EVERY_FIELD_SET.to_json() | {field: value}
    with pytest.raises(TypeError):
        Fault.from_json(raw)
