"""Data URIs (RFC 2397) as vcache writes them: ``data:<media type>;base64,<bytes>``.

One spelling for every place that hands an image over inline: requests rewritten by the proxy,
encodes asked of upstream, warm-up uploads, test images::

    data_uri(png_bytes, "image/png")          # "data:image/png;base64,iVBORw0..."
    data_uri_bytes(png_bytes, "image/png")    # b"data:image/png;base64,iVBORw0..."
    file_data_uri(Path("refs/cat.jpg"))       # the media type from the file name
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

import pybase64

UNKNOWN_TYPE = "application/octet-stream"


def data_uri(data: bytes | bytearray | memoryview, mime: str) -> str:
    return data_uri_bytes(data, mime).decode("ascii")


def data_uri_bytes(data: bytes | bytearray | memoryview, mime: str) -> bytes:
    """The same as ASCII bytes: JSON text as it is (nothing in it needs escaping), for bodies
    written out without going through a JSON encoder."""
    return b"data:" + mime.encode("ascii") + b";base64," + pybase64.b64encode(data)


def file_data_uri(path: Path) -> str:
    """The file's bytes, with the media type its name suggests (else application/octet-stream:
    the proxy decides what the bytes are, never the name)."""
    return data_uri(path.read_bytes(), mimetypes.guess_type(path.name)[0] or UNKNOWN_TYPE)
