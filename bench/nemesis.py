"""A nemesis test in the manner of Jepsen (issue 9).

    .venv/bin/python bench/nemesis.py --rounds 20 --seed 1 [--replicas 3] [--redis-url URL]
    .venv/bin/python bench/nemesis.py --rounds 20 --seed 1 --cluster

Starts N `tokenrelay serve --store redis` replicas (real processes) on a
throwaway redis-server (or on `--redis-url`, which is then never paused,
killed or restarted: only replica faults run there; or, with `--cluster`,
on a throwaway 3-master Redis Cluster, where CLIENT KILL and CLIENT PAUSE
hit every node and a restart restarts one). Each round, clients
stream through the replicas with random drops and resumes on random
replicas while the nemesis kills -9, SIGSTOPs/SIGCONTs and SIGTERMs
replicas (restarting them), kills Redis client connections, pauses Redis
(CLIENT PAUSE) and restarts it. Then everything is healed, and a checker
reads every client's record and every log in Redis
(tokenrelay_devtools/nemesis/checker.py: seq 1..n with no gap or
duplicate, an End that agrees with it, every client got exactly that text
or a typed partial that is a prefix of it, no INTERNAL/UNKNOWN, nothing
left running or leased).

Prints a line per round, then rounds, streams, faults injected by kind,
and every violation; exits 1 when there is any. The replicas' logs are
kept in --workdir (default: a temporary directory, printed), with a
`round-N.json` for each round that broke something: the violations, every
call of the clients involved and their streams' logs as stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tokenrelay_devtools.nemesis.faults import ALL_FAULTS
from tokenrelay_devtools.nemesis.runner import (
    NemesisSettings,
    describe_round,
    describe_summary,
    run_nemesis,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--redis-url", default=None, help="default: a throwaway redis-server")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a throwaway 3-master Redis Cluster instead (replicas get redis_cluster = true)",
    )
    parser.add_argument("--streams", type=int, default=8, help="clients per round")
    parser.add_argument("--faults", type=int, default=3, help="faults per round")
    parser.add_argument(
        "--kinds", default=",".join(ALL_FAULTS), help=f"comma-separated, of {','.join(ALL_FAULTS)}"
    )
    parser.add_argument("--lease-ttl-s", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in ALL_FAULTS]
    if unknown:
        parser.error(f"--kinds: unknown {unknown} (known: {', '.join(ALL_FAULTS)})")
    if args.cluster and args.redis_url:
        parser.error("--cluster starts a cluster of its own: leave out --redis-url")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tokenrelay-nemesis-"))
    print(f"workdir {workdir} (replica logs, redis data)", flush=True)
    settings = NemesisSettings(
        rounds=args.rounds,
        seed=args.seed,
        replicas=args.replicas,
        redis_url=args.redis_url,
        cluster=args.cluster,
        streams=args.streams,
        faults=args.faults,
        kinds=kinds,  # type: ignore[arg-type]
        lease_ttl_s=args.lease_ttl_s,
    )
    summary = asyncio.run(
        run_nemesis(settings, workdir, lambda result: print(describe_round(result), flush=True))
    )
    for line in describe_summary(summary):
        print(line)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
