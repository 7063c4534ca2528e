"""The tiny equivalence check that decides whether an unproven build gets packages.

Against the real builds of `make llama`: it must pass on the patched server (packages decode
exactly like the images they came from) and fail, saying why, on servers that cannot prove it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vision_cache.llama.server_build.equivalence import FAMILIES, check_equivalence

pytestmark = pytest.mark.server


def test_the_patched_build_passes(patched_bin: Path, models_dir: Path) -> None:
    result = check_equivalence(patched_bin, models_dir)
    assert result.passed, result.detail
    for family in FAMILIES:
        assert f"{family}: 2 images, inline and file, identical; controls differ" in result.detail


def test_a_stock_build_fails_because_it_knows_no_packages(
    stock_bin: Path, models_dir: Path
) -> None:
    result = check_equivalence(stock_bin, models_dir)
    assert not result.passed
    assert "invalid argument: --image-embedding-dir" in result.detail


def test_a_server_that_does_not_start_fails(tmp_path: Path, models_dir: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho 'error: unknown argument' >&2\nexit 3\n")
    broken.chmod(0o755)
    result = check_equivalence(broken, models_dir)
    assert not result.passed
    assert "exited with code 3" in result.detail and "unknown argument" in result.detail
