"""`tokenrelay serve` as an operator runs it: a real process, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from serverkit import run_to_end, start_request

TOKENRELAY = [sys.executable, "-m", "tokenrelay_server.cli"]


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TOKENRELAY, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def read_port(process: subprocess.Popen[str]) -> tuple[int, str]:
    assert process.stderr is not None and process.stdout is not None
    first_log_line = process.stderr.readline()
    port_line = process.stdout.readline()
    assert port_line.startswith("port "), port_line
    return int(port_line.split()[1]), first_log_line


async def test_serve_logs_where_it_listens_first_and_drains_on_sigterm() -> None:
    process = spawn("--port", "0", "--drain-grace-s", "0.5")
    try:
        port, first_line = read_port(process)
        assert f"listening on 127.0.0.1:{port}" in first_line
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            events = await run_to_end(channel, start_request(max_tokens=5))
        assert events[-1].end.total_seq == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stderr.read()  # type: ignore[union-attr]
    finally:
        process.kill()
        process.wait()


def test_environment_variables_set_flags() -> None:
    process = spawn(env={"TOKENRELAY_PORT": "0", "TOKENRELAY_CHECKPOINT_INTERVAL": "0"})
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "checkpoint_interval" in err


def test_a_config_file_with_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[server]\nport = 0\nstal_timeout_s = 3\n")
    process = spawn("--config", str(config))
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "server.stal_timeout_s" in err


def test_a_config_file_value_out_of_range_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[server]\nport = 70000\n")
    process = spawn("--config", str(config))
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "port" in err and "65535" in err


@pytest.mark.parametrize("flag", ["--port", "--stall-timeout-s"])
def test_flags_beat_the_config_file(tmp_path: Path, flag: str) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[server]\nport = 1\nstall_timeout_s = 1\n")
    value = "0" if flag == "--port" else "5"
    process = spawn(
        "--config", str(config), flag, value, *(["--port", "0"] if flag != "--port" else [])
    )
    try:
        port, first_line = read_port(process)
        assert port != 1 and "listening" in first_line
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_recovery_and_breaker_tables_are_read_from_the_config_file(tmp_path: Path) -> None:
    from tokenrelay_server.config.settings import build_settings, read_config_file

    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        "[recovery]\nmax_retries = 5\nbackoff_base_s = 0.5\nbackoff_cap_s = 10\n"
        "jitter = 0.2\nretry_budget_ratio = 0.1\n[breaker]\nfailure_threshold = 7\n"
        "cooldown_s = 12\n"
    )
    settings = build_settings(read_config_file(config))
    assert (settings.max_retries, settings.backoff_base_s, settings.backoff_cap_s) == (5, 0.5, 10)
    assert (settings.jitter, settings.retry_budget_ratio) == (0.2, 0.1)
    assert (settings.breaker_failure_threshold, settings.breaker_cooldown_s) == (7, 12)


def test_an_unknown_recovery_key_is_refused_with_its_line(tmp_path: Path) -> None:
    from tokenrelay_server.config.settings import ConfigError, read_config_file

    config = tmp_path / "tokenrelay.toml"
    config.write_text("[recovery]\nmax_retries = 5\nmax_retires = 3\n")
    with pytest.raises(ConfigError, match=r"recovery\.max_retires \(line 3\)"):
        read_config_file(config)


def test_the_first_message_timeout_is_a_flag_and_a_variable() -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main

    runner = CliRunner()
    shown = runner.invoke(main, ["serve", "--help"])
    assert "--first-message-timeout-s" in shown.output
    assert "TOKENRELAY_FIRST_MESSAGE_TIMEOUT_S" in shown.output
    refused = runner.invoke(main, ["serve"], env={"TOKENRELAY_FIRST_MESSAGE_TIMEOUT_S": "0"})
    assert refused.exit_code != 0
    assert "first_message_timeout_s" in refused.output
