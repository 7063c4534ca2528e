"""Synchronous client helpers for tests: a (patched) llama-server, or the proxy in front."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import httpx

N_PREDICT = 20


@dataclasses.dataclass(frozen=True)
class Reply:
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[str, float], ...], ...]
    timings: dict[str, Any]
    headers: httpx.Headers

    def max_logprob_diff(self, other: Reply) -> float:
        return max(
            (abs(a - b) for a, b in zip(self.logprobs, other.logprobs, strict=True)), default=0.0
        )


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def package_part(pkg: dict[str, Any]) -> dict[str, Any]:
    return {"type": "image_embedding", "image_embedding": pkg}


def chat_body(
    parts: list[dict[str, Any]],
    text: str = "Describe the image.",
    *,
    n: int = N_PREDICT,
    stream: bool = False,
) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
        "temperature": 0,
        "max_tokens": n,
        "cache_prompt": False,
        "logprobs": True,
        "top_logprobs": 3,
        "stream": stream,
    }


def chat(
    base_url: str,
    parts: list[dict[str, Any]],
    text: str = "Describe the image.",
    *,
    n: int = N_PREDICT,
    timeout: float = 300.0,
) -> Reply:
    r = httpx.post(
        f"{base_url}/v1/chat/completions", json=chat_body(parts, text, n=n), timeout=timeout
    )
    assert r.status_code == 200, r.text
    return reply(r)


def reply(r: httpx.Response) -> Reply:
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    return Reply(
        tokens=tuple(t["token"] for t in content),
        logprobs=tuple(t["logprob"] for t in content),
        top=tuple(tuple((c["token"], c["logprob"]) for c in t["top_logprobs"]) for t in content),
        timings=body.get("timings", {}),
        headers=r.headers,
    )


def encode(base_url: str, url: str, **options: Any) -> dict[str, Any]:
    """POST /vision/embedding; returns the whole answer (package under "image_embedding")."""
    r = httpx.post(
        f"{base_url}/vision/embedding", json={"image_url": {"url": url}, **options}, timeout=300.0
    )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def perturbed(pkg: dict[str, Any], index: int = 0, delta: float = 5.0) -> dict[str, Any]:
    """The same package with one embedding value changed."""
    import struct

    data = bytearray(base64.b64decode(pkg["data"]))
    (v,) = struct.unpack_from("<f", data, index * 4)
    struct.pack_into("<f", data, index * 4, v + delta)
    return {**pkg, "data": base64.b64encode(bytes(data)).decode()}
