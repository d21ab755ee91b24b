"""What the Redis store counts as a lost connection, retried within its
window: redis-py's own errors, and the two ways a connection closed under a
running command surfaces from inside redis-py (the nemesis saw both become
INTERNAL on a Redis Cluster after a node restart, one of them on uvloop)."""

from __future__ import annotations

import pytest

from tokenrelay_server.store.errors import StoreUnavailable
from tokenrelay_server.store.redis import RedisStore

CLOSED_UNDER_US = [
    AttributeError("'NoneType' object has no attribute 'writelines'"),
    RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False 0x5>; "
        "the handler is closed"
    ),
]


@pytest.mark.parametrize("failure", CLOSED_UNDER_US, ids=["attribute", "uvloop"])
async def test_a_connection_closed_mid_command_is_retried(failure: Exception) -> None:
    # No command reaches a server here: the call is ours.
    store = RedisStore.from_url("redis://127.0.0.1:1/0", retry_window_s=5.0)
    calls: list[bool] = []

    async def call(retried: bool) -> str:
        calls.append(retried)
        if len(calls) == 1:
            raise failure
        return "answer"

    try:
        assert await store._run("get_meta", "s1", call) == "answer"
    finally:
        await store.close()
    assert calls == [False, True]  # the retry is marked as one


async def test_past_the_window_it_is_store_unavailable() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", retry_window_s=0.0)

    async def call(retried: bool) -> str:
        raise CLOSED_UNDER_US[0]

    try:
        with pytest.raises(StoreUnavailable, match="closed mid-command"):
            await store._run("get_meta", "s1", call)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "bug", [AttributeError("'Chunk' object has no attribute 'x'"), RuntimeError("a bug")]
)
async def test_other_attribute_and_runtime_errors_are_bugs_not_retried(bug: Exception) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", retry_window_s=5.0)
    calls: list[bool] = []

    async def call(retried: bool) -> str:
        calls.append(retried)
        raise bug

    try:
        with pytest.raises(type(bug)):
            await store._run("get_meta", "s1", call)
    finally:
        await store.close()
    assert calls == [False]
