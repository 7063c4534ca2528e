"""vcache's patches to llama.cpp, shipped with the package, and applying them to a tree.

The patches live in the top-level ``llama_patches`` folder of the source tree, which is also
installed as package data, so an installed vcache builds the same server as a checkout. Every
file in that folder except its README is an input of the build (a patch, or data a patch's
build step reads) and goes into the build's cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vision_cache.llama.server_build.errors import PatchError

log = logging.getLogger("vcache.build")

# compat.json records what `make compat` measured with the patches: a result, not an input
_NOT_INPUTS = frozenset({"README.md", "__init__.py", "compat.json"})
# series for older llama.cpp ranges, one folder each: llama_patches/ranges/<n>-<label>/*.patch
RANGES_DIR = "ranges"
MAIN_SERIES = "main"
# the projector types packages are verified for, compiled into the patched server
VERIFIED_LIST = "verified_projectors.txt"
VERIFIED_INCLUDE = Path("tools/server/server-image-embedding-verified.inc")


@dataclasses.dataclass(frozen=True)
class PatchSet:
    """The patches a variant applies, and every file of theirs the build reads."""

    patches: tuple[Path, ...] = ()
    inputs: tuple[Path, ...] = ()

    def digests(self) -> list[bytes]:
        """SHA-256 of each input, in order: what a build key hashes."""
        return [hashlib.sha256(path.read_bytes()).digest() for path in self.inputs]


def patch_dir() -> Path:
    """The folder that holds the patches, in a checkout or an installed package."""
    return Path(str(importlib.resources.files("llama_patches")))


def patch_set(directory: Path | None = None) -> PatchSet:
    """The patches in `directory` (default: the shipped ones), in the order they apply."""
    directory = directory or patch_dir()
    inputs = _inputs(directory)
    patches = tuple(p for p in inputs if p.suffix == ".patch")
    if not patches:
        raise PatchError(f"no patches in {directory}: is the vcache installation complete?")
    return PatchSet(patches, inputs)


def _inputs(directory: Path) -> tuple[Path, ...]:
    return tuple(
        sorted(p for p in directory.iterdir() if p.is_file() and p.name not in _NOT_INPUTS)
    )


def patch_series(directory: Path | None = None) -> list[tuple[str, PatchSet]]:
    """Every series the patches come in, newest llama.cpp first: the top-level one ("main"),
    then one per folder of ``ranges/`` (same changes, ported to older trees). Each series also
    takes the top-level data files (the verified list) as inputs."""
    directory = (directory or patch_dir()).resolve()
    main = patch_set(directory)
    shared = tuple(p for p in main.inputs if p.suffix != ".patch")
    series = [(MAIN_SERIES, main)]
    ranges = directory / RANGES_DIR
    if ranges.is_dir():
        # numbered newest first (1-..., 2-...): the order they are tried in
        for folder in sorted(d for d in ranges.iterdir() if d.is_dir()):
            own = patch_set(folder)
            series.append((folder.name, PatchSet(own.patches, tuple(sorted(own.inputs + shared)))))
    return series


def select_patch_series(tree: Path, directory: Path | None = None) -> tuple[str, PatchSet]:
    """The series whose patches apply to `tree`, first in patch_series() order: chosen by what
    the tree contains (each series is tried, exactly, on a scratch copy of the files it
    touches). PatchError, saying why each failed, when none applies."""
    failures = []
    for label, series in patch_series(directory):
        problem = _try_series(tree, series)
        if problem is None:
            return label, series
        failures.append(f"{label}: {problem}")
    raise PatchError("no patch series applies to this tree: " + "; ".join(failures))


def _try_series(tree: Path, series: PatchSet) -> str | None:
    """Why `series` does not apply to `tree`, or None when it does."""
    with tempfile.TemporaryDirectory(prefix="vcache-patch-check-") as scratch:
        copy = Path(scratch) / "tree"
        for rel in sorted({f for patch in series.patches for f in _touched_files(patch)}):
            src = tree / rel
            if src.is_file():
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, copy / rel)
        copy.mkdir(exist_ok=True)
        try:
            apply_patches(copy, series.patches, quiet=True)
        except PatchError as e:
            return str(e).splitlines()[0]
    return None


def _touched_files(patch: Path) -> list[str]:
    """The files a patch changes or deletes (those it creates need not exist)."""
    return [
        line[6:].strip()
        for line in patch.read_text(errors="replace").splitlines()
        if line.startswith("--- a/")
    ]


def read_verified_projectors(patch_set: PatchSet) -> list[str]:
    """The projector type names in the verified list (the first word of each line); none
    when the patch set has no list."""
    path = next((p for p in patch_set.inputs if p.name == VERIFIED_LIST), None)
    if path is None:
        return []
    types = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", words[0]):
            raise PatchError(f"{path.name}:{n}: {words[0]!r} is not a projector type name")
        types.append(words[0])
    return types


def write_generated(tree: Path, patch_set: PatchSet) -> None:
    """Sources the patches include but do not carry: the verified list as C++."""
    if not any(p.name == VERIFIED_LIST for p in patch_set.inputs):
        return
    types = read_verified_projectors(patch_set)
    lines = [
        f"// generated from llama_patches/{VERIFIED_LIST} by the build; do not edit",
        "#define IMAGE_EMBEDDING_VERIFIED_PROJECTORS \\",
    ]
    lines += [f'    "{t}", \\' for t in types]
    lines.append("")
    (tree / VERIFIED_INCLUDE).write_text("\n".join(lines) + "\n")
    log.info("verified projector types: %s", ", ".join(types) or "none")


def apply_patches(tree: Path, patches: Sequence[Path], *, quiet: bool = False) -> None:
    """Apply each patch to `tree`, checking before and proving after.

    With git apply, or GNU patch where git is not installed (both exact: no fuzz).
    """
    tool = _git_apply if shutil.which("git") else _gnu_patch
    for patch in patches:
        check = tool(tree, patch, check=True)
        if check.returncode != 0:
            raise PatchError(explain_patch_failure(patch, check.stdout + check.stderr))
        if tool(tree, patch).returncode != 0:
            raise PatchError(f"{patch.name} passed its check but did not apply")
        # proof that it is in: it must now apply in reverse
        if tool(tree, patch, check=True, reverse=True).returncode != 0:
            raise PatchError(f"{patch.name} reported success but the tree does not contain it")
        if not quiet:
            log.info("applied %s", patch.name)


def _git_apply(
    tree: Path, patch: Path, *, check: bool = False, reverse: bool = False
) -> subprocess.CompletedProcess[str]:
    flags = ["--check"] * check + ["--reverse"] * reverse
    # the tree may sit inside another git work tree (a repository's .build/): run as a plain
    # directory, or git would apply the patch relative to that repository's root and silently
    # skip every path outside the current directory
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    return subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *flags, str(patch)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _gnu_patch(
    tree: Path, patch: Path, *, check: bool = False, reverse: bool = False
) -> subprocess.CompletedProcess[str]:
    flags = ["--dry-run"] * check + (["--reverse"] if reverse else ["--forward"])
    return subprocess.run(
        [
            "patch",
            "-p1",
            "--batch",
            "--fuzz=0",
            "--no-backup-if-mismatch",
            *flags,
            "-i",
            str(patch),
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )


def explain_patch_failure(patch: Path, output: str) -> str:
    """Which patch, file and hunk failed, from git apply's or GNU patch's report."""
    file, line, hunk = _failed_hunk(patch, output)
    if file is None:
        return f"{patch.name} does not apply:\n{output.strip()}"
    where = f"hunk #{hunk} " if hunk else ""
    at = f" (at line {line} of the original file)" if line else ""
    return (
        f"{patch.name} does not apply to this llama.cpp tree: {where}in {file}{at}.\n"
        "The tree has diverged from the one the patches were written for; see "
        "llama_patches/README.md, 'Rebasing onto a newer llama.cpp'."
    )


def _failed_hunk(patch: Path, output: str) -> tuple[str | None, int | None, int | None]:
    git = re.search(r"patch failed: (.+?):(\d+)", output)
    if git:
        file, line = git.group(1), int(git.group(2))
        return file, line, hunk_number(patch, file, line)
    current = None
    for text in output.splitlines():
        m = re.match(r"(?:patching|checking) file (.+)", text)
        if m:
            current = m.group(1).strip("'\"")
        failed = re.match(r"Hunk #(\d+) FAILED at (\d+)", text)
        if failed and current:
            return current, int(failed.group(2)), int(failed.group(1))
    return None, None, None


def hunk_number(patch: Path, file: str, line: int) -> int | None:
    """Which hunk of `patch` touching `file` starts at old line `line` (git apply's report)."""
    current, n = None, 0
    for text in patch.read_text(errors="replace").splitlines():
        if text.startswith("+++ b/"):
            current, n = text[6:], 0
        elif text.startswith("@@") and current == file:
            n += 1
            m = re.match(r"@@ -(\d+)", text)
            if m and int(m.group(1)) == line:
                return n
    return None
