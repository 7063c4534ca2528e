"""proxy.images.media: every form of image reference, against real servers on loopback.

The HTTP tests run an aiohttp server (and, where a test needs to break HTTP or count
connections, a raw asyncio server) on 127.0.0.1, port 0. Nothing here connects anywhere
else: addresses outside loopback appear only where the guard must refuse them first.
Only unit tests of the guard itself replace a piece of it (the resolver, the policy table).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.errors import MediaError, MediaFetchFailed, MediaNotAllowed, MediaTooLarge
from proxy.images import media, ssrf
from proxy.images.media import FetchPolicy, Media, MediaLoader
from proxy.images.ssrf import IPAddress

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
CAP = 100_000  # max_bytes for the size tests: big enough for several chunks


# --- fixtures ----------------------------------------------------------------------------

MakeLoader = Callable[..., MediaLoader]


@pytest.fixture
async def make_loader() -> AsyncIterator[MakeLoader]:
    """make_loader(**FetchPolicy fields) -> a loader, closed at teardown."""
    loaders: list[MediaLoader] = []

    def make(**policy: Any) -> MediaLoader:
        loader = MediaLoader(FetchPolicy(**policy))
        loaders.append(loader)
        return loader

    yield make
    for loader in loaders:
        await loader.aclose()


@dataclasses.dataclass
class ImageServer:
    """An aiohttp server on 127.0.0.1 with routes that behave well and badly."""

    port: int
    release: asyncio.Event  # set at teardown: handlers that stall return
    hosts: list[str] = dataclasses.field(default_factory=list)  # Host header of each request

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _image_app(server: ImageServer) -> web.Application:
    async def record(request: web.Request) -> None:
        server.hosts.append(request.host)

    async def image(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(body=IMAGE, content_type="image/png")

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        if n == 0:
            return await image(request)
        return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})  # relative

    async def stream(request: web.Request) -> web.StreamResponse:
        """n bytes, chunked (no Content-Length); with ?hang, then stall."""
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        remaining = int(request.match_info["n"])
        while remaining > 0:
            await response.write(b"x" * min(remaining, 16384))
            remaining -= 16384
        if "hang" in request.query:
            await server.release.wait()
        return response

    async def stall(request: web.Request) -> web.StreamResponse:
        await server.release.wait()
        return web.Response(body=IMAGE)

    async def drip(request: web.Request) -> web.StreamResponse:
        """A byte every 50 ms, forever: each read succeeds, the whole never ends."""
        response = web.StreamResponse()
        await response.prepare(request)
        while not server.release.is_set():
            await response.write(b"x")
            await asyncio.sleep(0.05)
        return response

    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.match_info["code"]), body=b"no")

    async def gzipped(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip", "Content-Type": "image/png"}
        return web.Response(body=gzip.compress(IMAGE), headers=headers)

    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"", content_type="image/png")

    app = web.Application()
    app.router.add_get("/img.png", image)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/stream/{n}", stream)
    app.router.add_get("/stall", stall)
    app.router.add_get("/drip", drip)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/empty", empty)
    return app


@pytest.fixture
async def image_server() -> AsyncIterator[ImageServer]:
    server = ImageServer(port=0, release=asyncio.Event())
    runner = web.AppRunner(_image_app(server), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    yield server
    server.release.set()
    await runner.cleanup()


@dataclasses.dataclass
class RawServer:
    """Answers every connection with fixed bytes, then closes or hangs; counts connections."""

    port: int
    host: str
    connections: int = 0

    def url(self, path: str = "/img.png", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"


RawFactory = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawFactory]:
    """raw_server(reply, hang=False, host="127.0.0.1") -> a started RawServer."""
    release = asyncio.Event()
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def start(reply: bytes, *, hang: bool = False, host: str = "127.0.0.1") -> RawServer:
        raw = RawServer(port=0, host=host)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            raw.connections += 1
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(reply)
                await writer.drain()
                if hang:
                    await release.wait()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the loader hung up first, as it should on a refused body
            finally:
                writer.close()

        server = await asyncio.start_server(handle, host, 0)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start
    release.set()
    for server in servers:
        server.close()
        await server.wait_closed()
    await asyncio.gather(*handlers, return_exceptions=True)


def http_reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"HTTP/1.1 {status}", *headers, "Connection: close"))
    return head.encode() + b"\r\n" + body


GOOD_REPLY = http_reply(b"PNG!", "Content-Type: image/png", "Content-Length: 4")


@pytest.fixture
def loopback_2() -> str:
    """127.0.0.2: a second loopback address, for canaries the guard must keep us from."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not a loopback address here")
    return "127.0.0.2"


