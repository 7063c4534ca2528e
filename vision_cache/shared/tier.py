"""The shared tier: visual packages in Redis (or Valkey), one copy for a fleet of proxies.

    tier = shared_tier(SharedTierConfig("redis://cache.internal:6379/0", prefix="team-a:"))
    found = await tier.get(key)                    # SharedEntry | None
    await tier.put(key, meta, payload, pin=True)   # False: not published (Redis trouble)
    async with tier.claim(key) as claim:           # fleet single-flight, best effort
        if claim.elsewhere:                        # another proxy is encoding it right now
            found = await tier.wait_for(key)
    await tier.aclose()

`shared_tier(None)` gives `NullSharedTier`, which has nothing and holds no lock, so callers
never test for a disabled tier. Keys in Redis (docs/scaling.md):

    <prefix>pkg1:<vc1 key>    one string per package (header, meta, payload); TTL unless pinned
    <prefix>lock:<vc1 key>    fleet single-flight lock: a random token, short PX, renewed
    <prefix>names1:<ns id>    hash: reference name -> image digest; no TTL

A value (vision_cache.shared.value: header, meta, payload) is written with one SET NX: Redis
adopts the argument's buffer, so even 18.6 MB costs its event loop about 0.01 ms. It is read in
GETRANGE pieces, `window` per round trip: a whole GET copies the value into the reply at once,
holding Redis for ~10 ms at 18.6 MB, against ~0.6 ms per round trip of four 1 MiB pieces
(scripts/bench_redis.py, docs/benchmarks.md). One key per entry means eviction and expiry take
an entry whole; a value that vanishes between two round trips reads short, which is a miss.

Nothing here raises for Redis trouble: a failed read is a miss, a failed write returns False.
After `failures` errors in a row, or one timeout, a circuit breaker skips Redis for
`cooldown_s` while a background probe waits for it to answer again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from vision_cache.errors import (
    InvalidKeyError,
    SharedEntryCorruptError,
    SharedTierConfigError,
    SharedTierError,
    SharedTierRefusedError,
    SharedTierTimeoutError,
    SharedTierUnavailableError,
)
from vision_cache.keys import CacheKey, validate_digest, validate_name
from vision_cache.shared.breaker import CircuitBreaker
from vision_cache.shared.value import HEADER_SIZE, ValueHeader, encode_value

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1024 * 1024
DEFAULT_TTL_S = 7 * 24 * 3600.0
_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SCHEMES = ("redis", "rediss", "unix")

# KEYS[1] is ours only while it holds our token: compare and act in one step.
_UNLOCK = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_DROP_IF_SAME = (
    "if redis.call('GETRANGE', KEYS[1], 0, ARGV[1]) == ARGV[2] then "
    "return redis.call('DEL', KEYS[1]) end return 0"
)


@dataclasses.dataclass(frozen=True, slots=True)
class SharedTierConfig:
    """Where the shared tier lives and how patient it is with it.

        SharedTierConfig("redis://cache.internal:6379/0")
        SharedTierConfig("rediss://vcache@cache.internal:6380/0", password=secret,
                         prefix="team-a:", timeout_s=0.2)

    Credentials in the URL win over `username`/`password`. `timeout_s` bounds each round
    trip (one per `window` x `piece_bytes` moved); `ttl_s` is how long unpinned entries live.
    With `cluster`, the URL names any one node of a Redis Cluster.
    """

    url: str
    prefix: str = "vcache:"
    cluster: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    timeout_s: float = 0.5
    ttl_s: float = DEFAULT_TTL_S
    lock_ttl_s: float = 5.0
    wait_s: float = 60.0
    failures: int = 3
    cooldown_s: float = 5.0
    piece_bytes: int = MIB
    window: int = 4
    max_connections: int = 32

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in _SCHEMES:
            raise SharedTierConfigError(
                f"shared store URL must start with one of {', '.join(s + '://' for s in _SCHEMES)}"
                f", got {self.redacted_url!r}"
            )
        if not _PREFIX.fullmatch(self.prefix):
            # no braces: they would make Redis Cluster hash only part of a key
            raise SharedTierConfigError(f"prefix must match {_PREFIX.pattern}, got {self.prefix!r}")
        positive = (self.timeout_s, self.ttl_s, self.lock_ttl_s, self.cooldown_s)
        if min(positive) <= 0 or self.wait_s < 0:
            raise SharedTierConfigError("timeouts, TTLs and the cool-down must be positive")
        if self.failures < 1 or self.window < 1 or self.max_connections < 1:
            raise SharedTierConfigError("failures, window and max_connections must be >= 1")
        if self.piece_bytes < HEADER_SIZE:
            raise SharedTierConfigError(f"piece_bytes must be at least {HEADER_SIZE}")
        if self.cluster and urlsplit(self.url).scheme == "unix":
            raise SharedTierConfigError("a Redis Cluster is reached over TCP, not unix://")

    @property
    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def window_bytes(self) -> int:
        return self.piece_bytes * self.window


@dataclasses.dataclass(frozen=True, slots=True)
class SharedEntry:
    """A package read from the shared tier; `payload` is a view over the bytes read."""

    meta: bytes
    payload: memoryview
    pinned: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of `claim()`: `elsewhere` if another proxy holds the key's lock."""

    elsewhere: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SharedTierStats:
    hits: int = 0
    misses: int = 0
    publishes: int = 0
    corrupt: int = 0
    errors: int = 0
    lock_waits: int = 0
    breaker_open: bool = False
    breaker_trips: int = 0


