"""`tokenrelay serve` as an operator runs it (a real process, real signals), and
`tokenrelay chat` as a user runs it against a real gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from serverkit import RawCall, RelayFactory, chunks_of, run_to_end, start_request, text_of

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


async def test_a_second_sigterm_does_not_cut_the_drain_short_and_sigint_stops_at_once() -> None:
    # `timeout` and systemd signal the process and then its group: the
    # gateway gets SIGTERM twice. The drain (an hour here) must go on; a
    # Ctrl-C (SIGINT) while draining stops it at once.
    process = spawn("--port", "0", "--drain-grace-s", "3600")
    assert process.stderr is not None

    async def said(words: str) -> None:
        while True:  # the gateway's own log lines, to the one we wait for
            line = await asyncio.to_thread(process.stderr.readline)  # type: ignore[union-attr]
            assert line, f"the gateway exited before saying {words!r}"
            if words in line:
                return

    try:
        port, _ = read_port(process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = RawCall(
                channel, start_request(max_tokens=100_000, metadata={"sim.pace_ms": "20"})
            )
            await call.events_until(lambda e: e.HasField("chunk"))
            process.send_signal(signal.SIGTERM)
            await said("draining: no new streams")
            process.send_signal(signal.SIGTERM)
            await said("SIGTERM again: already draining")
            # Still serving the open stream: its next chunks keep coming.
            seen = await call.events_until(lambda e: e.HasField("chunk"))
            after = max(c.seq for c in chunks_of(seen))
            more = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq > after)
            assert chunks_of(more) and process.poll() is None
            process.send_signal(signal.SIGINT)
            # At once, not after the hour of drain grace (60 s only bounds a hang).
            await asyncio.to_thread(process.wait, 60)
            call.cancel()
    finally:
        process.kill()
        process.wait()


def refused(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """`serve` with a bad configuration: exits 2 at once, no traceback; the
    lines it printed on stderr."""
    process = spawn(*args, env=env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2, err
    assert "Traceback" not in err and out == ""
    return err.splitlines()


def test_environment_variables_set_flags() -> None:
    assert refused(env={"TOKENRELAY_PORT": "0", "TOKENRELAY_CHECKPOINT_INTERVAL": "0"}) == [
        "TOKENRELAY_CHECKPOINT_INTERVAL: must be at least 1",
        "Error: 1 configuration mistake; nothing was started.",
    ]


def test_a_config_file_with_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[server]\nport = 0\nstal_timeout_s = 3\n")
    assert refused("--config", str(config))[0] == (
        f"{config}:3: server.stal_timeout_s: is not a known key (did you mean stall_timeout_s?)"
    )


def test_a_config_file_value_out_of_range_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[server]\nport = 70000\n")
    assert refused("--config", str(config))[0] == f"{config}:2: server.port: must be at most 65535"


MISTAKES = """\
[server]
port = "abc"
stal_timeout_s = 3

[recovery]
max_retires = 3

[breaker]
cooldown_s = -1

[bogus]

[providers.main]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "TR_TEST_KEY_THAT_IS_NOT_SET"

