"""Tenant API keys, tenant-bound resume tokens and who may cancel (issue 13,
items 1 and 2), over real gRPC (and real Redis where keys are shared).

Every refusal is checked for its status and for what its message says (and
never says: no key, no other caller's stream id)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serverkit import (
    ACME_KEY,
    GLOBEX_KEY,
    QUIET,
    SECRET,
    TENANTS,
    RawCall,
    RelayFactory,
    end_of,
    eventually,
    resume_request,
    run_to_end,
    start_request,
    tenants,
)
from test_allow_partial import details_of
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.config.problems import ConfigError
from tokenrelay_server.config.settings import Settings
from tokenrelay_server.core.clock import ManualClock, SystemClock
from tokenrelay_server.store.keys import KeyRecord
from tokenrelay_server.store.tenants_redis import RedisKeys

HANGS = {"sim.faults": "stall@1"}  # one chunk, then nothing (stall timeout out of reach)


async def refused(
    channel: grpc.aio.Channel, request: pb.StreamRequest, *, key: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, request, key=key)
    return caught.value


@pytest.fixture
async def keyed(relay_factory: RelayFactory) -> RelayServer:
    return await relay_factory(
        auth=tenants(acme={"models": ["sim"]}, globex={"models": ["smart"]}), **QUIET
    )


# --- item 1: keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        (None, "has no API key"),
        ((("authorization", "Basic " + ACME_KEY),), "must be `Bearer <key>`"),
        ((("authorization", "Bearer "),), "must be `Bearer <key>`"),
        ((("authorization", "Bearer a b"),), "malformed"),
        ((("authorization", "Bearer " + "k" * 300),), "malformed"),
        ((("authorization", "Bearer " + ACME_KEY + "x"),), "not known"),
        (
            (("authorization", "Bearer " + ACME_KEY), ("authorization", "Bearer " + ACME_KEY)),
            "more than one",
        ),
    ],
    ids=[
        "no key",
        "another scheme",
        "an empty bearer",
        "a key with a space",
        "a key too long",
        "an unknown key",
        "two authorization entries",
    ],
)
async def test_a_missing_malformed_or_unknown_key_is_unauthenticated(
    keyed: RelayServer, metadata: Any, says: str
) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        call = RawCall(channel, start_request(), metadata=metadata or ())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.events_until()
        call.cancel()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says in caught.value.details()
    assert ACME_KEY not in caught.value.details()


async def test_a_known_key_starts_and_a_model_the_tenant_may_not_use_is_denied(
    keyed: RelayServer,
) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=3), key=ACME_KEY)
        assert not end_of(events).partial
        error = await refused(channel, start_request(max_tokens=3), key=GLOBEX_KEY)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tenant globex may not use model 'sim'" in error.details()


async def test_health_and_reflection_need_no_key(keyed: RelayServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(keyed.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in stub.ServerReflectionInfo(iter([request])):
            names = {service.name for service in answer.list_services_response.service}
            break
    assert "tokenrelay.v1.Relay" in names


async def test_an_open_gateway_refuses_a_non_loopback_host_unless_allowed() -> None:
    with pytest.raises(ConfigError) as caught:
        await RelayServer.start(Settings(host="0.0.0.0", port=0, resume_secret=SECRET))
    assert "--allow-unauthenticated" in str(caught.value)
    assert "--host" in str(caught.value)
    server = await RelayServer.start(
        Settings(host="0.0.0.0", port=0, resume_secret=SECRET, allow_unauthenticated=True)
    )
    await server.stop(grace=0)
    keyed = await RelayServer.start(
        Settings(host="0.0.0.0", port=0, resume_secret=SECRET, auth=TENANTS)
    )
    await keyed.stop(grace=0)


async def test_a_revoked_key_is_refused_once_the_two_second_cache_lapses(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    keys = RedisKeys.from_url(redis_url, prefix=redis_prefix)
    key = "trk_revoke_me_" + "c3" * 20
    await keys.add(
        KeyRecord(id="acme-r", tenant="acme", sha256=hashlib.sha256(key.encode()).hexdigest())
    )
    relay = await relay_factory(
        clock=clock, auth_store="redis", redis_url=redis_url, redis_prefix=redis_prefix, **QUIET
    )
    try:
        async with grpc.aio.insecure_channel(relay.address) as channel:
            await run_to_end(channel, start_request(max_tokens=2), key=key)
            assert await keys.revoke("acme-r")
            # Within the cache's 2 s (on the gateway's clock) the key still works ...
            await run_to_end(channel, start_request(max_tokens=2), key=key)
            clock.advance(2.01)
            # ... after it, it is refused like a key never issued.
            error = await refused(channel, start_request(max_tokens=2), key=key)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in error.details() and key not in error.details()
    finally:
        await keys.close()


# --- item 2: resume tokens ------------------------------------------------------------------


async def test_another_tenants_valid_token_is_permission_denied(keyed: RelayServer) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=3), key=ACME_KEY)
        token = events[0].started.resume_token
        error = await refused(channel, resume_request(token, 0), key=GLOBEX_KEY)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "another tenant" in error.details()
        assert details_of(error)["ErrorInfo"].reason == "TOKEN_OTHER_TENANT"  # type: ignore[attr-defined]
        # Its owner reads it.
        again = await run_to_end(channel, resume_request(token, 0), key=ACME_KEY)
    assert end_of(again).total_seq == end_of(events).total_seq


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t: t.rsplit(".", 1)[0] + "." + "A" * 43, "TOKEN_BAD_MAC"),
        (lambda t: t.replace("v2.k0.", "v2.k7.", 1), "TOKEN_UNKNOWN_KID"),
        (lambda t: t[:-5], "TOKEN_MALFORMED"),
    ],
    ids=["a bad MAC", "an unknown kid", "a bad format"],
)
async def test_each_token_refusal_is_permission_denied_with_its_reason(
    keyed: RelayServer, edit: Any, reason: str
) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=3), key=ACME_KEY)
        error = await refused(
            channel, resume_request(edit(events[0].started.resume_token), 0), key=ACME_KEY
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(error)["ErrorInfo"].reason == reason  # type: ignore[attr-defined]


async def test_a_stream_past_retention_is_not_found(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, retention_s=100, auth=TENANTS, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=3), key=ACME_KEY)
        clock.advance(150)  # past the stream's retention, within its token's life
        error = await refused(
            channel, resume_request(events[0].started.resume_token, 0), key=ACME_KEY
        )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_two_hundred_tampered_or_foreign_tokens_over_grpc_none_accepted(
    keyed: RelayServer,
) -> None:
    rng = random.Random(7)
    foreign = ResumeTokens(b"d" * 32, ttl_s=600, clock=SystemClock())
    tally: dict[grpc.StatusCode, int] = {}
    accepted = 0
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=3), key=ACME_KEY)
        token = events[0].started.resume_token
        stream_id = events[0].started.stream_id
        for i in range(200):
            if i % 2:
                at = rng.randrange(len(token))
                candidate = (
                    token[:at] + rng.choice("0Aa_-.".replace(token[at], "")) + token[at + 1 :]
                )
            else:
                candidate = foreign.issue(stream_id, tenant="acme")
            try:
                await run_to_end(channel, resume_request(candidate, 0), key=ACME_KEY)
                accepted += 1
            except grpc.aio.AioRpcError as error:
                tally[error.code()] = tally.get(error.code(), 0) + 1
                assert candidate not in error.details()  # a token is never echoed
    assert accepted == 0
    assert set(tally) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}


async def test_rotation_over_grpc_old_kid_accepted_while_listed_refused_after(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str
) -> None:
    old, new = (
        "ecc72c92b9a14ea808d7b7fefa221793a6c48bfd5a17ba80bd8eec0ba0c7e8b5",
        "0c598e469a12f613df74f65a2e7e5971a4395350a43c9a66a1e67e0f5941203c",
    )
    shared = {"store": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix, **QUIET}
    before = await relay_factory(resume_secret=f"k1:{old}", **shared)
    during = await relay_factory(resume_secret=f"k2:{new},k1:{old}", **shared)
    after = await relay_factory(resume_secret=f"k2:{new}", **shared)
    async with grpc.aio.insecure_channel(before.address) as on_before:
        events = await run_to_end(on_before, start_request(max_tokens=3))
    old_token = events[0].started.resume_token
    assert old_token.startswith("v2.k1.")
    async with grpc.aio.insecure_channel(during.address) as on_during:
        again = await run_to_end(on_during, resume_request(old_token, 0))
    assert end_of(again).total_seq == end_of(events).total_seq
    assert again[0].started.resume_token.startswith("v2.k2.")  # the first kid signs
    async with grpc.aio.insecure_channel(after.address) as on_after:
        error = await refused(on_after, resume_request(old_token, 0))
        # The stream's values were sealed at rest with k1 (store/seal.py):
        # a valid k2 token reads them only while k1 is still listed.
        unsealed = await refused(on_after, resume_request(again[0].started.resume_token, 0))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "key id k1" in error.details()
    assert unsealed.code() == grpc.StatusCode.UNAVAILABLE
    assert "kid k1" in (unsealed.details() or "") and old not in (unsealed.details() or "")
    async with grpc.aio.insecure_channel(after.address) as on_after:
        fresh = await run_to_end(on_after, start_request(max_tokens=3))
        later = await run_to_end(on_after, resume_request(fresh[0].started.resume_token, 0))
    assert end_of(later).total_seq == end_of(fresh).total_seq


async def test_on_an_open_gateway_a_resumed_call_may_cancel(relay_factory: RelayFactory) -> None:
    # Open (no keys): every caller is the one anonymous tenant and there is
    # no credential to ask of a resumer, so the call that resumed may cancel,
    # as a client that reconnected must be able to cancel its own stream.
    relay = await relay_factory(**QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        owner = RawCall(channel, start_request(max_tokens=100_000, metadata=HANGS))
        started = (await owner.next_event()).started
        reader = RawCall(channel, resume_request(started.resume_token, 0))
        await reader.events_until(lambda e: e.HasField("chunk"))
        reader.send(pb.StreamRequest(cancel=pb.Cancel(reason="by the resumer")))
        events = await reader.events_until()
        owners = await owner.events_until()
        owner.cancel()
        reader.cancel()
    assert end_of(events).error.code == "CANCELLED"
    assert end_of(owners).error.code == "CANCELLED"  # every reader of the stream sees it
    await eventually(lambda: relay.hub.running_generations == 0)


async def test_the_tenants_key_may_cancel_on_a_resumed_call(keyed: RelayServer) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        owner = RawCall(channel, start_request(max_tokens=100_000, metadata=HANGS), key=ACME_KEY)
        started = (await owner.next_event()).started
        reader = RawCall(channel, resume_request(started.resume_token, 0), key=ACME_KEY)
        await reader.events_until(lambda e: e.HasField("chunk"))
        reader.send(pb.StreamRequest(cancel=pb.Cancel(reason="by acme")))
        events = await reader.events_until()
        owner.cancel()
        reader.cancel()
    assert end_of(events).error.code == "CANCELLED"
    await eventually(lambda: keyed.hub.running_generations == 0)


async def test_stream_ids_carry_128_random_bits(keyed: RelayServer) -> None:
    async with grpc.aio.insecure_channel(keyed.address) as channel:
        ids = [
            (await run_to_end(channel, start_request(max_tokens=1), key=ACME_KEY))[
                0
            ].started.stream_id
            for _ in range(3)
        ]
    assert all(len(stream_id) == 32 and int(stream_id, 16) >= 0 for stream_id in ids)
    assert len(set(ids)) == 3


async def test_idempotency_keys_are_scoped_to_the_tenant_and_errors_name_no_stream(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth=TENANTS, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = await run_to_end(
            channel, start_request(max_tokens=3, idempotency_key="order-1"), key=ACME_KEY
        )
        acme_stream = first[0].started.stream_id
        # The same key, same tenant, same request: the same stream.
        same = await run_to_end(
            channel, start_request(max_tokens=3, idempotency_key="order-1"), key=ACME_KEY
        )
        assert same[0].started.stream_id == acme_stream
        # Another tenant guessing it gets a stream of its own, never acme's.
        other = await run_to_end(
            channel, start_request(max_tokens=3, idempotency_key="order-1"), key=GLOBEX_KEY
        )
        assert other[0].started.stream_id != acme_stream
        assert not other[0].started.resumed
        # A different request under acme's key: refused, naming no stream.
        error = await refused(
            channel,
            start_request(max_tokens=4, prompt="else", idempotency_key="order-1"),
            key=ACME_KEY,
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in error.details()
    assert acme_stream not in error.details()


# --- keys shared through Redis, on real replica processes ------------------------------------


async def _serve(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    port = int((await process.stdout.readline()).split()[1])
    return process, port


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_keys_added_and_revoked_with_the_cli_on_every_replica(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "replica.toml"
    config.write_text(
        f'[server]\nport = 0\nstore = "redis"\nauth_store = "redis"\nredis_url = "{redis_url}"\n'
        f'redis_prefix = "{redis_prefix}"\nresume_secret = "{SECRET}"\n'
    )
    store = ("--config", str(config))
    status, out, _ = await _cli("keys", "add", "--tenant", "acme", "--id", "acme-cli", *store)
    assert status == 0, out
    key = out.strip().splitlines()[-1]
    status, listing, _ = await _cli("keys", "list", *store)
    assert "acme-cli\tacme" in listing and key not in listing
    replicas = [await _serve(config), await _serve(config)]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _, port in replicas]
        for channel in channels:
            assert not end_of(
                await run_to_end(channel, start_request(max_tokens=2), key=key)
            ).partial
        status, out, _ = await _cli("keys", "revoke", "acme-cli", *store)
        assert status == 0 and "revoked key acme-cli" in out
        for channel in channels:

            async def refused(channel: grpc.aio.Channel = channel) -> bool:
                try:
                    await run_to_end(channel, start_request(max_tokens=1), key=key)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    return True
                return False

            # Within the replicas' 2 s cache; the bound only guards against hanging.
            await eventually(refused, within_s=30, poll_s=0.1)
        for channel in channels:
            await channel.close()
        status, _, err = await _cli("keys", "revoke", "acme-cli", *store)
        assert status == 1 and "no key has id acme-cli" in err
    finally:
        for process, _ in replicas:
            process.kill()
            await process.wait()


async def test_keys_add_for_the_file_prints_toml_that_the_gateway_accepts(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    status, out, err = await _cli("keys", "add", "--tenant", "initech", "--id", "initech-1")
    assert status == 0
    key = err.strip().splitlines()[-1]
    assert key not in out  # the TOML holds only the hash
    config = tmp_path / "keys.toml"
    config.write_text(out)
    from tokenrelay_server.config.settings import read_config_file

    auth = read_config_file(config)["auth"]
    relay = await relay_factory(auth=auth, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=2), key=key)
    assert not end_of(events).partial


async def test_keys_secret_prints_a_secret_serve_accepts() -> None:
    status, out, _ = await _cli("keys", "secret")
    assert status == 0
    secret = out.strip()
    assert Settings(resume_secret=f"k3:{secret}").resume_keys == [("k3", secret)]


@pytest.mark.parametrize(
    "secret",
    ["changeme12345678", "changeme12345678changeme12345678", "ab" * 32, "0f1e2d3c4b5a6978" * 4],
    ids=["the issue's guessable one", "a dictionary word", "a repeated pair", "a repeated block"],
)
async def test_serve_refuses_a_weak_resume_secret(secret: str) -> None:
    status, _, err = await _cli("serve", "--port", "0", "--resume-secret", secret)
    assert status == 2
    assert "--resume-secret: entry 1 (kid k0): the secret" in err
    assert secret not in err


def test_config_mistakes_in_auth_tables_name_the_key(tmp_path: Path) -> None:
    from tokenrelay_server.config.settings import read_config_file

    config = tmp_path / "bad.toml"
    config.write_text(
        '[[auth.keys]]\nid = "a b"\ntenant = "acme"\nsha256 = "nothex"\n'
        "[tenants.acme]\nmax_concurrent_streams = 0\nbogus = 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        read_config_file(config)
    text = str(caught.value)
    assert "auth.keys[0].id" in text
    assert "auth.keys[0].sha256" in text
    assert "tenants.acme.max_concurrent_streams" in text
    assert "tenants.acme.bogus" in text
    assert "nothex" not in text


async def test_serve_on_a_public_host_with_no_key_refuses_unless_allowed() -> None:
    status, _, err = await _cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert status == 2
    assert "--host: no API key is configured" in err and "--allow-unauthenticated" in err
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--host", "0.0.0.0"),
        *("--port", "0", "--allow-unauthenticated"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        assert (await process.stdout.readline()).startswith(b"port ")
    finally:
        process.kill()
        await process.wait()


async def test_an_unreachable_key_store_is_unavailable_never_internal(
    relay_factory: RelayFactory,
) -> None:
    from redisproc import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    relay = await relay_factory(auth_store="redis", redis_url=dead, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        error = await refused(channel, start_request(max_tokens=2), key=ACME_KEY)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot check API keys" in error.details()


def test_resume_secrets_from_the_environment_are_comma_separated_kid_secret_pairs() -> None:
    from tokenrelay_server.config.settings import load_settings

    new, old = "5b" + SECRET[2:], SECRET
    settings = load_settings(
        None, flags={"resume_secret": None}, env={"TOKENRELAY_RESUME_SECRET": f"k2:{new},k1:{old}"}
    )
    assert settings.resume_keys == [("k2", new), ("k1", old)]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, flags={"resume_secret": f"k1:{new},k1:{old}"}, env={})
    assert "--resume-secret: entry 2: key id k1 is given twice" in str(caught.value)
    assert old not in str(caught.value) and new not in str(caught.value)


async def test_serve_takes_resume_secret_twice() -> None:
    new, old = "5b" + SECRET[2:], SECRET
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--port", "0"),
        *("--resume-secret", f"k2:{new}", "--resume-secret", f"k1:{old}"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        port = int((await process.stdout.readline()).split()[1])
        signer = ResumeTokens([("k1", old.encode())], ttl_s=600, clock=SystemClock())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            events = await run_to_end(channel, start_request(max_tokens=2))
            assert events[0].started.resume_token.startswith("v2.k2.")
            stream_id = events[0].started.stream_id
            again = await run_to_end(channel, resume_request(signer.issue(stream_id), 0))
        assert end_of(again).total_seq == end_of(events).total_seq
    finally:
        process.kill()
        await process.wait()
