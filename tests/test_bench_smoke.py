"""The benchmarks still run: each one, at a tiny size, in a subprocess, to
its JSON summary. (A refactor of the gateway broke relay_vs_echo's import
once and nothing noticed.) Figures are not asserted, only that every stream
the benchmark ran was correct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    return summary


def test_relay_vs_echo_runs_and_every_stream_is_exact() -> None:
    summary = run_bench(
        "relay_vs_echo.py",
        *("--streams", "2", "--total-chunks", "100", "--rounds", "1"),
        *("--resumes", "2", "--idle-streams", "5"),
    )
    throughput = summary["throughput"]
    assert isinstance(throughput, list) and throughput
    assert all(level["all_ok"] for level in throughput)


@pytest.mark.parametrize("script", ["observability_overhead.py"])
def test_observability_overhead_runs_and_every_stream_is_exact(script: str) -> None:
    summary = run_bench(
        script, *("--streams", "2", "--total-chunks", "100", "--rounds", "1", "--short-tokens", "0")
    )
    levels = summary["levels"]
    assert isinstance(levels, list) and levels
    assert all(level["all_ok"] for level in levels)


def test_seal_runs_and_reports_its_cost() -> None:
    summary = run_bench("seal.py", "--number", "200", "--repeat", "1")
    assert summary["sealed_size"] == 100 + 32  # header (k2), nonce, tag
    assert all(isinstance(summary[key], float) for key in ("seal_us", "open_us", "codec_us"))


def test_workers_runs_and_every_stream_is_exact(redis_url: str) -> None:
    summary = run_bench(
        "workers.py",
        *("--streams", "4", "--tokens", "10", "--rounds", "1", "--redis-url", redis_url),
    )
    assert summary["all_ok"] is True
    assert summary["exit_statuses"] == {"1": 0, "2": 0}


def test_redis_speed_runs_and_every_stream_is_exact(redis_url: str) -> None:
    summary = run_bench(
        "redis_speed.py",
        *("--redis-url", redis_url, "--streams", "4", "--total-chunks", "200", "--rounds", "1"),
        *("--paced-levels", "4", "--paced-tokens", "40", "--paced-ramp-s", "0", "--resumes", "4"),
    )
    flood = summary["flood"]
    assert isinstance(flood, dict) and flood["all_ok"]
    paced = summary["paced"]
    assert isinstance(paced, dict)
    assert all(level["errors"] == 0 for level in paced["levels"])
    resume = summary["resume"]
    assert isinstance(resume, dict) and resume["redis_p99_ms"] > 0
