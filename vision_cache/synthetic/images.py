"""Deterministic, clearly different test images for vision-cache tests.

Each image differs from the others in structure (shapes, stripes, checkers, noise, text),
colour and size/aspect ratio, because similar-looking images (a blue gradient and a solid
blue) can give the same output from a random-weight model and make negative controls
meaningless::

    from vision_cache.synthetic.images import sample_images
    for sample in sample_images():
        png = sample.encode("PNG")        # bytes, identical on every call
        url = sample.data_url("JPEG")     # data:image/jpeg;base64,...

    python -m vision_cache.synthetic.images --out DIR   # writes DIR/<name>.png and DIR/<name>.jpg
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vision_cache.data_uri import data_uri

Format = Literal["PNG", "JPEG"]
FORMATS: tuple[Format, ...] = ("PNG", "JPEG")
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg"}
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}


@dataclass(frozen=True)
class SampleImage:
    """A named test image; ``encode`` gives the same bytes on every call."""

    name: str
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def encode(self, fmt: Format = "PNG") -> bytes:
        buf = io.BytesIO()
        if fmt == "JPEG":
            # Fixed quality and no optimiser passes: bytes depend only on the pixels.
            self.image.save(buf, format="JPEG", quality=90, optimize=False)
        else:
            self.image.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()

    def data_url(self, fmt: Format = "PNG") -> str:
        return data_uri(self.encode(fmt), _MIME[fmt])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled default font: no system font lookup, so output is machine-independent.
    return ImageFont.load_default(size=size)


def shapes(width: int = 640, height: int = 480) -> Image.Image:
    """White background with a red disc, a blue square, a green triangle and text."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 40, 280, 280), fill=(220, 30, 30))
    draw.rectangle((340, 60, 600, 320), fill=(30, 60, 220))
    draw.polygon([(120, 460), (320, 300), (520, 460)], fill=(20, 170, 60))
    draw.text((360, 360), "SHAPES", fill=(0, 0, 0), font=_font(40))
    return img


def stripes(width: int = 300, height: int = 900) -> Image.Image:
    """Tall image of horizontal rainbow bands with a dark diagonal bar."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    colours = [
        (255, 0, 0),
        (255, 140, 0),
        (255, 230, 0),
        (0, 180, 0),
        (0, 120, 255),
        (90, 0, 160),
        (255, 0, 200),
        (0, 220, 220),
        (120, 60, 20),
    ]
    band = height // len(colours)
    for i, colour in enumerate(colours):
        draw.rectangle((0, i * band, width, (i + 1) * band), fill=colour)
    draw.line((0, 0, width, height), fill=(10, 10, 10), width=25)
    return img


def checkers(width: int = 1024, height: int = 256) -> Image.Image:
    """Wide yellow/purple checkerboard with a big black word."""
    cell = 32
    yy, xx = np.mgrid[0:height, 0:width]
    on = ((yy // cell + xx // cell) % 2).astype(bool)
    pixels = np.where(
        on[..., None], np.array([250, 220, 0], np.uint8), np.array([110, 0, 140], np.uint8)
    )
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    ImageDraw.Draw(img).text((300, 60), "CHECKERS", fill=(0, 0, 0), font=_font(110))
    return img


def noise(width: int = 512, height: int = 512) -> Image.Image:
    """Seeded colour noise with a white ring: high-frequency content everywhere."""
    rng = np.random.default_rng(20240607)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    ImageDraw.Draw(img).ellipse((96, 96, 416, 416), outline=(255, 255, 255), width=30)
    return img


def gradient_text(width: int = 800, height: int = 600) -> Image.Image:
    """Dark-to-orange radial gradient with large white text."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(xx - width / 2, yy - height / 2) / np.hypot(width / 2, height / 2)
    red = (255 * (1 - radius)).clip(0, 255)
    pixels = np.stack([red, red * 0.5, np.full_like(red, 40.0)], axis=-1).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    ImageDraw.Draw(img).text((120, 240), "HELLO 42", fill=(255, 255, 255), font=_font(120))
    return img


def tiny_icon(width: int = 64, height: int = 48) -> Image.Image:
    """Very small image: a cyan cross on black (exercises upscaling paths)."""
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rectangle((28, 4, 36, 44), fill=(0, 255, 255))
    draw.rectangle((8, 20, 56, 28), fill=(0, 255, 255))
    return img


_BUILDERS: dict[str, Callable[[], Image.Image]] = {
    "shapes_640x480": shapes,
    "stripes_300x900": stripes,
    "checkers_1024x256": checkers,
    "noise_512x512": noise,
    "gradient_text_800x600": gradient_text,
    "tiny_icon_64x48": tiny_icon,
}


def sample_names() -> list[str]:
    return list(_BUILDERS)


def sample_image(name: str) -> SampleImage:
    """One test image by name (see ``sample_names``)."""
    return SampleImage(name=name, image=_BUILDERS[name]())


def sample_images() -> list[SampleImage]:
    """All test images, in a fixed order."""
    return [sample_image(name) for name in _BUILDERS]


def write_all(out: Path) -> list[Path]:
    """Write every image in every format to ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in sample_images():
        for fmt in FORMATS:
            path = out / f"{sample.name}{_SUFFIX[fmt]}"
            path.write_bytes(sample.encode(fmt))
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the vcache test images.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
