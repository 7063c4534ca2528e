"""Build llama-server from llama.cpp source, with vcache's patches (or without, for comparison).

The patches ship with the package (the ``llama_patches`` folder), so an installed vcache builds
the patched server anywhere CMake and a compiler are::

    from vision_cache.llama.server_build import BuildRequest, build_server

    binary = build_server()                                    # patched; CUDA if a GPU is here
    stock = build_server(BuildRequest(variant="stock", backend="cpu"))

`vcache build-server` is the command line. Builds are cached by a key of everything that goes
into them (builder.py says where); progress is logged to the ``vcache.build`` logger.
"""

from vision_cache.llama.server_build.builder import build_server
from vision_cache.llama.server_build.cuda import gpu_present, parse_architectures
from vision_cache.llama.server_build.errors import (
    BuildError,
    CompileError,
    PatchError,
    SmokeTestError,
    SourceError,
    ToolMissing,
)
from vision_cache.llama.server_build.plan import VARIANTS, BuildRequest, default_cache_dir

__all__ = [
    "VARIANTS",
    "BuildError",
    "BuildRequest",
    "CompileError",
    "PatchError",
    "SmokeTestError",
    "SourceError",
    "ToolMissing",
    "build_server",
    "default_cache_dir",
    "gpu_present",
    "parse_architectures",
]
