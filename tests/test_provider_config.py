"""Upstream configuration: the TOML keys of issue 4, errors that name the key
(and its line), keys from the environment only, one pooled client per provider."""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path

import pytest

from tokenrelay_server.config.upstream import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ProviderConfig,
    UpstreamConfigError,
    format_key_path,
    load_upstream_config,
    load_upstream_config_file,
)
from tokenrelay_server.core.model import GenerationParams
from tokenrelay_server.upstream.anthropic import AnthropicProvider
from tokenrelay_server.upstream.base import ProviderRequest
from tokenrelay_server.upstream.build import build_providers, h2_available, make_client
from tokenrelay_server.upstream.openai import OpenAIProvider

EXAMPLE = """\
[server]
listen = "127.0.0.1:50051"   # not ours: ignored here

[providers.local-openai]
kind = "openai"                 # "openai" (any OpenAI-compatible API) or "anthropic"
base_url = "http://127.0.0.1:8081/v1"   # requests go to {base_url}/chat/completions
api_key_env = "LOCAL_OPENAI_KEY"        # optional; the key is read from this env var
connect_timeout_s = 5
first_token_timeout_s = 30
stall_timeout_s = 30

[providers.local-anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:8081/v1/"

[models.fast]                   # the alias a client puts in StartGeneration.model
chain = [
  { provider = "local-openai", model = "gpt-4o-mini" },
  { provider = "local-anthropic", model = "claude-3-5-haiku-latest" },
]
"""


def load(text: str):
    return load_upstream_config(tomllib.loads(text), "gateway.toml", source_text=text)


def problems(text: str) -> list[tuple[str, int | None]]:
    with pytest.raises(UpstreamConfigError) as caught:
        load(text)
    return [(problem.path, problem.line) for problem in caught.value.problems]


def test_the_example_from_the_issue_loads():
    config = load(EXAMPLE)
    openai = config.providers["local-openai"]
    assert (openai.kind, openai.base_url, openai.api_key_env) == (
        "openai",
        "http://127.0.0.1:8081/v1",
        "LOCAL_OPENAI_KEY",
    )
    assert (openai.connect_timeout_s, openai.first_token_timeout_s, openai.stall_timeout_s) == (
        5,
        30,
        30,
    )
    assert openai.max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES == 100 * 1024 * 1024
    assert config.providers["local-anthropic"].base_url == "http://127.0.0.1:8081/v1"
    assert [(e.provider, e.model) for e in config.models["fast"].chain] == [
        ("local-openai", "gpt-4o-mini"),
        ("local-anthropic", "claude-3-5-haiku-latest"),
    ]


def test_an_empty_document_has_no_providers_and_no_models():
    config = load_upstream_config({}, "empty.toml")
    assert (config.providers, config.models) == ({}, {})


@pytest.mark.parametrize(
    ("replace", "by", "path", "line"),
    [
        pytest.param(
            'kind = "openai"',
            'kind = "gemini"',
            "providers.local-openai.kind",
            5,
            id="an unknown kind names the kind key",
        ),
        pytest.param(
            'base_url = "http://127.0.0.1:8081/v1"',
            'base_url = "ftp://x"',
            "providers.local-openai.base_url",
            6,
            id="a base_url that is not http names the base_url key",
        ),
        pytest.param(
            'base_url = "http://127.0.0.1:8081/v1"',
            'base_url = "https://user:s3cret@api.example/v1"',
            "providers.local-openai.base_url",
            6,
            id="a base_url with a password in it is refused",
        ),
        pytest.param(
            'base_url = "http://127.0.0.1:8081/v1"',
            'base_url = "https:///v1"',
            "providers.local-openai.base_url",
            6,
            id="a base_url without a host is refused",
        ),
        pytest.param(
            "connect_timeout_s = 5",
            "connect_timeout_s = -1",
            "providers.local-openai.connect_timeout_s",
            8,
            id="a negative timeout names the timeout key",
        ),
        pytest.param(
            "stall_timeout_s = 30",
            "stall_timeout_s = 30\nstall_timeout = 9",
            "providers.local-openai.stall_timeout",
            11,
            id="a misspelt key is named as unknown",
        ),
        pytest.param(
            'api_key_env = "LOCAL_OPENAI_KEY"',
            'api_key_env = "not a name"',
            "providers.local-openai.api_key_env",
            7,
            id="an api_key_env that is no variable name",
        ),
        pytest.param(
            '{ provider = "local-anthropic", model',
            '{ provider = "nowhere", model',
            "models.fast.chain[1].provider",
            19,
            id="a chain entry naming an unknown provider names its index",
        ),
        pytest.param(
            'model = "gpt-4o-mini"',
            'model = ""',
            "models.fast.chain[0].model",
            18,
            id="an empty model name names its index",
        ),
    ],
)
def test_invalid_values_are_reported_with_key_path_and_line(replace, by, path, line):
    assert problems(EXAMPLE.replace(replace, by)) == [(path, line)]


def test_a_key_in_the_file_is_refused_with_a_pointer_to_api_key_env():
    text = EXAMPLE.replace('api_key_env = "LOCAL_OPENAI_KEY"', 'api_key = "sk-secret"')
    with pytest.raises(UpstreamConfigError) as caught:
        load(text)
    message = str(caught.value)
    assert "providers.local-openai.api_key" in message
    assert "api_key_env" in message
    assert "sk-secret" not in message


def test_a_missing_required_key_is_named_at_its_table():
    assert problems('[providers.p]\nkind = "openai"\n') == [("providers.p.base_url", 1)]


