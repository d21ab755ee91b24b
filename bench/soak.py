"""Soak a gateway: a steady mix of streams for N minutes, watching what it holds.

    .venv/bin/python bench/soak.py --minutes 10 [--store redis [--redis-url URL]]
    .venv/bin/python bench/soak.py --minutes 60 --target HOST:PORT --admin-token T \\
        [--max-streams 16] [--api-key KEY --foreign-key OTHER]
    .venv/bin/python bench/soak.py --operations 300        # by count, as CI does
    .venv/bin/python bench/soak.py --operations 300 --keyed  # its own gateway, with tenant keys

Without --target it starts its own gateway (`tokenrelay serve` in a process
of its own: max_streams 16, short stall timeout, breakers out of reach,
detach grace 30 s). The mix (tokenrelay_devtools/soak.py): clean streams,
recoverable and fatal `sim.faults`, client drops resumed on a new call,
cancels, bad requests, foreign and tampered resume tokens, and over-quota
bursts of max_streams + 2 starts. Every minute: the gateway's RSS, asyncio
tasks, open fds, running and detached streams (its Admin overview), and the
violations so far; at the end the RSS slope after warm-up (MB/h) and whether
tasks and fds came back to the baseline. Exit status 0 when there was no
violation and tasks and fds came back, else 1.

--keyed (without --target): the gateway it starts has [[auth.keys]] for two
tenants (fresh keys; the soak's tenant limited to 16 concurrent streams, the
gateway to 32) and the soak runs with the one's key and the other's as the
foreign key: foreign-tenant tokens, unauthenticated starts, and over-quota
bursts that meet the tenant's quota.

A --target needs the `sim` model with short timers and its breakers out of
reach, e.g. a config with `stall_timeout_s = 0.5`, `[breaker]
failure_threshold = 1000000`, `failure_rate = 1.0`, `[recovery]
retry_budget_ratio = 1000`, and `--max-streams` its max_streams (else no
over-quota bursts).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

import redis

from tokenrelay_devtools.gateway import GatewayProcess, keyed_tenants
from tokenrelay_devtools.soak import (
    SOAK_GATEWAY,
    SOAK_KEYED,
    SOAK_TENANT_STREAMS,
    SOAK_TENANTS,
    Soak,
    SoakSettings,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=float)
    length.add_argument("--operations", type=int)
    parser.add_argument("--target")
    parser.add_argument("--admin-token", default=os.environ.get("TOKENRELAY_ADMIN_TOKEN"))
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--max-streams", type=int, help="the target's max_streams")
    parser.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY"))
    parser.add_argument("--foreign-key")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keyed",
        action="store_true",
        help="start a gateway with two tenants' keys and soak with both (no --target)",
    )
    args = parser.parse_args()
    if args.keyed and args.target is not None:
        parser.error("--keyed starts its own gateway: give --api-key and --foreign-key instead")

    gateway = None
    prefix = None
    if args.target is None:
        settings = dict(SOAK_KEYED if args.keyed else SOAK_GATEWAY)
        if args.store == "redis":
            prefix = f"soak{secrets.token_hex(4)}"
            settings.update(store="redis", redis_url=args.redis_url, redis_prefix=prefix)
        max_streams = int(settings["max_streams"])
        if args.keyed:
            keys, tenants = keyed_tenants(SOAK_TENANTS["own"], SOAK_TENANTS["foreign"])
            gateway = GatewayProcess.start(keys=keys, tenants=tenants, **settings)
            args.api_key, args.foreign_key = gateway.key_of("own"), gateway.key_of("foreign")
            max_streams = SOAK_TENANT_STREAMS  # the tenant's quota, below the gateway's
        else:
            gateway = GatewayProcess.start(**settings)
        target, admin_token = gateway.address, gateway.admin_token
        keyed = " keyed (tenants own, foreign)" if args.keyed else ""
        print(f"gateway: {target} store={args.store}{keyed} (log {gateway.log_path})", flush=True)
    else:
        if not args.admin_token:
            parser.error("--target needs --admin-token (the soak reads the Admin overview)")
        target, admin_token, max_streams = args.target, args.admin_token, args.max_streams
    soak = Soak(
        target,
        admin_token,
        settings=SoakSettings(
            max_streams=max_streams,
            pooled_store=args.store == "redis",
            api_key=args.api_key,
            foreign_key=args.foreign_key,
        ),
        seed=args.seed,
        concurrency=args.concurrency,
        print_line=lambda line: print(line, flush=True),
    )
    try:
        report = soak.run(
            minutes=args.minutes,
            operations=args.operations,
            report_every_ops=None if args.minutes else max(args.operations // 10, 1),
        )
    finally:
        soak.close()
        if gateway is not None:
            gateway.stop()
            errors = gateway.error_lines()
            if errors:
                print(f"the gateway logged {len(errors)} ERROR line(s), e.g. {errors[0]}")
        if prefix is not None:
            with redis.Redis.from_url(args.redis_url) as client:
                keys = list(client.scan_iter(f"{prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
    for line in report.summary():
        print(line)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
