"""`make compat`'s bookkeeping: which trees, which commit each names, and the table it writes.

The builds and checks it drives are covered elsewhere (tests/test_build_checked.py,
tests/test_build_source_range.py); `make compat` itself runs outside `make test`.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from scripts import compat as compat_script
from vision_cache.llama.server_build import compat
from vision_cache.llama.server_build.errors import BuildError
from vision_cache.llama.server_build.source import LLAMA_CPP_PYTHON_VERSION

CHANGELOG = """# Changelog

## [Unreleased]

## [0.3.36]

- feat: Update llama.cpp to ggml-org/llama.cpp@0c1e570980a1b2c3
- fix: something else, see ggml-org/llama.cpp@ffffffff

## [0.3.35]

- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f
- feat: update llama.cpp to ggml-org/llama.cpp@adb55e514
"""


def _sdist(tmp_path: Path, version: str, changelog: str) -> Path:
    """A stand-in sdist holding CHANGELOG.md only (named like the release's own)."""
    path = tmp_path / f"llama_cpp_python-{version}.tar.gz"
    data = changelog.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"llama_cpp_python-{version}/CHANGELOG.md")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_the_commit_comes_from_the_release_s_own_section(tmp_path: Path) -> None:
    newest = _sdist(tmp_path, "0.3.36", CHANGELOG)
    assert compat_script.changelog_commit(newest, "0.3.36") == "0c1e570980a1b2c3"
    older = _sdist(
        tmp_path, "0.3.35", CHANGELOG
    )  # the first line of its section is the last update
    assert compat_script.changelog_commit(older, "0.3.35") == "4df29be4f"
    unknown = _sdist(tmp_path, "0.3.37", CHANGELOG)
    with pytest.raises(BuildError, match=r"names no llama\.cpp commit"):
        compat_script.changelog_commit(unknown, "0.3.37")


def test_the_newest_tree_measured_is_the_pinned_one() -> None:
    assert compat_script.VERSIONS[-1] == LLAMA_CPP_PYTHON_VERSION
    assert len(compat_script.VERSIONS) == 5


def _tree(version: str, commit: str, **kw: object) -> compat.TreeResult:
    fields: dict[str, object] = dict(
        llama_cpp_python=version, commit=commit, tree_digest="d", series="main",
        applies=True, builds=True, equivalence=True, build_s=None,
        tests=True, tests_summary="28 passed",
    )  # fmt: skip
    fields.update(kw)
    return compat.TreeResult(**fields)  # type: ignore[arg-type]


def test_the_table_says_what_passed_and_why_the_rest_did_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = compat.CompatRecord("2026-12-04", {}, (
        _tree("0.3.34", "e3546c794", series=None, applies=False, builds=None, equivalence=None,
              tests=None, tests_summary="", detail="no patch series applies to this tree"),
        _tree("0.3.35", "4df29be4f", series="1-4df29be4f", build_s=600),
        _tree("0.3.35.1", "abcdef012", series="1-4df29be4f", build_s=63),
        _tree("0.3.36", "0c1e57098"),
    ))  # fmt: skip
    text = compat_script.table(record, 1800, ["0.3.35", "0.3.36"])
    lines = text.splitlines()
    assert "| 0.3.34 | `e3546c794` | - | **no** | - | - | - | - |" in lines
    assert "| 0.3.35 | `4df29be4f` | 1-4df29be4f | yes | yes | yes | 28 passed | 10 min |" in lines
    assert "| 0.3.35.1 | `abcdef012` | 1-4df29be4f | yes | yes | yes | 28 passed | 63 s |" in lines
    assert "| 0.3.36 | `0c1e57098` | main | yes | yes | yes | 28 passed | cached |" in lines
    assert "Proven range: llama.cpp 4df29be4f..0c1e57098" in text
    assert "this run measured 0.3.35, 0.3.36 in 30 min" in text
    assert "- 0.3.34: no patch series applies to this tree" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{compat_script.TABLE_BEGIN}\nold\n"
                      f"{compat_script.TABLE_END}\n\nafter\n")  # fmt: skip
    monkeypatch.setattr(compat_script, "README", readme)
    compat_script.write_table(text)
    compat_script.write_table(text)  # rerunning replaces, never appends
    written = readme.read_text()
    assert written.count(compat_script.TABLE_BEGIN) == 1 and "old" not in written
    assert written.startswith("# x\n\nbefore\n\n") and written.endswith("\n\nafter\n")
    assert "| 0.3.36 | `0c1e57098` |" in written


def test_a_failed_server_test_run_is_not_proven() -> None:
    assert not _tree("0.3.36", "0c1e57098", tests=False, tests_summary="1 failed").proven
    assert _tree("0.3.36", "0c1e57098", tests=None, tests_summary="").proven


def test_the_server_tests_are_summed_up_by_their_counts() -> None:
    out = "....\n24 passed, 2 deselected in 9.59s\n"
    assert compat_script.pytest_summary(out) == "24 passed"
    failed = "F...\n= 1 failed, 23 passed, 2 deselected in 12.00s =\n"
    assert compat_script.pytest_summary(failed) == "1 failed, 23 passed"
    assert compat_script.pytest_summary("") == ""
