"""Configuration mistakes: where each one is and what is wrong, in plain words.

Every mistake of a run is collected and reported together, one per line, in
one format whatever its source (issue 8):

    tokenrelay.toml:3: server.port: must be a whole number
    tokenrelay.toml:9: providers.main.base_url: must be an http:// or https:// URL with a host
    --resume-secret: entry 1 (kid k0): the secret is too short (fewer than 32 characters); …
    TOKENRELAY_SIM: must be true or false

A file mistake names the file, the line (when it can be found) and the key
path; a flag or environment mistake names the flag or the variable alone.
Values are never echoed: some of them are secrets (`resume_secret`, a
password in `redis_url`).

tomllib gives no positions, so `KeyLines` finds a key's line by following
table headers and `key =` lines through the text (best effort; inline tables
and arrays are followed one level deep).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake. `source` is the file, the flag (`--port`) or the
    environment variable (`TOKENRELAY_PORT`); `path` the key path inside a
    file (`providers.local-openai.base_url`), empty for a flag or a variable."""

    path: str
    message: str
    line: int | None = None
    source: str = ""

    def describe(self, source_name: str | None = None) -> str:
        """`FILE:LINE: path: message`, `FILE: path: message` or `--flag: message`."""
        source = self.source or source_name or ""
        where = f"{source}:{self.line}" if source and self.line else source
        return ": ".join(part for part in (where, self.path, self.message) if part)

    def __str__(self) -> str:
        return self.describe()