@pytest.fixture
def only_127_0_0_1_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.1 is public, so a test server can play the public site.

    Every other address keeps its real verdict: 127.0.0.2 stays loopback, and so do the
    IPv6 forms embedding 127.0.0.1 (those are judged by the unpatched table).
    """
    real = ssrf.why_not_public

    def why_not_public(ip: IPAddress) -> str | None:
        return None if ip == IPv4Address("127.0.0.1") else real(ip)

    monkeypatch.setattr(ssrf, "why_not_public", why_not_public)


@dataclasses.dataclass
class FakeDNS:
    answers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lookups: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """A fake for the guard's one lookup a hop: names map to addresses; lookups are logged.

    It answers for names that do not exist (*.test), so a fetch that succeeds proves that
    aiohttp connected to what the guard returned and resolved nothing itself.
    """
    fake = FakeDNS()

    async def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
        fake.lookups.append(host)
        if host not in fake.answers:
            raise MediaFetchFailed(f"cannot resolve host {host!r}")
        return tuple(ip_address(a) for a in fake.answers[host])

    monkeypatch.setattr(media, "resolve_name", resolve)
    return fake


async def load_once(ref: str, **policy: Any) -> Media:
    async with MediaLoader(FetchPolicy(**policy)) as loader:
        return await loader.load(ref)


# --- data URIs and base64 ----------------------------------------------------------------

image_types = st.sampled_from(["png", "jpeg", "webp", "gif", "svg+xml", "x-portable-pixmap"])


@settings(deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), subtype=image_types)
def test_data_uri_round_trip(data: bytes, subtype: str) -> None:
    ref = f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"
    got = asyncio.run(load_once(ref))
    assert got == Media(data, f"image/{subtype}", "data-uri")


@settings(deadline=None)
@given(data=st.binary(min_size=1, max_size=3000))
def test_base64_round_trip(data: bytes) -> None:
    got = asyncio.run(load_once(base64.b64encode(data).decode()))
    assert got == Media(data, None, "base64")


@pytest.mark.parametrize(
    ("ref", "mime"),
    [
        ("DATA:IMAGE/PNG;BASE64,YQ==", "image/png"),
        ("data:image/png;charset=utf-8;base64,YQ==", "image/png"),
        ("data:image/jpeg ;base64,YQ==", "image/jpeg"),
        ("data:audio/wav;base64,YQ==", "audio/wav"),
    ],
)
async def test_data_uri_spellings(make_loader: MakeLoader, ref: str, mime: str) -> None:
    assert await make_loader().load(ref) == Media(b"a", mime, "data-uri")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("data:image/png;base64", "needs a ','"),
        ("data:image/png,a%20b", "only base64"),
        ("data:;base64,YQ==", "no valid media type"),
        ("data:image;base64,YQ==", "no valid media type"),
        ("data:video/mp4;base64,YQ==", "not an image or audio"),
        ("data:text/html;base64,YQ==", "not an image or audio"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,YQ", "Incorrect padding"),
    ],
)
async def test_bad_data_uris(make_loader: MakeLoader, ref: str, message: str) -> None:
    with pytest.raises(MediaError, match=message) as info:
        await make_loader().load(ref)
    assert type(info.value) is MediaError


@pytest.mark.parametrize(
    "text",
    [
        "YQ",  # missing padding (llama-server accepts it)
        "YQ==\n",  # trailing newline
        "Y Q==",  # whitespace inside
        "-_8=",  # URL-safe alphabet
        "YQ==YQ==",  # data after padding (llama-server decodes the prefix)
        "=YQ=",
        "!!!!",
        "not base64 at all",
        "aGVsbG8\u00e9",  # non-ASCII
    ],
)
async def test_base64_is_strict(make_loader: MakeLoader, text: str) -> None:
    with pytest.raises(MediaError, match="not valid base64") as info:
        await make_loader().load(text)
    assert type(info.value) is MediaError


async def test_empty_reference(make_loader: MakeLoader) -> None:
    with pytest.raises(MediaError, match="empty image reference"):
        await make_loader().load("")


async def test_base64_size_cap(make_loader: MakeLoader) -> None:
    loader = make_loader(max_bytes=CAP)
    assert len((await loader.load(base64.b64encode(b"x" * CAP).decode())).data) == CAP
    for size in (CAP + 1, 10 * CAP):  # just over (decoded), far over (refused unread)
        with pytest.raises(MediaTooLarge):
            await loader.load("data:image/png;base64," + base64.b64encode(b"x" * size).decode())


async def test_messages_never_echo_the_payload(make_loader: MakeLoader) -> None:
    with pytest.raises(MediaError) as info:
        await make_loader().load("A" * 1_000_001)  # invalid: length not a multiple of 4
    assert len(info.value.message) < 300
    with pytest.raises(MediaError) as info:
        await make_loader().load("data:image/png" + ";x" * 500_000)  # a header without ','
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    "ref",
    [
        "gopher://127.0.0.1:70/_x",
        "ftp://127.0.0.1/a.png",
        "javascript:alert(1)",
        "ws://127.0.0.1/",
        "dict://127.0.0.1:11211/stat",
        "vcache://cat",
        "mailto:a@b",
        "C:\\images\\cat.png",
        "localhost:8080/img.png",
    ],
)
async def test_unsupported_schemes(make_loader: MakeLoader, ref: str) -> None:
    with pytest.raises(MediaNotAllowed, match="scheme"):
        await make_loader(allow_private=True).load(ref)


@pytest.mark.parametrize(
    "ref", ["http//127.0.0.1/x.png", "http:/127.0.0.1/x.png", "http:127.0.0.1", "HTTPS//x"]
)
async def test_near_urls_are_refused_not_left_to_upstream(
    make_loader: MakeLoader, ref: str
) -> None:
    """llama-server downloads any url that starts with "http", unguarded. The package lookup
    leaves plain MediaErrors to upstream, so these must be MediaNotAllowed, not MediaError."""
    with pytest.raises(MediaNotAllowed):
        await make_loader().load(ref)


# --- http(s): fetching -------------------------------------------------------------------


async def test_fetch(make_loader: MakeLoader, image_server: ImageServer) -> None:
    got = await make_loader(allow_private=True).load(image_server.url("/img.png"))
    assert got == Media(IMAGE, "image/png", "http")


async def test_canary_private_server_sees_no_connection(
    make_loader: MakeLoader, raw_server: RawFactory
) -> None:
    """The same loopback URL: refused by default with 0 connections, fetched when allowed."""
    canary = await raw_server(GOOD_REPLY)
    with pytest.raises(MediaNotAllowed, match="loopback"):
        await make_loader().load(canary.url())
    assert canary.connections == 0
    assert (await make_loader(allow_private=True).load(canary.url())).data == b"PNG!"
    assert canary.connections == 1


async def test_name_resolving_to_loopback_is_refused(
    make_loader: MakeLoader, raw_server: RawFactory
) -> None:
    """`localhost` goes through the guard's real lookup (the hosts file, no DNS traffic)."""
    canary = await raw_server(GOOD_REPLY)
    with pytest.raises(MediaNotAllowed, match=r"localhost resolves to 127\.0\.0\.1"):
        await make_loader().load(canary.url(host="localhost"))
    assert canary.connections == 0
    allowed = await make_loader(allow_private=True).load(canary.url(host="localhost"))
    assert allowed.data == b"PNG!"


