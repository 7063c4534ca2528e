"""A fleet: two proxies with their own stores and llama-servers, sharing one Redis (issue 9).

Proxy A fronts the session's patched gemma3 server, proxy B a second one of its own, so an
encode on B's side shows in B's metrics and in the `media_encoded_n` timings B's server
reports. Each test has its own key prefix (or its own Redis, when it kills it).
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import vision_cache
from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.redis_server import RedisServer
from tests.support.vlm_client import Reply, chat, image_part
from vision_cache.keys import CacheKey
from vision_cache.shared.value import decode_value
from vision_cache.store import Store
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server

PROMPT = "Describe the image."
SHAPES, STRIPES, NOISE, CHECKERS = (
    "shapes_640x480",
    "stripes_300x900",
    "noise_512x512",
    "checkers_1024x256",
)


def url(name: str) -> str:
    return sample_image(name).data_url("PNG")


@pytest.fixture(scope="module")
def server_b(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "patched-gemma3-b.log"
    with LlamaServer(
        patched_bin, server_args(tiny_model("gemma3"), "--image-embedding"), log
    ) as server:
        yield server


class Fleet:
    """Proxies A and B in front of their own servers, sharing `redis_url` under `prefix`."""

    def __init__(self, server_a: LlamaServer, server_b: LlamaServer, tmp: Path) -> None:
        self.servers = {"a": server_a, "b": server_b}
        self.tmp = tmp
        self.prefix = f"f{uuid.uuid4().hex[:8]}:"
        self.proxies: dict[str, ProxyProcess] = {}

    def start(self, redis_url: str) -> None:
        for side, server in self.servers.items():
            p = ProxyProcess(
                [
                    "--upstream",
                    server.base_url,
                    "--store",
                    str(self.store(side)),
                    "--shared-store",
                    redis_url,
                    "--shared-prefix",
                    self.prefix,
                ],
                self.tmp / f"proxy-{side}.log",
            )
            p.start()
            self.proxies[side] = p

    def store(self, side: str) -> Path:
        return self.tmp / f"store-{side}"

    def url(self, side: str) -> str:
        return self.proxies[side].base_url

    def chat(self, side: str, image: str) -> Reply:
        return chat(self.url(side), [image_part(image)], PROMPT)

    def direct(self, side: str, image: str) -> Reply:
        return chat(self.servers[side].base_url, [image_part(image)], PROMPT)

    def metric(self, side: str, name: str) -> float:
        text = httpx.get(f"{self.url(side)}/vcache/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def encodes(self, side: str) -> int:
        return int(self.metric(side, "vcache_encode_seconds_count"))

    def stop(self) -> None:
        for p in self.proxies.values():
            p.stop()


@pytest.fixture
def fleet(
    patched_gemma: LlamaServer,
    server_b: LlamaServer,
    tmp_path: Path,
) -> Iterator[Fleet]:
    f = Fleet(patched_gemma, server_b, tmp_path)
    yield f
    f.stop()


def cache(reply: Reply) -> dict[str, float]:
    return {k: float(v) for k, v in (i.split("=") for i in reply.headers["x-vcache"].split())}


def test_warmed_on_a_hits_on_b_without_encoding_there(
    fleet: Fleet, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet.start(redis_server.url)
    png = tmp_path / "cat.png"
    png.write_bytes(sample_image(SHAPES).encode("PNG"))
    report = vision_cache.warm([], proxy=fleet.url("a"), names={"cat": png})
    assert report.count("encoded") == 1

    by_bytes = fleet.chat("b", url(SHAPES))
    assert (cache(by_bytes)["hits"], cache(by_bytes)["misses"]) == (1, 0)
    assert by_bytes.timings["media_encoded_n"] == 0
    by_name = fleet.chat("b", "vcache://cat")
    assert cache(by_name)["hits"] == 1
    assert fleet.encodes("b") == 0
    assert fleet.metric("b", "vcache_shared_hits_total") == 1  # then B's own disk tier

    direct = fleet.direct("b", url(SHAPES))
    assert by_bytes.tokens == direct.tokens == by_name.tokens
    assert fleet.chat("b", url(NOISE)).tokens != direct.tokens  # the image matters
    with Store.open(fleet.store("b")) as store:
        pinned = {e.key for e in store.iter_entries() if e.pinned}
        named = [store.resolve_name(k.namespace_id, "cat") for k in pinned]
    assert len(pinned) == 1 and named == list(pinned)


def test_two_proxies_missing_one_image_encode_it_once(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.start(redis_server.url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda side: fleet.chat(side, url(STRIPES)), ("a", "b"))
    assert fleet.encodes("a") + fleet.encodes("b") == 1
    # the other one found it in Redis (usually after waiting on the encoder's fleet lock)
    assert sum(fleet.metric(side, "vcache_shared_hits_total") for side in "ab") == 1
    assert sorted([cache(a)["misses"], cache(b)["misses"]]) == [0, 1]
    assert a.tokens == b.tokens == fleet.direct("a", url(STRIPES)).tokens


def test_corrupt_package_in_redis_is_a_miss_and_replaced(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.start(redis_server.url)
    fleet.chat("a", url(CHECKERS))
    with redis_server.client() as raw:
        (name,) = raw.keys(f"{fleet.prefix}pkg1:*")
        value = raw.get(name)
        assert isinstance(value, bytes)
        raw.setrange(name, len(value) - 100, bytes([value[-100] ^ 0x01]))
        corrupted = raw.get(name)

        reply = fleet.chat("b", url(CHECKERS))
        assert (cache(reply)["hits"], cache(reply)["misses"]) == (0, 1)
        assert fleet.metric("b", "vcache_shared_corrupt_total") == 1
        assert fleet.encodes("b") == 1
        assert reply.tokens == fleet.direct("b", url(CHECKERS)).tokens
        replaced = raw.get(name)
    assert isinstance(replaced, bytes) and replaced != corrupted
    decode_value(replaced)  # B's encode, published in its place: checksums intact


def test_redis_dies_and_comes_back_without_restarting_proxies(fleet: Fleet, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        fleet.start(server.url)
        fleet.chat("a", url(SHAPES))
        assert cache(fleet.chat("b", url(SHAPES)))["hits"] == 1

        server.kill()
        for side, image, misses in (
            ("a", STRIPES, 1),
            ("b", SHAPES, 0),
            ("b", NOISE, 1),
            ("a", STRIPES, 0),
        ):
            reply = fleet.chat(side, image=url(image))
            assert cache(reply)["misses"] == misses, (side, image)
        assert fleet.metric("a", "vcache_shared_breaker_open") == 1
        assert fleet.metric("b", "vcache_shared_breaker_open") == 1
        encodes_b = fleet.encodes("b")

        server.start()  # same port, empty: --save "" kept nothing
        _until(
            lambda: all(
                fleet.metric(side, "vcache_shared_breaker_open") == 0 for side in ("a", "b")
            )
        )
        assert cache(fleet.chat("a", url(CHECKERS)))["misses"] == 1
        reply = fleet.chat("b", url(CHECKERS))
        assert (cache(reply)["hits"], reply.timings["media_encoded_n"]) == (1, 0)
        assert fleet.encodes("b") == encodes_b


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_keys_in_redis_are_the_store_keys(fleet: Fleet, redis_server: RedisServer) -> None:
    """The fleet shares content keys: a namespace and a digest, never anything else."""
    fleet.start(redis_server.url)
    fleet.chat("a", url(NOISE))
    with redis_server.client() as raw:
        names = [n.decode() for n in raw.keys(f"{fleet.prefix}*")]
    assert len(names) == 1
    key = CacheKey.parse(names[0].removeprefix(f"{fleet.prefix}pkg1:"))
    with Store.open(fleet.store("a")) as store:
        assert store.get(key) is not None
