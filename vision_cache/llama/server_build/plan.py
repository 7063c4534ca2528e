"""What a build is asked for, and the plan it becomes: flags, cache key, directories.

The cache key hashes the source, every input of the patches, the variant and the CMake flags,
so a second request with the same inputs builds nothing, and any change builds anew beside
the old build (which stays usable until the cache is cleared).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Literal

from vision_cache.llama.server_build.patches import PatchSet
from vision_cache.llama.server_build.source import Source
from vision_cache.llama.server_build.ui import UiAssets, UiChoice

Variant = Literal["patched", "stock"]
Backend = Literal["auto", "cpu", "cuda"]
VARIANTS: tuple[Variant, ...] = ("patched", "stock")

# bump when a change to the build logic must invalidate cached builds
BUILD_LOGIC_VERSION = "2"

BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # shared libraries: llama-cpp-python can load this very build (LLAMA_CPP_LIB_PATH)
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # the web UI is built beforehand and put where CMake takes "pre-built assets" from
    # (server_build/ui.py); CMake's own ways download it or run npm in every build directory
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # $ORIGIN: the binary finds its libraries beside it once bin/ is copied out of the tree
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)


def default_cache_dir() -> Path:
    """$VCACHE_LLAMA_CACHE, else the user's cache directory (~/.cache/vcache/llama)."""
    if os.environ.get("VCACHE_LLAMA_CACHE"):
        return Path(os.environ["VCACHE_LLAMA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vcache" / "llama"


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """What to build. Every field has a default: ``BuildRequest()`` is the patched server for
    this machine (CUDA when an NVIDIA GPU is present), from the pinned llama.cpp.

        BuildRequest(backend="cuda", cuda_architectures=("89-real",), jobs=8)
        BuildRequest(variant="stock", source=Path("~/src/llama.cpp"))
    """

    variant: Variant = "patched"
    backend: Backend = "auto"
    source: Path | None = None  # a llama.cpp checkout; None: the pinned sdist's tree
    jobs: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 2)
    cuda_architectures: tuple[str, ...] | None = None  # None: the GPUs present
    cache_dir: Path | None = None  # None: default_cache_dir()
    cmake_args: tuple[str, ...] = ()  # appended last, so they win
    # llama.cpp's web UI, embedded in the server: "auto" when Node.js is found (ui.py)
    ui: UiChoice = "auto"
    # another patch folder than the shipped one (a rebase in progress); checked like a checkout
    patch_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    variant: Variant
    source: Source
    patches: PatchSet
    cmake_flags: tuple[str, ...]
    cache: Path
    ui: UiAssets | None = None

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for part in (BUILD_LOGIC_VERSION, self.variant, self.source.digest, *self.cmake_flags):
            h.update(part.encode() + b"\0")
        for digest in self.patches.digests():
            h.update(digest)
        if self.ui is not None:  # absent from the key without a UI: older builds keep theirs
            h.update(b"ui\0" + self.ui.digest.encode())
        return h.hexdigest()[:16]

    @property
    def dir(self) -> Path:
        return self.cache / f"{self.variant}-{self.key}"

    @property
    def binary(self) -> Path:
        return self.dir / "bin" / "llama-server"

    @property
    def manifest(self) -> Path:
        """Written last: its presence marks a finished build."""
        return self.dir / "build.json"