async def test_connects_to_the_vetted_address_only(
    make_loader: MakeLoader, image_server: ImageServer, dns: FakeDNS
) -> None:
    """images.test exists only in the guard's answer: aiohttp resolves nothing itself."""
    dns.answers["images.test"] = ["127.0.0.1"]
    loader = make_loader(allow_private=True)
    got = await loader.load(image_server.url("/img.png", host="images.test"))
    assert got.data == IMAGE
    assert dns.lookups == ["images.test"]  # one lookup, the guard's
    assert image_server.hosts == [f"images.test:{image_server.port}"]


async def test_concurrent_loads_keep_their_own_pins(
    make_loader: MakeLoader, image_server: ImageServer, dns: FakeDNS
) -> None:
    names = [f"n{i}.test" for i in range(8)]
    for name in names:
        dns.answers[name] = ["127.0.0.1"]
    loader = make_loader(allow_private=True)
    urls = [image_server.url("/img.png", host=name) for name in names]
    results = await asyncio.gather(*(loader.load(url) for url in urls))
    assert all(r.data == IMAGE for r in results)
    assert sorted(image_server.hosts) == sorted(f"{n}:{image_server.port}" for n in names)


@pytest.mark.parametrize(
    "answer",
    [
        ["10.0.0.1"],
        ["127.0.0.1", "10.0.0.1"],  # one bad answer among good ones refuses the name
        ["::ffff:127.0.0.2"],
        ["169.254.169.254"],
    ],
)
@pytest.mark.usefixtures("only_127_0_0_1_is_public")
async def test_name_with_a_non_public_answer_is_refused(
    make_loader: MakeLoader, dns: FakeDNS, answer: list[str]
) -> None:
    dns.answers["internal.test"] = answer
    with pytest.raises(MediaNotAllowed, match=r"internal\.test resolves to"):
        await make_loader().load("http://internal.test/img.png")


