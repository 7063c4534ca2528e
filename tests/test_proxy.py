"""The proxy in front of real llama-servers: hits, misses, fallback, and token-identical answers.

Each equivalence check compares the proxy's answer with the same request sent straight to
llama-server with the raw image, at temperature 0, and carries a negative control (another image
changes the answer), so a proxy that dropped or swapped images would fail.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import chat, image_part
from vision_cache.synthetic.images import sample_image

pytestmark = pytest.mark.server

SHAPES, STRIPES, NOISE, CHECKERS = (
    "shapes_640x480",
    "stripes_300x900",
    "noise_512x512",
    "checkers_1024x256",
)


def url(name: str, fmt: str = "PNG") -> str:
    return sample_image(name).data_url(fmt)  # type: ignore[arg-type]


def vcache_header(headers: Any) -> dict[str, float]:
    fields = dict(item.split("=") for item in headers["x-vcache"].split())
    return {k: float(v) for k, v in fields.items()}


@pytest.fixture(scope="module")
def proxy(
    patched_server: LlamaServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("proxy")
    with ProxyProcess(
        ["--upstream", patched_server.base_url, "--store", str(tmp / "store")], tmp / "proxy.log"
    ) as p:
        yield p


@pytest.fixture(scope="module")
def stock_proxy(
    stock_server: LlamaServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("stock-proxy")
    with ProxyProcess(
        ["--upstream", stock_server.base_url, "--store", str(tmp / "store")], tmp / "proxy.log"
    ) as p:
        yield p


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def sdk_chat(
    client: openai.OpenAI,
    images: list[str],
    text: str,
) -> tuple[list[str], list[float], dict[str, float] | None]:
    content: list[Any] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in images]
    raw = client.chat.completions.with_raw_response.create(
        model="test",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=20,
        logprobs=True,
        top_logprobs=3,
        extra_body={"cache_prompt": False},
    )
    completion = raw.parse()
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.content is not None
    header = vcache_header(raw.headers) if "x-vcache" in raw.headers else None
    return [t.token for t in lp.content], [t.logprob for t in lp.content], header


def test_miss_then_hit_is_token_identical_to_direct(
    proxy: ProxyProcess, patched_server: LlamaServer
) -> None:
    client, direct = sdk(proxy.base_url), sdk(patched_server.base_url)
    for i, text in enumerate(("Describe it.", "What colours are there?")):
        tokens, lps, header = sdk_chat(client, [url(SHAPES)], text)
        d_tokens, d_lps, _ = sdk_chat(direct, [url(SHAPES)], text)
        assert header is not None
        assert (header["hits"], header["misses"]) == ((0, 1) if i == 0 else (1, 0))
        assert tokens == d_tokens
        assert max(abs(a - b) for a, b in zip(lps, d_lps, strict=True)) <= 1e-5
    other, _, _ = sdk_chat(client, [url(NOISE)], "Describe it.")
    first, _, _ = sdk_chat(client, [url(SHAPES)], "Describe it.")
    assert other != first


def test_several_images_in_one_request(proxy: ProxyProcess, patched_server: LlamaServer) -> None:
    client, direct = sdk(proxy.base_url), sdk(patched_server.base_url)
    images = [url(STRIPES), url(CHECKERS, "JPEG")]
    tokens, _, header = sdk_chat(client, images, "Compare the two.")
    assert header is not None and header["hits"] + header["misses"] == 2
    assert tokens == sdk_chat(direct, images, "Compare the two.")[0]
    tokens2, _, header2 = sdk_chat(client, images[::-1], "Now the other way round.")
    assert header2 is not None and header2["hits"] == 2
    assert tokens2 == sdk_chat(direct, images[::-1], "Now the other way round.")[0]
    swapped = sdk_chat(client, [url(STRIPES), url(NOISE)], "Compare the two.")[0]
    assert swapped != tokens


def test_streaming_matches_direct(proxy: ProxyProcess, patched_server: LlamaServer) -> None:
    def stream(base: str, text: str) -> str:
        chunks = sdk(base).chat.completions.create(
            model="test",
            stream=True,
            temperature=0,
            max_tokens=20,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": url(CHECKERS)}},
                    ],
                }
            ],
            extra_body={"cache_prompt": False},
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    for text in ("Stream a description.", "Stream something else."):
        got = stream(proxy.base_url, text)
        assert got and got == stream(patched_server.base_url, text)


def _streamed_chat(text: str) -> dict[str, Any]:
    return {
        "stream": True,
        "temperature": 0,
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(url(CHECKERS))]}
        ],
    }


def test_llama_server_closes_the_connection_after_a_stream(patched_server: LlamaServer) -> None:
    """While announcing keep-alive: what test_faults.py's CLOSE_AFTER_STREAM fault mimics."""
    with httpx.Client(base_url=patched_server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=_streamed_chat("Once.")) as r:
            assert r.headers.get("keep-alive")
            r.read()
            stream = r.extensions["network_stream"]
        deadline = time.monotonic() + 5
        while not stream.get_extra_info("is_readable") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.get_extra_info("is_readable")  # readable and idle: the server's FIN


