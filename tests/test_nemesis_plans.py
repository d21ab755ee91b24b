"""The nemesis's seeded plans: the fault schedule and the clients' streams
are functions of the seed (so a round's schedule can be replayed), and they
keep to what was asked."""

from __future__ import annotations

import random

from tokenrelay_devtools.nemesis.clients import plan_streams
from tokenrelay_devtools.nemesis.faults import REDIS_FAULTS, REPLICA_FAULTS, Fault, schedule


def test_a_schedule_is_the_seeds_and_fires_in_order() -> None:
    def make(seed: str) -> list[Fault]:
        return list(
            schedule(random.Random(seed), replicas=3, total_chunks=500, lease_ttl_s=2, count=6)
        )

    first = make("7:3")
    assert first == make("7:3")
    assert first != make("7:4")
    ats = [f.at_chunk for f in first]
    assert ats == sorted(ats) and all(1 <= at <= 400 for at in ats)


def test_a_schedule_holds_only_the_kinds_asked_for_on_replicas_that_exist() -> None:
    faults = schedule(
        random.Random(1),
        replicas=2,
        total_chunks=300,
        lease_ttl_s=2,
        kinds=REPLICA_FAULTS,
        count=50,
    )
    assert {f.kind for f in faults} == set(REPLICA_FAULTS)
    assert not {f.kind for f in faults} & set(REDIS_FAULTS)
    assert {f.replica for f in faults} <= {0, 1}
    pauses = [f.hold_s for f in faults if f.kind == "pause"]
    assert min(pauses) >= 1.0 and max(pauses) <= 5.0  # 0.5 to 2.5 lease TTLs


def test_stream_plans_are_the_seeds_and_drop_inside_their_stream() -> None:
    plans = plan_streams(random.Random(3), prefix="r0", count=40, replicas=3)
    assert plans == plan_streams(random.Random(3), prefix="r0", count=40, replicas=3)
    assert len({p.name for p in plans}) == 40  # each its own idempotency key
    assert any(p.drops for p in plans)
    for plan in plans:
        assert list(plan.drops) == sorted(set(plan.drops))
        assert all(0 < seq < plan.max_tokens for seq in plan.drops)
        assert 0 <= plan.start_replica < 3
        assert plan.expected_text()  # the simulator's clean answer
