"""The llama-server patches (llama_patches/): packages out of /vision/embedding, packages back in.

Every equivalence carries a negative control, so a server that ignored the package, or a test
model whose output did not depend on the image, would fail here.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llama_server import LlamaServer
from tests.support.vlm_client import chat, encode, image_part, package_part, perturbed
from vision_cache.synthetic.images import sample_image

pytestmark = pytest.mark.server

# three sizes and aspect ratios: landscape, tall portrait, wide strip
IMAGES = ("shapes_640x480", "stripes_300x900", "checkers_1024x256")
LOGPROB_TOLERANCE = 1e-5


def _url(name: str) -> str:
    return sample_image(name).data_url("PNG")


@pytest.mark.parametrize("image", IMAGES)
def test_package_is_token_identical_to_raw_image(patched_server: LlamaServer, image: str) -> None:
    base = patched_server.base_url
    url = _url(image)
    raw = chat(base, [image_part(url)])
    inline = encode(base, url)["image_embedding"]
    by_file = encode(base, url, output="file")["image_embedding"]

    via_inline = chat(base, [package_part(inline)])
    via_file = chat(base, [package_part(by_file)])

    assert len(raw.tokens) >= 16
    assert via_inline.tokens == raw.tokens
    assert via_file.tokens == raw.tokens
    assert raw.max_logprob_diff(via_inline) <= LOGPROB_TOLERANCE
    assert raw.max_logprob_diff(via_file) <= LOGPROB_TOLERANCE
    # negative controls: another image, and the same package with one value changed
    other = chat(base, [image_part(_url("noise_512x512"))])
    assert other.tokens != raw.tokens
    tampered = chat(base, [package_part(perturbed(inline))])
    assert tampered.tokens != raw.tokens or tampered.max_logprob_diff(raw) > 1e-3


def test_package_id_is_the_image_sha256(patched_server: LlamaServer) -> None:
    png = sample_image("shapes_640x480").encode("PNG")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    pkg = encode(patched_server.base_url, url)["image_embedding"]
    assert pkg["id"] == hashlib.sha256(png).hexdigest()
    payload = base64.b64decode(pkg["data"])
    n_tokens = sum(c["n_tokens"] for c in pkg["chunks"])
    assert len(payload) == n_tokens * pkg["n_embd"] * 4


def test_packages_are_decoded_not_encoded(patched_server: LlamaServer) -> None:
    """One package, two requests with different text before the image: no encoder either time."""
    base = patched_server.base_url
    answer = encode(base, _url("checkers_1024x256"))
    assert answer["timings"]["encode_ms"] > 0
    pkg = answer["image_embedding"]
    n_tokens = answer["n_tokens"]
    for text in ("First question about it.", "A different question entirely?"):
        r = chat(base, [package_part(pkg)], text)
        assert r.timings["media_encode_ms"] == 0
        assert r.timings["media_encoded_n"] == 0
        assert r.timings["media_embedding_n"] == n_tokens
    raw = chat(base, [image_part(_url("checkers_1024x256"))], "Yet another question.")
    assert raw.timings["media_encoded_n"] == n_tokens
    assert raw.timings["media_encode_ms"] > 0


def test_props_advertise_the_capability(patched_server: LlamaServer) -> None:
    props = httpx.get(f"{patched_server.base_url}/props").json()["image_embedding"]
    assert props["enabled"] is True
    assert props["version"] == 1
    assert props["mmproj"].startswith("xxh3-128:")
    assert props["file_dir"] is True
    expected = {"image_min_tokens", "image_max_tokens", "flash_attn", "device"}
    assert expected <= props["settings"].keys()


def test_stock_server_has_no_capability(stock_server: LlamaServer) -> None:
    props = httpx.get(f"{stock_server.base_url}/props").json()
    assert "image_embedding" not in props


def test_native_completion_takes_a_package(patched_server: LlamaServer) -> None:
    base = patched_server.base_url
    png = sample_image("stripes_300x900").encode("PNG")
    marker = httpx.get(f"{base}/props").json()["media_marker"]
    pkg = encode(base, "data:image/png;base64," + base64.b64encode(png).decode())["image_embedding"]

    def complete(item: Any) -> list[int]:
        body = {
            "prompt": {"prompt_string": f"Image: {marker}\nIt shows", "multimodal_data": [item]},
            "temperature": 0,
            "n_predict": 16,
            "cache_prompt": False,
            "return_tokens": True,
        }
        r = httpx.post(f"{base}/completion", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return list(r.json()["tokens"])

    raw = complete(base64.b64encode(png).decode())
    assert complete({"image_embedding": pkg}) == raw
    assert complete(base64.b64encode(sample_image("noise_512x512").encode("PNG")).decode()) != raw


def test_anthropic_messages_take_a_package(patched_server: LlamaServer) -> None:
    base = patched_server.base_url
    png = sample_image("shapes_640x480").encode("PNG")
    pkg = encode(base, "data:image/png;base64," + base64.b64encode(png).decode())["image_embedding"]

    def message(source: dict[str, Any]) -> str:
        body = {
            "model": "m",
            "max_tokens": 16,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": source},
                    ],
                }
            ],
        }
        r = httpx.post(f"{base}/v1/messages", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return str(r.json()["content"][0]["text"])

    raw = message(
        {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()}
    )
    assert message({"type": "image_embedding", "image_embedding": pkg}) == raw


# --- invalid packages: 400, and the server keeps serving ------------------------------------


def _bad_packages(pkg: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    data = base64.b64decode(pkg["data"])
    meta0 = pkg["chunks"][0]
    return {
        "other mmproj": {**pkg, "mmproj": "xxh3-128:" + "0" * 32 + ":1"},
        "wrong n_embd": {**pkg, "n_embd": pkg["n_embd"] + 1},
        "short payload": {**pkg, "data": base64.b64encode(data[:-4]).decode()},
        "long payload": {**pkg, "data": base64.b64encode(data + b"\0" * 4).decode()},
        "bad base64": {**pkg, "data": "!!!!" + pkg["data"][4:]},
        "unknown version": {**pkg, "version": 2},
        "bad id": {**pkg, "id": "not-a-digest"},
        "bad dtype": {**pkg, "dtype": "q8_0"},
        "no chunks": {**pkg, "chunks": []},
        "forged chunk metadata": {
            **pkg,
            "chunks": [{**meta0, "meta": base64.b64encode(b"x" * 40).decode()}],
        },
        "absurd token count": {**pkg, "chunks": [{**meta0, "n_tokens": 10**12}]},
        "data and file": {**ref, "data": pkg["data"]},
        "bad checksum": {**ref, "file": {**ref["file"], "xxh3": "0" * 16}},
        "region past the end": {**ref, "file": {**ref["file"], "offset": 8}},
        "dot-dot path": {**ref, "file": {**ref["file"], "path": "../../etc/passwd"}},
        "absolute path": {**ref, "file": {**ref["file"], "path": "/etc/passwd"}},
        "missing file": {**ref, "file": {**ref["file"], "path": "nope.f32"}},
        "NUL in path": {**ref, "file": {**ref["file"], "path": "a\u0000b"}},
        "symlink out of the directory": {**ref, "file": {**ref["file"], "path": "escape/passwd"}},
        "not an object": "hello",
    }


def test_invalid_packages_get_400_and_the_server_keeps_serving(
    patched_server: LlamaServer, embedding_dir: Path
) -> None:
    base = patched_server.base_url
    url = _url("shapes_640x480")
    pkg = encode(base, url)["image_embedding"]
    ref = encode(base, url, output="file")["image_embedding"]
    escape = embedding_dir / "escape"
    if not escape.exists():
        escape.symlink_to("/etc")
    good = chat(base, [package_part(pkg)])
    for name, bad in _bad_packages(pkg, ref).items():
        r = httpx.post(
            f"{base}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": [package_part(bad)]}], "max_tokens": 4},
        )
        assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:200]}"
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error", name
        assert error["message"], name
        assert chat(base, [package_part(pkg)]).tokens == good.tokens, f"after {name}"


def test_client_bytes_cannot_pose_as_a_package(patched_server: LlamaServer) -> None:
    pkg = encode(patched_server.base_url, _url("shapes_640x480"))["image_embedding"]
    import json

    forged = b"\0vcache-image-embedding\0" + json.dumps(pkg).encode()
    r = httpx.post(
        f"{patched_server.base_url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        image_part("data:image/png;base64," + base64.b64encode(forged).decode())
                    ],
                }
            ],
            "max_tokens": 4,
        },
    )
    assert r.status_code == 400
    assert "reserved prefix" in r.json()["error"]["message"]


def test_encode_endpoint_rejects_non_images(patched_server: LlamaServer) -> None:
    base = patched_server.base_url
    for body in ({}, {"image_url": {"url": "data:image/png;base64,AAAA"}}, {"dtype": "q4"}):
        r = httpx.post(f"{base}/vision/embedding", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
    r = httpx.post(f"{base}/vision/embedding", content=b"{not json", timeout=60)
    assert r.status_code == 400


def test_f16_packages_are_half_the_size(patched_server: LlamaServer) -> None:
    base = patched_server.base_url
    f32 = encode(base, _url("shapes_640x480"))["image_embedding"]
    f16 = encode(base, _url("shapes_640x480"), dtype="f16")["image_embedding"]
    assert len(base64.b64decode(f16["data"])) * 2 == len(base64.b64decode(f32["data"]))
    reply = chat(base, [package_part(f16)])
    assert len(reply.tokens) >= 16
    assert reply.timings["media_embedding_n"] > 0
    assert reply.timings["media_encoded_n"] == 0
