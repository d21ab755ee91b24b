"""The collector's tuning of a served gateway (api/heap.py; issue 10).

`tune_collector` freezes what is alive, so it runs in a fresh interpreter of
its own here (never in the test process, whose garbage it would keep)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tokenrelay_server.api.heap import FULL_COLLECTION_EVERY

TOKENRELAY = [sys.executable, "-m", "tokenrelay_server.cli"]

PROBE = """
import gc, json
import tokenrelay_server.api.server  # the gateway's start-up heap
from tokenrelay_server.api.heap import tune_collector
before = gc.get_threshold()
frozen = tune_collector()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "counted": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_the_start_up_heap_is_frozen_and_full_collections_spaced_out() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    figures = json.loads(result.stdout)
    young, middle, _ = figures["before"]
    # Young collections keep their thresholds; full ones come 10x more rarely.
    assert figures["after"] == [young, middle, FULL_COLLECTION_EVERY]
    assert FULL_COLLECTION_EVERY == 100
    # The imported modules' objects are frozen: the collector walks almost
    # nothing of the start-up heap any more.
    assert figures["frozen"] == figures["counted"] > 10_000
    assert figures["tracked"] < figures["frozen"] / 10


def test_tokenrelay_serve_tunes_the_collector_once_it_is_up() -> None:
    process = subprocess.Popen(
        [*TOKENRELAY, "serve", "--port", "0", "--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        for line in process.stdout:  # bounded by the serve's own output
            lines.append(line)
            if "tokenrelay listening on" in line:
                break
        said = "".join(lines)
        frozen = [line for line in lines if "start-up objects out of the collector's way" in line]
        assert frozen, said
        assert int(frozen[0].split("froze ")[1].split()[0]) > 10_000
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