[models.fast]
chain = [{ provider = "main", model = "m" }]
"""


def test_serve_reports_every_mistake_of_file_environment_and_flags_at_once(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(MISTAKES)
    lines = refused(
        "--config",
        str(config),
        "--port",
        "0",  # overrides the file's port, which is still checked
        "--resume-secret",
        "short",
        "--redis-url",
        "redis://localhost:abc/0",
        env={"TOKENRELAY_SIM": "perhaps", "TOKENRELAY_STALL_TIMEOUT_S": "soon"},
    )
    assert lines == [
        f"{config}:2: server.port: must be a whole number",
        f"{config}:3: server.stal_timeout_s: is not a known key (did you mean stall_timeout_s?)",
        f"{config}:6: recovery.max_retires: is not a known key (did you mean max_retries?)",
        f"{config}:9: breaker.cooldown_s: must be at least 0",
        f"{config}:11: bogus: is not a known table "
        "(known: auth, breaker, limits, models, providers, recovery, server, tenants)",
        f"{config}:16: providers.main.api_key_env: "
        "environment variable TR_TEST_KEY_THAT_IS_NOT_SET is not set or empty",
        "TOKENRELAY_STALL_TIMEOUT_S: must be a number",
        "TOKENRELAY_SIM: must be true or false",
        "--redis-url: is not a valid Redis URL: port could not be cast to integer value as 'abc'",
        "--resume-secret: entry 1 (kid k0): the secret is too short (fewer than 32 characters); "
        "use 32 random bytes, hex or base64 (`tokenrelay keys secret` prints one)",
        "Error: 10 configuration mistakes; nothing was started.",
    ]


def test_a_bad_redis_url_is_one_line_not_a_traceback() -> None:
    assert refused("--port", "0", "--store", "redis", "--redis-url", "redis://h:abc/0") == [
        "--redis-url: is not a valid Redis URL: port could not be cast to integer value as 'abc'",
        "Error: 1 configuration mistake; nothing was started.",
    ]


async def test_no_sim_makes_model_sim_an_unknown_model() -> None:
    process = spawn("--port", "0", "--no-sim")
    try:
        port, _ = read_port(process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_to_end(channel, start_request(model="sim"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown model 'sim'" in caught.value.details()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_help_shows_the_sim_switch_and_every_variable() -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--sim / --no-sim" in result.output
    for variable in ("TOKENRELAY_SIM", "TOKENRELAY_PORT", "TOKENRELAY_REDIS_URL"):
        assert f"env var: {variable}" in result.output


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


# --- `tokenrelay chat` as a user runs it (issue 8, defect 8) -------------------------------------

CHAT_PROMPT = "tell me about streams"


async def run_chat_command(*args: str, merge_stderr: bool = False) -> tuple[int, str, str]:
    """`tokenrelay chat ARGS` in a real process; the gateway keeps running in
    this test's loop meanwhile. With `merge_stderr` both streams share one
    pipe, as they share a terminal: the second string is then empty."""
    process = await asyncio.create_subprocess_exec(
        *TOKENRELAY,
        "chat",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), (err or b"").decode()


@pytest.mark.parametrize(
    ("faults", "exit_code", "chunks"),
    [
        pytest.param("http:401", 1, 0, id="a failure before any text exits 1"),
        pytest.param("reset@3", 2, 3, id="a failure after some text is a partial answer, exit 2"),
    ],
)
async def test_chat_exit_code_says_whether_any_answer_came_and_the_error_is_said_once(
    relay_factory: RelayFactory, faults: str, exit_code: int, chunks: int
) -> None:
    relay = await relay_factory(max_retries=0, allow_fallback=False)
    code, out, err = await run_chat_command(
        "--target", relay.address, "--meta", f"sim.faults={faults}", CHAT_PROMPT
    )
    assert code == exit_code, err
    error_code = "HTTP_401" if faults == "http:401" else "ECONNRESET"
    assert err.count(error_code) == 1, err
    if chunks == 0:
        assert out == ""
        assert "partial" not in err and "HTTP 401" not in err
        assert err.startswith("error: ")
    else:
        assert out.endswith("\n") and out.strip()
        assert f"— {chunks} chunks" in err and "partial answer" in err


async def test_chat_notices_go_on_their_own_lines_and_leave_the_answer_whole(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(backoff_base_s=0)  # the retry needs no wait at all
    metadata = {"sim.seed": "lines"}
    async with grpc.aio.insecure_channel(relay.address) as channel:
        clean = await run_to_end(
            channel, start_request(prompt=CHAT_PROMPT, max_tokens=40, metadata=metadata)
        )
    answer = text_of(clean)
    # The reset lands in the middle of a line of the answer.
    assert not "".join(chunk.text for chunk in chunks_of(clean)[:5]).endswith("\n")
    code, screen, _ = await run_chat_command(
        "--target", relay.address, "--max-tokens", "40",
        "--meta", "sim.seed=lines", "--meta", "sim.faults=reset@5",
        CHAT_PROMPT,
        merge_stderr=True,
    )  # fmt: skip
    assert code == 0, screen
    lines = screen.splitlines(keepends=True)
    notices = [line for line in lines if line.startswith("[")]
    assert len(notices) == 1 and notices[0].startswith("[notice ECONNRESET: "), screen
    summary = [line for line in lines if line.startswith("— ")]
    assert len(summary) == 1 and "40 chunks" in summary[0]
    # Without its notice and summary lines, the screen is the answer, unbroken.
    rest = "".join(line for line in lines if line not in notices + summary)
    assert rest == answer + "\n"


async def test_chat_to_a_dead_address_reports_the_refused_connection() -> None:
    # A bound socket that never listens: every connection to it is refused.
    # No reconnect: a reconnect waits out its window for a channel that never
    # connects, on the wall clock of a process the test cannot move; the
    # refusal ends the first attempt by itself (the window is only a guard).
    # test_client's test of chat to a dead address moves a reconnect's window
    # on a manual clock.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        code, out, err = await run_chat_command(
            "--target", f"127.0.0.1:{port}",
            "--reconnects", "0", "--connect-timeout-s", "30", "--backoff-base-s", "0",
            CHAT_PROMPT,
        )  # fmt: skip
    assert code == 1
    assert out == ""
    assert "no StreamStarted" not in err, err
    [last] = err.splitlines()[-1:]
    assert last.startswith(f"error: the gateway at 127.0.0.1:{port} is unreachable: "), err
    assert "after 0 reconnect attempt(s)" in last and "Connection refused" in last, err


def test_the_first_message_timeout_is_a_flag_and_a_variable() -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main

    runner = CliRunner()
    shown = runner.invoke(main, ["serve", "--help"])
    assert "--first-message-timeout-s" in shown.output
    assert "TOKENRELAY_FIRST_MESSAGE_TIMEOUT_S" in shown.output
    refused = runner.invoke(main, ["serve"], env={"TOKENRELAY_FIRST_MESSAGE_TIMEOUT_S": "0"})
    assert refused.exit_code != 0
    assert "TOKENRELAY_FIRST_MESSAGE_TIMEOUT_S: " in refused.output
