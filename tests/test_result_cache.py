"""The result cache in front of a real llama-server: a hit is the first answer byte for byte
and costs upstream nothing; any change that could change the answer misses."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from proxy.images.json_body import MIN_SPAN
from tests.support.fixtures import server_args
from tests.support.inprocess_proxy import png, proxy_in_front
from tests.support.llama_server import LlamaServer
from vision_cache.data_uri import data_uri
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server

CHAT = "/v1/chat/completions"
ON = {"X-Vcache-Result-Cache": "on"}


def question(image: str, text: str = "What is this?", **params: Any) -> dict[str, Any]:
    return {
        "temperature": 0,
        "max_tokens": 6,
        **params,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }


async def upstream_work(server: LlamaServer) -> tuple[int, int]:
    """(prompt tokens, tokens generated) so far: what any model call would add to."""
    async with httpx.AsyncClient(base_url=server.base_url) as c:
        text = (await c.get("/metrics")).text

    def counter(name: str) -> int:
        m = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
        assert m, name
        return int(float(m.group(1)))

    return counter("prompt_tokens_total"), counter("tokens_predicted_total")


@pytest.fixture(scope="module")
def metrics_gemma(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """A patched gemma3 server with /metrics, which counts every token any request costs."""
    log = tmp_path_factory.mktemp("logs") / "result-cache-gemma3.log"
    args = server_args(tiny_model("gemma3"), "--image-embedding", "--metrics")
    with LlamaServer(patched_bin, args, log) as server:
        yield server


@pytest.fixture
async def client(metrics_gemma: LlamaServer, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        proxy_in_front(
            metrics_gemma.base_url, tmp_path, upstream_idle_s=120, result_cache=False
        ) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        yield c


def result_of(r: httpx.Response) -> str:
    m = re.search(r"result=(\w+)", r.headers.get("x-vcache", ""))
    return m.group(1) if m else ""


async def test_a_hit_is_the_first_answer_and_calls_nothing(
    client: httpx.AsyncClient, metrics_gemma: LlamaServer
) -> None:
    body = question(png(1))
    first = await client.post(CHAT, json=body, headers=ON)
    assert first.status_code == 200, first.text
    assert result_of(first) == "miss"
    before = await upstream_work(metrics_gemma)
    second = await client.post(CHAT, json=body, headers=ON)
    assert result_of(second) == "hit"
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert await upstream_work(metrics_gemma) == before


async def test_a_stream_is_replayed_as_the_same_events(
    client: httpx.AsyncClient, metrics_gemma: LlamaServer
) -> None:
    body = question(png(2), stream=True)

    async def events() -> tuple[str, list[bytes]]:
        async with client.stream("POST", CHAT, json=body, headers=ON) as r:
            return result_of(r), [chunk async for chunk in r.aiter_raw()]

    result, first = await events()
    assert result == "miss"
    before = await upstream_work(metrics_gemma)
    result, second = await events()
    assert result == "hit"
    assert b"".join(second) == b"".join(first)
    split = [e for e in b"".join(first).split(b"\n\n") if e]
    assert len(split) > 2 and split[-1] == b"data: [DONE]"
    assert await upstream_work(metrics_gemma) == before


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0, "top_k": 3},  # a sampling parameter
        {"max_tokens": 5},  # the length
        {"image": 4},  # the image
        {"text": "What is that?"},  # the text
    ],
)
async def test_any_change_misses(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    base = question(png(3))
    assert result_of(await client.post(CHAT, json=base, headers=ON)) in ("miss", "hit")
    assert result_of(await client.post(CHAT, json=base, headers=ON)) == "hit"
    changed = question(png(change.pop("image", 3)), change.pop("text", "What is this?"))
    changed.update(change)
    assert result_of(await client.post(CHAT, json=changed, headers=ON)) == "miss"


async def test_the_same_image_by_name_hits(client: httpx.AsyncClient) -> None:
    image = png(5)
    r = await client.post("/vcache/warm", json={"image": image, "name": "five"})
    assert r.status_code == 200, r.text
    assert result_of(await client.post(CHAT, json=question(image), headers=ON)) == "miss"
    assert result_of(await client.post(CHAT, json=question("vcache://five"), headers=ON)) == "hit"


async def test_a_big_image_read_in_place_keys_by_its_bytes(client: httpx.AsyncClient) -> None:
    """An image of 64 KiB or more stays in the raw body and stands in the parsed one as a
    placeholder that differs on every read (proxy.images.json_body): the key must not."""
    pixels = np.random.default_rng(7).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = data_uri(buf.getvalue(), "image/png")
    assert len(image) >= MIN_SPAN
    r = await client.post("/vcache/warm", json={"image": image, "name": "big"})
    assert r.status_code == 200, r.text
    assert result_of(await client.post(CHAT, json=question(image), headers=ON)) == "miss"
    assert result_of(await client.post(CHAT, json=question(image), headers=ON)) == "hit"
    assert result_of(await client.post(CHAT, json=question("vcache://big"), headers=ON)) == "hit"


async def test_off_by_default_and_by_what_the_request_says(client: httpx.AsyncClient) -> None:
    body = question(png(6))
    plain = await client.post(CHAT, json=body)
    assert result_of(plain) == ""  # off by default
    assert result_of(await client.post(CHAT, json=body, headers=ON)) == "miss"
    assert result_of(await client.post(CHAT, json=body, headers=ON)) == "hit"
    refresh = {**ON, "Cache-Control": "no-cache"}
    assert result_of(await client.post(CHAT, json=body, headers=refresh)) == "refresh"
    off = {"X-Vcache-Result-Cache": "off"}
    assert result_of(await client.post(CHAT, json=body, headers=off)) == ""
    sampled = question(png(6), temperature=0.7)  # not determined
    assert result_of(await client.post(CHAT, json=sampled, headers=ON)) == "skip"
    seeded = question(png(6), temperature=0.7, seed=42)  # determined by its seed
    assert result_of(await client.post(CHAT, json=seeded, headers=ON)) == "miss"
    assert result_of(await client.post(CHAT, json=seeded, headers=ON)) == "hit"
