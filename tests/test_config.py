"""Server settings from file, environment and flags (issue 8): every mistake
of a run reported at once, each where it was made, in plain words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokenrelay_server.config.problems import KeyLines
from tokenrelay_server.config.settings import (
    ConfigError,
    Settings,
    check_redis_url,
    load_settings,
    read_config_file,
)

# Every setting with a flag (and so a TOKENRELAY_* variable), as the CLI passes them.
FLAG_NAMES = (
    "host",
    "port",
    "store",
    "redis_url",
    "resume_secret",
    "checkpoint_interval",
    "stall_timeout_s",
    "first_token_timeout_s",
    "max_retries",
    "sim",
    "redis_cluster",
    "heartbeat_interval_s",
    "heartbeat_ttl_s",
)


def load(
    text: str | None = None,
    *,
    tmp_path: Path,
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    path = None
    if text is not None:
        path = tmp_path / "p.toml"
        path.write_text(text)
    given = dict.fromkeys(FLAG_NAMES)
    given.update(flags or {})
    return load_settings(path, flags=given, env=env or {})


def mistakes(text: str | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text, **kwargs)
    return [problem.describe() for problem in caught.value.problems]


# --- one mistake each: where it is reported and how it reads ------------------------------

ONE_MISTAKE = [
    pytest.param(
        "[server]\nheartbeat_interval_s = 1\nheartbeat_ttl_s = 0.5\n",
        "p.toml:3: server.heartbeat_ttl_s: must be longer than heartbeat_interval_s (1.0), "
        "or every replica would look dead between two heartbeats",
        id="a heartbeat TTL no longer than its interval is refused saying why",
    ),
    pytest.param(
        "[server]\nport = 1\nport_x = 2\n",
        "p.toml:3: server.port_x: is not a known key (did you mean port?)",
        id="a misspelt server key is named at its line with a suggestion",
    ),
    pytest.param(
        '[server]\nhost = "h"\n\nport = "abc"\n',
        "p.toml:4: server.port: must be a whole number",
        id="a server value of the wrong type is named at its line in plain words",
    ),
    pytest.param(
        "[server]\nport = 70000\n",
        "p.toml:2: server.port: must be at most 65535",
        id="a server value out of range says the limit",
    ),
    pytest.param(
        '[server]\nresume_secret = "short"\n',
        "p.toml:2: server.resume_secret: must be at least 16 characters long",
        id="a short resume secret says how long it must be and does not echo it",
    ),
    pytest.param(
        '[server]\nstore = "disk"\n',
        "p.toml:2: server.store: must be 'memory' or 'redis'",
        id="a store that is neither says the choices",
    ),
    pytest.param(
        "[server]\nmax_retries = 2\n",
        "p.toml:2: server.max_retries: is not a [server] key; it belongs in [recovery]",
        id="a recovery key in the server table says where it belongs",
    ),
    pytest.param(
        "[recovery]\njitter = 3\n",
        "p.toml:2: recovery.jitter: must be at most 1",
        id="a recovery value out of range is named in its table",
    ),
    pytest.param(
        "[breaker]\n\ncooldown_s = -1\n",
        "p.toml:3: breaker.cooldown_s: must be at least 0",
        id="a breaker value is named by its key in the table, not the setting",
    ),
    pytest.param(
        "[server]\nport = 1\n\n[srever]\nhost = 'h'\n",
        "p.toml:4: srever: is not a known table (known: breaker, limits, models, providers, "
        "recovery, server)",
        id="an unknown table is named at its header",
    ),
    pytest.param(
        "# top\nport = 1\n",
        "p.toml:2: port: is not a table; the setting port belongs in [server]",
        id="a setting outside any table says which table it belongs in",
    ),
    pytest.param(
        "[server]\nport = 1\nextras.colour = 'red'\n",
        "p.toml:3: server.extras: is not a known key",
        id="a dotted key is named at its line",
    ),
    pytest.param(
        "server = 5\n",
        "p.toml:1: server: must be a table",
        id="a server that is not a table",
    ),
    pytest.param(
        "[server]\nsim = 'maybe'\n",
        "p.toml:2: server.sim: must be true or false",
        id="a sim switch that is no boolean",
    ),
    pytest.param(
        '[server]\nredis_url = "localhost:6379"\n',
        "p.toml:2: server.redis_url: must start with redis://, rediss:// or unix://",
        id="a redis URL with no scheme is named in the file",
    ),
    pytest.param(
        '[server]\nport = 1\nhost = "a\n',
        "p.toml:3: invalid TOML: Illegal character '\\n' (column 10)",
        id="a TOML syntax error has its line in the same place as every other",
    ),
    pytest.param(
        '[providers.p]\nkind = "openai"\nbase_url = "http://h/v1"\napi_key_env = "TR_NOT_SET"\n'
        '[models.m]\nchain = [{ provider = "p", model = "x" }]\n',
        "p.toml:4: providers.p.api_key_env: environment variable TR_NOT_SET is not set or empty",
        id="a key variable that is not set is named at its api_key_env line",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ONE_MISTAKE)
def test_a_file_mistake_is_reported_with_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert mistakes(text, tmp_path=tmp_path) == [f"{tmp_path}/{expected}"]


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "nowhere.toml", flags={}, env={})
    assert str(caught.value) == f"{tmp_path / 'nowhere.toml'}: the file does not exist"


FLAG_AND_ENV_MISTAKES = [
    pytest.param({"port": "abc"}, {}, "--port: must be a whole number", id="a flag names the flag"),
    pytest.param(
        {"resume_secret": "x"},
        {},
        "--resume-secret: must be at least 16 characters long",
        id="a short --resume-secret names the flag, not the setting",
    ),
    pytest.param(
        {"redis_url": "redis://localhost:abc/0"},
        {},
        "--redis-url: is not a valid Redis URL: port could not be cast to integer value as 'abc'",
        id="a redis URL with a bad port is one line naming the flag",
    ),
    pytest.param(
        {},
        {"TOKENRELAY_CHECKPOINT_INTERVAL": "0"},
        "TOKENRELAY_CHECKPOINT_INTERVAL: must be at least 1",
        id="an environment variable names the variable",
    ),
    pytest.param(
        {},
        {"TOKENRELAY_SIM": "perhaps"},
        "TOKENRELAY_SIM: must be true or false",
        id="TOKENRELAY_SIM that is no boolean",
    ),
    pytest.param(
        {},
        {"TOKENRELAY_REDIS_CLUSTER": "perhaps"},
        "TOKENRELAY_REDIS_CLUSTER: must be true or false",
        id="TOKENRELAY_REDIS_CLUSTER that is no boolean",
    ),
    pytest.param(
        {"heartbeat_ttl_s": "0.2"},
        {},
        "--heartbeat-ttl-s: must be longer than heartbeat_interval_s (0.5), "
        "or every replica would look dead between two heartbeats",
        id="a --heartbeat-ttl-s under the default interval names the flag",
    ),
    pytest.param(
        {},
        {"TOKENRELAY_STORE": "disk"},
        "TOKENRELAY_STORE: must be 'memory' or 'redis'",
        id="a choice from the environment says the choices",
    ),
]


@pytest.mark.parametrize(("flags", "env", "expected"), FLAG_AND_ENV_MISTAKES)
def test_a_flag_or_variable_mistake_names_the_flag_or_variable(
    tmp_path: Path, flags: dict[str, Any], env: dict[str, str], expected: str
) -> None:
    assert mistakes(tmp_path=tmp_path, flags=flags, env=env) == [expected]


# --- all at once ----------------------------------------------------------------------------

SEVERAL = """\
[server]
port = "abc"
stal_timeout_s = 3
resume_secret = "too-short"

