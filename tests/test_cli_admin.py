"""`tokenrelay stats` and `tokenrelay top` as an operator runs them: real
processes against a real gateway in this test's loop, and `top` on a real
terminal (tmux: send-keys to type, capture-pane to read the screen).

A stream that must still be running while `top` shows it is PACED on the
gateway's ManualClock: it waits mid-generation after the chunks the test let
it make (`produce`), however long the commands take."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from scrape import scrape
from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    eventually,
    generation_of,
    produce,
    run_to_end,
    start_request,
)
from tokenrelay_server.core.clock import ManualClock

TOKENRELAY = [sys.executable, "-m", "tokenrelay_server.cli"]
TOKEN = "admin-token-0123456789"


async def run_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`tokenrelay ARGS` in a real process (stdout a pipe, not a terminal)."""
    process = await asyncio.create_subprocess_exec(
        *TOKENRELAY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_stats_prints_rows_by_type_and_code_most_frequent_first(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(admin_token=TOKEN, backoff_base_s=0, max_retries=3)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for faults in ("http:500,http:500,reset@2", "http:401"):
            await run_to_end(channel, start_request(metadata={"sim.faults": faults}))
    code, out, err = await run_command(
        "stats", "--period", "day", "--target", relay.address, env={"TOKENRELAY_ADMIN_TOKEN": TOKEN}
    )
    assert code == 0, err
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0] == ["errors", "in", "the", "last", "day:", "4"]
    header = "type code count avg bytes avg tokens recoverable providers"
    assert lines[1] == header.split()
    rows = [(line[0], line[1], line[2], line[5]) for line in lines[2:]]
    assert rows == [
        ("protocol", "HTTP_500", "2", "2"),
        ("network", "ECONNRESET", "1", "1"),
        ("protocol", "HTTP_401", "1", "0"),
    ]
    assert lines[3][4] == "2.0"  # the reset came after 2 tokens
    assert TOKEN not in out + err


async def test_stats_with_no_errors_says_so(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(admin_token=TOKEN)
    code, out, _ = await run_command("stats", "--target", relay.address, "--admin-token", TOKEN)
    assert (code, out.strip()) == (0, "no errors in the last hour")


@pytest.mark.parametrize(
    ("served_token", "given", "said"),
    [
        pytest.param(TOKEN, "wrong-token-0123456789", "refused the admin token", id="wrong token"),
        pytest.param(None, TOKEN, "serves no Admin service: start it with", id="no Admin"),
    ],
)
@pytest.mark.parametrize("command", ["stats", "top"])
async def test_an_admin_command_that_cannot_ask_exits_1_saying_why(
    relay_factory: RelayFactory, served_token: str | None, given: str, said: str, command: str
) -> None:
    relay = await relay_factory(admin_token=served_token)
    code, out, err = await run_command(command, "--target", relay.address, "--admin-token", given)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and said in " ".join(err.split()), err
    assert given not in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["stats", "top"])
async def test_an_admin_command_without_a_token_is_a_usage_error(command: str) -> None:
    code, out, err = await run_command(command, env={"TOKENRELAY_ADMIN_TOKEN": ""})
    assert code == 2 and out == ""
    assert "--admin-token" in err and "TOKENRELAY_ADMIN_TOKEN" in err


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        pytest.param(
            ("--admin-token", "short"),
            "--admin-token: must be at least 16 characters",
            id="a short admin token",
        ),
        pytest.param(
            ("--metrics-port", "70000"),
            "--metrics-port: must be at most 65535",
            id="a metrics port out of range",
        ),
    ],
)
async def test_serve_refuses_bad_observability_flags_naming_them(
    flags: tuple[str, ...], problem: str
) -> None:
    code, out, err = await run_command("serve", "--port", "0", *flags)
    assert code == 2 and out == ""
    assert problem in err, err


async def test_top_off_a_terminal_prints_one_snapshot(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    # backoff 0: the resume after the reset needs no clock move.
    relay = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET, backoff_base_s=0)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        await run_to_end(channel, start_request(metadata={"sim.faults": "reset@3"}))
        call = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 1)  # then it waits
        await call.events_until(lambda e: e.HasField("chunk"))
        code, out, err = await run_command("top", "--target", relay.address, "--admin-token", TOKEN)
        call.cancel()
    assert code == 0, err
    assert out.count("tokenrelay top") == 1  # one snapshot, no redraws
    assert f"(replica {relay.hub.replica_id})" in out
    assert "streams: 1 running, 0 detached" in out
    assert "ECONNRESET" in out and "resume" in out and "sim → sim" in out
    assert "closed" in out  # the breaker of sim/sim
    assert "\x1b[" not in out  # no cursor movement or colour off a terminal


