"""Stand-in workers for the supervisor of `serve --workers N` (api/workers.py):
processes that say they serve, crash or fail to start when a test says, so
its restart rules run on real processes without a gateway.

    python tests/workerkit.py DIR     # supervise 2 `flaky` workers; DIR holds their marks

Worker 0 serves until SIGTERM. Worker 1 serves once and then exits 1 (a
crash); every restart of it exits 1 before it serves. Restarts wait nothing
(delays 0), so the supervisor gives up after MAX_STARTUP_FAILURES of them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from tokenrelay_server.api.workers import WorkerLink, supervise
from tokenrelay_server.config.settings import Settings


def flaky(settings: Settings, link: WorkerLink) -> None:
    link.die_with_supervisor()
    if link.index == 0:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        link.ready(settings.port, "steady")
        while True:
            signal.pause()
    mark = Path(os.environ["WORKERKIT_DIR"]) / "worker-1-served"
    if not mark.exists():
        mark.touch()
        link.ready(settings.port, "flaky")
    sys.exit(1)


def main(workdir: str) -> int:
    os.environ["WORKERKIT_DIR"] = workdir
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = Settings(port=0, workers=2, store="redis")
    return supervise(
        settings,
        flaky,
        announce_port=lambda port: print(f"port {port}", flush=True),
        delays=lambda _crashes: 0.0,
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1]))
