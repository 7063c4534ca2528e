"""vcache's version, as installed (`vcache --version`, GET /vcache/health, vcache_build_info)."""

from __future__ import annotations

from importlib import metadata


def _installed() -> str:
    try:
        return metadata.version("vcache")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed()
