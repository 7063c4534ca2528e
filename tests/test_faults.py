"""Upstream faults (tests/support/fault_upstream.py): each ends in a clean error the client
can read, never a hang, and no request the client sent once reaches upstream twice.

Before the response headers, a fault is a 502 or 504 in llama-server's error shape; after them
an event stream ends with an error event and anything else ends short of its length. Every
test runs the real proxy (serve.running_proxy, on port 0) in front of the fake, in-process, and
bounds its client with timeouts: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fault_upstream import SMUGGLED, Fault, FaultUpstream, refused_port
from tests.support.inprocess_proxy import CHAT, IDLE_S, assert_error_shape, chat, png
from tests.support.inprocess_proxy import proxy_in_front as running

CLIENT_S = 10.0  # no test waits longer for anything


@asynccontextmanager
async def proxy_in_front(upstream: str, tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    async with running(upstream, tmp_path, **settings) as (url, _):
        yield url


@pytest.fixture
async def fake() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as upstream:
        yield upstream


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=CLIENT_S) as c:
        yield c


def events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an event stream, parsed; the whole stream must parse."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def stream_bytes(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> bytes:
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        return b"".join([chunk async for chunk in r.aiter_raw()])


# --- before the headers: 502 / 504 ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("image", [None, png()])
async def test_refused_connection_is_a_502(
    client: httpx.AsyncClient, tmp_path: Path, stream: bool, image: str | None
) -> None:
    async with refused_port() as port, proxy_in_front(f"http://127.0.0.1:{port}", tmp_path) as url:
        r = await client.post(f"{url}{CHAT}", json=chat(stream, image))
        assert_error_shape(r, 502)
        assert_error_shape(await client.get(f"{url}/health"), 502)


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_headers_is_a_502_sent_once(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, stream: bool
) -> None:
    fake.set_fault(CHAT, Fault.RESET_BEFORE_HEADERS)
    async with proxy_in_front(fake.url, tmp_path) as url:
        assert_error_shape(await client.post(f"{url}{CHAT}", json=chat(stream)), 502)
    assert fake.count("POST", CHAT) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_stall_before_headers_is_a_504(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, stream: bool
) -> None:
    fake.set_fault(CHAT, Fault.STALL_BEFORE_HEADERS)
    async with proxy_in_front(fake.url, tmp_path) as url:
        started = asyncio.get_running_loop().time()
        r = await client.post(f"{url}{CHAT}", json=chat(stream))
        assert_error_shape(r, 504)
        assert asyncio.get_running_loop().time() - started < IDLE_S + 2
    assert fake.count("POST", CHAT) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_upstream_errors_pass_through_unchanged(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, status: int
) -> None:
    fake.set_fault(CHAT, Fault.STATUS_500 if status == 500 else Fault.STATUS_503)
    async with proxy_in_front(fake.url, tmp_path) as url:
        assert_error_shape(await client.post(f"{url}{CHAT}", json=chat()), status)
    assert fake.count("POST", CHAT) == 1


# --- after the headers: an error event, or a response cut short --------------------------


async def test_reset_mid_stream_ends_with_a_parseable_error_event(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The fake stops inside an event: that half event is dropped, the error stands alone."""
    fake.set_fault(CHAT, Fault.RESET_MID_BODY)
    async with proxy_in_front(fake.url, tmp_path) as url:
        got = events(await stream_bytes(client, f"{url}{CHAT}", chat(stream=True)))
    assert got[0]["choices"][0]["delta"]["content"] == "t0 "
    assert got[-1]["error"]["code"] == 502 and got[-1]["error"]["type"] == "unavailable_error"
    assert len(got) == 2
    assert fake.count("POST", CHAT) == 1


async def test_stall_mid_stream_ends_with_a_504_event(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    fake.set_fault(CHAT, Fault.STALL_MID_STREAM)
    async with proxy_in_front(fake.url, tmp_path) as url:
        got = events(await stream_bytes(client, f"{url}{CHAT}", chat(stream=True)))
    assert got[-1]["error"]["code"] == 504
    assert fake.count("POST", CHAT) == 1


@pytest.mark.parametrize("fault", [Fault.RESET_MID_BODY, Fault.STALL_MID_STREAM])
async def test_a_broken_json_body_ends_short_never_complete(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, fault: Fault
) -> None:
    """Regression: an error answer written after the headers were out became part of the
    body (or a second response on the connection); the client must see a short response."""
    fake.set_fault(CHAT, fault)
    async with proxy_in_front(fake.url, tmp_path) as url:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"{url}{CHAT}", json=chat())
        # the proxy itself is fine, and so is the next request
        fake.set_fault(CHAT, Fault.OK)
        assert (await client.post(f"{url}{CHAT}", json=chat())).status_code == 200
    assert fake.count("POST", CHAT) == 2


