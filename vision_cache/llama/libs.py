"""The llama.cpp shared libraries llama-cpp-python runs on, and what identifies them.

llama-cpp-python finds its libraries through two environment variables read once, when its
modules are first imported: ``LLAMA_CPP_LIB_PATH`` (libllama and, through it, ggml) and
``MTMD_CPP_LIB`` (libmtmd). vcache points both at the ``bin/`` directory of its own llama.cpp
build (`vcache build-server`), so the bindings and the patched llama-server share one
compile and one version (docs/llama-cpp-python.md)::

    libs = load_llama_libs(Path(".build/llama/patched-<key>/bin"))
    libs.build_id        # "patched-<key>", what that llama-server reports in GET /props
    libs.mtmd.mtmd_default_marker()

`load_llama_libs` must run before anything imports ``llama_cpp``; a second call with the same
directory returns the same object, one with another directory raises `LlamaLibsError` (a
process holds one libllama).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from vision_cache.errors import VisionCacheError

# dependencies before dependents: each library's DT_NEEDED entries are then already loaded
# (glibc matches them by soname), whatever RUNPATH the build left in the files
_PRELOAD_ORDER = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "libmtmd.so")
_lock = threading.Lock()
_loaded: LlamaLibs | None = None


class LlamaLibsError(VisionCacheError):
    """The llama.cpp libraries or llama-cpp-python cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class LlamaLibs:
    """The loaded bindings: ``llama`` is ``llama_cpp.llama_cpp``, ``mtmd`` ``llama_cpp.mtmd_cpp``.

    Both are typed ``Any``: their ctypes annotations type pointers as ``NewType`` ints and arrays
    as ctypes classes, looser and stricter than what they accept; vision_cache.llama.mtmd types the
    boundary instead.
    """

    lib_dir: Path | None
    build_id: str
    llama: Any
    mtmd: Any


def load_llama_libs(lib_dir: Path | None = None) -> LlamaLibs:
    """Load llama-cpp-python on the libraries in `lib_dir`.

    None: ``$LLAMA_CPP_LIB_PATH`` if set, else the libraries bundled with llama-cpp-python.
    """
    global _loaded
    with _lock:
        wanted = _wanted_dir(lib_dir)
        if _loaded is not None:
            if _loaded.lib_dir != wanted:
                raise LlamaLibsError(
                    f"llama.cpp is already loaded from {_loaded.lib_dir}, "
                    f"cannot switch to {wanted} in the same process"
                )
            return _loaded
        _loaded = _load(wanted)
        return _loaded


def _wanted_dir(lib_dir: Path | None) -> Path | None:
    if lib_dir is None and os.environ.get("LLAMA_CPP_LIB_PATH"):
        lib_dir = Path(os.environ["LLAMA_CPP_LIB_PATH"])
    return lib_dir.resolve() if lib_dir is not None else None


def _load(lib_dir: Path | None) -> LlamaLibs:
    if lib_dir is not None:
        _point_bindings_at(lib_dir)
    elif "llama_cpp" not in sys.modules:
        os.environ.pop("MTMD_CPP_LIB", None)
    try:
        llama = importlib.import_module("llama_cpp.llama_cpp")
        mtmd = importlib.import_module("llama_cpp.mtmd_cpp")
    except ImportError as e:
        raise LlamaLibsError(
            "llama-cpp-python is not installed: run scripts/install_llama_cpp_python.sh"
        ) from e
    except (OSError, RuntimeError) as e:  # the bindings' own "cannot load library" errors
        raise LlamaLibsError(f"llama-cpp-python cannot load llama.cpp: {e}") from e
    where = lib_dir if lib_dir is not None else Path(str(llama.__file__)).parent / "lib"
    _check_origin(mtmd, where)
    return LlamaLibs(lib_dir, build_id(where), llama, mtmd)


def _point_bindings_at(lib_dir: Path) -> None:
    if "llama_cpp.llama_cpp" in sys.modules:
        raise LlamaLibsError(
            "llama_cpp was imported before load_llama_libs(): its libraries are already chosen"
        )
    missing = [n for n in ("libllama.so", "libmtmd.so") if not (lib_dir / n).exists()]
    if missing:
        raise LlamaLibsError(
            f"{lib_dir} has no {', '.join(missing)}: not a llama.cpp build's library directory"
        )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    os.environ["MTMD_CPP_LIB"] = str(lib_dir)
    for name in _PRELOAD_ORDER:
        path = lib_dir / name
        if path.exists():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise LlamaLibsError(f"cannot load {path}: {e}") from e


def _check_origin(mtmd: Any, where: Path) -> None:
    """The bindings must run on the libraries we chose, not on a copy found elsewhere."""
    loaded = Path(mtmd._libmtmd._name).resolve()
    if loaded.parent != where.resolve():
        raise LlamaLibsError(f"libmtmd was loaded from {loaded.parent}, expected {where}")


def build_id(lib_dir: Path) -> str:
    """Identity of the llama.cpp build in `lib_dir`, as part of cache namespaces.

    Our builds (a ``build.json`` beside ``bin/``) are named as their llama-server names itself
    in GET /props, ``<variant>-<key>``; any other build by a digest of its library files, so
    packages from two different builds never share a namespace.
    """
    manifest = lib_dir.parent / "build.json"
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text())
            return f"{doc['variant']}-{doc['key']}"
        except (ValueError, KeyError, TypeError):
            pass  # not one of ours after all: fall back to the digest
    return "libs-sha256:" + _libraries_digest(lib_dir)


def _libraries_digest(lib_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(lib_dir.glob("lib*.so*")):
        if path.is_symlink() or not path.is_file():
            continue  # the versioned file behind the links is hashed once
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]
