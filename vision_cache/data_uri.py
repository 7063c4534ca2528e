"""Data URIs (RFC 2397) as vcache writes them: ``data:<media type>;base64,<bytes>``.

One spelling for every place that hands an image over inline: requests rewritten by the proxy,
encodes asked of upstream, warm-up uploads, test images::

    data_uri(png_bytes, "image/png")          # "data:image/png;base64,iVBORw0..."
    file_data_uri(Path("refs/cat.jpg"))       # the media type from the file name
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

UNKNOWN_TYPE = "application/octet-stream"


def data_uri(data: bytes | bytearray | memoryview, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def file_data_uri(path: Path) -> str:
    """The file's bytes, with the media type its name suggests (else application/octet-stream:
    the proxy decides what the bytes are, never the name)."""
    return data_uri(path.read_bytes(), mimetypes.guess_type(path.name)[0] or UNKNOWN_TYPE)
