"""The pieces of `make conformance` that decide its verdict (scripts/conformance.py)."""

from __future__ import annotations

from pathlib import Path

from scripts.conformance import compare, hf_cache_layout, outcomes, write_hf_cache
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
