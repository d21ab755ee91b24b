"""Model `sim` (the simulator, which takes fault scripts from request
metadata) is routable only where it is wanted (issue 8): by default only
when the configuration defines no [models.*]; `sim`, `--sim/--no-sim` and
TOKENRELAY_SIM override. Where it is off, asking for it is INVALID_ARGUMENT
naming the model, like any unknown model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from serverkit import RelayFactory, end_of, run_to_end, start_request
from tokenrelay_server.config.settings import load_settings
from tokenrelay_server.config.upstream import load_upstream_config

# An alias of our own, served by the simulator as a provider: a deployment
# that defines models, without any real upstream to run.
MODELS = load_upstream_config(
    {"models": {"demo": {"chain": [{"provider": "sim", "model": "sim"}]}}}, "test.toml"
)


async def serves(relay_address: str, model: str) -> bool:
    """True when `model` streams to its end; False when it is refused as an
    unknown model (any other failure fails the test)."""
    async with grpc.aio.insecure_channel(relay_address) as channel:
        try:
            events = await run_to_end(channel, start_request(model=model, max_tokens=5))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            assert f"start.model: unknown model {model!r}" in error.details()
            return False
    assert end_of(events).total_seq == 5
    return True


@pytest.mark.parametrize(
    ("settings", "sim_served"),
    [
        pytest.param({}, True, id="sim is served when no models are configured"),
        pytest.param({"upstream": MODELS}, False, id="sim is refused once models are configured"),
        pytest.param({"upstream": MODELS, "sim": True}, True, id="sim true serves it with models"),
        pytest.param({"sim": False}, False, id="sim false refuses it without models"),
    ],
)
async def test_sim_is_routable_only_where_wanted(
    relay_factory: RelayFactory, settings: dict[str, Any], sim_served: bool
) -> None:
    relay = await relay_factory(**settings)
    assert await serves(relay.address, "sim") is sim_served
    assert ("sim" in relay.hub.router.models) is sim_served
    if "upstream" in settings:
        assert await serves(relay.address, "demo")  # the configured alias, whatever sim says


async def test_the_refusal_lists_the_models_that_are_configured(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(upstream=MODELS)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run_to_end(channel, start_request(model="sim"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "start.model: unknown model 'sim' (configured: demo)"


@pytest.mark.parametrize(
    ("flags", "env", "sim_served"),
    [
        pytest.param({"sim": True}, {}, True, id="--sim serves it despite the models"),
        pytest.param({}, {"TOKENRELAY_SIM": "true"}, True, id="TOKENRELAY_SIM=true serves it"),
        pytest.param(
            {"sim": False}, {"TOKENRELAY_SIM": "true"}, False, id="--no-sim beats the variable"
        ),
        pytest.param({}, {}, False, id="the file's models turn it off by default"),
    ],
)
async def test_the_sim_switch_from_flags_and_environment_reaches_the_server(
    relay_factory: RelayFactory,
    tmp_path: Path,
    flags: dict[str, Any],
    env: dict[str, str],
    sim_served: bool,
) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text('[models.demo]\nchain = [{ provider = "sim", model = "sim" }]\n')
    settings = load_settings(config, flags={"sim": None, **flags}, env=env)
    relay = await relay_factory(upstream=settings.upstream, sim=settings.sim)
    assert await serves(relay.address, "sim") is sim_served