async def test_pinned_resolver_refuses_unvetted_names() -> None:
    resolver = media.PinnedResolver()
    with pytest.raises(OSError, match="not vetted"):
        await resolver.resolve("images.test", 80)
    url = URL("http://images.test/")
    with media.pinned(url, (IPv4Address("127.0.0.1"),)):
        with pytest.raises(OSError, match="not vetted"):
            await resolver.resolve("other.test", 80)
        answer = await resolver.resolve("images.test.", 80, socket.AF_UNSPEC)
    assert [(r["host"], r["port"]) for r in answer] == [("127.0.0.1", 80)]


async def test_lookup_failure_is_fetch_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fail)
    with pytest.raises(MediaFetchFailed, match=r"cannot resolve host 'nowhere\.test'"):
        await media.resolve_name("nowhere.test", 80)


# --- http(s): redirects ------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_followed(
    make_loader: MakeLoader, image_server: ImageServer, status: int
) -> None:
    target = image_server.url("/img.png")
    url = image_server.url(f"/redirect?status={status}&to={quote(target, safe='')}")
    assert (await make_loader(allow_private=True).load(url)).data == IMAGE


async def test_redirect_limit(make_loader: MakeLoader, image_server: ImageServer) -> None:
    url = image_server.url("/chain/3")
    assert (await make_loader(allow_private=True, max_redirects=3).load(url)).data == IMAGE
    with pytest.raises(MediaFetchFailed, match="more than 2 redirects"):
        await make_loader(allow_private=True, max_redirects=2).load(url)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/img.png",
        "http://[::ffff:127.0.0.2]:{port}/img.png",
        "http://0x7f.0.0.2:{port}/img.png",
        "http://2130706434:{port}/img.png",
        "http://internal.test:{port}/img.png",  # resolves to 127.0.0.2
    ],
)
@pytest.mark.usefixtures("only_127_0_0_1_is_public")
async def test_redirect_to_internal_address_is_refused(
    make_loader: MakeLoader,
    image_server: ImageServer,
    raw_server: RawFactory,
    loopback_2: str,
    dns: FakeDNS,
    target: str,
) -> None:
    """A public site (127.0.0.1, by the fixture) redirecting inwards: the canary sees nothing."""
    canary = await raw_server(GOOD_REPLY, host=loopback_2)
    dns.answers["internal.test"] = [loopback_2]
    target = quote(target.format(port=canary.port), safe="")
    url = image_server.url(f"/redirect?to={target}")
    with pytest.raises(MediaNotAllowed, match="redirect from"):
        await make_loader().load(url)
    assert canary.connections == 0
    assert len(image_server.hosts) == 1  # the first hop did happen: the redirect was refused


