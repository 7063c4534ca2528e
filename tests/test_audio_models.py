"""The generated tiny audio-language models, served by the real stock llama-server, answer
according to the audio.

Equivalence tests of the audio cache prove nothing on a model whose answer ignores the audio, so
this checks, per family, that greedy output is long, repeatable and different for different
clips, and that a clip longer than one 30 s window becomes two chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llama_server import LlamaServer
from vision_cache.synthetic import audio as test_audio
from vision_cache.synthetic import models
from vision_cache.synthetic.mixed import generate_mixed
from vision_cache.synthetic.registry import audio_family_names

PROMPT = "What do you hear?"
MIN_TOKENS = 12
CLIPS = test_audio.sample_clips()


def chat(client: httpx.Client, b64: str | None, max_tokens: int = 16) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if b64 is not None:
        content.append({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}})
    content.append({"type": "text", "text": PROMPT})
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache_prompt": False,
    }
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def text_of(reply: dict[str, Any]) -> str:
    return str(reply["choices"][0]["message"]["content"])


@pytest.fixture(scope="module", params=audio_family_names())
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def client(
    family: str, models_dir: Path, stock_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    files = models.generate(family, "tiny", 0, models_dir)
    log = tmp_path_factory.mktemp("logs") / f"stock-{family}.log"
    args = [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        "2",
        "-c",
        "4096",
        "-np",
        "1",
        "--no-warmup",
    ]
    with (
        LlamaServer(stock_bin, args, log) as server,
        httpx.Client(base_url=server.base_url, timeout=120.0) as http,
    ):
        yield http


def _digests(files: models.ModelFiles) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in (files.model, files.mmproj)]


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = models.generate("ultravox", "tiny", seed=3, out=tmp_path / "a")
    again = models.generate("ultravox", "tiny", seed=3, out=tmp_path / "b")
    other = models.generate("ultravox", "tiny", seed=4, out=tmp_path / "c")
    assert _digests(first) == _digests(again)
    assert _digests(first)[1] != _digests(other)[1]


def test_clips_are_distinct_stable_and_split_where_llama_cpp_splits() -> None:
    wavs = [c.wav() for c in CLIPS]
    assert len(set(wavs)) == len(wavs) >= 5
    assert wavs == [c.wav() for c in test_audio.sample_clips()]
    assert {c.rate for c in CLIPS} >= {8000, 16000, 44100}
    assert test_audio.whisper_windows(479_839) == 1  # 29.99 s
    assert test_audio.whisper_windows(479_840) == 2
    assert test_audio.whisper_windows(int(test_audio.long_clip().seconds * 16000)) == 2


@pytest.mark.server
def test_audio_gives_long_distinct_answers_and_repeats(client: httpx.Client) -> None:
    replies = [chat(client, clip.base64()) for clip in CLIPS]
    texts = [text_of(r) for r in replies]
    for reply in replies:
        assert reply["usage"]["completion_tokens"] >= MIN_TOKENS
        assert reply["choices"][0]["finish_reason"] == "length"  # no early EOS
    assert len(set(texts)) == len(texts), texts
    assert text_of(chat(client, CLIPS[0].base64())) == texts[0]
    assert text_of(chat(client, None)) not in texts


@pytest.mark.server
def test_long_clip_becomes_two_windows(client: httpx.Client, family: str) -> None:
    per_window = models.audio_tokens_per_window(family, "tiny")
    short = chat(client, CLIPS[0].base64(), max_tokens=1)["usage"]["prompt_tokens"]
    long = chat(client, test_audio.long_clip().base64(), max_tokens=1)["usage"]["prompt_tokens"]
    assert long - short == per_window


@pytest.mark.server
def test_the_mixed_model_loads_with_both_encoders(stock_bin: Path, tmp_path: Path) -> None:
    """The image-and-audio test model (vision_cache.synthetic.mixed): one mmproj, and a stock
    llama-server takes images and audio from it."""
    files = generate_mixed("gemma3", "qwen2audio", tmp_path)
    args = ["-m", str(files.model), "--mmproj", str(files.mmproj), "-t", "2", "-c", "1024"]
    with LlamaServer(stock_bin, [*args, "--no-warmup"], tmp_path / "mixed.log") as server:
        modalities = httpx.get(f"{server.base_url}/props", timeout=30).json()["modalities"]
    assert modalities["vision"] is True and modalities["audio"] is True
    written = files.mmproj.stat().st_mtime_ns
    assert generate_mixed("gemma3", "qwen2audio", tmp_path) == files
    assert files.mmproj.stat().st_mtime_ns == written  # kept, not written again