# -- the tiers ---------------------------------------------------------------------------


class SharedTier(ABC):
    """A tier shared by every proxy of a fleet; never raises for its backend's trouble."""

    @abstractmethod
    async def get(self, key: CacheKey) -> SharedEntry | None: ...

    @abstractmethod
    async def put(
        self,
        key: CacheKey,
        meta: bytes,
        payload: bytes | memoryview,
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> bool: ...

    @abstractmethod
    async def discard(self, key: CacheKey) -> None: ...

    @abstractmethod
    async def set_name(self, key: CacheKey, name: str) -> bool: ...

    @abstractmethod
    async def resolve_name(self, namespace_id: str, name: str) -> CacheKey | None: ...

    @abstractmethod
    def claim(self, key: CacheKey) -> AbstractAsyncContextManager[Claim]: ...

    @abstractmethod
    async def wait_for(self, key: CacheKey) -> SharedEntry | None: ...

    @abstractmethod
    def stats(self) -> SharedTierStats: ...

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class NullSharedTier(SharedTier):
    """No shared tier: every read misses, nothing is published, no proxy waits."""

    async def get(self, key: CacheKey) -> SharedEntry | None:
        return None

    async def put(
        self,
        key: CacheKey,
        meta: bytes,
        payload: bytes | memoryview,
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> bool:
        return False

    async def discard(self, key: CacheKey) -> None:
        return None

    async def set_name(self, key: CacheKey, name: str) -> bool:
        return False

    async def resolve_name(self, namespace_id: str, name: str) -> CacheKey | None:
        return None

    @contextlib.asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        yield Claim(elsewhere=False)

    async def wait_for(self, key: CacheKey) -> SharedEntry | None:
        return None

    def stats(self) -> SharedTierStats:
        return SharedTierStats()

    def describe(self) -> str:
        return "off"

    async def aclose(self) -> None:
        return None


def shared_tier(config: SharedTierConfig | None) -> SharedTier:
    """The tier for `config`; `NullSharedTier` when there is none."""
    return NullSharedTier() if config is None else RedisTier(config)


class RedisTier(SharedTier):
    """Packages, names and locks in one Redis (or Valkey) database. One event loop owns it."""

    def __init__(self, config: SharedTierConfig) -> None:
        self._config = config
        self._redis = _cluster_client(config) if config.cluster else _client(config)
        self._breaker = CircuitBreaker(failures=config.failures, cooldown_s=config.cooldown_s)
        self._counts: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._unlock = self._redis.register_script(_UNLOCK)
        self._renew = self._redis.register_script(_RENEW)
        self._drop_if_same = self._redis.register_script(_DROP_IF_SAME)

    def describe(self) -> str:
        return f"{self._config.redacted_url} (prefix {self._config.prefix})"

    def stats(self) -> SharedTierStats:
        c = self._counts
        return SharedTierStats(
            c["hits"],
            c["misses"],
            c["publishes"],
            c["corrupt"],
            c["errors"],
            c["lock_waits"],
            self._breaker.is_open,
            self._breaker.trips,
        )

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()

    # -- key names --------------------------------------------------------------------

    def _entry_name(self, key: CacheKey) -> str:
        return f"{self._config.prefix}pkg1:{key.text}"

    def _lock_name(self, key: CacheKey) -> str:
        return f"{self._config.prefix}lock:{key.text}"

    def _names_name(self, namespace_id: str) -> str:
        return f"{self._config.prefix}names1:{namespace_id}"

    # -- packages ---------------------------------------------------------------------

    async def get(self, key: CacheKey) -> SharedEntry | None:
        """The fleet's package for `key`, checksums verified; None on a miss, a corrupt value
        (deleted, so the next put replaces it), or Redis trouble."""
        if not self._breaker.allows():
            return None
        try:
            found = await self._read(self._entry_name(key))
        except SharedTierError as exc:
            self._failed("get", exc)
            return None
        self._count("hits" if found is not None else "misses")
        return found

    async def _read(self, name: str) -> SharedEntry | None:
        size, pttl, head = await self._first_window(name)
        if size == 0:
            return None  # absent, expired or evicted
        try:
            header = ValueHeader.parse(head, size)
            value = await self._rest(name, head, size)
            if value is None:
                return None  # evicted, expired or deleted between round trips: a miss
            meta, payload = header.split(value)
        except SharedEntryCorruptError as exc:
            await self._drop_corrupt(name, head[:HEADER_SIZE], exc)
            return None
        return SharedEntry(meta, payload, pinned=pttl == -1)  # -1: no TTL, i.e. pinned

    async def _first_window(self, name: str) -> tuple[int, int, bytes]:
        """Size, TTL and the first window of the value, as one consistent snapshot."""
        span = self._config.piece_bytes
        # MULTI: size, TTL and header must describe the same value
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.strlen(name)
            pipe.pttl(name)
            for i in range(self._config.window):
                pipe.getrange(name, i * span, (i + 1) * span - 1)
            size, pttl, *pieces = await self._io(pipe.execute())
        return int(size), int(pttl), b"".join(pieces)

    async def _rest(self, name: str, head: bytes, size: int) -> bytes | None:
        """The whole value, reading what `head` lacks in windows; None if it shrank."""
        pieces = [head]
        span = self._config.piece_bytes
        for batch in _batched(range(len(head), size, span), self._config.window):
            async with self._redis.pipeline(transaction=False) as pipe:
                for start in batch:
                    pipe.getrange(name, start, min(start + span, size) - 1)
                pieces.extend(await self._io(pipe.execute()))
        value = b"".join(pieces)
        return value if len(value) == size else None

    async def _drop_corrupt(self, name: str, head: bytes, exc: SharedEntryCorruptError) -> None:
        log.warning("shared tier: %s is corrupt (%s); deleting it", name, exc)
        self._count("corrupt")
        # Only if it is still the value we read: another proxy may have replaced it already.
        await self._io(self._drop_if_same(keys=[name], args=[len(head) - 1, head]))

    async def put(
        self,
        key: CacheKey,
        meta: bytes,
        payload: bytes | memoryview,
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> bool:
        """Publish a package unless the fleet has it (the first put wins, as in the store);
        with `pin`, the entry loses its TTL. False if it could not be published."""
        if not self._breaker.allows():
            return False
        name = self._entry_name(key)
        try:
            created = False
            # a look first: re-sending tens of MB only for SET NX to drop them is waste
            if not await self._io(self._redis.exists(name)):
                created = await self._publish(name, encode_value(meta, payload), pin, ttl)
            if pin and not created:
                await self._io(self._redis.persist(name))
        except SharedTierError as exc:
            self._failed("put", exc)
            return False
        if created:
            self._count("publishes")
        return True

    async def _publish(self, name: str, value: bytes, pin: bool, ttl: float | None) -> bool:
        ttl_ms = None if pin else max(1, round((ttl or self._config.ttl_s) * 1000))
        rounds = -(-len(value) // self._config.window_bytes)  # as patient as a read of it
        done = await self._io(
            self._redis.set(name, value, nx=True, px=ttl_ms),
            timeout_s=self._config.timeout_s * max(1, rounds),
        )
        return bool(done)

    async def discard(self, key: CacheKey) -> None:
        """Delete a package the caller found unusable, so the next put replaces it."""
        if self._breaker.allows():
            try:
                await self._io(self._redis.delete(self._entry_name(key)))
            except SharedTierError as exc:
                self._failed("discard", exc)

    # -- names ------------------------------------------------------------------------

    async def set_name(self, key: CacheKey, name: str) -> bool:
        """Point `name` at `key` for the whole fleet (names never expire)."""
        validate_name(name)
        if not self._breaker.allows():
            return False
        try:
            await self._io(self._redis.hset(self._names_name(key.namespace_id), name, key.digest))
        except SharedTierError as exc:
            self._failed("set_name", exc)
            return False
        return True

    async def resolve_name(self, namespace_id: str, name: str) -> CacheKey | None:
        validate_name(name)
        if not self._breaker.allows():
            return None
        try:
            digest = await self._io(self._redis.hget(self._names_name(namespace_id), name))
        except SharedTierError as exc:
            self._failed("resolve_name", exc)
            return None
        return _key_or_none(namespace_id, digest)

    # -- fleet single-flight ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        """Hold the key's fleet lock while the body runs, if nobody else does. Best effort:
        with Redis unavailable the body runs unlocked (`elsewhere` False)."""
        name, token = self._lock_name(key), secrets.token_hex(16)
        held = await self._try_lock(name, token)
        if held is not True:
            yield Claim(elsewhere=held is False)
            return
        beat = self._spawn(self._heartbeat(name, token))
        try:
            yield Claim(elsewhere=False)
        finally:
            beat.cancel()
            await self._release(name, token)

    async def _try_lock(self, name: str, token: str) -> bool | None:
        """True: ours; False: another proxy's; None: Redis unavailable."""
        if not self._breaker.allows():
            return None
        try:
            ok = await self._io(self._redis.set(name, token, nx=True, px=self._lock_ms()))
        except SharedTierError as exc:
            self._failed("lock", exc)
            return None
        return bool(ok)

    async def _heartbeat(self, name: str, token: str) -> None:
        """Keep our lock while the encode runs; a crashed proxy's lapses in lock_ttl_s."""
        while True:
            await asyncio.sleep(self._config.lock_ttl_s / 3)
            if not self._breaker.allows():
                continue
            try:
                if not await self._io(self._renew(keys=[name], args=[token, self._lock_ms()])):
                    return  # lapsed and taken: nothing left to renew
            except SharedTierError as exc:
                self._failed("lock", exc)

    async def _release(self, name: str, token: str) -> None:
        if not self._breaker.allows():
            return  # it lapses by itself
        try:
            await self._io(self._unlock(keys=[name], args=[token]))
        except SharedTierError as exc:
            self._failed("unlock", exc)

    async def wait_for(self, key: CacheKey) -> SharedEntry | None:
        """While another proxy holds the key's lock, wait for its package (up to wait_s).
        None if the lock goes away without a package, the bound passes, or Redis fails:
        the caller then encodes itself."""
        entry, lock = self._entry_name(key), self._lock_name(key)
        self._count("lock_waits")
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self._config.wait_s, 0.01
        while self._breaker.allows() and loop.time() < deadline:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.exists(entry)
                    pipe.exists(lock)
                    has_entry, locked = await self._io(pipe.execute())
            except SharedTierError as exc:
                self._failed("wait", exc)
                return None
            if has_entry:
                return await self.get(key)
            if not locked:
                return None  # the holder failed, or died and its lock lapsed
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        return None

    def _lock_ms(self) -> int:
        return max(1, round(self._config.lock_ttl_s * 1000))

    # -- the boundary: every round trip, the breaker and its probe --------------------

    async def _io(self, op: Awaitable[T], timeout_s: float | None = None) -> T:
        """Await one round trip, translating redis-py's failures at this one place."""
        try:
            async with asyncio.timeout(timeout_s or self._config.timeout_s):
                result = await op
        except Exception as exc:
            error = _translate(exc)
            if error is None:
                raise
            raise error from exc
        self._breaker.record_success()
        return result

    def _failed(self, op: str, exc: SharedTierError) -> None:
        self._count("errors")
        if isinstance(exc, SharedTierTimeoutError):
            tripped = self._breaker.record_timeout()
        elif isinstance(exc, SharedTierUnavailableError):
            tripped = self._breaker.record_failure()
        else:  # Redis answered (out of memory, say): it is up, the breaker stays closed
            log.warning("shared tier refused %s: %s", op, exc)
            return
        log.debug("shared tier %s failed: %s", op, exc)
        if tripped:
            log.warning(
                "shared tier %s unavailable (%s): skipping it, probing every %g s",
                self._config.redacted_url,
                exc,
                self._config.cooldown_s,
            )
            if self._probe is None or self._probe.done():
                self._probe = self._spawn(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        """Off the request path: PING after each cool-down until Redis answers."""
        while self._breaker.is_open:
            await asyncio.sleep(self._breaker.retry_in())
            try:
                await self._io(self._redis.ping())
            except SharedTierError:
                self._breaker.reopen()
                continue
            self._breaker.close()
            log.warning("shared tier %s is back", self._config.redacted_url)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a strong reference until it ends
        task.add_done_callback(self._tasks.discard)
        return task

    def _count(self, name: str) -> None:
        self._counts[name] += 1


def _client(config: SharedTierConfig) -> Redis:
    _require_redis_py()
    from redis.asyncio import BlockingConnectionPool, Redis

    try:
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=None,  # waiting for a connection is bounded by each call's own timeout
            **_client_options(config),
        )
    except ValueError as exc:
        raise SharedTierConfigError(f"bad shared store URL {config.redacted_url}: {exc}") from None
    # the client owns the pool: closing it closes the pool's connections
    return Redis.from_pool(pool)


def _cluster_client(config: SharedTierConfig) -> RedisCluster:
    _require_redis_py()
    from redis.asyncio import RedisCluster
    from redis.exceptions import RedisClusterException

    try:
        return RedisCluster.from_url(
            config.url, max_connections=config.max_connections, **_client_options(config)
        )
    except (ValueError, RedisClusterException) as exc:
        raise SharedTierConfigError(f"bad shared store URL {config.redacted_url}: {exc}") from None


def _client_options(config: SharedTierConfig) -> dict[str, Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    credentials = {
        k: v
        for k, v in (("username", config.username), ("password", config.password))
        if v is not None
    }
    # no retries inside a call: one failure goes to the breaker, which decides
    return {
        "socket_connect_timeout": config.timeout_s,
        "retry": Retry(NoBackoff(), 0),
        **credentials,
    }


def _require_redis_py() -> None:
    try:
        import redis  # noqa: F401
    except ImportError as exc:  # an optional extra: the proxy runs without it
        raise SharedTierConfigError(
            "the shared tier needs redis-py: pip install 'vcache[redis]'"
        ) from exc


def _translate(exc: Exception) -> SharedTierError | None:
    """redis-py's (and the socket's) failures as our error classes; None: not Redis's."""
    from redis import exceptions as rx

    if isinstance(exc, TimeoutError | rx.TimeoutError):
        return SharedTierTimeoutError(f"Redis did not answer in time ({exc!r})")
    if isinstance(exc, rx.ResponseError):
        return SharedTierRefusedError(str(exc))
    if isinstance(exc, rx.RedisError | OSError):
        return SharedTierUnavailableError(f"{type(exc).__name__}: {exc}")
    return None


def _key_or_none(namespace_id: str, digest: Any) -> CacheKey | None:
    if digest is None:
        return None
    try:
        return CacheKey(validate_digest(namespace_id, "namespace id"), bytes(digest).decode())
    except (InvalidKeyError, UnicodeDecodeError, TypeError):
        log.warning("shared tier: name points at a malformed digest %r", digest)
        return None


def _batched(items: Iterable[int], n: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
