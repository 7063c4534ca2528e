"""Hostile clients, a damaged disk, a damaged store: what THREAT_MODEL.md promises, end to end.

The proxy runs in-process (tests/support/inprocess_proxy.py) in front of the fault upstream in its
well-behaved modes, which plays a stock llama-server or, with ``packages=True``, a patched one
that checks every package it is handed (tests/support/fault_upstream.py). Nothing here leaves
loopback: an autouse guard fails any test whose process tries to connect anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import os
import resource
import socket
import sqlite3
from base64 import b64encode
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.cli.config import ServeSettings
from proxy.errors import AuthError, MediaFetchFailed
from proxy.images import media, ssrf
from proxy.images.ssrf import IPAddress
from proxy.web import app as proxy_app
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess_proxy import (
    CHAT,
    assert_error_shape,
    chat,
    png,
    png_bytes,
    proxy_in_front,
)
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.store_helpers import ALLOWED_FILES, integrity
from vision_cache import Store
from vision_cache.store import index as index_module

LOOPBACK = ("127.", "::1", "::ffff:127.")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every outgoing connection of this process must go to loopback; others raise here."""
    attempts: list[str] = []
    real = asyncio.BaseEventLoop.create_connection

    async def guarded(self: asyncio.BaseEventLoop, *args: Any, **kwargs: Any) -> Any:
        host = str(kwargs.get("host") or (args[1] if len(args) > 1 else ""))
        attempts.append(host)
        if host and not host.startswith(LOOPBACK) and host != "localhost":
            raise AssertionError(f"a test tried to connect to {host}")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", guarded)
    return attempts


@pytest.fixture
async def stock() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as upstream:
        yield upstream


@pytest.fixture
async def patched() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream(packages=True) as upstream:
        yield upstream


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


def names_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def store_files_ok(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert ALLOWED_FILES.fullmatch(str(path.relative_to(root))), path


# --- SSRF: every spelling refused, the canary sees nothing, upstream never gets the URL -----


class Canary:
    """Listening sockets on loopback that count every connection made to them."""

    def __init__(self) -> None:
        self.connections = 0
        self.servers: list[asyncio.Server] = []
        self.port = 0

    async def start(self) -> None:
        async def seen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        first = await asyncio.start_server(seen, "127.0.0.1", 0)
        self.port = first.sockets[0].getsockname()[1]
        self.servers.append(first)
        for host in ("::1", "127.0.0.2"):  # same port where this machine has the address
            with contextlib.suppress(OSError):
                self.servers.append(await asyncio.start_server(seen, host, self.port))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    c = Canary()
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the guard's one lookup a hop resolves; anything else does not resolve."""
    answers: dict[str, list[str]] = {"localhost": ["127.0.0.1"]}
    real = media.resolve_name

    async def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
        if host == "localhost":
            return await real(host, port)  # the system's own answer for a real name
        if host not in answers:
            raise MediaFetchFailed(f"cannot resolve host {host!r}")
        return tuple(ip_address(a) for a in answers[host])

    monkeypatch.setattr(media, "resolve_name", resolve)
    answers.update(
        {
            "metadata.test": ["169.254.169.254"],
            "intranet.test": ["10.1.2.3"],
            "loopback.test": ["127.0.0.1"],
            "v6.test": ["::1"],
            "mixed.test": ["93.184.216.34", "127.0.0.1"],
        }
    )
    return answers


REFUSED_URLS = [
    "http://127.0.0.1:{port}/x.png",
    "http://localhost:{port}/x.png",  # a real DNS name that resolves to loopback
    "http://loopback.test:{port}/x.png",  # a name that resolves to loopback
    "http://metadata.test/latest/meta-data/",  # ... to the cloud metadata address
    "http://intranet.test:{port}/x.png",  # ... to a private address
    "http://mixed.test:{port}/x.png",  # one private answer among public ones
    "http://v6.test:{port}/x.png",  # ... to IPv6 loopback
    "http://[::1]:{port}/x.png",
    "http://[::ffff:127.0.0.1]:{port}/x.png",
    "http://[::ffff:7f00:1]:{port}/x.png",
    "http://2130706433:{port}/x.png",
    "http://0177.0.0.1:{port}/x.png",
    "http://0x7f.1:{port}/x.png",
    "http://127.1:{port}/x.png",
    "http://0:{port}/x.png",
    "http://127.0.0.2:{port}/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1:{port}/x.png",
    "http://192.168.1.1:{port}/x.png",
    "http://172.16.0.1:{port}/x.png",
    "http://[fe80::1]:{port}/x.png",
    "http://[fc00::1]:{port}/x.png",
    "http://user:pw@127.0.0.1:{port}/x.png",
    "https://127.0.0.1:{port}/x.png",
    "http//127.0.0.1:{port}/x.png",
    "http:127.0.0.1:{port}/x.png",
    "gopher://127.0.0.1:{port}/_GET",
    "ftp://127.0.0.1:{port}/x.png",
    "dict://127.0.0.1:{port}/",
    "ldap://127.0.0.1:{port}/",
    "ws://127.0.0.1:{port}/",
    "jar:http://127.0.0.1:{port}/x.jar!/x.png",
    "netdoc:///etc/passwd",
    "javascript:alert(1)",
    "http://[x]@//",  # yarl raised IndexError on these: a 500 until fixed (found by atheris)
    "http://a@[::1]@/x.png",
]


def anthropic_url(url: str) -> tuple[str, dict[str, Any]]:
    return "/v1/messages", {
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}]}
        ],
    }