async def test_malformed_sse_is_relayed_byte_for_byte(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Not the proxy's to judge: what upstream streams, the client gets, and the stream ends."""
    fake.set_fault(CHAT, Fault.MALFORMED_SSE)
    async with proxy_in_front(fake.url, tmp_path) as url:
        via = await stream_bytes(client, f"{url}{CHAT}", chat(stream=True))
        fake.set_fault("/direct", Fault.MALFORMED_SSE)
    async with httpx.AsyncClient(timeout=CLIENT_S) as direct:
        assert via == await stream_bytes(direct, f"{fake.url}/direct", chat(stream=True))


# --- connections: 204 with a body, keep-alive closes, disconnects ------------------------------


@pytest.mark.parametrize("path", ["/cors-proxy", "/v1/models"])
async def test_a_204_with_a_body_never_poisons_the_next_response(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, path: str
) -> None:
    """A 204 whose 'body' is another response must never reach the next request on a pooled
    connection (response splitting). /cors-proxy is llama-server's own case; any other path
    the general one. The relay reads no body for a 204, and httpcore then closes the
    connection; forwarding._drop_connection closes it explicitly, so that a relay that does
    read it (the mutation this test was checked against) still cannot pass the bytes on."""
    fake.set_fault(path, Fault.NO_CONTENT_CHUNKED)
    async with proxy_in_front(fake.url, tmp_path) as url:
        for _ in range(5):
            r = await client.get(f"{url}{path}")
            assert (r.status_code, r.content) == (204, b"")
            r = await client.post(f"{url}{CHAT}", json=chat())
            assert r.status_code == 200, r.text
            assert SMUGGLED not in r.content and r.json()["choices"]


async def test_llama_servers_204_with_a_chunk_end_arrives_as_a_204(
    fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """llama-server's /cors-proxy relays a target's 204 with the chunked terminator after its
    head (llama.cpp's unit/test_proxy.py::test_mcp_proxy_no_content). Straight from the server
    a client gets the 204; through vcache it once got a 502, aiohttp's parser failing the read
    on those bytes. And the connection is not reused after it."""
    fake.set_fault("/cors-proxy", Fault.NO_CONTENT_CHUNK_END)
    async with proxy_in_front(fake.url, tmp_path) as url:
        for _ in range(3):
            r = await client.post(f"{url}/cors-proxy?url=http://127.0.0.1:9/", json={})
            assert (r.status_code, r.content) == (204, b""), r.text
            r = await client.post(f"{url}{CHAT}", json=chat())
            assert r.status_code == 200, r.text
    order = [(s.path.startswith("/cors-proxy"), s.connection) for s in fake.seen]
    ended = [i for i, (cors, _) in enumerate(order) if cors]
    assert len(ended) == 3
    for i in ended:  # nothing went on a connection after a 204 on it
        assert order[i][1] not in {conn for _, conn in order[i + 1 :]}, order


async def test_random_keep_alive_closes_give_200_or_502_and_no_replay(
    fake: FaultUpstream, tmp_path: Path
) -> None:
    fake.set_fault(CHAT, Fault.CLOSE_RANDOMLY)
    async with (
        proxy_in_front(fake.url, tmp_path) as url,
        httpx.AsyncClient(timeout=CLIENT_S, limits=httpx.Limits(max_connections=8)) as client,
    ):
        replies = await asyncio.gather(
            *(client.post(f"{url}{CHAT}", json=chat(tag=str(i))) for i in range(200))
        )
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 502}, statuses
    for r in replies:
        if r.status_code == 502:
            assert_error_shape(r, 502)
    tags = [s.json()["messages"][0]["content"][0]["text"] for s in fake.requests(CHAT)]
    assert len(tags) == len(set(tags)) == 200  # each request reached upstream exactly once


async def test_streams_back_to_back_never_meet_the_connection_upstream_closes(
    fake: FaultUpstream, tmp_path: Path
) -> None:
    """llama-server closes the connection after each stream while announcing keep-alive: a
    request sent on it in the meantime would be a 502 nobody caused."""
    fake.set_fault(CHAT, Fault.CLOSE_AFTER_STREAM)
    async with (
        proxy_in_front(fake.url, tmp_path) as url,
        httpx.AsyncClient(timeout=CLIENT_S) as client,
    ):
        for i in range(5):
            r = await client.post(f"{url}{CHAT}", json=chat(True, tag=str(i)))
            assert r.status_code == 200, r.text
            assert r.text.rstrip().endswith("data: [DONE]")
    assert fake.count("POST", CHAT) == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_closes_the_upstream_request(
    fake: FaultUpstream, tmp_path: Path, stream: bool
) -> None:
    fake.set_fault(CHAT, Fault.STALL_BEFORE_HEADERS if not stream else Fault.STALL_MID_STREAM)
    async with proxy_in_front(fake.url, tmp_path, upstream_idle_s=60) as url:
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.5)) as client:
            with pytest.raises(httpx.ReadTimeout):
                async with client.stream("POST", f"{url}{CHAT}", json=chat(stream)) as r:
                    async for _ in r.aiter_raw():
                        pass
        gone = asyncio.get_running_loop().time()
        while fake.requests(CHAT)[0].closed_at is None:
            assert asyncio.get_running_loop().time() - gone < 1.0, "upstream request still open"
            await asyncio.sleep(0.01)