def test_images_in_earlier_turns(proxy: ProxyProcess, patched_server: LlamaServer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Look."}, image_part(url(SHAPES))]},
        {"role": "assistant", "content": "I see it."},
        {"role": "user", "content": "And now?"},
    ]
    body = {"messages": messages, "temperature": 0, "max_tokens": 16, "cache_prompt": False}
    via = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120)
    direct = httpx.post(f"{patched_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert via.status_code == 200
    assert vcache_header(via.headers)["fallback"] == 0
    assert via.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]


def test_native_completion_hits(proxy: ProxyProcess, patched_server: LlamaServer) -> None:
    marker = httpx.get(f"{patched_server.base_url}/props").json()["media_marker"]
    data = base64.b64encode(sample_image(STRIPES).encode("PNG")).decode()

    def complete(base: str, lead: str) -> httpx.Response:
        body = {
            "prompt": {"prompt_string": f"{lead} {marker}\nIt shows", "multimodal_data": [data]},
            "temperature": 0,
            "n_predict": 16,
            "cache_prompt": False,
        }
        return httpx.post(f"{base}/completion", json=body, timeout=120)

    for lead in ("Picture:", "Another picture:"):
        via = complete(proxy.base_url, lead)
        assert via.status_code == 200, via.text
        assert via.json()["content"] == complete(patched_server.base_url, lead).json()["content"]
    assert vcache_header(via.headers)["hits"] == 1


def test_anthropic_messages_hit(proxy: ProxyProcess, patched_server: LlamaServer) -> None:
    data = base64.b64encode(sample_image(NOISE).encode("PNG")).decode()

    def message(base: str, text: str) -> httpx.Response:
        body = {
            "model": "m",
            "max_tokens": 16,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": data},
                        },
                    ],
                }
            ],
        }
        return httpx.post(f"{base}/v1/messages", json=body, timeout=120)

    for text in ("What is it?", "Describe the texture."):
        via = message(proxy.base_url, text)
        assert via.status_code == 200, via.text
        assert via.json()["content"] == message(patched_server.base_url, text).json()["content"]
    assert vcache_header(via.headers)["hits"] == 1


def test_stock_upstream_falls_back_and_matches(
    stock_proxy: ProxyProcess, stock_server: LlamaServer
) -> None:
    for text in ("Describe it.", "Again, differently."):
        via = chat(stock_proxy.base_url, [image_part(url(SHAPES))], text)
        direct = chat(stock_server.base_url, [image_part(url(SHAPES))], text)
        assert via.tokens == direct.tokens
        header = vcache_header(via.headers)
        assert (header["hits"], header["misses"], header["fallback"]) == (0, 0, 1)


PASSTHROUGH: list[tuple[str, str, dict[str, Any] | None, Callable[[Any], Any]]] = [
    ("GET", "/health", None, lambda j: j),
    ("GET", "/v1/models", None, lambda j: [m["id"] for m in j["data"]]),
    ("POST", "/tokenize", {"content": "hello world"}, lambda j: j),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}, lambda j: j),
    ("GET", "/props", None, lambda j: {k: j[k] for k in ("model_path", "image_embedding")}),
    ("GET", "/slots", None, lambda j: [s["id"] for s in j]),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "view"), PASSTHROUGH, ids=[p[1] for p in PASSTHROUGH]
)
def test_passthrough_endpoints(
    proxy: ProxyProcess,
    patched_server: LlamaServer,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    view: Callable[[Any], Any],
) -> None:
    via = httpx.request(method, f"{proxy.base_url}{path}", json=body, timeout=30)
    direct = httpx.request(method, f"{patched_server.base_url}{path}", json=body, timeout=30)
    assert via.status_code == direct.status_code
    assert view(via.json()) == view(direct.json())
    assert via.headers.get("content-type") == direct.headers.get("content-type")


def test_metrics_passthrough_and_own_metrics(proxy: ProxyProcess) -> None:
    own = httpx.get(f"{proxy.base_url}/vcache/metrics", timeout=10)
    assert own.status_code == 200
    assert "vcache_hits_total" in own.text
    # /metrics is llama-server's (disabled unless --metrics): the proxy relays its answer
    upstream = httpx.get(f"{proxy.base_url}/metrics", timeout=10)
    assert upstream.status_code in (200, 501)


def test_client_packages_are_refused(proxy: ProxyProcess) -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_embedding", "image_embedding": {"version": 1}}],
            }
        ],
        "max_tokens": 4,
    }
    r = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_limit_and_image_limit(patched_server: LlamaServer, tmp_path: Path) -> None:
    args = [
        "--upstream",
        patched_server.base_url,
        "--store",
        str(tmp_path / "s"),
        "--max-body-mb",
        "1",
        "--max-images",
        "2",
    ]
    with ProxyProcess(args, tmp_path / "p.log") as p:
        big = {"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
        r = httpx.post(f"{p.base_url}/v1/chat/completions", json=big, timeout=30)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == 413

        def chunks() -> Iterator[bytes]:
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}]}'

        r = httpx.post(f"{p.base_url}/v1/chat/completions", content=chunks(), timeout=30)
        assert r.status_code == 413
        three = [image_part(url(SHAPES))] * 3
        r = httpx.post(
            f"{p.base_url}/v1/chat/completions",
            timeout=30,
            json={"messages": [{"role": "user", "content": three}]},
        )
        assert r.status_code == 400
        assert "limit is 2" in r.json()["error"]["message"]
