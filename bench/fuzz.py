"""Fuzz a gateway's edge: every call's status tallied; pass or fail.

    .venv/bin/python bench/fuzz.py --count 10000 --seed 1
    .venv/bin/python bench/fuzz.py --count 1000 --keyed     # its own gateway, with tenant keys
    .venv/bin/python bench/fuzz.py --target HOST:PORT --admin-token T --count 1000 --seed 7 \\
        [--api-key KEY --foreign-key OTHER] [--resume-secret S] [--save-failures DIR]

Without --target it starts its own gateway (`tokenrelay serve` in a process
of its own, on a free port, short timers, no detach grace). Cases are drawn
from the contract's descriptors, with raw mutated frames, valid, tampered,
foreign and (with the resume secret) forged and expired resume tokens, and
valid, missing, malformed, unknown and foreign keys
(tokenrelay_devtools/fuzz/). Case N of seed S is the same on every run.

Pass: 0 UNKNOWN, 0 INTERNAL, a message on every status but OK, no call hung,
no refused token (nor, with --api-key, a bad key) opening a stream; after
the run the gateway's streams and attached calls back at the baseline, its
asyncio tasks at most 2 above (the Admin overview: needs --admin-token for a
--target), health SERVING, a clean stream whole, and (own gateway) nothing
logged at ERROR. Exit status 0 on pass, 1 on fail.

A --target should run with short timers, or fuzzed stalls wait its own
(and count as hung calls past the 20 s guard), e.g.
`tokenrelay serve --detach-grace-s 0 --stall-timeout-s 0.2 --first-token-timeout-s 0.5
--backoff-base-s 0 --admin-token ...`.

--keyed (without --target): the gateway it starts has [[auth.keys]] for two
tenants (fresh keys, their SHA-256 in the file; [tenants.*] limits), and the
run uses the one tenant's key as --api-key and the other's as --foreign-key.

With --api-key the gateway is taken to enforce keys: a call with a missing,
malformed or unknown key that opens a stream is a failure, as is
--foreign-key resuming a stream of --api-key's tenant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tokenrelay_devtools.fuzz.gateways import fuzz_gateway, keyed_fuzz_gateway
from tokenrelay_devtools.fuzz.generate import Material
from tokenrelay_devtools.fuzz.run import fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="HOST:PORT of a running gateway (default: start one)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("TOKENRELAY_ADMIN_TOKEN"),
        help="the target's admin token, to read its streams and tasks (Admin overview)",
    )
    parser.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY"))
    parser.add_argument("--foreign-key", help="a key of another tenant")
    parser.add_argument("--resume-secret", help="the target's resume secret (forged tokens)")
    parser.add_argument("--save-failures", type=Path, help="write each failing case here")
    parser.add_argument(
        "--keyed",
        action="store_true",
        help="start a gateway with two tenants' keys and fuzz with both (no --target)",
    )
    args = parser.parse_args()
    if args.keyed and args.target is not None:
        parser.error("--keyed starts its own gateway: give --api-key and --foreign-key instead")

    material = Material(api_key=args.api_key, foreign_key=args.foreign_key)
    gateway = None
    if args.target is None:
        gateway = keyed_fuzz_gateway() if args.keyed else fuzz_gateway()
        target, admin_token = gateway.address, gateway.admin_token
        material.secret = gateway.resume_secret
        if args.keyed:
            material.api_key = gateway.key_of("own")
            material.foreign_key = gateway.key_of("foreign")
        keyed = (
            f", keys of tenants {', '.join(k.tenant for k in gateway.keys)}" if gateway.keys else ""
        )
        print(f"gateway: {target} (log {gateway.log_path}{keyed})")
    else:
        target, admin_token = args.target, args.admin_token
        material.secret = args.resume_secret
    began = time.monotonic()
    try:
        report = fuzz(
            target,
            count=args.count,
            seed=args.seed,
            material=material,
            admin_token=admin_token,
            concurrency=args.concurrency,
            corpus_out=args.save_failures,
            server_errors=gateway.error_lines if gateway is not None else None,
            progress=lambda done: print(f"  {done} calls", file=sys.stderr, flush=True),
        )
    finally:
        if gateway is not None:
            gateway.stop()
    print(f"target={target} seed={args.seed} count={args.count} ({time.monotonic() - began:.0f} s)")
    for line in report.lines():
        print(line)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