[recovery]
jitter = 3

[bogus]
x = 1

[providers.main]
kind = "gemini"
base_url = "ftp://x"

[models.fast]
chain = [{ provider = "mian", model = "m" }]
"""


def test_every_mistake_of_file_environment_and_flags_is_reported_together(tmp_path: Path) -> None:
    found = mistakes(
        SEVERAL,
        tmp_path=tmp_path,
        flags={"store": "disk", "redis_url": "http://h"},
        env={"TOKENRELAY_SIM": "perhaps", "TOKENRELAY_MAX_RETRIES": "-1"},
    )
    file = tmp_path / "p.toml"
    assert found == [
        f"{file}:2: server.port: must be a whole number",
        f"{file}:3: server.stal_timeout_s: is not a known key (did you mean stall_timeout_s?)",
        f"{file}:4: server.resume_secret: must be at least 16 characters long",
        f"{file}:7: recovery.jitter: must be at most 1",
        f"{file}:9: bogus: is not a known table (known: breaker, limits, models, providers, "
        "recovery, server)",
        f"{file}:13: providers.main.kind: must be 'openai' or 'anthropic'",
        f"{file}:14: providers.main.base_url: must be an http:// or https:// URL with a host",
        f"{file}:17: models.fast.chain[0].provider: no provider named 'mian' (known: main, sim)",
        "TOKENRELAY_SIM: must be true or false",
        "TOKENRELAY_MAX_RETRIES: must be at least 0",
        "--store: must be 'memory' or 'redis'",
        "--redis-url: must start with redis://, rediss:// or unix://",
    ]
    assert not any("too-short" in line or "Input should" in line for line in found)


def test_a_file_value_that_a_flag_overrides_is_still_checked(tmp_path: Path) -> None:
    found = mistakes("[server]\nport = -5\n", tmp_path=tmp_path, flags={"port": "0"})
    assert found == [f"{tmp_path / 'p.toml'}:2: server.port: must be at least 0"]


def test_a_file_value_that_the_environment_overrides_is_still_checked(tmp_path: Path) -> None:
    found = mistakes(
        '[server]\nredis_url = "redis://h:99999/0"\n',
        tmp_path=tmp_path,
        env={"TOKENRELAY_REDIS_URL": "redis://127.0.0.1:6379/0"},
    )
    assert found == [
        f"{tmp_path / 'p.toml'}:2: server.redis_url: is not a valid Redis URL: "
        "port out of range 0-65535"
    ]


def test_read_config_file_reports_every_mistake_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[recovery]\nmax_retries = 5\nmax_retires = 3\n[breaker]\nwindow_s = 0\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert str(caught.value).splitlines() == [
        f"{path}:3: recovery.max_retires: is not a known key (did you mean max_retries?)",
        f"{path}:5: breaker.window_s: must be greater than 0",
    ]


# --- precedence -----------------------------------------------------------------------------


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    text = "[server]\nport = 1\nhost = '0.0.0.0'\nmax_streams = 7\n[recovery]\nmax_retries = 1\n"
    settings = load(
        text,
        tmp_path=tmp_path,
        flags={"port": "3"},
        env={"TOKENRELAY_PORT": "2", "TOKENRELAY_HOST": "::1", "TOKENRELAY_MAX_RETRIES": ""},
    )
    assert (settings.port, settings.host, settings.max_streams) == (3, "::1", 7)
    assert settings.max_retries == 1  # an empty variable is unset, as click has it


def test_timeouts_from_the_environment_or_flags_override_every_provider(tmp_path: Path) -> None:
    settings = load(
        "[server]\nstall_timeout_s = 9\n",
        tmp_path=tmp_path,
        flags={"first_token_timeout_s": "4"},
        env={"TOKENRELAY_STALL_TIMEOUT_S": "2.5"},
    )
    assert settings.timeout_overrides == {"stall_timeout_s": 2.5, "first_token_timeout_s": 4.0}
    assert load("[server]\nstall_timeout_s = 9\n", tmp_path=tmp_path).timeout_overrides == {}


# --- is model `sim` routable? ---------------------------------------------------------------

MODELS = '[models.m]\nchain = [{ provider = "sim", model = "sim" }]\n'


@pytest.mark.parametrize(
    ("text", "flags", "env", "routable"),
    [
        pytest.param(None, {}, {}, True, id="sim is on with no configuration"),
        pytest.param("[server]\nport = 0\n", {}, {}, True, id="sim is on with no models"),
        pytest.param(MODELS, {}, {}, False, id="sim is off once models are configured"),
        pytest.param("[server]\nsim = true\n" + MODELS, {}, {}, True, id="sim = true wins"),
        pytest.param("[server]\nsim = false\n", {}, {}, False, id="sim = false turns it off"),
        pytest.param(MODELS, {"sim": True}, {}, True, id="--sim turns it on despite models"),
        pytest.param(None, {"sim": False}, {}, False, id="--no-sim turns it off"),
        pytest.param(MODELS, {}, {"TOKENRELAY_SIM": "true"}, True, id="TOKENRELAY_SIM=true"),
        pytest.param(None, {}, {"TOKENRELAY_SIM": "0"}, False, id="TOKENRELAY_SIM=0"),
        pytest.param(
            "[server]\nsim = true\n",
            {"sim": False},
            {"TOKENRELAY_SIM": "true"},
            False,
            id="--no-sim beats the environment and the file",
        ),
    ],
)
def test_sim_is_routable_only_where_wanted(
    tmp_path: Path, text: str | None, flags: dict[str, Any], env: dict[str, str], routable: bool
) -> None:
    assert load(text, tmp_path=tmp_path, flags=flags, env=env).sim_routable is routable


# --- redis URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://user:secret@cache.example:6380/3",
        "redis://[::1]:6379/1",
        "unix:///run/redis.sock?db=2",
        "redis://h:6379/0?socket_timeout=2",
    ],
)
def test_a_good_redis_url_is_accepted(url: str) -> None:
    assert check_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("localhost:6379", "must start with", id="no scheme"),
        pytest.param("http://h:6379", "must start with", id="an http URL"),
        pytest.param("redis://h:abc/0", "port could not be cast", id="a port that is no number"),
        pytest.param("redis://h:70000/0", "port out of range", id="a port out of range"),
        pytest.param("redis://", "must name a host", id="no host"),
        pytest.param("redis://:pw@:6379/0", "must name a host", id="a password and no host"),
        pytest.param("redis://h/zero", "database number", id="a database that is no number"),
        pytest.param("redis://h/0?db=x", "invalid value for 'db'", id="a bad db option"),
        pytest.param("unix://", "socket path", id="a unix URL with no path"),
    ],
)
def test_a_bad_redis_url_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_redis_url(url)


def test_a_redis_password_never_appears_in_the_error(tmp_path: Path) -> None:
    found = mistakes(flags={"redis_url": "redis://:hunter2@h:99999/0"}, tmp_path=tmp_path)
    assert found == ["--redis-url: is not a valid Redis URL: port out of range 0-65535"]


# --- line finding ---------------------------------------------------------------------------


def test_a_table_defined_only_by_dotted_keys_is_found_at_its_first_mention() -> None:
    lines = KeyLines("# x\na.b = 1\n[c.d.e]\nf = 2\n")
    assert (lines.line_of(("a",)), lines.line_of(("c",)), lines.line_of(("c", "d"))) == (2, 3, 3)


@pytest.mark.parametrize(
    ("text", "flags", "env"),
    [
        pytest.param("[server]\nredis_cluster = true\n", {}, {}, id="in the server table"),
        pytest.param(None, {}, {"TOKENRELAY_REDIS_CLUSTER": "true"}, id="by its variable"),
        pytest.param(None, {"redis_cluster": True}, {}, id="by --redis-cluster"),
    ],
)
def test_redis_cluster_is_set_by_file_variable_or_flag(
    tmp_path: Path, text: str | None, flags: dict[str, Any], env: dict[str, str]
) -> None:
    assert load(tmp_path=tmp_path).redis_cluster is False
    assert load(text, tmp_path=tmp_path, flags=flags, env=env).redis_cluster is True


def test_heartbeat_settings_come_from_the_file_and_default_to_half_and_two_seconds(
    tmp_path: Path,
) -> None:
    default = load(tmp_path=tmp_path)
    assert (default.heartbeat_interval_s, default.heartbeat_ttl_s) == (0.5, 2.0)
    text = "[server]\nheartbeat_interval_s = 0.2\nheartbeat_ttl_s = 1\n"
    given = load(text, tmp_path=tmp_path)
    assert (given.heartbeat_interval_s, given.heartbeat_ttl_s) == (0.2, 1.0)
