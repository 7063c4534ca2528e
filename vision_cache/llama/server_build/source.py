"""The llama.cpp source a build starts from, and what identifies it.

By default that is the tree vendored in the PyPI sdist of llama-cpp-python pinned below (pip
fetches it once into the build cache, from the package index pip is configured with); a path
names a llama.cpp checkout of the user's own instead, which is hashed file by file and never
modified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vision_cache.llama.server_build.errors import SourceError
from vision_cache.llama.server_build.locks import file_lock

log = logging.getLogger("vcache.build")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# llama.cpp commit vendored in that sdist; its .git is a dangling gitlink, so it is recorded here
PINNED_COMMIT = "0c1e57098"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"

# not part of what gets built; leaving them out keeps hashing a checkout fast
_SKIP_DIRS = frozenset(
    {".git", "build", ".github", ".devops", "models", "docs", "media", "examples"}
)


@dataclasses.dataclass(frozen=True)
class Source:
    """A llama.cpp source tree and what identifies it."""

    tree: Path
    digest: str
    description: str
    commit: str


def resolve_source(path: Path | None, cache: Path) -> Source:
    """The pinned sdist's tree (fetched and unpacked once into `cache`), or the checkout `path`."""
    if path is None:
        return _pinned_source(cache)
    tree = path.expanduser().resolve()
    if not (tree / "tools" / "server").is_dir() or not (tree / "tools" / "mtmd").is_dir():
        raise SourceError(f"{tree} is not a llama.cpp tree (it has no tools/server and tools/mtmd)")
    log.info("hashing the source tree %s", tree)
    return Source(tree, tree_digest(tree), f"llama.cpp checkout {tree.name}", git_commit(tree))


def _pinned_source(cache: Path) -> Source:
    cache.mkdir(parents=True, exist_ok=True)
    # two builds starting at once (patched and stock) must not both download and unpack
    with file_lock(cache / "sources.lock"):
        sdist = fetch_sdist(cache / "downloads")
        digest = _file_sha256(sdist)
        tree = extract_vendored_tree(sdist, cache / "sources" / digest[:16])
    return Source(tree, digest, f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist", PINNED_COMMIT)


def fetch_sdist(downloads: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama-cpp-python sdist (the pinned version unless told), downloaded once with pip."""
    sdist_name = f"llama_cpp_python-{version}.tar.gz"
    target = downloads / sdist_name
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading the llama-cpp-python %s sdist with pip (77 MB, once)", version)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(downloads),
        f"llama-cpp-python=={version}",
    ]
    # pip's own output goes to stderr too: stdout carries the binary's path alone
    done = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if done.returncode != 0 or not target.exists():
        raise SourceError(
            f"could not download the llama-cpp-python {version} sdist with pip "
            f"({' '.join(cmd[2:])}); put {sdist_name} into {downloads}, or build a llama.cpp "
            "checkout of your own with --source PATH"
        )
    return target


def extract_vendored_tree(sdist: Path, dest: Path) -> Path:
    """Unpack vendor/llama.cpp from the sdist (any version) into dest/llama.cpp (once)."""
    tree = dest / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    log.info("unpacking vendor/llama.cpp from the sdist")
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    dest.mkdir(parents=True, exist_ok=True)
    # unpacked beside its final place and renamed: an interrupted unpack leaves no half tree
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix) :]
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        # the vendored .git is a gitlink to a repository the sdist does not contain
        (staging / ".git").unlink(missing_ok=True)
        if tree.exists():
            shutil.rmtree(tree)
        staging.rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def tree_files(tree: Path) -> Iterator[Path]:
    """Files that make up a source tree, in a stable order, without VCS or build state."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("build-")
        )
        for name in sorted(filenames):
            yield Path(dirpath) / name


def tree_digest(tree: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    for path in tree_files(tree):
        if path.is_symlink() or not path.is_file():
            continue
        h.update(str(path.relative_to(tree)).encode() + b"\0")
        h.update(hashlib.blake2b(path.read_bytes(), digest_size=32).digest())
    return h.hexdigest()


def git_commit(tree: Path) -> str:
    """The commit checked out in `tree` when `tree` is the top of a git checkout, else
    "unknown" (a tree unpacked inside some other repository is not that repository's HEAD)."""
    top = _git(tree, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != tree.resolve():
        return "unknown"
    return _git(tree, "rev-parse", "--short=9", "HEAD") or "unknown"


def git_modified(tree: Path) -> bool:
    """Whether the checkout `tree` has changes to tracked files (untracked ones do not count:
    they are not built unless a tracked file names them)."""
    status = _git(tree, "status", "--porcelain", "--untracked-files=no")
    return status is None or status != ""


def _git(tree: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    res = subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() if res.returncode == 0 else None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
