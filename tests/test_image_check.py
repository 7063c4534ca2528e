"""Hostile and broken images: refused by the proxy with a 400 before upstream decodes them."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from proxy.errors import MediaError, MediaTooLarge
from proxy.images.inspection import inspect
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def real_png(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_with_bad_exif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 0)).save(buf, format="JPEG")
    data = buf.getvalue()
    # a well-framed APP1 "Exif" segment whose TIFF structure is garbage (offsets past its end)
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x13" * 32
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


BAD_IMAGES: dict[str, tuple[bytes, type[MediaError]]] = {
    "decompression bomb": (png_header(100_000, 100_000), MediaTooLarge),
    "zero height": (png_header(64, 0), MediaError),
    "truncated file": (real_png()[:20], MediaError),
    "not an image": (b"%PDF-1.7 definitely not pixels", MediaError),
    "unsupported format": (b"II*\x00" + b"\x00" * 60, MediaError),  # a TIFF header
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_inspect_refuses(name: str) -> None:
    data, error = BAD_IMAGES[name]
    with pytest.raises(error):
        inspect(data)


def test_inspect_reads_only_the_header() -> None:
    info = inspect(real_png((640, 480)))
    assert (info.format, info.width, info.height) == ("PNG", 640, 480)
    # a malformed EXIF block is not the proxy's business: the header is fine
    assert inspect(jpeg_with_bad_exif()).format == "JPEG"


@pytest.fixture(scope="module")
def gemma_proxy(
    patched_gemma: LlamaServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("img-proxy")
    with ProxyProcess(
        ["--upstream", patched_gemma.base_url, "--store", str(tmp / "s")], tmp / "p.log"
    ) as proxy:
        yield proxy


@pytest.mark.server
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_proxy_answers_400_and_upstream_survives(
    gemma_proxy: ProxyProcess, patched_gemma: LlamaServer, name: str
) -> None:
    data, _ = BAD_IMAGES[name]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    r = httpx.post(
        f"{gemma_proxy.base_url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ],
            "max_tokens": 2,
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    assert httpx.get(f"{patched_gemma.base_url}/health", timeout=10).status_code == 200
    good = "data:image/png;base64," + base64.b64encode(real_png()).decode()
    ok = httpx.post(
        f"{gemma_proxy.base_url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}}]}
            ],
            "max_tokens": 2,
        },
    )
    assert ok.status_code == 200


def png_with_truncated_pixels() -> bytes:
    """A header Pillow reads happily, pixel data cut off: only a decoder finds out."""
    data = real_png((64, 48))
    idat = data.index(b"IDAT")
    return data[: idat + 12]


HEADER_OK_IMAGES = {
    "malformed EXIF": jpeg_with_bad_exif(),
    "truncated pixel data": png_with_truncated_pixels(),
}


@pytest.mark.server
@pytest.mark.parametrize("name", list(HEADER_OK_IMAGES))
def test_images_with_a_sound_header_are_left_to_upstream_and_nothing_breaks(
    gemma_proxy: ProxyProcess, patched_gemma: LlamaServer, name: str
) -> None:
    """Past the header check the decoder decides: an answer or llama-server's own 4xx, relayed;
    never a 500 from the proxy, never a traceback, and the server keeps serving."""
    url = "data:image/jpeg;base64," + base64.b64encode(HEADER_OK_IMAGES[name]).decode()
    r = httpx.post(
        f"{gemma_proxy.base_url}/v1/chat/completions",
        timeout=60,
        json={
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ],
            "max_tokens": 2,
        },
    )
    assert r.status_code in (200, 400), r.text
    assert "Traceback" not in r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    assert httpx.get(f"{patched_gemma.base_url}/health", timeout=10).status_code == 200
