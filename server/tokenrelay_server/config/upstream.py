"""Upstream configuration: providers and model aliases, from TOML.

    [providers.local-openai]
    kind = "openai"                 # "openai" (any OpenAI-compatible API) or "anthropic"
    base_url = "http://127.0.0.1:8081/v1"   # → {base_url}/chat/completions or {base_url}/messages
    api_key_env = "LOCAL_OPENAI_KEY"        # optional; the key is read from this env var
    connect_timeout_s = 5
    first_token_timeout_s = 30
    stall_timeout_s = 30

    [models.fast]                   # the alias a client puts in StartGeneration.model
    chain = [
      { provider = "local-openai", model = "gpt-4o-mini" },
      { provider = "local-anthropic", model = "claude-3-5-haiku-latest" },
    ]

Optional provider keys (defaults in `ProviderConfig`): `max_response_bytes`
(the size cap, 100 MB), `max_connections`, `max_keepalive_connections`,
`keepalive_expiry_s`, `http2` (used when the `h2` package is installed),
`include_usage` (OpenAI `stream_options.include_usage`; turn off for servers
that reject it), `anthropic_version`, `default_max_tokens` (Anthropic needs
one), `assistant_prefill` (Anthropic continuation as a prefill rather than an
instruction), `forward_sim_headers` (send `sim.*` request metadata as
`x-sim-*` headers, for the mock upstream).

Secrets never live in the file: a key is read from the environment variable
that `api_key_env` names, when the providers are built, and an `api_key`
key in the file is an error that says so.

Validation errors name the key path (`providers.local-openai.base_url`,
`models.fast.chain[1].provider`) and, when the source text is at hand, the
line: tomllib gives no positions, so the line is found by following table
headers and keys through the text (best effort; inline tables and arrays are
followed one level deep).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_RESPONSE_BYTES = 100 * 1024 * 1024
BUILTIN_PROVIDERS: frozenset[str] = frozenset({"sim"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")




class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    """One upstream: where it is, how to authenticate, how long to wait."""

    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key_env: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=30.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, gt=0)
    max_connections: int = Field(default=100, gt=0)
    max_keepalive_connections: int = Field(default=20, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, gt=0)
    http2: bool = True
    include_usage: bool = True
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(default=4096, gt=0)
    assistant_prefill: bool = True
    forward_sim_headers: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"is not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.query or url.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("must be the name of an environment variable, like OPENAI_API_KEY")
        return value


class ChainEntry(_Strict):
    """One step of a fallback chain: a configured provider and its model name."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)


class ModelRoute(_Strict):
    """A model alias: the providers to try, in order."""

    chain: tuple[ChainEntry, ...] = Field(min_length=1)


class UpstreamConfig(_Strict):
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelRoute] = Field(default_factory=dict)


# --- errors that name the key --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str  # `providers.local-openai.base_url`
    message: str
    line: int | None = None

    def describe(self, source_name: str) -> str:
        where = f"{source_name}:{self.line}" if self.line else source_name
        return f"{where}: {self.path}: {self.message}"


class UpstreamConfigError(ValueError):
    """The upstream configuration is invalid. Each problem names its key."""

    def __init__(self, source_name: str, problems: Collection[ConfigProblem]) -> None:
        self.source_name = source_name
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.describe(source_name) for problem in self.problems))


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


_FRIENDLY: dict[str, str] = {
    "extra_forbidden": "is not a known key",
    "missing": "is required",
    "literal_error": "must be one of {expected}",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}


def _problem_message(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and loc and loc[-1] == "api_key":
        return (
            "API keys do not go in the config file; set api_key_env to the name of "
            "an environment variable that holds it"
        )
    template = _FRIENDLY.get(error["type"])
    context = error.get("ctx") or {}
    if template is not None:
        try:
            return template.format(**context)
        except (KeyError, IndexError):
            pass
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def load_upstream_config(
    document: Mapping[str, Any],
    source_name: str,
    *,
    source_text: str | None = None,
    builtin_providers: Collection[str] = BUILTIN_PROVIDERS,
) -> UpstreamConfig:
    """Validate the `providers` and `models` tables of a parsed TOML document.

    Other top-level tables are ignored (they belong to the rest of the
    gateway's configuration). A chain may name a configured provider or one
    of `builtin_providers` (the simulator). Raises `UpstreamConfigError`.
    """
    section = {key: document[key] for key in ("providers", "models") if key in document}
    lines = KeyLines(source_text) if source_text is not None else None
    try:
        config = UpstreamConfig.model_validate(section)
    except pydantic.ValidationError as exc:
        problems: list[ConfigProblem] = []
        for error in exc.errors():
            loc: tuple[str | int, ...] = tuple(error["loc"])
            problems.append(
                ConfigProblem(
                    path=format_key_path(loc),
                    message=_problem_message(error),
                    line=lines.line_of(loc) if lines else None,
                )
            )
        raise UpstreamConfigError(source_name, problems) from None
    problems = []
    known = set(config.providers) | set(builtin_providers)
    for alias, route in config.models.items():
        for index, entry in enumerate(route.chain):
            if entry.provider not in known:
                loc = ("models", alias, "chain", index, "provider")
                names = ", ".join(sorted(known)) or "none"
                problems.append(
                    ConfigProblem(
                        path=format_key_path(loc),
                        message=f"no provider named {entry.provider!r} (known: {names})",
                        line=lines.line_of(loc) if lines else None,
                    )
                )
    if problems:
        raise UpstreamConfigError(source_name, problems)
    return config


def load_upstream_config_file(
    path: str | Path, *, builtin_providers: Collection[str] = BUILTIN_PROVIDERS
) -> UpstreamConfig:
    """Read and validate a TOML file (tomllib's syntax errors carry a line)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamConfigError(str(path), [ConfigProblem("(syntax)", str(exc))]) from None
    return load_upstream_config(
        document, str(path), source_text=text, builtin_providers=builtin_providers
    )


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
    headers and `key =` lines through the source text."""

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
        self._lines.setdefault(key, number)

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
