"""The fuzzer in CI: 1,000 seeded calls against a gateway process, and the
corpus of inputs that once found a bug, replayed.

`bench/fuzz.py --count N --seed S` runs any number the same way (case N of
seed S is the same everywhere). The gateway is a real `tokenrelay serve`
process (tokenrelay_devtools/gateway.py) on real time with short timers;
nothing here waits on the wall clock to make something happen: the run
polls the Admin overview until the gateway is back at its baseline, and a
generous bound only guards against hanging.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tokenrelay_devtools.fuzz.corpus import load
from tokenrelay_devtools.fuzz.draw import RandomDraw
from tokenrelay_devtools.fuzz.gateways import fuzz_gateway, keyed_fuzz_gateway
from tokenrelay_devtools.fuzz.generate import (
    BAD_CREDENTIALS,
    EXPIRED,
    FOREIGN,
    TAMPERED,
    UNKNOWN_STREAM,
    FuzzCase,
    Material,
    resign,
    resume_token,
    tamper,
)
from tokenrelay_devtools.fuzz.run import case_of, fuzz, play, problems, replay
from tokenrelay_devtools.gateway import GatewayProcess

CORPUS = Path(__file__).parent / "corpus"
CI_CALLS = 1_000
CI_SEED = 13


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with fuzz_gateway(tmp_path_factory.mktemp("fuzz-gateway")) as process:
        yield process


def material_for(gateway: GatewayProcess, **keys: str) -> Material:
    return Material(secret=gateway.resume_secret, **keys)


def test_a_thousand_fuzzed_calls_get_no_internal_or_unknown_and_leave_nothing_behind(
    gateway: GatewayProcess,
) -> None:
    report = fuzz(
        gateway.address,
        count=CI_CALLS,
        seed=CI_SEED,
        material=material_for(gateway),
        admin_token=gateway.admin_token,
        server_errors=gateway.error_lines,
    )
    assert report.calls == CI_CALLS
    assert report.tally["UNKNOWN"] == 0 and report.tally["INTERNAL"] == 0
    assert report.failures == [], "\n".join(f.line() for f in report.failures)
    assert report.leaks == [] and report.healthy_after and report.clean_after
    assert report.server_errors == []
    assert report.passed, "\n".join(report.lines())
    # The mix reached what it is meant to: streams that ran, validation,
    # refused tokens, forged tokens of streams that do not exist.
    for code in ("OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND"):
        assert report.tally[code] > 0, report.tally
    assert set(report.by_first) == {"start", "resume", "any"}


def test_a_thousand_fuzzed_calls_with_keys_refuse_every_bad_key_and_foreign_token(
    tmp_path: Path,
) -> None:
    # A gateway of its own with two tenants' keys: the run's key, a foreign
    # tenant's key, and missing, malformed, unknown and doubled ones.
    with keyed_fuzz_gateway(tmp_path) as keyed:
        report = fuzz(
            keyed.address,
            count=CI_CALLS,
            seed=CI_SEED,
            material=material_for(
                keyed, api_key=keyed.key_of("own"), foreign_key=keyed.key_of("foreign")
            ),
            admin_token=keyed.admin_token,
            server_errors=keyed.error_lines,
        )
    assert report.failures == [], "\n".join(f.line() for f in report.failures)
    assert report.passed, "\n".join(report.lines())
    for code in ("OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
        assert report.tally[code] > 0, report.tally


@pytest.mark.parametrize(
    ("path", "case"), load(CORPUS), ids=lambda value: value.stem if isinstance(value, Path) else ""
)
def test_a_corpus_input_gets_its_status_and_nothing_else(
    gateway: GatewayProcess, path: Path, case: FuzzCase
) -> None:
    expected = json.loads(path.read_text()).get("expect")
    with grpc.insecure_channel(gateway.address) as channel:
        outcome = play(channel, case)
    assert problems(case, outcome, expect_auth=False) == []
    if expected is not None:
        assert outcome.code == expected, outcome


def test_the_corpus_replayed_leaves_the_gateway_as_it_was(gateway: GatewayProcess) -> None:
    cases = [case for _, case in load(CORPUS)]
    assert cases, "the corpus is empty"
    report = replay(
        gateway.address,
        cases,
        material=material_for(gateway),
        admin_token=gateway.admin_token,
        server_errors=gateway.error_lines,
    )
    assert report.calls == len(cases)
    assert report.passed, "\n".join(report.lines())


def test_with_an_api_key_a_gateway_that_ignores_keys_is_caught(
    gateway: GatewayProcess,
) -> None:
    # This gateway has no keys, so it opens streams whatever the key: told
    # that it has them (--api-key), the fuzzer must say so.
    report = fuzz(
        gateway.address,
        count=CI_CALLS,
        seed=CI_SEED,
        material=material_for(gateway, api_key="tr_" + "a" * 64, foreign_key="tr_" + "b" * 64),
        admin_token=gateway.admin_token,
    )
    complaints = {problem for failure in report.failures for problem in failure.problems}
    assert any(f"a call with {kind} opened a stream" in complaints for kind in BAD_CREDENTIALS)
    assert "another tenant's key resumed this tenant's stream" in complaints
    assert not report.passed
    # Only the keys were wrong: nothing else.
    assert complaints <= {
        *(f"a call with {kind} opened a stream" for kind in BAD_CREDENTIALS),
        "another tenant's key resumed this tenant's stream",
    }


def test_a_case_is_the_same_for_the_same_seed_and_index() -> None:
    material = Material(tokens=["v1." + "a" * 32 + ".1999999999.sig"], secret="s" * 32)
    first = [case_of(5, index, material).to_json() for index in range(50)]
    again = [case_of(5, index, material).to_json() for index in range(50)]
    assert first == again
    assert first != [case_of(6, index, material).to_json() for index in range(50)]
    assert all(1 <= len(case["frames"]) <= 4 for case in first)


def test_a_key_goes_as_bearer_metadata() -> None:
    material = Material(api_key="tr_key", foreign_key="tr_other")
    cases = [case_of(1, index, material) for index in range(200)]
    by_credential = {case.credential: case.metadata for case in cases}
    assert by_credential["key"] == (("authorization", "Bearer tr_key"),)
    assert by_credential["foreign-key"] == (("authorization", "Bearer tr_other"),)
    assert by_credential["no-key"] == ()
    assert len(by_credential["two-keys"]) == 2


def test_refused_tokens_differ_from_every_valid_one() -> None:
    mac = "c2lnbmF0dXJlX29mX3RoZV90b2tlbl9iYXNlNjR1cmw"
    valid = "v2.k0.-." + "ab" * 16 + ".1700000000.1999999999." + mac
    material = Material(tokens=[valid], secret="s" * 32)
    kinds = set()
    for index in range(2_000):
        draw = RandomDraw(random.Random(index))
        token, kind = resume_token(draw, material)
        kinds.add(kind)
        if kind != "valid":
            assert token != valid, kind
        assert tamper(draw, valid) != valid
    assert kinds == {"valid", TAMPERED, FOREIGN, UNKNOWN_STREAM, EXPIRED}
    assert resign(valid, b"other").rpartition(".")[0] == valid.rpartition(".")[0]
