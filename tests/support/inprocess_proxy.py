"""The real proxy (serve.running_proxy, port 0) inside the test's event loop, and small helpers
for talking to it: for tests that need to reach into the process (inject I/O faults, fake the
DNS) or start many proxies fast. tests/support/proxy_process.py runs it as a subprocess instead."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from proxy.cli.config import ServeSettings
from proxy.serve import running_proxy
from proxy.web.state import Proxy
from vision_cache.data_uri import data_uri

IDLE_S = 0.5  # --upstream-idle-s unless a test says otherwise: faults show up fast
CHAT = "/v1/chat/completions"


@asynccontextmanager
async def proxy_in_front(
    upstream: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[str, Proxy]]:
    config = ServeSettings(
        upstream=upstream,
        port=0,
        **{"store": tmp_path / "store", "upstream_idle_s": IDLE_S, **settings},
    )
    async with running_proxy(config) as running:
        yield running


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 8 + seed % 50), (seed % 256, 90, (seed // 256) % 256)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def png(seed: int = 0) -> str:
    return data_uri(png_bytes(seed), "image/png")


def chat(stream: bool = False, image: str | None = None, tag: str = "") -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"hello {tag}"}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"stream": stream, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


def assert_error_shape(r: httpx.Response, status: int) -> None:
    """llama-server's error body, with the status it claims, and no traceback."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], type(error["message"]), type(error["type"])) == (status, str, str)
    assert "Traceback" not in r.text