@pytest.mark.parametrize(
    "target",
    [
        "file:///etc/passwd",
        "file://img.png",
        "gopher://127.0.0.1:70/_x",
        "ftp://127.0.0.1/img.png",
        "data:image/png;base64,YQ==",
        "javascript:alert(1)",
        "http://user:pw@127.0.0.1/img.png",
    ],
)
async def test_redirect_scheme_and_credentials_are_checked(
    make_loader: MakeLoader, image_server: ImageServer, tmp_path: Path, target: str
) -> None:
    (tmp_path / "img.png").write_bytes(IMAGE)
    loader = make_loader(allow_private=True, media_root=tmp_path)
    with pytest.raises(MediaNotAllowed, match="redirect from"):
        await loader.load(image_server.url(f"/redirect?to={quote(target, safe='')}"))


async def test_redirect_without_location(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    server = await raw_server(http_reply(b"", "Content-Length: 0", status="302 Found"))
    with pytest.raises(MediaFetchFailed, match="without a Location"):
        await make_loader(allow_private=True).load(server.url())


# --- http(s): size and time --------------------------------------------------------------


async def test_streamed_body_over_cap_is_refused_while_streaming(
    make_loader: MakeLoader, image_server: ImageServer
) -> None:
    """Chunked, no Content-Length, and the server never finishes: the cap must fire first."""
    loader = make_loader(allow_private=True, max_bytes=CAP, timeout_s=10.0)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge, match="over the 100000-byte cap"):
        await loader.load(image_server.url(f"/stream/{CAP + 1}?hang"))
    assert time.monotonic() - started < 5.0


async def test_streamed_body_at_cap_is_fine(
    make_loader: MakeLoader, image_server: ImageServer
) -> None:
    got = await make_loader(allow_private=True, max_bytes=CAP).load(
        image_server.url(f"/stream/{CAP}")
    )
    assert got.data == b"x" * CAP


async def test_declared_length_over_cap_is_refused_unread(
    make_loader: MakeLoader, raw_server: RawFactory
) -> None:
    server = await raw_server(http_reply(b"x" * 10, "Content-Length: 1000000000"), hang=True)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge, match="Content-Length 1000000000"):
        await make_loader(allow_private=True, max_bytes=CAP).load(server.url())
    assert time.monotonic() - started < 5.0


