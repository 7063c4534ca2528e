"""The generated tiny VLMs, served by the real llama-server, answer according to the image.

Equivalence tests of the cache (same answer with and without a cached visual package)
prove nothing on a model whose answer ignores the image, so this checks, for each
architecture, that greedy output is long, repeatable, and different for different images.
Servers and models come from the shared fixtures in tests/support/fixtures.py.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llama_server import LlamaServer
from vision_cache.synthetic import images as test_images
from vision_cache.synthetic import models

PROMPT = "Describe this image."
MIN_TOKENS = 16
SAMPLES = test_images.sample_images()


@dataclass(frozen=True)
class Reply:
    """The parts of a /v1/chat/completions answer these tests compare."""

    content: str
    tokens: list[str]
    top_logprobs: list[list[tuple[str, float]]]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def chat(client: httpx.Client, image_url: str | None, max_tokens: int = 24) -> Reply:
    """Greedy chat completion; the prompt cache is off so logprobs compare exactly."""
    content: list[dict[str, Any]] = []
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": PROMPT})
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
        "cache_prompt": False,
    }
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    choice = data["choices"][0]
    steps = choice["logprobs"]["content"]
    return Reply(
        content=choice["message"]["content"],
        tokens=[step["token"] for step in steps],
        top_logprobs=[[(t["token"], t["logprob"]) for t in step["top_logprobs"]] for step in steps],
        prompt_tokens=data["usage"]["prompt_tokens"],
        completion_tokens=data["usage"]["completion_tokens"],
        finish_reason=choice["finish_reason"],
    )


@pytest.fixture
def client(stock_server: LlamaServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stock_server.base_url, timeout=120.0) as http:
        yield http


def _digests(files: models.ModelFiles) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in (files.model, files.mmproj)]


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = models.generate("qwen2vl", "tiny", seed=3, out=tmp_path / "a")
    again = models.generate("qwen2vl", "tiny", seed=3, out=tmp_path / "b")
    other = models.generate("qwen2vl", "tiny", seed=4, out=tmp_path / "c")
    assert _digests(first) == _digests(again)
    assert _digests(first)[0] != _digests(other)[0]
    assert _digests(first)[1] != _digests(other)[1]


def test_generation_skips_up_to_date_models_and_redoes_changed_ones(tmp_path: Path) -> None:
    files = models.generate("gemma3", "tiny", seed=0, out=tmp_path)
    stamp = files.model.stat().st_mtime_ns
    assert models.generate("gemma3", "tiny", seed=0, out=tmp_path) == files
    assert files.model.stat().st_mtime_ns == stamp  # recorded seed and params match
    models.generate("gemma3", "tiny", seed=1, out=tmp_path)
    assert files.model.stat().st_mtime_ns != stamp  # another seed: regenerated
    files.mmproj.write_bytes(b"truncated")
    models.generate("gemma3", "tiny", seed=1, out=tmp_path)
    assert files.mmproj.stat().st_size > 1_000_000  # a damaged file is rewritten


def test_test_images_are_distinct_and_stable() -> None:
    samples = test_images.sample_images()
    assert len({s.size for s in samples}) == len(samples) >= 4
    for fmt in test_images.FORMATS:
        encoded = [s.encode(fmt) for s in samples]
        assert len(set(encoded)) == len(encoded)
        assert encoded == [s.encode(fmt) for s in test_images.sample_images()]


@pytest.mark.server
@pytest.mark.parametrize("fmt", test_images.FORMATS)
def test_image_request_generates_whole_words(client: httpx.Client, fmt: test_images.Format) -> None:
    reply = chat(client, SAMPLES[0].data_url(fmt))
    assert reply.completion_tokens >= MIN_TOKENS
    assert reply.finish_reason == "length"  # no early EOS
    # Only whole-word tokens are likely outputs: readable text, no bytes or fragments.
    assert all(t.startswith(" ") and t[1:].isalpha() for t in reply.tokens), reply.content


@pytest.mark.server
def test_same_image_twice_gives_identical_output(client: httpx.Client) -> None:
    url = SAMPLES[1].data_url()
    first, second = chat(client, url), chat(client, url)
    assert first.tokens == second.tokens
    assert first.top_logprobs == second.top_logprobs


@pytest.mark.server
def test_different_images_give_different_outputs(client: httpx.Client) -> None:
    replies = {sample.name: chat(client, sample.data_url()) for sample in SAMPLES}
    for (name_a, a), (name_b, b) in itertools.combinations(replies.items(), 2):
        assert a.tokens != b.tokens, f"{name_a} and {name_b}: {a.content!r}"
        # The image shows already in the first step's distribution, not only later.
        assert a.top_logprobs[0] != b.top_logprobs[0], f"{name_a} and {name_b}"


@pytest.mark.server
def test_image_token_count_matches_preprocessing(client: httpx.Client, arch: str) -> None:
    """gemma3 gives every image the same count; qwen2vl follows size and aspect ratio."""
    text_only = chat(client, None, max_tokens=1).prompt_tokens
    counts = {}
    for sample in SAMPLES:
        with_image = chat(client, sample.data_url(), max_tokens=1).prompt_tokens
        counts[sample.name] = with_image - text_only - 2  # minus image begin/end tokens
        width, height = sample.size
        expected = models.expected_image_tokens(arch, "tiny", width, height)
        assert counts[sample.name] == expected, sample.name
    assert (len(set(counts.values())) == 1) == (arch == "gemma3"), counts
