"""The proven range: the llama.cpp trees the patches are known to apply to, build on and decode
packages exactly on, as `make compat` measured them (llama_patches/compat.json).

A record holds, per tree, its llama.cpp commit and tree digest, which patch series applied (and
the digest of that series' patches), and whether it applied, built and passed the tiny
equivalence check. A source is inside the proven range when its files are those of a tree that
passed everything, or it is a git checkout without local changes at such a tree's commit or at
a commit between two of them (git ancestry); a tree counts only while its series is the one it
was measured with, so changing one series takes its own trees out of the range and leaves the
others in. Anything outside gets checked before its packages are trusted
(builder.build_server). The data files beside the patches (the verified projector list) are
not part of a series' digest: they decide which projector types take packages, not whether the
patches apply, build and decode right on a tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

from vision_cache.llama.server_build.patches import patch_dir, patch_series
from vision_cache.llama.server_build.source import Source, git_modified

COMPAT_FILE = "compat.json"


@dataclasses.dataclass(frozen=True)
class TreeResult:
    """One tree of a compat run."""

    llama_cpp_python: str  # the sdist the tree came from
    commit: str  # llama.cpp commit (short hash)
    tree_digest: str  # source.tree_digest() of the unpacked tree
    series: str | None  # the patch series that applied, None when none did
    applies: bool
    builds: bool | None  # None: not tried (did not apply)
    equivalence: bool | None  # None: not tried
    detail: str = ""
    series_digest: str | None = None  # series_digests()[series] when it was measured
    build_s: float | None = None  # None: not built, or the build was already in the cache
    tests: bool | None = None  # tests/test_patched_server.py against the build; None: not run
    tests_summary: str = ""

    @property
    def proven(self) -> bool:
        return bool(self.applies and self.builds and self.equivalence) and self.tests is not False


@dataclasses.dataclass(frozen=True)
class CompatRecord:
    measured_at: str
    series: dict[str, str]  # label -> series_digest() of every series at the time
    trees: tuple[TreeResult, ...]  # oldest llama.cpp first

    def to_json(self) -> dict[str, Any]:
        return {
            "measured_at": self.measured_at,
            "series": self.series,
            "trees": [dataclasses.asdict(t) for t in self.trees],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompatRecord:
        trees = tuple(TreeResult(**t) for t in data["trees"])
        return cls(str(data["measured_at"]), dict(data["series"]), trees)

    def still_valid(self, tree: TreeResult, current: dict[str, str]) -> bool:
        """Whether `tree`'s result holds for the patches in `current` (series_digests()): its
        series is unchanged, or, for a tree no series applied to, no series changed."""
        if tree.series is None:
            return self.series == current
        return current.get(tree.series) == tree.series_digest


@dataclasses.dataclass(frozen=True)
class Verdict:
    inside: bool
    why: str


def series_digests(directory: Path | None = None) -> dict[str, str]:
    """label -> SHA-256 over that series' patches (names and contents), every series."""
    digests = {}
    for label, series in patch_series(directory):
        h = hashlib.sha256()
        for path in series.patches:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        digests[label] = h.hexdigest()
    return digests


def load_record(directory: Path | None = None) -> CompatRecord | None:
    path = (directory or patch_dir()) / COMPAT_FILE
    if not path.exists():
        return None
    return CompatRecord.from_json(json.loads(path.read_text()))


def write_record(record: CompatRecord, directory: Path | None = None) -> Path:
    path = (directory or patch_dir()) / COMPAT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    tmp.rename(path)
    return path


def proven_range(record: CompatRecord, current: dict[str, str] | None = None) -> list[TreeResult]:
    """The run of consecutive proven trees that ends with the newest proven one; with
    `current` (series_digests()), a tree whose series changed since counts as unproven."""
    best: list[TreeResult] = []
    run: list[TreeResult] = []
    for tree in record.trees:
        valid = current is None or record.still_valid(tree, current)
        run = [*run, tree] if tree.proven and valid else []
        if run:
            best = run
    return best


def describe(trees: list[TreeResult]) -> str:
    if not trees:
        return "no proven llama.cpp tree"
    first, last = trees[0], trees[-1]
    if first is last:
        return f"llama.cpp {first.commit} (llama-cpp-python {first.llama_cpp_python})"
    return (
        f"llama.cpp {first.commit}..{last.commit} "
        f"(llama-cpp-python {first.llama_cpp_python}..{last.llama_cpp_python})"
    )


def verdict(source: Source, directory: Path | None = None) -> Verdict:
    """Whether `source` lies inside the range the shipped patches are proven on, and why."""
    record = load_record(directory)
    if record is None:
        return Verdict(False, "no proven range is recorded (llama_patches/compat.json)")
    current = series_digests(directory)
    trees = proven_range(record, current)
    span = describe(trees)
    for tree in trees:
        if source.digest == tree.tree_digest:
            return Verdict(True, f"its tree is that of llama-cpp-python {tree.llama_cpp_python} "
                                 f"(proven: {span})")  # fmt: skip
    for tree in record.trees:
        if tree.proven and not record.still_valid(tree, current) and _same(source, tree):
            return Verdict(
                False,
                f"it is llama.cpp {tree.commit}, proven on {record.measured_at} with other "
                f"patches than these (series {tree.series} changed since; `make compat` "
                f"measures it again; proven now: {span})",
            )
    if source.commit == "unknown":
        return Verdict(False, f"its files match no proven tree and it is no git checkout "
                              f"(proven: {span})")  # fmt: skip
    if git_modified(source.tree):
        return Verdict(False, f"commit {source.commit} has local changes (proven: {span})")
    for tree in trees:
        if tree.commit.startswith(source.commit[:9]):
            return Verdict(True, f"commit {source.commit} was measured (proven: {span})")
    if len(trees) >= 2:
        for older, newer in itertools.pairwise(trees):
            if _between(source.tree, older.commit, newer.commit):
                return Verdict(
                    True,
                    f"commit {source.commit} lies between {older.commit} and {newer.commit} "
                    f"(proven: {span})",
                )
    return Verdict(False, f"commit {source.commit} is not among them (proven: {span})")


def _same(source: Source, tree: TreeResult) -> bool:
    if source.digest == tree.tree_digest:
        return True
    return source.commit != "unknown" and tree.commit.startswith(source.commit[:9])


def _between(tree: Path, older: str, newer: str) -> bool:
    """HEAD of the git checkout `tree` descends from `older` and is an ancestor of `newer`."""

    def ancestor(a: str, b: str) -> bool:
        res = subprocess.run(
            ["git", "-C", str(tree), "merge-base", "--is-ancestor", a, b],
            capture_output=True,
            check=False,
        )
        return res.returncode == 0

    return ancestor(older, "HEAD") and ancestor("HEAD", newer)
