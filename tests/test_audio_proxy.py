"""Audio through the proxy, against real llama-servers: a hit answers exactly as stock does.

For each audio family, a clip sent through the proxy (a miss, then hits with other text) gets
the same tokens and top logprobs as the raw clip sent straight to the stock llama-server, with
its package inline in the JSON and by file reference; another clip changes the answer (the
negative control). Bad audio gets stock's own answer and never reaches the store. A model that
takes both gets an image and a clip in one request, and answers as stock does.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic import audio as clips
from vision_cache.synthetic import models
from vision_cache.synthetic.images import sample_images
from vision_cache.synthetic.mixed import generate_mixed
from vision_cache.synthetic.registry import audio_family_names

pytestmark = pytest.mark.server

N = 8
A, B = clips.sample_clips()[1], clips.sample_clips()[3]  # a chirp, a click train
GOOD_DIGEST = hashlib.sha256(A.wav()).hexdigest()  # cached by the first test


@dataclass(frozen=True)
class Setup:
    stock: str
    inline: str  # proxy, packages inline
    file: str  # proxy, packages by file reference into the server's embedding directory
    file_store: Path


@pytest.fixture(scope="module", params=audio_family_names())
def setup(
    request: pytest.FixtureRequest,
    stock_bin: Path,
    patched_bin: Path,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    family = str(request.param)
    files = models.generate(family, "tiny", 0, models_dir)
    tmp = tmp_path_factory.mktemp(f"audio-{family}")
    shared = tmp / "file-store"
    (shared / "segments").mkdir(parents=True)  # the store's payloads: what upstream maps
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
        "2",
        "--no-warmup",
    ]
    # one media marker for both servers (it is random per process), so that one native prompt
    # means the same to both
    env = {"LLAMA_MEDIA_MARKER": "<__audio__>"}
    with (
        LlamaServer(stock_bin, args, tmp / "stock.log", env=env) as stock,
        LlamaServer(
            patched_bin,
            [*args, "--image-embedding-dir", str(shared / "segments")],
            tmp / "patched.log",
            env=env,
        ) as patched,
    ):
        caps = httpx.get(f"{patched.base_url}/props").json().get("image_embedding", {})
        if "audio" not in caps.get("modalities", []) or not caps.get("media_endpoint"):
            pytest.skip("this patched llama-server takes no audio packages")
        with (
            ProxyProcess(
                [
                    "--upstream",
                    patched.base_url,
                    "--store",
                    str(tmp / "inline"),
                    "--transport",
                    "inline",
                ],
                tmp / "inline.log",
            ) as inline,
            ProxyProcess(
                ["--upstream", patched.base_url, "--store", str(shared), "--transport", "file"],
                tmp / "file.log",
            ) as by_file,
        ):
            yield Setup(stock.base_url, inline.base_url, by_file.base_url, shared)


def audio_part(b64: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}


def chat(base: str, part: dict[str, Any], text: str) -> httpx.Response:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, part]}],
        "temperature": 0,
        "max_tokens": N,
        "cache_prompt": False,
        "logprobs": True,
        "top_logprobs": 3,
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)


def answer(r: httpx.Response) -> list[tuple[str, list[tuple[str, float]]]]:
    assert r.status_code == 200, r.text
    steps = r.json()["choices"][0]["logprobs"]["content"]
    return [(s["token"], [(t["token"], t["logprob"]) for t in s["top_logprobs"]]) for s in steps]


def tally(r: httpx.Response) -> dict[str, float]:
    return {k: float(v) for k, v in (f.split("=") for f in r.headers["x-vcache"].split())}


@pytest.mark.parametrize("transport", ["inline", "file"])
def test_miss_and_hits_match_stock_with_a_negative_control(setup: Setup, transport: str) -> None:
    proxy = setup.inline if transport == "inline" else setup.file
    for i, text in enumerate(("What do you hear?", "Describe the sound.")):
        direct = answer(chat(setup.stock, audio_part(A.base64()), text))
        r = chat(proxy, audio_part(A.base64()), text)
        assert answer(r) == direct
        seen = tally(r)
        assert (seen["audio_misses"], seen["audio_hits"]) == ((1, 0) if i == 0 else (0, 1))
    other = chat(proxy, audio_part(B.base64()), "Describe the sound.")
    assert answer(other) == answer(chat(setup.stock, audio_part(B.base64()), "Describe the sound."))
    assert [t for t, _ in answer(other)] != [t for t, _ in direct]


def test_clip_of_two_windows_round_trips(setup: Setup) -> None:
    long = clips.long_clip()
    direct = answer(chat(setup.stock, audio_part(long.base64()), "Summarise."))
    for _ in range(2):  # miss, then hit
        assert answer(chat(setup.inline, audio_part(long.base64()), "Summarise.")) == direct


def test_native_prompt_multimodal_data(setup: Setup) -> None:
    marker = httpx.get(f"{setup.stock}/props").json()["media_marker"]
    assert marker == httpx.get(f"{setup.inline}/props").json()["media_marker"]

    def complete(base: str) -> httpx.Response:
        prompt = {"prompt_string": f"Listen: {marker} Now say:", "multimodal_data": [A.base64()]}
        return httpx.post(
            f"{base}/completion",
            timeout=300,
            json={"prompt": prompt, "n_predict": N, "temperature": 0, "cache_prompt": False},
        )

    direct = complete(setup.stock).json()["content"]
    first, second = complete(setup.inline), complete(setup.inline)
    assert first.json()["content"] == second.json()["content"] == direct
    assert tally(second)["audio_hits"] == 1


def test_warm_and_named_reference(setup: Setup) -> None:
    clip = clips.sample_clips()[0]
    r = httpx.post(
        f"{setup.inline}/vcache/warm", timeout=300, json={"image": clip.data_url(), "name": "tone"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["ref"] == "vcache://tone"
    named = chat(setup.inline, audio_part("vcache://tone"), "What is it?")
    assert answer(named) == answer(chat(setup.stock, audio_part(clip.base64()), "What is it?"))
    assert tally(named)["audio_hits"] == 1
    metrics = httpx.get(f"{setup.inline}/vcache/metrics").text
    assert "vcache_audio_hits_total" in metrics


def _wav(pcm: bytes, data_size: int, rate: int = 16000) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
        + pcm
    )


def _bad_clips() -> dict[str, bytes]:
    good = clips.sample_clips()[2].wav()
    pcm = good[44:]
    return {
        "not decodable": b"RIFF\x10\x00\x00\x00WAVE" + b"\x07" * 200,
        "truncated header": good[:30],
        "truncated data": good[: len(good) // 2],
        "header claims 4 GB": _wav(pcm, 0xFFFFFFF0 - 36),
        "header claims twice the data": _wav(pcm, 2 * len(pcm)),
        "mp3 sync, no frames": b"\xff\xfb\x90\x00" + b"\x00\x11" * 300,
    }


@pytest.mark.parametrize("case", list(_bad_clips()))
def test_bad_audio_gets_stocks_answer(setup: Setup, case: str) -> None:
    """Undecodable clips get stock's 400 and are not stored; ones that stock decodes anyway
    (miniaudio reads what a short or lying file holds) get stock's answer."""
    b64 = base64.b64encode(_bad_clips()[case]).decode()
    direct = chat(setup.stock, audio_part(b64), "What?")
    proxied = chat(setup.file, audio_part(b64), "What?")
    assert proxied.status_code == direct.status_code
    if direct.status_code == 200:
        assert answer(proxied) == answer(direct)
    else:
        assert proxied.json()["error"] == direct.json()["error"]
        assert tally(proxied)["audio_fallback"] == 1
        digest = hashlib.sha256(_bad_clips()[case]).hexdigest()
        r = httpx.post(f"{setup.file}/vcache/lookup", json={"digests": [digest, GOOD_DIGEST]})
        assert r.json()["present"] == [GOOD_DIGEST]


