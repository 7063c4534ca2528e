"""vision_cache.llama.libs: naming llama.cpp builds for cache namespaces (no libraries loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from vision_cache.llama.libs import build_id


def _libs(root: Path, content: bytes) -> Path:
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    (bindir / "libmtmd.so.0.5.0").write_bytes(content)
    (bindir / "libmtmd.so").symlink_to("libmtmd.so.0.5.0")
    return bindir


def test_our_builds_are_named_as_their_llama_server_names_itself(tmp_path: Path) -> None:
    bindir = _libs(tmp_path / "patched-abc", b"x")
    (bindir.parent / "build.json").write_text(json.dumps({"variant": "patched", "key": "abc"}))
    assert build_id(bindir) == "patched-abc"  # VCACHE_BUILD_ID, GET /props image_embedding.build


def test_other_builds_are_named_by_their_library_bytes(tmp_path: Path) -> None:
    one = build_id(_libs(tmp_path / "one", b"library one"))
    assert one.startswith("libs-sha256:")
    assert build_id(_libs(tmp_path / "same", b"library one")) == one
    assert build_id(_libs(tmp_path / "two", b"library two")) != one
    # a manifest that is not ours does not name the build
    broken = _libs(tmp_path / "broken", b"library one")
    (broken.parent / "build.json").write_text("{not json")
    assert build_id(broken) == one
