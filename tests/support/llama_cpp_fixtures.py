"""Fixtures for the llama-cpp-python tests (encoder worker, chat handler, in-process backend).

A pytest plugin (tests/conftest.py loads it): its fixtures reach every test module. Everything
runs on the patched build's shared libraries (the `patched_bin` fixture's directory), the "one
compile" setup scripts/install_llama_cpp_python.sh installs; the tiny models come from
`tiny_model`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.lookup.local_encoder import LocalEncoder, LocalEncoderConfig
from vision_cache.data_uri import data_uri
from vision_cache.llama.libs import LlamaLibs, load_llama_libs
from vision_cache.llama.mtmd import EncoderSettings
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

# clearly different pictures (similar ones can collide on random-weight models)
IMAGES = ("shapes_640x480", "stripes_300x900", "checkers_1024x256")
OTHER_IMAGE = "noise_512x512"


def png(name: str) -> bytes:
    return sample_image(name).encode("PNG")


def data_url(image: bytes) -> str:
    return data_uri(image, "image/png")


@pytest.fixture(scope="session")
def lib_dir(patched_bin: Path) -> Path:
    return patched_bin.parent


@pytest.fixture(scope="session")
def llama_libs(lib_dir: Path) -> LlamaLibs:
    """llama-cpp-python in this process, on the patched build's libraries."""
    return load_llama_libs(lib_dir)


@pytest.fixture(scope="session")
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for the encoders (a LocalEncoder belongs to the loop it started on)."""
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="session")
def local_encoder(
    runner: asyncio.Runner, lib_dir: Path, tiny_model: Callable[[str], ModelFiles], arch: str
) -> Iterator[LocalEncoder]:
    """One encoder worker for `arch`, on 1 thread (the servers use 2: threads must not matter)."""
    files = tiny_model(arch)
    config = LocalEncoderConfig(
        mmproj=files.mmproj,
        text_model=files.model,
        lib_dir=lib_dir,
        settings=EncoderSettings(n_threads=1),
        timeout_s=120.0,
    )
    encoder = LocalEncoder(config)
    runner.run(encoder.start())
    try:
        yield encoder
    finally:
        runner.run(encoder.aclose())
