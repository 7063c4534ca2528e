"""The pieces of `make conformance` that decide its verdict (scripts/conformance.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pytest

import scripts.conformance as conformance
from scripts.conformance import compare, hf_cache_layout, outcomes, recheck, write_hf_cache
from tests.conformance.suite_plugin import load_skips, skip_reason

JUNIT = """<testsuites><testsuite>
<testcase classname="unit.test_a" name="test_ok"/>
<testcase classname="unit.test_a" name="test_bad[x]"><failure message="assert 1 == 2"/></testcase>
<testcase classname="unit.test_b" name="test_err"><error message="boom"/></testcase>
<testcase classname="unit.test_b" name="test_skip"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def test_outcomes_read_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    assert outcomes(path) == {
        "unit/test_a.py::test_ok": ("passed", ""),
        "unit/test_a.py::test_bad[x]": ("failed", "assert 1 == 2"),
        "unit/test_b.py::test_err": ("failed", "boom"),
        "unit/test_b.py::test_skip": ("skipped", "no"),
    }


def test_compare_finds_what_passes_direct_only() -> None:
    direct = {
        "a": ("passed", ""),
        "b": ("failed", ""),
        "c": ("passed", ""),
        "d": ("failed", ""),
        "e": ("skipped", ""),
    }
    via = {
        "a": ("passed", ""),
        "b": ("failed", ""),
        "c": ("failed", "x"),
        "d": ("passed", ""),
        "e": ("skipped", ""),
    }
    assert compare(direct, via) == {
        "passed both": ["a"],
        "failed both": ["b"],
        "passed direct, not through vcache": ["c"],
        "passed through vcache only": ["d"],
        "skipped": ["e"],
    }


def test_a_test_missing_from_one_run_is_a_regression() -> None:
    groups = compare({"a": ("passed", "")}, {})
    assert groups == {"passed direct, not through vcache": ["a"]}


def _junit(path: Path, results: dict[str, bool]) -> Path:
    cases = "".join(
        f'<testcase classname="unit.test_a" name="{name}">'
        + ("" if ok else '<failure message="no"/>')
        + "</testcase>"
        for name, ok in results.items()
    )
    path.write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    return path


def test_a_difference_stands_only_if_a_second_run_alone_shows_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second look runs exactly the tests that passed direct only, both ways; what passes
    both ways then is reported apart and no longer fails `make conformance`."""
    asked: list[tuple[str, tuple[str, ...]]] = []
    second = {"direct": {"flaky": True, "real": True}, "vcache": {"flaky": True, "real": False}}

    def run_suite(
        ws: object, run: conformance.Run, server: Path, args: object, again: Sequence[str] = ()
    ) -> Path:
        asked.append((run.front, tuple(again)))
        return _junit(tmp_path / f"{run.front}.xml", second[run.front])

    monkeypatch.setattr(conformance, "run_suite", run_suite)
    groups = {
        "passed both": ["unit/test_a.py::fine"],
        conformance.REGRESSED: ["unit/test_a.py::flaky", "unit/test_a.py::real"],
    }
    ws = conformance.Workspace(*(tmp_path,) * 6)
    after = recheck(ws, "stock", tmp_path, argparse.Namespace(), groups)
    regressed = ("unit/test_a.py::flaky", "unit/test_a.py::real")
    assert asked == [("direct", regressed), ("vcache", regressed)]
    assert after == {
        "passed both": ["unit/test_a.py::fine"],
        conformance.REGRESSED: ["unit/test_a.py::real"],
        "differed once, not on a second run alone": ["unit/test_a.py::flaky"],
    }


def test_no_second_run_without_a_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conformance, "run_suite", lambda *a: pytest.fail("ran again"))
    groups = {"passed both": ["a"], "failed both": ["b"]}
    ws = conformance.Workspace(*(tmp_path,) * 6)
    assert recheck(ws, "stock", tmp_path, argparse.Namespace(), groups) == groups


def test_every_skip_has_a_reason_and_matches() -> None:
    skips = load_skips()
    assert skips and all(reason for _, reason in skips)
    assert skip_reason("unit/test_lora.py::test_lora[0.0-x]", skips) is not None
    assert skip_reason("unit/test_security.py::test_cors_options[a-b-c]", skips) is None


def test_hf_cache_is_laid_out_as_llama_cpp_reads_it(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    write_hf_cache(tmp_path / "cache", {"org/repo": {"dir/file-Q8_0.gguf": model}})
    root = tmp_path / "cache" / "models--org--repo"
    commit = (root / "refs" / "main").read_text()
    assert len(commit) == 40
    assert (root / "snapshots" / commit / "dir" / "file-Q8_0.gguf").read_bytes() == b"GGUF"
    layout = hf_cache_layout(tmp_path, tmp_path / "gemma")
    assert "mmproj-tinygemma3.gguf" in layout["ggml-org/tinygemma3-GGUF"]
