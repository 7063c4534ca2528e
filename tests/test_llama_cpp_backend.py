"""`vcache serve --backend llama-cpp-python` (proxy.backends.llama_cpp), served in-process."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.backends.llama_cpp import LlamaCppSettings, running_backend
from tests.support.llama_cpp_fixtures import OTHER_IMAGE, data_url, png
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server


def _body(image: bytes | str, *, stream: bool = False, n: int = 12) -> dict[str, Any]:
    url = image if isinstance(image, str) else data_url(image)
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the image."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": n,
        "stream": stream,
    }


def _content(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _streamed(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [
        line[len("data: ") :] for line in reply.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    return "".join(d.get("content") or "" for d in deltas)


@pytest.fixture
def settings(
    lib_dir: Path, tiny_model: Callable[[str], ModelFiles], tmp_path: Path
) -> LlamaCppSettings:
    files = tiny_model("gemma3")
    return LlamaCppSettings(
        model=files.model,
        mmproj=files.mmproj,
        store=tmp_path / "store",
        lib_dir=lib_dir,
        n_ctx=2048,
        n_threads=2,
        alias="tiny-gemma3",
        port=0,
    )


async def test_chat_completions_hit_the_cache_and_stream(settings: LlamaCppSettings) -> None:
    async with (
        running_backend(settings) as (url, handler),
        httpx.AsyncClient(base_url=url, timeout=120) as client,
    ):
        assert (await client.get("/health")).json() == {"status": "ok"}
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny-gemma3"]

        image = png("shapes_640x480")
        first = _content(await client.post("/v1/chat/completions", json=_body(image)))
        second = _content(await client.post("/chat/completions", json=_body(image)))
        streamed = _streamed(
            await client.post("/v1/chat/completions", json=_body(image, stream=True))
        )
        other = _content(await client.post("/v1/chat/completions", json=_body(png(OTHER_IMAGE))))

    assert first == second == streamed
    assert first.strip()
    assert other != first  # negative control: the reply depends on the image
    assert (handler.stats.misses, handler.stats.hits) == (2, 2)


async def test_bad_requests_get_llama_servers_error_shape(settings: LlamaCppSettings) -> None:
    async with (
        running_backend(settings) as (url, handler),
        httpx.AsyncClient(base_url=url, timeout=120) as client,
    ):
        cases = {
            "no messages": {"temperature": 0},
            "private URL": _body("http://127.0.0.1:1/cat.png"),
            "not an image": _body(data_url(b"definitely not an image")),
        }
        for name, body in cases.items():
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 400, f"{name}: {reply.text}"
            assert reply.json()["error"]["type"] == "invalid_request_error", name
        reply = await client.post("/v1/chat/completions", content=b"{not json")
        assert reply.status_code == 400
        assert reply.headers["X-Request-Id"]  # the proxy's own middleware answered
        # still serving, and nothing was encoded for the refused requests
        assert _content(
            await client.post("/v1/chat/completions", json=_body(png("stripes_300x900"), n=4))
        )
        assert handler.stats.misses == 1


async def test_a_body_over_the_limit_gets_413_in_llama_servers_shape(
    settings: LlamaCppSettings,
) -> None:
    small = dataclasses.replace(settings, max_body_mb=1)
    async with (
        running_backend(small) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=120) as client,
    ):
        reply = await client.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024))
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["code"] == 413


async def test_a_client_leaving_mid_stream_does_not_block_the_next(
    settings: LlamaCppSettings,
) -> None:
    async with (
        running_backend(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=120) as client,
    ):
        body = _body(png("checkers_1024x256"), stream=True, n=200)
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    break  # one event, then hang up
        assert _content(
            await client.post("/v1/chat/completions", json=_body(png("checkers_1024x256"), n=4))
        )