def responses_url(url: str) -> tuple[str, dict[str, Any]]:
    return "/v1/responses", {
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]
    }


def chat_url(url: str) -> tuple[str, dict[str, Any]]:
    return CHAT, chat(image=url)


def prompt_url(url: str) -> tuple[str, dict[str, Any]]:
    return "/completion", {"prompt": {"prompt_string": "<__media__>", "multimodal_data": [url]}}


@pytest.mark.parametrize("packages", [False, True], ids=["stock", "patched"])
@pytest.mark.usefixtures("fake_dns")
async def test_ssrf_every_form_is_refused_and_never_forwarded(
    canary: Canary, client: httpx.AsyncClient, tmp_path: Path, packages: bool
) -> None:
    """Regression: in front of a stock server (or when /props failed) image URLs went to
    upstream unchecked, and llama-server fetches them itself (a real stock server connected to
    the canary). Now no client URL reaches upstream, whatever upstream can do."""
    async with (
        FaultUpstream(packages=packages) as fake,
        proxy_in_front(fake.url, tmp_path) as (url, _),
    ):
        for template in REFUSED_URLS:
            ref = template.format(port=canary.port)
            for shape in (chat_url, anthropic_url, responses_url, prompt_url):
                path, body = shape(ref)
                r = await client.post(f"{url}{path}", json=body)
                assert_error_shape(r, 400)
        for seen in fake.seen:
            assert str(canary.port).encode() not in seen.body, seen.body[:200]
            assert b"etc/passwd" not in seen.body
    assert canary.connections == 0