# --- top on a real terminal ------------------------------------------------------------------


class Terminal:
    """A tmux server of our own (its own socket) with one 150x45 window."""

    def __init__(self, tmux: str, socket: Path) -> None:
        self._base = [tmux, "-S", str(socket)]

    async def tmux(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *self._base,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode()

    async def screen(self) -> str:
        code, text = await self.tmux("capture-pane", "-p", "-t", "top")
        assert code == 0, text
        return text

    async def until(self, predicate: Callable[[str], bool], *, within_s: float = 30.0) -> str:
        """The screen once `predicate(screen)` holds (checked often; the
        bound only guards against hanging)."""
        text = ""
        try:
            async with asyncio.timeout(within_s):
                while not predicate(text := await self.screen()):  # noqa: ASYNC110 (polling tmux)
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"the screen never showed it; last screen:\n{text}") from None
        return text


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[Terminal]:
    tmux = shutil.which("tmux")
    assert tmux is not None, "tmux is needed (make test installs it: apt-get install tmux)"
    term = Terminal(tmux, tmp_path / "tmux.sock")
    yield term
    await term.tmux("kill-server")


async def test_top_on_a_terminal_refreshes_in_place_and_quits_on_ctrl_c(
    relay_factory: RelayFactory, terminal: Terminal, clock: ManualClock
) -> None:
    relay = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET, backoff_base_s=0)
    command = " ".join(
        [
            "env",
            f"TOKENRELAY_ADMIN_TOKEN={TOKEN}",
            "TERM=xterm-256color",
            *TOKENRELAY,
            "top",
            "--target",
            relay.address,
            "--interval-s",
            "0.2",
        ]
    )
    code, out = await terminal.tmux(
        "new-session", "-d", "-s", "top", "-x", "150", "-y", "45", command
    )
    assert code == 0, out
    first = await terminal.until(lambda s: "streams: 0 running, 0 detached" in s)
    assert f"(replica {relay.hub.replica_id})" in first
    assert "recent recovery actions" in first and "(none)" in first
    async with grpc.aio.insecure_channel(relay.address) as channel:
        await run_to_end(channel, start_request(metadata={"sim.faults": "reset@3"}))
        kept = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        left = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        kept_started = await kept.next_event()
        await left.next_event()
        # Paced from the same time: one second brings a chunk of each.
        await produce(clock, relay, generation_of(relay, kept_started), 1)
        for call in (kept, left):
            await call.events_until(lambda e: e.HasField("chunk"))
        left.cancel()
        later = await terminal.until(
            lambda s: "streams: 1 running, 1 detached" in s and "ECONNRESET" in s
        )
        kept.cancel()
    assert "resume" in later and "sim → sim" in later
    assert "running" in later and "detached" in later  # the streams table's states
    assert later.count("tokenrelay top") == 1  # redrawn in place, not appended
    code, history = await terminal.tmux("display-message", "-p", "-t", "top", "#{history_size}")
    assert history.strip() == "0"  # the alternate screen: nothing scrolled away
    await terminal.tmux("send-keys", "-t", "top", "C-c")

    async def closed() -> bool:  # the session closes when `top` exits
        return (await terminal.tmux("has-session", "-t", "top"))[0] != 0

    await eventually(closed, within_s=30, poll_s=0.05)


async def test_serve_with_metrics_and_admin_logs_where_and_serves_both() -> None:
    process = await asyncio.create_subprocess_exec(
        *TOKENRELAY,
        "serve",
        "--port", "0", "--metrics-port", "0", "--drain-grace-s", "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKENRELAY_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(60):
            port = int((await process.stdout.readline()).split()[1])
            lines = [(await process.stderr.readline()).decode() for _ in range(3)]
        [metrics_line] = [line for line in lines if "metrics at http://" in line]
        url = metrics_line.split("metrics at ")[1].strip()
        assert any("Admin service on" in line for line in lines), lines
        assert TOKEN not in "".join(lines)
        code, out, err = await run_command(
            "stats", "--target", f"127.0.0.1:{port}", "--admin-token", TOKEN
        )
        assert (code, out.strip()) == (0, "no errors in the last hour"), err
        samples = await scrape(url)
        assert samples.get("tokenrelay_store_up") == 1
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()
