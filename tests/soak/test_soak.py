"""The soak in CI: a short run by count (not wall time) against a gateway
process, memory store and Redis: 0 violations, and once every stream ended
the gateway's asyncio tasks and open fds back at their baseline.

`bench/soak.py --minutes N` runs it for as long as wanted. The gateway runs
on real time (it is a real process); nothing here waits on the wall clock to
make something happen: the soak polls the Admin overview until the gateway
is idle, and a generous bound only guards against hanging.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tokenrelay_devtools.gateway import GatewayProcess, keyed_tenants
from tokenrelay_devtools.soak import (
    KEYED_WEIGHTS,
    SOAK_GATEWAY,
    SOAK_KEYED,
    SOAK_TENANT_STREAMS,
    SOAK_TENANTS,
    WEIGHTS,
    Soak,
    SoakReport,
    SoakSettings,
)

CI_OPERATIONS = 150


def soak(
    gateway: GatewayProcess, operations: int, *, pooled_store: bool = False
) -> tuple[SoakReport, list[str]]:
    printed: list[str] = []
    runner = Soak(
        gateway.address,
        gateway.admin_token,
        settings=SoakSettings(max_streams=SOAK_GATEWAY["max_streams"], pooled_store=pooled_store),
        seed=13,
        concurrency=4,
        print_line=printed.append,
    )
    try:
        report = runner.run(operations=operations, report_every_ops=operations // 5)
    finally:
        runner.close()
    return report, printed


def assert_clean_soak(report: SoakReport, printed: list[str], gateway: GatewayProcess) -> None:
    assert report.violation_count == 0, report.violations
    assert sum(report.ops.values()) == CI_OPERATIONS
    assert set(report.ops) == set(WEIGHTS), report.ops  # every kind of operation ran
    # The over-quota burst was refused past the limit, never admitted past it.
    assert 0 < report.admitted_max <= SOAK_GATEWAY["max_streams"]
    assert report.refused_over_quota >= 2
    assert report.statuses["INVALID_ARGUMENT"] > 0 and report.statuses["PERMISSION_DENIED"] > 0
    assert report.back_at_baseline, "\n".join(report.summary())
    assert report.passed
    # A line per report: RSS, tasks, fds, running and detached streams, violations.
    assert len(printed) >= 5
    for field in ("rss=", "tasks=", "fds=", "running=", "detached=", "violations=0"):
        assert all(field in line for line in printed), (field, printed)
    assert gateway.error_lines() == []


@pytest.fixture
def memory_gateway(tmp_path) -> Iterator[GatewayProcess]:
    with GatewayProcess.start(tmp_path, **SOAK_GATEWAY) as gateway:
        yield gateway


def test_a_short_soak_on_the_memory_store_breaks_nothing_and_leaks_nothing(
    memory_gateway: GatewayProcess,
) -> None:
    report, printed = soak(memory_gateway, CI_OPERATIONS)
    assert_clean_soak(report, printed, memory_gateway)
    assert report.fd_slack == 2  # no pool: the fds come back exactly (within 2)


@pytest.fixture
def redis_gateway(tmp_path, redis_url: str, redis_prefix: str) -> Iterator[GatewayProcess]:
    settings = {**SOAK_GATEWAY, "store": "redis", "redis_url": redis_url}
    with GatewayProcess.start(tmp_path, redis_prefix=redis_prefix, **settings) as gateway:
        yield gateway


def test_a_short_soak_on_redis_breaks_nothing_and_leaks_nothing(
    redis_gateway: GatewayProcess, redis_url: str, redis_prefix: str
) -> None:
    report, printed = soak(redis_gateway, CI_OPERATIONS, pooled_store=True)
    assert_clean_soak(report, printed, redis_gateway)
    with redis.Redis.from_url(redis_url) as client:
        assert any(client.scan_iter(f"{redis_prefix}:*", count=1000))  # it did use Redis


def test_a_short_soak_with_tenant_keys_refuses_strangers_and_holds_the_tenant_quota(
    tmp_path,
) -> None:
    keys, tenants = keyed_tenants(SOAK_TENANTS["own"], SOAK_TENANTS["foreign"])
    with GatewayProcess.start(tmp_path, keys=keys, tenants=tenants, **SOAK_KEYED) as gateway:
        printed: list[str] = []
        runner = Soak(
            gateway.address,
            gateway.admin_token,
            settings=SoakSettings(
                max_streams=SOAK_TENANT_STREAMS,
                api_key=gateway.key_of("own"),
                foreign_key=gateway.key_of("foreign"),
            ),
            seed=13,
            concurrency=4,
            print_line=printed.append,
        )
        try:
            report = runner.run(operations=CI_OPERATIONS, report_every_ops=CI_OPERATIONS // 5)
        finally:
            runner.close()
        assert report.violation_count == 0, report.violations
        assert set(report.ops) == set(WEIGHTS) | set(KEYED_WEIGHTS), report.ops
        assert report.statuses["UNAUTHENTICATED"] == report.ops["unauthenticated"] > 0
        assert report.statuses["PERMISSION_DENIED"] > 0
        # The burst met the tenant's quota (16), not the gateway's max_streams (32).
        assert 0 < report.admitted_max <= SOAK_TENANT_STREAMS < SOAK_KEYED["max_streams"]
        assert report.refused_over_quota >= 2
        assert report.passed, "\n".join(report.summary())
        assert gateway.error_lines() == []


def test_the_rss_slope_is_fitted_to_the_samples_after_warm_up() -> None:
    from tokenrelay_devtools.fuzz.run import Census
    from tokenrelay_devtools.soak import Sample

    def at(seconds: float, megabytes: float) -> Sample:
        return Sample(seconds, 0, Census(0, 0, 0, 16, int(megabytes * 1e6), 14))

    # Warm-up climbs 100 MB in a minute; after it, 2 MB per 10 minutes.
    report = SoakReport(warm_at_s=60.0)
    report.samples = [at(0, 80), at(30, 150), *(at(60 + 60 * i, 180 + 0.2 * i) for i in range(11))]
    assert report.rss_slope_mb_per_h == pytest.approx(12.0)
    assert report.rss_growth_after_warmup == pytest.approx(2 / 180)