async def test_a_redirect_to_an_internal_address_is_refused(
    canary: Canary, client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 'public' site (127.0.0.1 is declared public for this test only) redirecting to a
    loopback address it is not: refused before any connection to the target."""
    if len(canary.servers) < 3:
        pytest.skip("127.0.0.2 is not a loopback address here")
    real = ssrf.why_not_public
    monkeypatch.setattr(
        ssrf, "why_not_public", lambda ip: None if ip == IPv4Address("127.0.0.1") else real(ip)
    )

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:{canary.port}/x.png\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    site = await asyncio.start_server(redirect, "127.0.0.1", 0)
    site_url = f"http://127.0.0.1:{site.sockets[0].getsockname()[1]}/img.png"
    try:
        async with (
            FaultUpstream(packages=True) as fake,
            proxy_in_front(fake.url, tmp_path) as (url, _),
        ):
            r = await client.post(f"{url}{CHAT}", json=chat(image=site_url))
    finally:
        site.close()
        await site.wait_closed()
    assert_error_shape(r, 400)
    assert "redirect" in r.json()["error"]["message"]
    assert canary.connections == 0


async def test_a_fetched_image_reaches_a_stock_upstream_as_bytes(
    client: httpx.AsyncClient, stock: FaultUpstream, tmp_path: Path
) -> None:
    """With private URLs allowed, the proxy fetches the image and inlines it: the stock
    upstream still never sees a URL."""
    image = png_bytes(7)

    async def serve_png(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: "
            + str(len(image)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + image
        )
        await writer.drain()
        writer.close()

    site = await asyncio.start_server(serve_png, "127.0.0.1", 0)
    image_url = f"http://127.0.0.1:{site.sockets[0].getsockname()[1]}/a.png"
    try:
        async with proxy_in_front(stock.url, tmp_path, allow_private_urls=True) as (url, _):
            r = await client.post(f"{url}{CHAT}", json=chat(image=image_url))
    finally:
        site.close()
        await site.wait_closed()
    assert r.status_code == 200, r.text
    [seen] = stock.requests(CHAT)
    assert b"http://127.0.0.1" not in seen.body
    part = seen.json()["messages"][0]["content"][1]
    assert part["image_url"]["url"] == "data:image/png;base64," + b64encode(image).decode()


# --- auth: the proxy key ------------------------------------------------------------------

KEY = "s3cret-proxy-key"
ADMIN_GETS = ("/vcache/health", "/vcache/metrics", "/vcache/stats", "/vcache/namespace")


async def test_with_a_key_every_vcache_endpoint_answers_401_without_it(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with proxy_in_front(stock.url, tmp_path, api_key=KEY) as (url, _):
        for path in ADMIN_GETS:
            for headers in (
                {},
                {"X-Vcache-Key": "wrong"},
                {"X-Vcache-Key": KEY[:-1]},
                {"Authorization": f"Bearer {KEY}x"},
                {"Authorization": KEY},
            ):
                assert_error_shape(await client.get(f"{url}{path}", headers=headers), 401)
            assert (await client.get(f"{url}{path}", headers={"X-Vcache-Key": KEY})).is_success
            bearer = {"Authorization": f"Bearer {KEY}"}
            assert (await client.get(f"{url}{path}", headers=bearer)).is_success
        for path in ("/vcache/lookup", "/vcache/warm"):
            assert_error_shape(await client.post(f"{url}{path}", json={}), 401)


async def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (httpx would normalise the path)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/%76cache/stats",
        "/vcache%2Fstats",
        "/vcache//stats",
        "/vcache/./stats",
        "/x/../vcache/stats",
        "/vcache/stats/",
        "/VCACHE/stats",
        "/vcache/stats?x=/",
        "//vcache/stats",
        "/vcache/%2e/stats",
    ],
)
async def test_no_spelling_of_a_path_reaches_an_admin_endpoint_without_the_key(
    stock: FaultUpstream, tmp_path: Path, target: str
) -> None:
    async with proxy_in_front(stock.url, tmp_path, api_key=KEY) as (url, _):
        status, body = await raw_get(url, target)
    # refused, or not an admin path at all (forwarded to upstream), never the store's stats
    assert status == 401 or (b"live_bytes" not in body and b"entries" not in body), body


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp.test_utils import make_mocked_request

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module proxy.web.app calls it in
    request = make_mocked_request("GET", "/vcache/stats", headers={"X-Vcache-Key": "guess"})
    with pytest.raises(AuthError):
        proxy_app.check_key(request, KEY)
    assert calls == [(b"guess", KEY.encode())]


async def test_defaults_bind_to_loopback_and_keep_the_key_from_upstream(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    assert ServeSettings.model_fields["host"].default == "127.0.0.1"
    config = ServeSettings(upstream=stock.url, store=tmp_path / "s", port=0)
    assert config.host == "127.0.0.1" and config.api_key is None
    async with proxy_in_front(stock.url, tmp_path, api_key=KEY) as (url, _):
        assert url.startswith("http://127.0.0.1:")
        await client.post(f"{url}{CHAT}", json=chat(), headers={"X-Vcache-Key": KEY})
    assert all("x-vcache-key" not in s.headers for s in stock.seen)


async def test_clients_cannot_make_upstream_write_into_the_store(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Exports write into the directory upstream shares with the store: the proxy's to ask."""
    async with proxy_in_front(stock.url, tmp_path) as (url, _):
        r = await client.post(
            f"{url}{CHAT}", json=chat(), headers={"X-Image-Embedding-Export": "f32"}
        )
        assert r.status_code == 200
    assert stock.seen
    assert all("x-image-embedding-export" not in s.headers for s in stock.seen)


# --- limits: 413 everywhere, and a bounded sum of bodies ----------------------------------


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


@pytest.mark.parametrize(
    "path", ["/tokenize", CHAT, "/v1/messages", "/completion", "/vcache/warm", "/vcache/lookup"]
)
async def test_bodies_over_the_limit_get_413_with_a_length_or_chunked(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, path: str
) -> None:
    """Regression (/vcache/warm, /vcache/lookup): the proxy's own endpoints read any body
    whole, with no limit at all."""
    big = b'{"content": "' + b"x" * (2 << 20) + b'"}'
    headers = {"Content-Type": "application/json"}
    async with proxy_in_front(stock.url, tmp_path, max_body_mb=1) as (url, _):
        assert_error_shape(await client.post(f"{url}{path}", content=big, headers=headers), 413)
        r = await client.post(f"{url}{path}", content=chunked(big), headers=headers)
        assert_error_shape(r, 413)
        assert (await client.post(f"{url}{CHAT}", json=chat())).status_code == 200
    assert all(len(s.body) < 1 << 20 for s in stock.seen)


async def test_the_body_budget_serves_in_order_and_gives_up_with_503() -> None:
    from proxy.errors import ProxyBusy
    from proxy.web.budget import BodyBudget

    budget = BodyBudget(10, wait_s=0.2)
    order: list[str] = []

    async def take(name: str, n: int, hold: float) -> None:
        async with budget.reservation() as held:
            await held.take(n)
            order.append(name)
            await asyncio.sleep(hold)

    first = asyncio.create_task(take("big", 8, 0.05))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(take("medium", 5, 0)), asyncio.create_task(take("small", 1, 0))]
    await asyncio.gather(first, *waiting)
    assert order == ["big", "medium", "small"]  # small waited its turn though it fit
    assert budget.held == 0

    async with budget.reservation() as hog:
        await hog.take(10)
        with pytest.raises(ProxyBusy) as refused:
            await take("late", 1, 0)
        assert refused.value.status == 503
        cancelled = asyncio.create_task(take("cancelled", 3, 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert budget.held == 0 and not budget._waiters


# --- keys and paths: nothing a client sends becomes a path -------------------------------


BAD_REFERENCES = [
    "vcache://../../etc/passwd",
    "vcache:///etc/passwd",
    "vcache://a\x00b",
    "vcache://sha256:" + "0" * 63,
    "vcache://sha256:" + "G" * 64,
    "vcache://" + "a" * 300,
    "vcache://name/../x",
    "vcache://",
    "vcache://.",
    "vcache://..",
    "vcache://a b",
    "vcache://%2e%2e%2f",
]


async def test_bad_references_and_names_are_refused_and_touch_no_path(
    patched: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        for ref in BAD_REFERENCES:
            assert_error_shape(await client.post(f"{url}{CHAT}", json=chat(image=ref)), 400)
        for name in ("../x", "/abs", "a\x00b", "a/b", ".hidden", "x" * 200):
            r = await client.post(f"{url}/vcache/warm", json={"image": png(), "name": name})
            assert_error_shape(r, 400)
        for digest in ("../" + "0" * 61, "0" * 64 + "\x00", "/" + "0" * 63):
            r = await client.post(f"{url}/vcache/lookup", json={"digests": [digest]})
            assert_error_shape(r, 400)
    store_files_ok(tmp_path / "store")
    assert names_in(tmp_path) == {"store"}


async def test_file_urls_stay_below_the_media_root(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(3))
    (root / "ok.png").write_bytes(png_bytes(4))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    async with proxy_in_front(stock.url, tmp_path, media_path=root) as (url, _):
        for ref in (
            "file://linked/secret.png",
            f"file://{outside}/secret.png",
            "file://../outside/secret.png",
            "file://ok.png\x00.txt",
        ):
            assert_error_shape(await client.post(f"{url}{CHAT}", json=chat(image=ref)), 400)
        assert (await client.post(f"{url}{CHAT}", json=chat(image="file://ok.png"))).is_success
    assert all(b"file://" not in s.body for s in stock.seen)


# --- I/O faults: the request succeeds, uncached -------------------------------------------


def _raise(code: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def _index_full(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("database or disk is full")


IO_FAULTS: dict[str, tuple[object, str, Callable[..., Any]]] = {
    "write-ENOSPC": (os, "pwrite", _raise(errno.ENOSPC)),
    "write-EIO": (os, "pwrite", _raise(errno.EIO)),
    "fsync-EIO": (os, "fdatasync", _raise(errno.EIO)),
    "fsync-ENOSPC": (os, "fdatasync", _raise(errno.ENOSPC)),
    "index-commit-full": (index_module, "_insert", _index_full),
}


@pytest.mark.parametrize("fault", list(IO_FAULTS))
async def test_a_failing_disk_leaves_requests_working_uncached(
    patched: FaultUpstream,
    client: httpx.AsyncClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    target, name, failure = IO_FAULTS[fault]
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        monkeypatch.setattr(target, name, failure)
        for _ in range(2):  # still a miss the second time: nothing was stored
            r = await client.post(f"{url}{CHAT}", json=chat(image=png(11)))
            assert r.status_code == 200, r.text
            assert r.headers["x-vcache"].startswith("hits=0 misses=1")
            assert r.json()["vcache_fake"] == {"intact": 1, "corrupt": 0, "images": 0}
        monkeypatch.undo()
        r = await client.post(f"{url}{CHAT}", json=chat(image=png(11)))
        assert r.headers["x-vcache"].startswith("hits=0 misses=1")  # stored now
        r = await client.post(f"{url}{CHAT}", json=chat(image=png(11)))
        assert r.headers["x-vcache"].startswith("hits=1")
    with Store.open(tmp_path / "store", hot_bytes=0) as store:
        assert store.check().ok and len(list(store.iter_entries())) == 1
    assert integrity(tmp_path / "store") == "ok"


# --- corruption: a damaged entry is a miss, quarantined, never wrong embeddings -----------


def _flip_payload(root: Path) -> None:
    with Store.open(root, hot_bytes=0) as store:
        [info] = list(store.iter_entries())
    path = root / "segments" / info.ref.segment
    with path.open("r+b") as f:
        f.seek(info.ref.offset + info.ref.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("quarantine_fails", [False, True], ids=["quarantined", "rename-EIO"])
async def test_a_flipped_payload_byte_is_a_miss_and_never_served(
    patched: FaultUpstream,
    client: httpx.AsyncClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    quarantine_fails: bool,
) -> None:
    """At rest: the proxy stopped, one bit of the payload flipped, the proxy started again.
    With the quarantine's rename failing too (EIO), it is still a miss, never a 500."""
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        assert (await client.post(f"{url}{CHAT}", json=chat(image=png(21)))).is_success
    _flip_payload(tmp_path / "store")
    if quarantine_fails:
        monkeypatch.setattr(os, "replace", _raise(errno.EIO))
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        r = await client.post(f"{url}{CHAT}", json=chat(image=png(21)))
        assert r.status_code == 200, r.text
        assert r.headers["x-vcache"].startswith("hits=0 misses=1")
        assert r.json()["vcache_fake"] == {"intact": 1, "corrupt": 0, "images": 0}
    monkeypatch.undo()
    if not quarantine_fails:
        assert list((tmp_path / "store" / "quarantine").glob("*.bin"))
    assert patched.requests("/vision/embedding").__len__() == 2


async def test_a_payload_damaged_while_the_proxy_runs_is_never_served(
    patched: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The proxy has already checked this entry once (it wrote it, then served it): a bit
    flipped in the file under it afterwards must still not reach upstream as embeddings."""
    async with proxy_in_front(patched.url, tmp_path, hot_mb=0) as (url, _):
        for _ in range(2):
            assert (await client.post(f"{url}{CHAT}", json=chat(image=png(31)))).is_success
        _flip_payload(tmp_path / "store")
        r = await client.post(f"{url}{CHAT}", json=chat(image=png(31)))
    assert r.status_code == 200, r.text
    assert r.json()["vcache_fake"] == {"intact": 0, "corrupt": 0, "images": 1}  # forwarded


async def test_a_damaged_index_is_replaced_and_requests_go_on(
    patched: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        for seed in range(5):
            assert (await client.post(f"{url}{CHAT}", json=chat(image=png(40 + seed)))).is_success
    index = tmp_path / "store" / "index.sqlite"
    data = bytearray(index.read_bytes())
    for offset in range(0, len(data), 97):  # every 97th byte, header included
        data[offset] ^= 0x5A
    index.write_bytes(bytes(data))
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        for seed in range(5):
            r = await client.post(f"{url}{CHAT}", json=chat(image=png(40 + seed)))
            assert r.status_code == 200, r.text
            assert r.json()["vcache_fake"] == {"intact": 1, "corrupt": 0, "images": 0}
    with Store.open(tmp_path / "store", hot_bytes=0) as store:
        assert store.check().ok
    assert integrity(tmp_path / "store") == "ok"


# --- parser differentials: what the proxy cannot read must not reach upstream ------------


def differential_bodies(url: str) -> dict[str, bytes]:
    """A chat body carrying `url`, spelled so that orjson (which the proxy once used) could
    not read it and llama-server's nlohmann::json can."""
    raw = orjson.dumps(chat(image=url))
    return {
        "utf-8 BOM": b"\xef\xbb\xbf" + raw,
        "deep nesting": raw[:-1] + b', "junk": ' + b"[" * 1100 + b"]" * 1100 + b"}",
    }


async def test_bodies_the_proxy_cannot_read_are_refused_not_forwarded(
    canary: Canary, client: httpx.AsyncClient, stock: FaultUpstream, tmp_path: Path
) -> None:
    """Regression: an unparseable body was forwarded unread ("upstream answers malformed JSON
    its own way"), and llama-server read these two and fetched the URL in them."""
    url_ = f"http://127.0.0.1:{canary.port}/x.png"
    async with proxy_in_front(stock.url, tmp_path) as (url, _):
        for name, raw in differential_bodies(url_).items():
            r = await client.post(f"{url}{CHAT}", content=raw)
            assert_error_shape(r, 400)
            assert ("loopback" in r.text) == (name == "utf-8 BOM"), r.text  # BOM: read, refused
        for raw in (b"", b"{", b'{"a": 1} x', b"\xff\xfe", b"[" * 5000):
            assert_error_shape(await client.post(f"{url}{CHAT}", content=raw), 400)
    assert not stock.requests(CHAT)
    assert canary.connections == 0


@pytest.mark.server
def test_a_real_stock_server_never_sees_a_client_url(
    stock_server: LlamaServer, tmp_path: Path
) -> None:
    """The same, against llama-server itself, which does fetch what reaches it (the canary
    counts its connections when it is sent these bodies directly)."""

    async def run() -> tuple[int, int]:
        canary = Canary()
        await canary.start()
        target = f"http://127.0.0.1:{canary.port}/x.png"
        bodies = [orjson.dumps(chat(image=target)), *differential_bodies(target).values()]
        try:
            async with (
                proxy_in_front(stock_server.base_url, tmp_path) as (url, _),
                httpx.AsyncClient(timeout=60) as client,
            ):
                for raw in bodies:
                    assert_error_shape(await client.post(f"{url}{CHAT}", content=raw), 400)
                through_proxy = canary.connections
                for raw in bodies:  # the control: direct, llama-server goes and fetches
                    await client.post(f"{stock_server.base_url}{CHAT}", content=raw)
            return through_proxy, canary.connections
        finally:
            await canary.stop()

    through_proxy, total = asyncio.run(run())
    assert through_proxy == 0
    assert total == 3  # the control: each body makes llama-server connect


def test_the_proxy_raises_its_open_file_limit(tmp_path: Path) -> None:
    """Regression: with the common soft limit of 1024, the hot tier's mappings (a descriptor
    each) and the connections ran the proxy out of descriptors under load (the soak found it:
    /vcache/health answered 500). `vcache serve` now raises the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard limit leaves nothing to raise")
    with socket.socket() as unused:  # an upstream nobody answers: health needs none
        unused.bind(("127.0.0.1", 0))
        upstream = f"http://127.0.0.1:{unused.getsockname()[1]}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the proxy
        try:
            proxy = ProxyProcess(
                ["--upstream", upstream, "--store", str(tmp_path / "s")], tmp_path / "proxy.log"
            )
            proxy.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            assert proxy.proc is not None
            limits = Path(f"/proc/{proxy.proc.pid}/limits").read_text()
        finally:
            proxy.stop()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    assert int(line.split()[3]) == min(65536, hard if hard != resource.RLIM_INFINITY else 65536)


async def test_numbers_orjson_cannot_write_survive_a_rewrite(
    patched: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Regression (found by fuzz/fuzz_requests.py): a body with an integer past 64 bits and an
    image was parsed, rewritten, and then failed to serialise (orjson): a 500. NaN would have
    become null. Upstream must get both as the client wrote them."""
    body = chat(image=png(51))
    raw = json.dumps({**body, "seed": 2**70, "temperature": float("nan")})
    async with proxy_in_front(patched.url, tmp_path) as (url, _):
        r = await client.post(f"{url}{CHAT}", content=raw)
    assert r.status_code == 200, r.text
    assert r.json()["vcache_fake"]["intact"] == 1
    [seen] = patched.requests(CHAT)
    assert b'"seed":1180591620717411303424' in seen.body and b"NaN" in seen.body


async def test_a_large_body_is_forwarded_whole_with_its_length(
    stock: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Large bodies go out in slices (proxy.upstream.relay.build_request), still framed by their
    Content-Length, byte for byte as sent."""
    raw = json.dumps(chat(image=png(61), tag="x" * 300_000)).encode()
    async with proxy_in_front(stock.url, tmp_path) as (url, _):
        r = await client.post(f"{url}{CHAT}", content=raw)
    assert r.status_code == 200, r.text
    [seen] = stock.requests(CHAT)
    assert seen.headers["content-length"] == str(len(raw))
    assert "transfer-encoding" not in seen.headers
    assert seen.body == raw
