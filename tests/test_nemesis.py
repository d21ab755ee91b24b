"""The nemesis, short (issue 9): a few rounds of `bench/nemesis.py` over
real processes, three `tokenrelay serve --store redis` replicas on a
throwaway redis-server the rig starts (and restarts) itself, asserting
that the checker finds no violation.

Nothing here waits on the wall clock to make something happen: faults fire
when the clients have received a given number of chunks, readiness and
quiescence are conditions polled within generous bounds, and no duration
is asserted. (A fault's hold, how long a replica stays paused or Redis
down, is the fault itself.) A slow machine only makes it take longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenrelay_devtools.nemesis.runner import (
    NemesisSettings,
    Summary,
    describe_summary,
    run_nemesis,
)
from tokenrelay_server.config.settings import Settings


async def _run(tmp_path: Path, **overrides: object) -> Summary:
    values: dict[str, object] = {"rounds": 3, "streams": 6, "faults": 3, **overrides}
    settings = NemesisSettings(**values)  # type: ignore[arg-type]
    summary = await run_nemesis(settings, tmp_path)
    lines = describe_summary(summary)
    assert len(summary.rounds) == settings.rounds
    if settings.faults:
        assert sum(summary.total("injected").values()) > 0, "the nemesis injected nothing"
    assert summary.violations == [], "\n".join(lines)
    return summary


@pytest.mark.timeout(900)
async def test_clients_dropping_and_resuming_anywhere_break_no_promise(tmp_path: Path) -> None:
    # No faults: only the clients' own drops, each resumed on a replica
    # picked at random (the rig, the clients and the checker end to end).
    summary = await _run(tmp_path, seed=4, faults=0, rounds=2)
    calls = sum(r.calls for r in summary.rounds)
    assert calls > summary.streams, "no client dropped and resumed"
    assert summary.total("outcomes") == {"complete": summary.streams}


@pytest.mark.timeout(900)
@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,  # violations only: a rig that cannot start still fails
    reason=(
        "now and then (about 1 stream in 100 under kill -9 and SIGTERM) a replica still "
        "lists a generation whose stream every client read to its End, and renews its "
        "lease, a minute after the round (left-running + left-leased): a generation that "
        "is never unregistered, issue 9 defects 4/5"
    ),
)
async def test_replica_crashes_and_drains_break_no_promise(tmp_path: Path) -> None:
    # kill -9 (takeover once the lease lapsed) and SIGTERM (a drain, resumed
    # elsewhere), with restarts: without Redis faults and pauses, all that
    # is left today is the rare generation left behind named above.
    await _run(tmp_path, seed=2, kinds=("kill", "terminate"))


@pytest.mark.timeout(900)
@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,  # violations only: a rig that cannot start still fails
    reason=(
        "store defects of issue 9, fixed on other branches: a Redis error (CLIENT KILL, a "
        "restart) ends streams INTERNAL and leaves logs without an End while clients were told "
        "one (defects 2, 3); no fencing after a pause: the woken owner keeps its generation and "
        "its lease keeper only logs 'lost its lease' (defect 4)"
    ),
)
async def test_every_fault_of_the_nemesis_breaks_no_promise(tmp_path: Path) -> None:
    await _run(tmp_path, seed=1)


@pytest.mark.timeout(900)
@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="the store defects of issue 9 (see above), on a Redis Cluster too",
)
async def test_the_nemesis_on_a_redis_cluster_breaks_no_promise(tmp_path: Path) -> None:
    # Issue 9 item 8 (`redis_cluster`, another branch) is what lets the
    # replicas use a cluster; until it is merged there is nothing to run.
    if "redis_cluster" not in Settings.model_fields:
        pytest.xfail("the server has no redis_cluster setting yet (issue 9, item 8)")
    await _run(tmp_path, seed=3, cluster=True, rounds=2)
