"""What `vcache build-server --source` decides for a tree, branch by branch.

The compile and the equivalence check are replaced by recorders (the real ones are exercised by
tests/test_build_source_range.py and `make compat`); the decision logic around them is real:
the proven-range verdict, the choice of patch series, which build is handed back, and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from vision_cache.llama.server_build import builder, compat
from vision_cache.llama.server_build.equivalence import EquivalenceResult
from vision_cache.llama.server_build.errors import CompileError, PatchError
from vision_cache.llama.server_build.plan import BuildPlan, BuildRequest
from vision_cache.llama.server_build.source import tree_digest


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
    d = tmp_path / "llama_patches"
    d.mkdir()
    (d / "0001-hook.patch").write_text(_patch("int b;", "int b; // hooked"))
    return d


def _tree(root: Path, middle: str) -> Path:
    for folder in ("src", "tools/server", "tools/mtmd"):
        (root / folder).mkdir(parents=True)
    (root / "src" / "hook.cpp").write_text(f"int a;\n{middle}\nint c;\n")
    return root


class Recorder:
    """Stands in for the compile and the equivalence check."""

    def __init__(self, *, compile_fails: bool = False, equivalent: bool = True) -> None:
        self.compile_fails = compile_fails
        self.equivalent = equivalent
        self.missing_module = False
        self.built: list[BuildPlan] = []
        self.manifests: list[dict[str, Any]] = []
        self.checks = 0

    def ensure_built(self, plan: BuildPlan, jobs: int, details: dict[str, Any] | None) -> Path:
        if plan.variant == "patched" and self.compile_fails:
            raise CompileError("hook.cpp:2: error: 'b' was not declared")
        self.built.append(plan)
        self.manifests.append(details or {})
        plan.binary.parent.mkdir(parents=True, exist_ok=True)
        plan.binary.write_text("#!/bin/sh\n")
        return plan.binary

    def check_equivalence(self, binary: Path, models: Path) -> EquivalenceResult:
        self.checks += 1
        if self.missing_module:
            raise ModuleNotFoundError("No module named 'gguf'")
        detail = "2 images identical" if self.equivalent else "gemma3: package answers 'x'"
        return EquivalenceResult(self.equivalent, detail)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(builder, "ensure_built", rec.ensure_built)
    monkeypatch.setattr(builder, "check_equivalence", rec.check_equivalence)
    return rec


def _build(tree: Path, patches: Path, tmp_path: Path) -> Path:
    request = BuildRequest(backend="cpu", source=tree, cache_dir=tmp_path / "cache",
                           patch_dir=patches, jobs=1)  # fmt: skip
    return builder.build_server(request)


def test_no_series_applies_gives_the_stock_build_and_says_why(
    recorder: Recorder, patches: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vcache.build")
    binary = _build(_tree(tmp_path / "t", "int z;"), patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["stock"]
    assert binary == recorder.built[0].binary
    assert recorder.built[0].patches.patches == ()
    assert "no patch series applies" in recorder.manifests[0]["packages_off_because"]
    assert recorder.checks == 0
    assert "outside the proven range" in caplog.text
    assert "packages off" in caplog.text and "no patch series applies" in caplog.text


def test_a_failed_patched_compile_gives_the_stock_build(
    recorder: Recorder, patches: Path, tmp_path: Path
) -> None:
    recorder.compile_fails = True
    _build(_tree(tmp_path / "t", "int b;"), patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["stock"]
    why = recorder.manifests[0]["packages_off_because"]
    assert why.startswith("the patched build failed") and "not declared" in why
    assert recorder.checks == 0


def test_a_failed_equivalence_check_gives_the_stock_build_and_is_remembered(
    recorder: Recorder, patches: Path, tmp_path: Path
) -> None:
    recorder.equivalent = False
    tree = _tree(tmp_path / "t", "int b;")
    first = _build(tree, patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["patched", "stock"]
    assert first == recorder.built[1].binary
    assert "tiny equivalence check failed" in recorder.manifests[1]["packages_off_because"]
    record = json.loads((recorder.built[0].dir / "equivalence.json").read_text())
    assert record["passed"] is False and "answers 'x'" in record["detail"]
    assert _build(tree, patches, tmp_path) == first
    assert recorder.checks == 1  # the verdict is kept beside the patched build


def test_a_check_that_cannot_run_gives_the_stock_build_and_is_tried_again(
    recorder: Recorder, patches: Path, tmp_path: Path
) -> None:
    recorder.missing_module = True
    tree = _tree(tmp_path / "t", "int b;")
    _build(tree, patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["patched", "stock"]
    assert "pip install gguf" in recorder.manifests[1]["packages_off_because"]
    assert not (recorder.built[0].dir / "equivalence.json").exists()
    recorder.missing_module = False
    assert _build(tree, patches, tmp_path) == recorder.built[2].binary
    assert recorder.built[2].variant == "patched" and recorder.checks == 2


def test_a_passed_equivalence_check_gives_the_patched_build(
    recorder: Recorder, patches: Path, tmp_path: Path
) -> None:
    binary = _build(_tree(tmp_path / "t", "int b;"), patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["patched"]
    assert binary == recorder.built[0].binary
    assert recorder.manifests[0]["series"] == "main"
    assert recorder.checks == 1


def _prove(patches: Path, tree: Path) -> None:
    current = compat.series_digests(patches)
    result = compat.TreeResult(
        llama_cpp_python="0.3.36", commit="0c1e57098", tree_digest=tree_digest(tree),
        series="main", applies=True, builds=True, equivalence=True,
        series_digest=current["main"],
    )  # fmt: skip
    record = compat.CompatRecord("today", current, (result,))
    compat.write_record(record, patches)


def test_inside_the_proven_range_builds_patched_without_a_check(
    recorder: Recorder, patches: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vcache.build")
    tree = _tree(tmp_path / "t", "int b;")
    _prove(patches, tree)
    _build(tree, patches, tmp_path)
    assert [p.variant for p in recorder.built] == ["patched"]
    assert recorder.checks == 0
    assert "inside the proven range" in caplog.text


def test_inside_the_range_but_not_applying_is_an_error(
    recorder: Recorder, patches: Path, tmp_path: Path
) -> None:
    """A record that calls a tree proven when no series applies to it is wrong: say so rather
    than quietly build something else."""
    tree = _tree(tmp_path / "t", "int z;")
    _prove(patches, tree)
    with pytest.raises(PatchError, match="inside the proven range, but no patch series"):
        _build(tree, patches, tmp_path)
    assert recorder.built == []
