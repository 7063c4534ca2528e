"""Which patch series a llama.cpp tree gets, and whether a tree is inside the proven range.

Small synthetic trees and patches: the logic `vcache build-server --source` and `make compat`
rely on, without building anything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import subprocess
import tomllib
from pathlib import Path

import pytest

from vision_cache.llama.server_build import compat
from vision_cache.llama.server_build.errors import PatchError
from vision_cache.llama.server_build.patches import patch_series, select_patch_series
from vision_cache.llama.server_build.source import Source, git_commit, tree_digest


def _patch(old: str, new: str) -> str:
    return (
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "Subject: [PATCH] hook\n\n---\n"
        "diff --git a/src/hook.cpp b/src/hook.cpp\n"
        "--- a/src/hook.cpp\n+++ b/src/hook.cpp\n"
        "@@ -1,3 +1,3 @@\n"
        f" int a;\n-{old}\n+{new}\n int c;\n"
    )


@pytest.fixture
def patches(tmp_path: Path) -> Path:
    """A top-level series for trees whose line 2 is `int b;`, a range for `int b0;`."""
    d = tmp_path / "llama_patches"
    (d / "ranges" / "1-older").mkdir(parents=True)
    (d / "0001-hook.patch").write_text(_patch("int b;", "int b; // hooked"))
    (d / "ranges" / "1-older" / "0001-hook.patch").write_text(
        _patch("int b0;", "int b0; // hooked")
    )
    (d / "verified_projectors.txt").write_text("gemma3  a test\n")
    (d / "README.md").write_text("not an input\n")
    return d


def _tree(root: Path, middle: str) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "hook.cpp").write_text(f"int a;\n{middle}\nint c;\n")
    return root


def test_series_are_the_top_level_then_each_range(patches: Path) -> None:
    series = patch_series(patches)
    assert [label for label, _ in series] == ["main", "1-older"]
    for _, s in series:
        assert [p.name for p in s.inputs if p.suffix != ".patch"] == ["verified_projectors.txt"]


def test_the_tree_chooses_the_series(patches: Path, tmp_path: Path) -> None:
    assert select_patch_series(_tree(tmp_path / "new", "int b;"), patches)[0] == "main"
    assert select_patch_series(_tree(tmp_path / "old", "int b0;"), patches)[0] == "1-older"
    with pytest.raises(PatchError, match="no patch series applies") as e:
        select_patch_series(_tree(tmp_path / "other", "int z;"), patches)
    assert "main:" in str(e.value) and "1-older:" in str(e.value)


def test_choosing_leaves_the_tree_alone(patches: Path, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "t", "int b;")
    select_patch_series(tree, patches)
    assert (tree / "src" / "hook.cpp").read_text() == "int a;\nint b;\nint c;\n"


def _record(patches: Path, *trees: compat.TreeResult) -> None:
    current = compat.series_digests(patches)
    trees = tuple(dataclasses.replace(t, series_digest=current[str(t.series)]) for t in trees)
    compat.write_record(compat.CompatRecord("today", current, trees), patches)


def _result(
    version: str, commit: str, digest: str, proven: bool = True, series: str = "main"
) -> compat.TreeResult:
    return compat.TreeResult(
        llama_cpp_python=version, commit=commit, tree_digest=digest, series=series,
        applies=True, builds=True, equivalence=proven,
    )  # fmt: skip


def test_a_measured_tree_is_inside(patches: Path, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "t", "int b;")
    _record(patches, _result("0.3.35", "aaaaaaa11", "x", proven=False),
            _result("0.3.36", "bbbbbbb22", tree_digest(tree)))  # fmt: skip
    by_digest = compat.verdict(Source(tree, tree_digest(tree), "t", "unknown"), patches)
    assert by_digest.inside and "0.3.36" in by_digest.why
    other = compat.verdict(Source(tree, "other", "t", "unknown"), patches)
    assert not other.inside and "no git checkout" in other.why


def test_a_clean_checkout_of_a_measured_commit_is_inside(patches: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo", 1)
    commit = _git(repo, "rev-parse", "--short=9", "HEAD")
    _record(patches, _result("0.3.35", "aaaaaaa11", "x", proven=False),
            _result("0.3.36", commit, "y"))  # fmt: skip
    source = Source(repo, "other", "repo", commit)
    assert compat.verdict(source, patches).inside
    (repo / "n.txt").write_text("edited")
    edited = compat.verdict(source, patches)
    assert not edited.inside and "local changes" in edited.why
    failed = compat.verdict(Source(repo, "z", "repo", "aaaaaaa11"), patches)
    assert not failed.inside  # measured, but it did not pass


def test_no_record_or_a_stale_one_is_outside(patches: Path, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "t", "int b;")
    source = Source(tree, tree_digest(tree), "t", "unknown")
    assert not compat.verdict(source, patches).inside
    _record(patches, _result("0.3.36", "bbbbbbb22", tree_digest(tree)))
    assert compat.verdict(source, patches).inside
    # the verified list decides which projectors take packages, not whether a tree is proven
    (patches / "verified_projectors.txt").write_text("gemma3  a test\nmlp  another\n")
    assert compat.verdict(source, patches).inside
    (patches / "0001-hook.patch").write_text(_patch("int b;", "int b; // hooked again"))
    stale = compat.verdict(source, patches)
    assert not stale.inside and "with other patches than these" in stale.why
    assert "series main changed" in stale.why


def test_a_changed_series_takes_out_its_own_trees_only(patches: Path, tmp_path: Path) -> None:
    old = _tree(tmp_path / "old", "int b0;")
    new = _tree(tmp_path / "new", "int b;")
    _record(patches, _result("0.3.35", "aaaaaaa11", tree_digest(old), series="1-older"),
            _result("0.3.36", "bbbbbbb22", tree_digest(new)))  # fmt: skip
    (patches / "0001-hook.patch").write_text(_patch("int b;", "int b; // hooked again"))
    assert compat.verdict(Source(old, tree_digest(old), "old", "unknown"), patches).inside
    assert not compat.verdict(Source(new, tree_digest(new), "new", "unknown"), patches).inside
    record = compat.load_record(patches)
    assert record is not None
    current = compat.series_digests(patches)
    assert [t.llama_cpp_python for t in compat.proven_range(record, current)] == ["0.3.35"]


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env=env, check=True)  # fmt: skip
    return done.stdout.strip()


def _repo(root: Path, n_commits: int) -> Path:
    repo = _tree(root, "int b;")
    _git(repo, "init", "-q")
    for i in range(n_commits):
        (repo / "n.txt").write_text(str(i))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"c{i}")
    return repo


def test_a_commit_between_two_proven_ones_is_inside(patches: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo", 4)
    commits = _git(repo, "rev-list", "--reverse", "--abbrev-commit", "--abbrev=9", "HEAD").split()
    _record(patches, _result("0.3.35", commits[0], "x"), _result("0.3.36", commits[2], "y"))
    _git(repo, "checkout", "-q", commits[1])
    between = compat.verdict(Source(repo, "z", "repo", commits[1]), patches)
    assert between.inside and "lies between" in between.why
    _git(repo, "checkout", "-q", commits[3])
    assert not compat.verdict(Source(repo, "z", "repo", commits[3]), patches).inside


def test_a_tree_inside_another_repository_has_no_commit(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo", 1)
    inner = _tree(repo / "vendor" / "llama.cpp", "int b;")
    assert git_commit(repo) != "unknown"
    assert git_commit(inner) == "unknown"


def test_every_shipped_series_file_is_package_data() -> None:
    """The wheel carries llama_patches/ by pyproject's package-data globs: every series, the
    verified list and the compat record must match one (a range folder missed would leave an
    installed vcache unable to build those trees)."""
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["llama_patches"]
    shipped = root / "llama_patches"
    wanted = [p for _, s in patch_series(shipped) for p in s.inputs]
    wanted.append(shipped / compat.COMPAT_FILE)  # whether or not it exists yet
    for path in wanted:
        rel = path.relative_to(shipped).as_posix()
        assert any(fnmatch.fnmatchcase(rel, g) and rel.count("/") == g.count("/") for g in globs), (
            f"llama_patches/{rel} is not package data"
        )