@pytest.fixture(scope="module")
def mixed(
    stock_bin: Path, patched_bin: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """Stock and proxied servers of one model that takes images and audio (gemma3 + qwen2a)."""
    files = generate_mixed("gemma3", "qwen2audio", models_dir)
    tmp = tmp_path_factory.mktemp("audio-mixed")
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
        "2",
        "--no-warmup",
    ]
    with (
        LlamaServer(stock_bin, args, tmp / "stock.log") as stock,
        LlamaServer(patched_bin, [*args, "--image-embedding"], tmp / "patched.log") as patched,
    ):
        caps = httpx.get(f"{patched.base_url}/props").json().get("image_embedding", {})
        if not {"image", "audio"} <= set(caps.get("modalities", [])):
            pytest.skip("this patched llama-server takes no audio packages")
        with ProxyProcess(
            ["--upstream", patched.base_url, "--store", str(tmp / "store")], tmp / "proxy.log"
        ) as proxy:
            yield stock.base_url, proxy.base_url


def test_image_and_audio_in_one_request(mixed: tuple[str, str]) -> None:
    stock, proxy = mixed
    image = {"type": "image_url", "image_url": {"url": sample_images()[0].data_url()}}

    def both(base: str, clip: clips.SampleClip, text: str) -> httpx.Response:
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [image, audio_part(clip.base64()), {"type": "text", "text": text}],
                }
            ],
            "temperature": 0,
            "max_tokens": N,
            "cache_prompt": False,
            "logprobs": True,
            "top_logprobs": 3,
        }
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)

    for i, text in enumerate(("What is this?", "Describe both.")):
        r = both(proxy, A, text)
        assert answer(r) == answer(both(stock, A, text))
        seen = tally(r)
        assert (seen["hits"], seen["audio_hits"]) == ((0, 0) if i == 0 else (2, 1))
    other = both(proxy, B, "Describe both.")
    assert answer(other) == answer(both(stock, B, "Describe both."))
    assert [t for t, _ in answer(other)] != [t for t, _ in answer(r)]