async def test_body_until_close_over_cap(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    """No Content-Length and no chunking: the body runs until the server closes."""
    server = await raw_server(http_reply(b"x" * (3 * CAP)))
    with pytest.raises(MediaTooLarge):
        await make_loader(allow_private=True, max_bytes=CAP).load(server.url())


async def test_lying_content_length_short(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    """Content-Length 10, then 3 x cap bytes: HTTP framing makes the body 10 bytes.

    What follows the declared length is not the body: aiohttp refuses the answer when it
    sees it (a failed fetch), or, had it arrived later, it would never be read (connections
    are not reused). Either way the lie gets the liar at most 10 bytes, never the cap.
    """
    server = await raw_server(http_reply(b"y" * (3 * CAP), "Content-Length: 10"))
    try:
        got = await make_loader(allow_private=True, max_bytes=CAP).load(server.url())
    except MediaFetchFailed as exc:
        assert "not valid HTTP" in exc.message
    else:
        assert got.data == b"y" * 10


async def test_lying_content_length_long(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    """Content-Length 1000, then 10 bytes and close: a cut-short body is a failed fetch."""
    server = await raw_server(http_reply(b"z" * 10, "Content-Length: 1000"))
    with pytest.raises(MediaFetchFailed, match="cut short"):
        await make_loader(allow_private=True).load(server.url())


@pytest.mark.parametrize("path", ["/stall", "/drip", f"/stream/{CAP}?hang"])
async def test_total_time_cap(
    make_loader: MakeLoader, image_server: ImageServer, path: str
) -> None:
    """Stalled before headers, dripping a byte at a time, stalled mid-body: one deadline."""
    loader = make_loader(allow_private=True, timeout_s=0.5, max_bytes=10 * CAP)
    started = time.monotonic()
    with pytest.raises(MediaFetchFailed, match=r"within 0\.5 s"):
        await loader.load(image_server.url(path))
    assert time.monotonic() - started < 2.0


async def test_silent_server_times_out(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    server = await raw_server(b"", hang=True)
    with pytest.raises(MediaFetchFailed, match=r"within 0\.3 s"):
        await make_loader(allow_private=True, timeout_s=0.3).load(server.url())


# --- http(s): other failures -------------------------------------------------------------


@pytest.mark.parametrize("code", [204, 404, 500, 304])
async def test_non_2xx_or_empty(
    make_loader: MakeLoader, image_server: ImageServer, code: int
) -> None:
    with pytest.raises(MediaFetchFailed, match="HTTP" if code != 204 else "empty body"):
        await make_loader(allow_private=True).load(image_server.url(f"/status/{code}"))


async def test_empty_body(make_loader: MakeLoader, image_server: ImageServer) -> None:
    with pytest.raises(MediaFetchFailed, match="empty body"):
        await make_loader(allow_private=True).load(image_server.url("/empty"))


async def test_compressed_body_is_refused(
    make_loader: MakeLoader, image_server: ImageServer
) -> None:
    with pytest.raises(MediaFetchFailed, match="'gzip'-encoded"):
        await make_loader(allow_private=True).load(image_server.url("/gzip"))


async def test_connection_refused(make_loader: MakeLoader) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MediaFetchFailed, match="cannot connect") as info:
        await make_loader(allow_private=True).load(f"http://127.0.0.1:{port}/img.png")
    assert "Errno" not in info.value.message


async def test_garbage_answer(make_loader: MakeLoader, raw_server: RawFactory) -> None:
    server = await raw_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    with pytest.raises(MediaFetchFailed):
        await make_loader(allow_private=True).load(server.url())


# --- file URLs ---------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path: Path) -> Iterator[Path]:
    """tmp/media with cat.png, sub/dog.png; tmp/secret.png and tmp/outside/ lie outside."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(IMAGE)
    (root / "sub" / "dog.png").write_bytes(IMAGE[::-1])
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(b"secret")
    yield root


@pytest.mark.parametrize(
    ("ref", "data"),
    [
        ("file://cat.png", IMAGE),
        ("file://sub/dog.png", IMAGE[::-1]),
        ("file://./cat.png", IMAGE),
        ("file://sub//dog.png", IMAGE[::-1]),
        ("FILE://cat.png", IMAGE),
    ],
)
async def test_file(make_loader: MakeLoader, media_root: Path, ref: str, data: bytes) -> None:
    assert await make_loader(media_root=media_root).load(ref) == Media(data, None, "file")


async def test_symlink_inside_the_root_is_fine(make_loader: MakeLoader, media_root: Path) -> None:
    (media_root / "alias.png").symlink_to("cat.png")
    (media_root / "sub" / "up.png").symlink_to("../cat.png")
    loader = make_loader(media_root=media_root)
    assert (await loader.load("file://alias.png")).data == IMAGE
    assert (await loader.load("file://sub/up.png")).data == IMAGE


async def test_root_may_itself_be_a_symlink(
    make_loader: MakeLoader, media_root: Path, tmp_path: Path
) -> None:
    (tmp_path / "link-to-media").symlink_to(media_root)
    loader = make_loader(media_root=tmp_path / "link-to-media")
    assert (await loader.load("file://cat.png")).data == IMAGE


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("file://../secret.png", r"'\.\.'"),
        ("file://sub/../../secret.png", r"'\.\.'"),
        ("file://sub/..", r"'\.\.'"),
        ("file:///etc/passwd", "relative"),
        ("file:////etc/passwd", "relative"),
        ("file://cat.png\x00.txt", "NUL"),
        ("file://escape.png", "out of the media directory"),
        ("file://escape-dir/x.png", "out of the media directory"),
        ("file://absolute.png", "out of the media directory"),
        ("file://sub", "not a regular file"),
        ("file://pipe", "not a regular file"),
    ],
)
async def test_file_refusals(
    make_loader: MakeLoader, media_root: Path, tmp_path: Path, ref: str, message: str
) -> None:
    (media_root / "escape.png").symlink_to("../secret.png")
    (media_root / "escape-dir").symlink_to("../outside")
    (media_root / "absolute.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(media_root / "pipe")  # opening it must not wait for a writer
    with pytest.raises(MediaNotAllowed, match=message):
        await make_loader(media_root=media_root).load(ref)


def test_symlink_swapped_in_after_the_check_is_refused(media_root: Path, tmp_path: Path) -> None:
    """The containment check resolved a path without symlinks; one that appears before the
    open (a race) must be refused at open time, not followed out of the root."""
    (media_root / "sub-link").symlink_to(tmp_path / "outside")
    (media_root / "file-link.png").symlink_to(tmp_path / "secret.png")
    root = os.path.realpath(media_root)
    for parts in (("sub-link", "x.png"), ("file-link.png",)):
        with pytest.raises(MediaNotAllowed, match="changed while it was opened"):
            media.open_regular(root, parts, "file://race")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("file://missing.png", "no such file"),
        ("file://sub/missing/x.png", "no such file"),
        ("file://cat.png/x", "no such file"),
        ("file://", "no file named"),
        ("file:cat.png", "file://<path"),
        ("file://empty.png", "empty"),
    ],
)
async def test_file_errors(
    make_loader: MakeLoader, media_root: Path, ref: str, message: str
) -> None:
    (media_root / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match=message) as info:
        await make_loader(media_root=media_root).load(ref)
    assert not isinstance(info.value, MediaNotAllowed)
    assert str(media_root) not in info.value.message  # no server paths in messages


async def test_file_urls_off_without_media_root(make_loader: MakeLoader) -> None:
    with pytest.raises(MediaNotAllowed, match="no media directory"):
        await make_loader().load("file://cat.png")


async def test_file_size_cap(make_loader: MakeLoader, media_root: Path) -> None:
    (media_root / "big.png").write_bytes(b"x" * (CAP + 1))
    (media_root / "fits.png").write_bytes(b"x" * CAP)
    loader = make_loader(media_root=media_root, max_bytes=CAP)
    assert len((await loader.load("file://fits.png")).data) == CAP
    with pytest.raises(MediaTooLarge):
        await loader.load("file://big.png")


# --- the loader's life -------------------------------------------------------------------


async def test_context_manager_closes_the_session(image_server: ImageServer) -> None:
    async with MediaLoader(FetchPolicy(allow_private=True)) as loader:
        assert (await loader.load(image_server.url("/img.png"))).data == IMAGE
        session = loader._session
    assert session is not None
    assert session.closed
    with pytest.raises(RuntimeError, match="closed"):
        await loader.load("YQ==")
    await loader.aclose()  # twice is fine


def test_media_repr_leaves_the_bytes_out() -> None:
    assert repr(Media(b"x" * 10_000, "image/png", "http")) == (
        "Media(mime='image/png', origin='http')"
    )


@pytest.mark.parametrize("ref", ["http://[x]@//", "http://a@[::1]@/", "http://@[]@//c"])
async def test_urls_the_parser_chokes_on_are_refused(make_loader: MakeLoader, ref: str) -> None:
    """Regression (found by fuzz/fuzz_requests.py): yarl raises IndexError for these, which
    escaped the loader and became a 500."""
    with pytest.raises(MediaNotAllowed, match="not a valid URL"):
        await make_loader(allow_private=True).load(ref)


async def test_a_redirect_the_parser_chokes_on_is_a_fetch_failure(
    make_loader: MakeLoader, raw_server: RawFactory
) -> None:
    server = await raw_server(http_reply(b"", "Location: http://[x]@//", status="302 Found"))
    with pytest.raises(MediaFetchFailed, match="malformed"):
        await make_loader(allow_private=True).load(server.url())
