"""A look at an image's header before anything decodes it: size, format, decompression bombs.

llama-server decodes images with stb_image, which allocates width x height x 3 bytes up front:
a small file claiming 100,000 x 100,000 pixels is a 30 GB allocation on the server. The proxy
reads only the header (Pillow opens lazily) and refuses what no vision model needs, before the
image reaches upstream's encoder. Nothing here decodes pixel data.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from PIL import Image, UnidentifiedImageError

from proxy.errors import MediaError, MediaTooLarge

# Pillow's own bomb threshold; a 12-megapixel photo is 12e6, the largest inputs vision
# towers take are a few megapixels once resized
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# the formats llama-server's stb_image reads, as Pillow names them
FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "PPM", "TGA", "PSD", "WEBP"})


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect(data: bytes, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Format and size from the header; raises MediaError (400) for anything unusable."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; here the limit is an error. Its
            # complaints about metadata (a corrupt EXIF block) are not: pixels are what count
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                info = ImageInfo(img.format or "", *img.size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLarge(f"image refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise MediaError(
            "not an image in a supported format (JPEG, PNG, BMP, GIF, PPM, TGA, PSD or WebP)"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"image header is unreadable: {e}") from e
    return _checked(info, max_pixels)


def _checked(info: ImageInfo, max_pixels: int) -> ImageInfo:
    if info.format not in FORMATS:
        raise MediaError(f"image format {info.format or 'unknown'} is not supported")
    if info.width <= 0 or info.height <= 0:
        raise MediaError(f"image has no pixels ({info.width}x{info.height})")
    if info.width * info.height > max_pixels:
        raise MediaTooLarge(
            f"image of {info.width}x{info.height} pixels is over the {max_pixels:,}-pixel limit"
        )
    return info
