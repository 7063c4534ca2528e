"""Finding audio in requests, telling it from images, and putting packages back (no servers)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from proxy.images.json_body import JsonBody, parse
from proxy.images.modality import audio_mime, sniff
from proxy.images.slots import find_images, package_kind
from proxy.lookup.package_lookup import RequestTally
from vision_cache.package import PackageHeader, StoredPackage, parse_inline
from vision_cache.synthetic.audio import sample_clips

WAV = sample_clips()[0].wav()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "modality"),
    [
        (WAV, "audio"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 8, "audio"),
        (b"\xff\xfb\x90\x00" + b"\x00" * 12, "audio"),  # an MPEG frame sync
        (b"fLaC" + b"\x00" * 12, "audio"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image"),  # RIFF, but WebP
        (WAV[:11], "image"),  # mtmd needs 12 bytes to call it audio
        (_png(), "image"),
    ],
)
def test_sniff_follows_mtmd(data: bytes, modality: str) -> None:
    assert sniff(data) == modality


def test_audio_mime_from_bytes() -> None:
    assert audio_mime(WAV) == "audio/wav"
    assert audio_mime(b"fLaC") == "audio/flac"
    assert audio_mime(b"ID3\x04") == "audio/mpeg"


def _audio_package() -> dict[str, Any]:
    header = PackageHeader(
        mmproj="m",
        n_embd=2,
        dtype="f32",
        image_id="a" * 64,
        nx=0,
        ny=0,
        chunks=(),
        modality="audio",
        n_samples=48000,
        sample_rate=16000,
    )
    return header.to_wire()


def test_chat_input_audio_slots_take_a_media_embedding() -> None:
    b64 = base64.b64encode(WAV).decode()
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                    {"type": "input_audio", "input_audio": {"url": "https://example.com/a.wav"}},
                ],
            }
        ]
    }
    doc = parsed(body)
    slots = find_images("/v1/chat/completions", doc, max_images=8)
    # the clip's base64 is long enough to stay in the body as a span: its slot says so
    assert [s.span.text() if s.span else s.ref for s in slots] == [b64, "https://example.com/a.wav"]
    pkg = _audio_package()
    slots[0].put_package(pkg)
    slots[1].put_image(WAV, "audio/wav", doc.insert)
    parts = json.loads(doc.dumps().join())["messages"][0]["content"]
    assert parts[1] == {"type": "media_embedding", "media_embedding": pkg}
    assert parts[2]["input_audio"] == {"url": "data:audio/wav;base64," + b64}


def parsed(body: dict[str, Any]) -> JsonBody:
    return parse(json.dumps(body).encode())


def test_multimodal_data_clip_and_image_packages_take_their_own_forms() -> None:
    body: dict[str, Any] = {"prompt": {"prompt_string": "x", "multimodal_data": ["AAAA", "BBBB"]}}
    doc = parsed(body)
    slots = find_images("/completion", doc, max_images=8)
    slots[0].put_package(_audio_package())
    slots[1].put_package({"id": "b" * 64})
    data = doc.tree["prompt"]["multimodal_data"]
    assert list(data[0]) == ["media_embedding"] and list(data[1]) == ["image_embedding"]
    assert package_kind({"modality": "image"}) == "image_embedding"


def test_client_media_embedding_parts_are_refused_like_image_embedding_ones() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "media_embedding", "media_embedding": {}}]}
        ]
    }
    with pytest.raises(Exception, match="not accepted from clients"):
        find_images("/v1/chat/completions", parsed(body), max_images=8)


def test_anthropic_blocks_have_no_audio_form() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "audio/wav", "data": "AAAA"},
                    }
                ],
            }
        ]
    }
    (slot,) = find_images("/v1/messages", parsed(body), max_images=8)
    assert not slot.takes_audio


def test_audio_package_header_round_trips_through_the_store_meta() -> None:
    wire = {
        **_audio_package(),
        "chunks": [{"n_tokens": 1, "meta": "AA=="}],
        "data": base64.b64encode(b"\x00" * 8).decode(),
    }
    header, payload = parse_inline(wire)
    assert payload == b"\x00" * 8
    assert (header.modality, header.n_samples, header.sample_rate) == ("audio", 48000, 16000)
    assert StoredPackage.from_meta(StoredPackage(header).to_meta()).header == header
    with pytest.raises(Exception, match="audio package"):
        parse_inline({**wire, "image": {"nx": 1, "ny": 1}})


def test_tally_counts_audio_apart() -> None:
    tally = RequestTally()
    tally.count("hit", "image")
    tally.count("miss", "audio")
    assert tally.header() == (
        "hits=1 misses=1 fallback=0 encode_ms_saved=0 audio_hits=0 audio_misses=1 audio_fallback=0"
    )
    tally.all_fallback()
    assert (tally.fallbacks, tally.audio_fallbacks, tally.hits) == (2, 1, 0)
    assert RequestTally().header() == "hits=0 misses=0 fallback=0 encode_ms_saved=0"