def test_an_empty_chain_is_refused():
    text = '[providers.p]\nkind = "openai"\nbase_url = "http://h/v1"\n[models.m]\nchain = []\n'
    assert problems(text) == [("models.m.chain", 5)]


def test_a_chain_may_name_the_builtin_simulator():
    config = load('[models.demo]\nchain = [{ provider = "sim", model = "sim" }]\n')
    assert config.models["demo"].chain[0].provider == "sim"


def test_arrays_of_tables_are_followed_for_line_numbers():
    text = (
        '[providers.p]\nkind = "openai"\nbase_url = "http://h/v1"\n'
        '[[models.m.chain]]\nprovider = "p"\nmodel = "a"\n'
        '[[models.m.chain]]\nprovider = "q"\nmodel = "b"\n'
    )
    assert problems(text) == [("models.m.chain[1].provider", 8)]


def test_an_unknown_chain_provider_is_reported_with_other_mistakes():
    text = EXAMPLE.replace('kind = "anthropic"', 'kind = "x"')
    text = text.replace('{ provider = "local-openai"', '{ provider = "local-opnai"')
    assert problems(text) == [
        ("providers.local-anthropic.kind", 13),
        ("models.fast.chain[0].provider", 18),
    ]


def test_every_problem_is_reported_at_once():
    text = EXAMPLE.replace('kind = "anthropic"', 'kind = "x"').replace("stall_timeout_s = 30", "")
    text = text.replace("connect_timeout_s = 5", "connect_timeout_s = 0")
    assert {path for path, _ in problems(text)} == {
        "providers.local-openai.connect_timeout_s",
        "providers.local-anthropic.kind",
    }


def test_quoted_keys_are_quoted_in_paths():
    assert format_key_path(("providers", "my.provider", "base_url")) == (
        'providers."my.provider".base_url'
    )


def test_the_message_leads_with_file_line_and_key(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE.replace('kind = "openai"', 'kind = "gemini"'))
    with pytest.raises(UpstreamConfigError) as caught:
        load_upstream_config_file(path)
    assert (
        str(caught.value)
        == f"{path}:5: providers.local-openai.kind: must be 'openai' or 'anthropic'"
    )


def test_a_toml_syntax_error_reports_its_line(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text('[providers.p]\nkind = "openai\n')
    with pytest.raises(UpstreamConfigError) as caught:
        load_upstream_config_file(path)
    assert str(caught.value).startswith(f"{path}:2: invalid TOML: ")


# --- building providers -------------------------------------------------------------------------


async def test_build_providers_makes_one_adapter_and_client_per_provider():
    providers = build_providers(load(EXAMPLE), {"LOCAL_OPENAI_KEY": "sk-local"})
    try:
        assert isinstance(providers["local-openai"], OpenAIProvider)
        assert isinstance(providers["local-anthropic"], AnthropicProvider)
        clients = {id(p._client) for p in providers.values()}  # type: ignore[attr-defined]
        assert len(clients) == 2
        assert all("sk-local" not in repr(p) for p in providers.values())
    finally:
        for provider in providers.values():
            await provider.aclose()


def test_a_missing_key_variable_names_api_key_env_and_the_variable():
    with pytest.raises(UpstreamConfigError) as caught:
        build_providers(load(EXAMPLE), {})
    message = str(caught.value)
    assert "providers.local-openai.api_key_env" in message
    assert "LOCAL_OPENAI_KEY" in message


async def test_the_key_comes_from_the_environment_into_the_request():
    document = {
        "providers": {"p": {"kind": "openai", "base_url": "http://h/v1", "api_key_env": "K"}}
    }
    providers = build_providers(load_upstream_config(document, "t"), {"K": " sk-env \n"})
    provider = providers["p"]
    try:
        request = ProviderRequest(model="m", messages=(), params=GenerationParams())
        sent = provider.build_request(request)  # type: ignore[attr-defined]
        assert sent.headers["authorization"] == "Bearer sk-env"
    finally:
        await provider.aclose()


async def test_the_client_uses_the_connect_timeout_pools_and_http2_only_with_h2():
    cfg = ProviderConfig(
        kind="openai", base_url="http://h/v1", connect_timeout_s=2.5, max_connections=7
    )
    client = make_client(cfg)
    try:
        assert client.timeout.connect == 2.5
        assert client.timeout.read is None  # first-token and stall timeouts are the loop's
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections == 7
        assert pool._http2 is h2_available()
        assert not client.follow_redirects
    finally:
        await client.aclose()


async def test_every_client_verifies_tls_with_one_context_built_once():
    # Loading the CA bundle costs ~25 ms of CPU: a gateway with many
    # providers (or the chaos run, with a gateway per worker) paid it per client.
    first = make_client(ProviderConfig(kind="openai", base_url="https://a.example/v1"))
    second = make_client(ProviderConfig(kind="anthropic", base_url="https://b.example/v1"))
    try:
        contexts = [c._transport._pool._ssl_context for c in (first, second)]  # type: ignore[attr-defined]
        assert contexts[0] is contexts[1]
        assert contexts[0].verify_mode is ssl.CERT_REQUIRED and contexts[0].check_hostname
    finally:
        await first.aclose()
        await second.aclose()


async def test_http2_can_be_turned_off():
    cfg = ProviderConfig(kind="openai", base_url="http://h/v1", http2=False)
    async with make_client(cfg) as client:
        assert client._transport._pool._http2 is False  # type: ignore[attr-defined]
