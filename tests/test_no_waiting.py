"""No client waits for another's image, and big strings travel as they came.

A request with a big image is parsed, decoded and hashed off the event loop, so every other
request keeps being served meanwhile; big strings in a body (an image's base64, a pasted
document) reach upstream byte for byte, whatever the proxy does with the rest of the body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from proxy.images import image_bytes, media
from proxy.images.json_body import Span
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess_proxy import CHAT, chat, png, png_bytes, proxy_in_front

CLIENT_S = 10.0


@pytest.fixture
async def fake() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream(packages=True) as upstream:
        yield upstream


async def test_a_text_request_is_answered_while_an_image_is_being_read(
    fake: FaultUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's decode and hash wait on a gate here; were they on the event loop, the text
    request sent meanwhile could not be answered before the gate opens."""
    started, gate = threading.Event(), threading.Event()
    real = image_bytes.read_reference

    def held(ref: Span | str, max_bytes: int) -> image_bytes.ImageBytes:
        started.set()
        assert gate.wait(CLIENT_S), "the gate never opened"
        return real(ref, max_bytes)

    monkeypatch.setattr(media, "read_reference", held)
    big = "data:image/png;base64," + base64.b64encode(png_bytes(3) + b"\0" * 300_000).decode()
    async with (
        proxy_in_front(fake.url, tmp_path) as (url, _),
        httpx.AsyncClient(timeout=CLIENT_S) as client,
    ):
        image_request = asyncio.create_task(client.post(f"{url}{CHAT}", json=chat(image=big)))
        assert await asyncio.to_thread(started.wait, CLIENT_S)
        text = await client.post(f"{url}{CHAT}", json=chat(tag="meanwhile"))
        assert text.status_code == 200 and not image_request.done()
        gate.set()
        answered = await image_request
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-vcache"].startswith("hits=0 misses=1")


@pytest.mark.parametrize("escape", ['\\u00e9\\n\\"', ""])
async def test_big_strings_travel_byte_for_byte_beside_a_swapped_image(
    fake: FaultUpstream, tmp_path: Path, escape: str
) -> None:
    document = ("A long document pasted in. " * 8000) + escape  # ~200 KB, a span
    body = chat(image=png(7))
    body["messages"][0]["content"][0]["text"] = "<json>"
    raw = json.dumps(body).encode().replace(b'"<json>"', b'"' + document.encode() + b'"')
    async with (
        proxy_in_front(fake.url, tmp_path) as (url, _),
        httpx.AsyncClient(timeout=CLIENT_S) as client,
    ):
        for _ in range(2):  # a miss, then a hit
            r = await client.post(
                f"{url}{CHAT}", content=raw, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 200, r.text
    sent = fake.requests(CHAT)[-1].body
    assert b'"' + document.encode() + b'"' in sent  # the escapes as the client wrote them
    assert r.json()["vcache_fake"] == {"intact": 1, "corrupt": 0, "images": 0}