class ConfigError(Exception):
    """The configuration is invalid: nothing was started. `problems` lists
    every mistake found (each names its file and line, flag or variable);
    fix them all and start again."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.describe() for problem in self.problems))


def format_key_path(loc: tuple[str | int, ...]) -> str:
    """('models', 'fast', 'chain', 1, 'provider') → models.fast.chain[1].provider"""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
        text += ("." if text else "") + key
    return text


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def toml_syntax_problem(source_name: str, error: tomllib.TOMLDecodeError) -> ConfigProblem:
    """tomllib's message ends with "(at line N, column M)": the line goes
    where every other line goes, the column stays in the message."""
    message = str(error)
    match = _TOML_POSITION.search(message)
    if match is None:
        return ConfigProblem("", f"invalid TOML: {message}", None, source_name)
    text = message[: match.start()]
    return ConfigProblem(
        "", f"invalid TOML: {text} (column {match.group(2)})", int(match.group(1)), source_name
    )


# --- pydantic's wording → ours ----------------------------------------------------------------

# pydantic error type → message; `{name}` fields come from the error's ctx.
_FRIENDLY: dict[str, str] = {
    "extra_forbidden": "is not a known key",
    "missing": "is required",
    "literal_error": "must be {expected}",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "too_short": "must not be empty",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "tuple_type": "must be an array",
    "list_type": "must be an array",
}


_T = TypeVar("_T")


def _plain_number(value: _T) -> _T | int:
    # 1.0 → 1, so a bound reads "at most 1", not "at most 1.0".
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def friendly_message(error: Mapping[str, Any]) -> str:
    """A pydantic error (one item of `ValidationError.errors()`) in plain words."""
    loc = tuple(error["loc"])
    kind = error["type"]
    context = {key: _plain_number(value) for key, value in (error.get("ctx") or {}).items()}
    if kind == "extra_forbidden" and loc and loc[-1] == "api_key":
        return (
            "API keys do not go in the config file; set api_key_env to the name of "
            "an environment variable that holds it"
        )
    if kind == "string_too_short":
        least = context.get("min_length", 1)
        return "must not be empty" if least <= 1 else f"must be at least {least} characters long"
    template = _FRIENDLY.get(kind)
    if template is not None:
        try:
            return template.format(**context)
        except (KeyError, IndexError):
            pass
    # The long tail: pydantic's own sentence, in our voice.
    message = str(error["msg"]).removeprefix("Value error, ")
    return message.replace("Input should be", "must be")


# Where a value came from: (source, key path, line) for a pydantic `loc`.
Locator = Callable[[tuple[str | int, ...]], tuple[str, str, int | None]]


def validation_problems(error: pydantic.ValidationError, locate: Locator) -> list[ConfigProblem]:
    """One problem per pydantic error; `locate(loc)` says where the value came
    from: (source, key path, line)."""
    problems = []
    for item in error.errors():
        loc: tuple[str | int, ...] = tuple(item["loc"])
        source, path, line = locate(loc)
        problems.append(ConfigProblem(path, friendly_message(item), line, source))
    return problems


# --- from keys to line numbers (best effort) --------------------------------------------------


_KEY_PART = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*')


def _split_key(text: str) -> tuple[tuple[str, ...], str] | None:
    """('a', 'b'), rest for `a."b" = rest`; None when the text starts with no key."""
    parts: list[str] = []
    position = 0
    while True:
        match = _KEY_PART.match(text, position)
        if not match or match.end() == match.start():
            return None
        parts.append(next(group for group in match.groups() if group is not None))
        position = match.end()
        if text.startswith(".", position):
            position += 1
            continue
        return tuple(parts), text[position:]


class KeyLines:
    """Maps key paths to the line that defines them, by following table
    headers and `key =` lines through the source text. A table defined only
    implicitly (`[a.b]` defines `a`, so does `a.b = 1`) is found at its first
    mention."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str | int, ...], int] = {}
        table: tuple[str | int, ...] = ()
        array_counts: dict[tuple[str | int, ...], int] = {}
        open_array: tuple[tuple[str | int, ...], int] | None = None  # key, items so far
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if open_array is not None:
                key, count = open_array
                count = self._inline_items(key, line, number, count)
                open_array = (key, count)
                if line.startswith("]") or line.rstrip(",").endswith("]"):
                    open_array = None
                continue
            if line.startswith("[["):
                parsed = _split_key(line[2:])
                if parsed:
                    header = parsed[0]
                    index = array_counts.get(header, 0)
                    array_counts[header] = index + 1
                    table = (*header, index)
                    self._remember(header, number)
                    self._remember(table, number)
                continue
            if line.startswith("["):
                parsed = _split_key(line[1:])
                if parsed:
                    table = parsed[0]
                    self._remember(table, number)
                continue
            parsed = _split_key(line)
            if not parsed or not parsed[1].lstrip().startswith("="):
                continue
            key = (*table, *parsed[0])
            self._remember(key, number)
            value = parsed[1].lstrip()[1:].strip()
            if value.startswith("["):
                count = self._inline_items(key, value[1:], number, 0)
                if not value.rstrip(",").endswith("]"):
                    open_array = (key, count)
            elif value.startswith("{"):
                self._inline_table(key, value[1:], number)

    def _remember(self, key: tuple[str | int, ...], number: int) -> None:
        # The key and every table above it; the first mention wins.
        for end in range(len(key), 0, -1):
            self._lines.setdefault(key[:end], number)

    def _inline_items(self, key: tuple[str | int, ...], text: str, number: int, count: int) -> int:
        # One level deep: each `{` on the line starts the next item.
        for piece in text.split("{")[1:]:
            item = (*key, count)
            self._remember(item, number)
            self._inline_table(item, piece, number)
            count += 1
        return count

    def _inline_table(self, key: tuple[str | int, ...], text: str, number: int) -> None:
        for assignment in text.split(","):
            parsed = _split_key(assignment)
            if parsed and parsed[1].lstrip().startswith("="):
                self._remember((*key, *parsed[0]), number)

    def line_of(self, loc: tuple[str | int, ...]) -> int | None:
        """The line of the longest prefix of `loc` that the text defines."""
        for end in range(len(loc), 0, -1):
            number = self._lines.get(loc[:end])
            if number is not None:
                return number
        return None
