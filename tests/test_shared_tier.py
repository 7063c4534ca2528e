"""The shared Redis tier against a real redis-server (issue 9: a shared tier for a fleet).

The session's redis-server is shared; each test keeps to its own key prefix and removes its
keys. Tests that kill, freeze or reconfigure Redis run one of their own.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from tests.support.redis_server import RedisClusterNodes, RedisServer, free_port
from vision_cache.errors import InvalidNameError, SharedEntryCorruptError, SharedTierConfigError
from vision_cache.keys import CacheKey, Namespace
from vision_cache.shared.tier import NullSharedTier, RedisTier, SharedTierConfig, shared_tier
from vision_cache.shared.value import HEADER_SIZE, decode_value, encode_value

NS = Namespace.for_encoder(
    model="m", mmproj="xxh3-128:" + "0" * 32 + ":1", build="b", format_version=1, encoder={}
)
META = b'{"package":"header"}'
KIB = 1024

TierFactory = Callable[..., RedisTier]


def key(i: int) -> CacheKey:
    return NS.key_for_image(b"image %d" % i)


@pytest.fixture
def prefix(redis_server: RedisServer) -> Iterator[str]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    yield prefix
    with redis_server.client() as client:
        for name in client.scan_iter(match=prefix + "*"):
            client.delete(name)


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        yield client


@pytest.fixture
async def make_tier(redis_server: RedisServer, prefix: str) -> AsyncIterator[TierFactory]:
    tiers: list[RedisTier] = []

    def make(url: str | None = None, **options: Any) -> RedisTier:
        options.setdefault("prefix", prefix)
        tier = RedisTier(SharedTierConfig(url or redis_server.url, **options))
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        await tier.aclose()


def entry_name(prefix: str, k: CacheKey) -> str:
    return f"{prefix}pkg1:{k.text}"


# -- values -------------------------------------------------------------------------------


@given(st.binary(max_size=2000), st.binary(min_size=1, max_size=5000))
def test_value_round_trip(meta: bytes, payload: bytes) -> None:
    got_meta, got_payload = decode_value(encode_value(meta, payload))
    assert got_meta == meta
    assert bytes(got_payload) == payload


@given(st.binary(max_size=200), st.binary(min_size=1, max_size=2000), st.data())
def test_any_damaged_byte_is_detected(meta: bytes, payload: bytes, data: st.DataObject) -> None:
    value = bytearray(encode_value(meta, payload))
    # every byte but the reserved field (6, 7) and the nonce (36..43) is checked
    checked = [i for i in range(len(value)) if not (6 <= i < 8 or 36 <= i < HEADER_SIZE)]
    at = data.draw(st.sampled_from(checked))
    value[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SharedEntryCorruptError):
        decode_value(bytes(value))
    with pytest.raises(SharedEntryCorruptError):
        decode_value(bytes(value[:-1]))


def test_config_refuses_what_cannot_work() -> None:
    for url in ("http://127.0.0.1:6379", "127.0.0.1:6379", ""):
        with pytest.raises(SharedTierConfigError):
            SharedTierConfig(url)
    for prefix in ("", "a{b}:", "has space", "x" * 65):
        with pytest.raises(ValueError):
            SharedTierConfig("redis://127.0.0.1", prefix=prefix)
    with pytest.raises(SharedTierConfigError):
        SharedTierConfig("redis://127.0.0.1", timeout_s=0)


def test_config_never_shows_the_password() -> None:
    config = SharedTierConfig("rediss://vc:hunter2@cache:6380/0", password="s3cret")
    assert "hunter2" not in config.redacted_url
    assert config.redacted_url == "rediss://vc:***@cache:6380/0"
    assert "s3cret" not in repr(config)


async def test_null_tier_has_nothing_and_holds_nothing() -> None:
    tier = shared_tier(None)
    assert isinstance(tier, NullSharedTier)
    assert await tier.get(key(0)) is None
    assert not await tier.put(key(0), META, b"x")
    async with tier.claim(key(0)) as claim:
        assert not claim.elsewhere
    await tier.aclose()


# -- packages -----------------------------------------------------------------------------


async def test_round_trip_over_many_windows(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    tier = make_tier(piece_bytes=64 * KIB, window=2)
    payload = os.urandom(1000 * KIB)  # 16 pieces: 8 round trips
    assert await tier.get(key(1)) is None
    assert await tier.put(key(1), META, payload)
    found = await tier.get(key(1))
    assert found is not None
    assert (found.meta, bytes(found.payload), found.pinned) == (META, payload, False)
    assert raw.keys(prefix + "*") == [entry_name(prefix, key(1)).encode()]
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.publishes, stats.errors) == (1, 1, 1, 0)


async def test_ttl_per_entry_and_none_when_pinned(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    tier = make_tier(ttl_s=3600)
    assert await tier.put(key(1), META, b"a" * 100)
    assert await tier.put(key(2), META, b"b" * 100, ttl=30)
    assert await tier.put(key(3), META, b"c" * 100, pin=True)
    assert 3_590_000 < raw.pttl(entry_name(prefix, key(1))) <= 3_600_000
    assert 29_000 < raw.pttl(entry_name(prefix, key(2))) <= 30_000
    assert raw.pttl(entry_name(prefix, key(3))) == -1
    found = await tier.get(key(3))
    assert found is not None and found.pinned


async def test_expired_entry_is_a_miss(make_tier: TierFactory) -> None:
    tier = make_tier()
    assert await tier.put(key(1), META, b"a" * 100, ttl=0.2)
    assert await tier.get(key(1)) is not None
    await asyncio.sleep(0.3)
    assert await tier.get(key(1)) is None


async def test_first_put_wins_and_a_pinned_put_pins(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    tier = make_tier()
    assert await tier.put(key(1), META, b"first")
    assert await tier.put(key(1), META, b"second", pin=True)
    found = await tier.get(key(1))
    assert found is not None
    assert (bytes(found.payload), found.pinned) == (b"first", True)
    assert raw.pttl(entry_name(prefix, key(1))) == -1
    assert tier.stats().publishes == 1


async def test_corrupt_payload_is_a_miss_then_replaced(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    tier = make_tier(piece_bytes=64 * KIB)
    payload = os.urandom(300 * KIB)
    assert await tier.put(key(1), META, payload)
    name = entry_name(prefix, key(1))
    at = HEADER_SIZE + len(META) + 200 * KIB
    raw.setrange(name, at, bytes([payload[200 * KIB] ^ 0x40]))
    assert await tier.get(key(1)) is None
    assert tier.stats().corrupt == 1
    assert not raw.exists(name)
    assert await tier.put(key(1), META, payload)
    found = await tier.get(key(1))
    assert found is not None and bytes(found.payload) == payload


async def test_truncated_value_is_a_miss(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    """What a half-evicted entry would look like if Redis evicted part of a value."""
    tier = make_tier()
    assert await tier.put(key(1), META, os.urandom(10 * KIB))
    name = entry_name(prefix, key(1))
    value = raw.get(name)
    assert isinstance(value, bytes)
    for cut in (len(value) // 2, HEADER_SIZE - 1, 1):
        raw.set(name, value[:cut])
        assert await tier.get(key(1)) is None
        assert not raw.exists(name)
    assert tier.stats().corrupt == 3


async def test_value_gone_between_round_trips_is_a_plain_miss(
    make_tier: TierFactory, raw: redis.Redis, prefix: str, redis_server: RedisServer
) -> None:
    class Vanishing(RedisTier):
        async def _first_window(self, name: str) -> tuple[int, int, bytes]:
            first = await super()._first_window(name)
            raw.delete(name)  # evicted or expired right after the first round trip
            return first

    tier = make_tier(piece_bytes=16 * KIB, window=1)
    assert await tier.put(key(1), META, os.urandom(100 * KIB))
    vanishing = Vanishing(
        SharedTierConfig(redis_server.url, prefix=prefix, piece_bytes=16 * KIB, window=1)
    )
    try:
        assert await vanishing.get(key(1)) is None
        stats = vanishing.stats()
        assert (stats.misses, stats.corrupt, stats.errors) == (1, 0, 0)
    finally:
        await vanishing.aclose()


async def test_eviction_under_maxmemory_is_a_miss_never_an_error(
    tmp_path: Path, prefix: str
) -> None:
    """volatile-lru, the documented policy: pinned entries (no TTL) stay, the rest may go."""
    with RedisServer(
        tmp_path, extra=("--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru")
    ) as server:
        tier = RedisTier(SharedTierConfig(server.url, prefix=prefix))
        try:
            payloads = {i: os.urandom(1024 * KIB) for i in range(14)}
            for i, payload in payloads.items():
                assert await tier.put(key(i), META, payload, pin=i < 2)
            found = {i: await tier.get(key(i)) for i in payloads}
            for i, entry in found.items():
                assert entry is None or bytes(entry.payload) == payloads[i]
            assert found[0] is not None and found[1] is not None
            assert any(entry is None for entry in found.values())
            assert tier.stats().errors == 0
        finally:
            await tier.aclose()


async def test_out_of_memory_fails_the_put_softly(tmp_path: Path, prefix: str) -> None:
    """Pinned entries filling maxmemory: puts fail (counted), Redis stays in use."""
    with RedisServer(
        tmp_path, extra=("--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru")
    ) as server:
        tier = RedisTier(SharedTierConfig(server.url, prefix=prefix, failures=1))
        try:
            results = [
                await tier.put(key(i), META, os.urandom(1024 * KIB), pin=True) for i in range(8)
            ]
            assert results[0] and not all(results)
            assert tier.stats().errors >= 1
            assert not tier.stats().breaker_open  # Redis answered: it is up
            assert await tier.get(key(0)) is not None
        finally:
            await tier.aclose()


async def test_prefixes_keep_deployments_apart(make_tier: TierFactory, prefix: str) -> None:
    a, b = make_tier(prefix=prefix + "a:"), make_tier(prefix=prefix + "b:")
    assert await a.put(key(1), META, b"payload")
    await a.set_name(key(1), "logo")
    assert await b.get(key(1)) is None
    assert await b.resolve_name(NS.id, "logo") is None
    assert await a.resolve_name(NS.id, "logo") == key(1)


async def test_names(make_tier: TierFactory, raw: redis.Redis, prefix: str) -> None:
    tier = make_tier()
    assert await tier.resolve_name(NS.id, "cat") is None
    assert await tier.set_name(key(1), "cat")
    assert await tier.set_name(key(2), "cat")  # re-pointing, as in the store
    assert await tier.resolve_name(NS.id, "cat") == key(2)
    raw.hset(f"{prefix}names1:{NS.id}", "dog", "not-a-digest")
    assert await tier.resolve_name(NS.id, "dog") is None
    with pytest.raises(InvalidNameError):
        await tier.resolve_name(NS.id, "../etc")


# -- fleet single-flight ------------------------------------------------------------------


async def test_lock_is_exclusive_and_released(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    a, b = make_tier(), make_tier()
    async with a.claim(key(1)) as mine:
        assert not mine.elsewhere
        async with b.claim(key(1)) as theirs:
            assert theirs.elsewhere
        async with b.claim(key(2)) as other_key:
            assert not other_key.elsewhere
    assert not raw.exists(f"{prefix}lock:{key(1).text}")
    async with b.claim(key(1)) as now_free:
        assert not now_free.elsewhere


async def test_lock_is_renewed_while_held(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    a, b = make_tier(lock_ttl_s=0.5), make_tier()
    async with a.claim(key(1)):
        await asyncio.sleep(1.2)  # more than two TTLs
        assert raw.pttl(f"{prefix}lock:{key(1).text}") > 0
        async with b.claim(key(1)) as theirs:
            assert theirs.elsewhere


async def test_waiter_gets_the_holders_package(make_tier: TierFactory) -> None:
    a, b = make_tier(), make_tier(wait_s=10)

    async def holder() -> None:
        async with a.claim(key(1)):
            await asyncio.sleep(0.3)  # encoding
            await a.put(key(1), META, b"encoded")

    async with b.claim(key(1)) as early:
        assert not early.elsewhere  # nobody holds it yet: release it again
    task = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    async with b.claim(key(1)) as claim:
        assert claim.elsewhere
        found = await b.wait_for(key(1))
    await task
    assert found is not None and bytes(found.payload) == b"encoded"
    assert b.stats().lock_waits == 1


async def test_waiter_stops_when_the_lock_lapses(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    """A holder that died: its lock lapses and the waiter encodes itself."""
    tier = make_tier(wait_s=10)
    raw.set(f"{prefix}lock:{key(1).text}", "dead-proxy", px=300)
    started = time.monotonic()
    async with tier.claim(key(1)) as claim:
        assert claim.elsewhere
        assert await tier.wait_for(key(1)) is None
    assert time.monotonic() - started < 2


async def test_waiter_gives_up_after_its_bound(
    make_tier: TierFactory, raw: redis.Redis, prefix: str
) -> None:
    tier = make_tier(wait_s=0.3)
    raw.set(f"{prefix}lock:{key(1).text}", "slow-proxy", px=60_000)
    started = time.monotonic()
    assert await tier.wait_for(key(1)) is None
    assert 0.3 <= time.monotonic() - started < 1.5


# -- failures -----------------------------------------------------------------------------


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_breaker_opens_on_a_dead_redis_and_closes_when_it_is_back(
    tmp_path: Path, prefix: str
) -> None:
    server = RedisServer(tmp_path, port=free_port())
    tier = RedisTier(SharedTierConfig(server.url, prefix=prefix, failures=2, cooldown_s=0.3))
    try:
        assert await tier.get(key(1)) is None
        assert not tier.stats().breaker_open
        assert not await tier.put(key(1), META, b"x")
        assert tier.stats().breaker_open
        started = time.perf_counter()
        for _ in range(100):  # skipped without touching the network
            assert await tier.get(key(1)) is None
        assert time.perf_counter() - started < 0.05
        assert tier.stats().errors == 2
        server.start()
        await _until(lambda: not tier.stats().breaker_open)
        assert await tier.put(key(1), META, b"x")
        server.kill()  # and once more, without making a new tier
        assert await tier.get(key(1)) is None
        assert not tier.stats().breaker_open  # failures=2: the second call trips it
        assert await tier.get(key(1)) is None
        assert tier.stats().breaker_open
        server.start()
        await _until(lambda: not tier.stats().breaker_open)
        assert await tier.put(key(1), META, b"y")
        found = await tier.get(key(1))
        assert found is not None and bytes(found.payload) == b"y"
        assert tier.stats().breaker_trips == 2
    finally:
        await tier.aclose()
        server.stop()


async def test_one_timeout_opens_the_breaker(tmp_path: Path, prefix: str) -> None:
    with RedisServer(tmp_path) as server:
        tier = RedisTier(SharedTierConfig(server.url, prefix=prefix, timeout_s=0.2, cooldown_s=0.3))
        try:
            assert await tier.put(key(1), META, b"x")
            server.freeze()
            started = time.perf_counter()
            assert await tier.get(key(1)) is None
            assert 0.15 < time.perf_counter() - started < 1.0
            assert tier.stats().breaker_open
            started = time.perf_counter()
            assert await tier.get(key(1)) is None
            assert time.perf_counter() - started < 0.01
            server.thaw()
            await _until(lambda: not tier.stats().breaker_open)
            assert await tier.get(key(1)) is not None
        finally:
            server.thaw()
            await tier.aclose()


async def test_credentials_from_the_url_or_the_config(
    make_tier: TierFactory, raw: redis.Redis, redis_server: RedisServer
) -> None:
    raw.acl_setuser(
        "vc-test", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"], reset=True
    )
    try:
        port = redis_server.port
        from_url = make_tier(f"redis://vc-test:s3cret@127.0.0.1:{port}/0")
        from_config = make_tier(
            f"redis://127.0.0.1:{port}/0", username="vc-test", password="s3cret"
        )
        wrong = make_tier(f"redis://127.0.0.1:{port}/0", username="vc-test", password="nope")
        assert await from_url.put(key(1), META, b"x")
        assert await from_config.get(key(1)) is not None
        assert await wrong.get(key(1)) is None
        assert wrong.stats().errors == 1
    finally:
        raw.acl_deluser("vc-test")


async def test_redis_cluster(tmp_path: Path, prefix: str) -> None:
    """One key per package: every command lands on the node of its key's slot."""
    with RedisClusterNodes(tmp_path) as cluster:
        a, b = (
            RedisTier(
                SharedTierConfig(
                    cluster.url, prefix=prefix, cluster=True, piece_bytes=64 * KIB, window=2
                )
            )
            for _ in "ab"
        )
        try:
            payloads = {i: os.urandom(300 * KIB) for i in range(6)}
            for i, payload in payloads.items():
                assert await a.put(key(i), META, payload, pin=i == 0)
            for i, payload in payloads.items():
                found = await b.get(key(i))
                assert found is not None and bytes(found.payload) == payload
                assert found.pinned == (i == 0)
            counts = []
            for node in cluster.nodes:
                with node.client() as client:
                    counts.append(client.dbsize())
            assert sum(counts) == 6 and max(counts) < 6  # spread over the nodes
            assert await a.set_name(key(1), "cat")
            assert await b.resolve_name(NS.id, "cat") == key(1)
            async with a.claim(key(9)) as mine, b.claim(key(9)) as theirs:
                assert (mine.elsewhere, theirs.elsewhere) == (False, True)
            assert (a.stats().errors, b.stats().errors) == (0, 0)
        finally:
            await a.aclose()
            await b.aclose()