# --- the image path: the one deliberate re-send, and nothing else ----------------------------


@pytest.fixture
async def patched_fake() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream(packages=True) as upstream:
        yield upstream


async def test_refused_packages_are_sent_again_as_images_once(
    patched_fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The documented exception (THREAT_MODEL.md): a 400 that refuses the packages means the
    request was not processed, so it goes again, once, with the client's images."""
    patched_fake.set_fault(CHAT, Fault.REFUSE_PACKAGES)
    async with proxy_in_front(patched_fake.url, tmp_path) as url:
        r = await client.post(f"{url}{CHAT}", json=chat(image=png()))
    assert r.status_code == 200, r.text
    first, second = patched_fake.requests(CHAT)
    assert b'"image_embedding"' in first.body and b'"image_embedding"' not in second.body
    assert r.json()["vcache_fake"] == {"intact": 0, "corrupt": 0, "images": 1}


@pytest.mark.parametrize(
    "fault",
    [
        Fault.STATUS_500,
        Fault.RESET_BEFORE_HEADERS,
        Fault.STALL_BEFORE_HEADERS,
        Fault.RESET_MID_BODY,
    ],
)
async def test_no_other_failure_sends_a_request_twice(
    patched_fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, fault: Fault
) -> None:
    patched_fake.set_fault(CHAT, fault)
    async with proxy_in_front(patched_fake.url, tmp_path) as url:
        try:
            r = await client.post(f"{url}{CHAT}", json=chat(image=png(1)))
            assert r.status_code in (500, 502, 504)
            assert "Traceback" not in r.text
        except httpx.RemoteProtocolError:
            assert fault is Fault.RESET_MID_BODY  # cut short after the headers
    assert patched_fake.count("POST", CHAT) == 1
    assert b'"image_embedding"' in patched_fake.requests(CHAT)[0].body  # the cache path ran


@pytest.mark.parametrize(
    "fault", [Fault.STATUS_500, Fault.RESET_BEFORE_HEADERS, Fault.STALL_BEFORE_HEADERS]
)
async def test_a_failing_encoder_means_the_image_is_forwarded(
    patched_fake: FaultUpstream, client: httpx.AsyncClient, tmp_path: Path, fault: Fault
) -> None:
    patched_fake.set_fault("/vision/embedding", fault)
    async with proxy_in_front(patched_fake.url, tmp_path) as url:
        r = await client.post(f"{url}{CHAT}", json=chat(image=png(2)))
    assert r.status_code == 200, r.text
    assert "fallback=1" in r.headers["x-vcache"]
    assert patched_fake.count("POST", CHAT) == 1
    assert r.json()["vcache_fake"]["images"] == 1
