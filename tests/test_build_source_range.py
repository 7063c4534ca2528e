"""`vcache build-server --source DIR` on a llama.cpp tree outside the proven range.

The tree is the pinned one with one local edit inside the context of a hook, so no patch series
applies: the build must say that the tree is outside the proven range, build llama-server
without the patches, and hand back that binary; a proxy in front of it forwards raw images, and
the answers are those of stock llama-server. The edit is a comment line in
tools/server/CMakeLists.txt, so the build compiles nothing new: every object is in ccache from
`make llama`'s stock build, and the test costs a configure, a link and two servers (about a
minute and a half on two cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures import server_args
from tests.support.llama_server import ROOT, LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import chat, image_part
from vision_cache.llama.server_build.source import resolve_source
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server

CACHE = Path(os.environ.get("VCACHE_LLAMA_CACHE", ROOT / ".build" / "llama"))
# tools/server/CMakeLists.txt: the last lines, the context of the patches' include() hook
HOOK_CONTEXT = "target_link_libraries(${TARGET} PRIVATE llama-server-impl)\n"


@pytest.fixture(scope="module")
def outside_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned llama.cpp tree with a local edit where a patch hooks in."""
    pinned = resolve_source(None, CACHE).tree
    tree = tmp_path_factory.mktemp("checkout") / "llama.cpp"
    shutil.copytree(pinned, tree, symlinks=True)
    cmake = tree / "tools" / "server" / "CMakeLists.txt"
    text = cmake.read_text()
    assert text.count(HOOK_CONTEXT) == 1
    cmake.write_text(text.replace(HOOK_CONTEXT, HOOK_CONTEXT + "# a local note\n"))
    return tree


@pytest.fixture(scope="module")
def build(outside_tree: Path) -> tuple[Path, str]:
    """(the binary `vcache build-server --source` printed, what it logged)."""
    env = {**os.environ, "VCACHE_LLAMA_CACHE": str(CACHE)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "build-server", "--cpu", "--jobs", "2",
         "--source", str(outside_tree)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip()), done.stderr


def _gemma_server(
    binary: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    with LlamaServer(binary, server_args(tiny_model("gemma3")), log) as server:
        yield server


@pytest.fixture(scope="module")
def fallback_server(
    build: tuple[Path, str],
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """The binary the build handed back, serving the tiny Gemma 3 model."""
    yield from _gemma_server(build[0], tiny_model, tmp_path_factory, "fallback")


@pytest.fixture(scope="module")
def stock_gemma(
    stock_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """Stock llama-server from the pinned tree (`make llama`), the same model."""
    yield from _gemma_server(stock_bin, tiny_model, tmp_path_factory, "stock")


def test_the_build_says_outside_and_builds_without_patches(build: tuple[Path, str]) -> None:
    binary, said = build
    assert "outside the proven range" in said
    assert "no patch series applies" in said
    assert "packages off" in said and "WITHOUT vcache's patches" in said
    manifest = json.loads((binary.parent.parent / "build.json").read_text())
    assert manifest["variant"] == "stock"
    assert manifest["patches"] == []
    assert "no patch series applies" in manifest["packages_off_because"]
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    assert "--image-embedding" not in help_text


def test_the_proxy_forwards_raw_images_and_answers_like_stock(
    fallback_server: LlamaServer,
    stock_gemma: LlamaServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert "image_embedding" not in httpx.get(f"{fallback_server.base_url}/props").json()
    tmp = tmp_path_factory.mktemp("fallback-proxy")
    args = ["--upstream", fallback_server.base_url, "--store", str(tmp / "store")]
    url = sample_image("shapes_640x480").data_url("PNG")
    with ProxyProcess(args, tmp / "proxy.log") as proxy:
        for text in ("Describe it.", "Again, differently."):
            via = chat(proxy.base_url, [image_part(url)], text)
            direct = chat(stock_gemma.base_url, [image_part(url)], text)
            assert via.tokens == direct.tokens
            assert via.max_logprob_diff(direct) <= 1e-5
            fields = dict(item.split("=") for item in via.headers["x-vcache"].split())
            assert (fields["hits"], fields["misses"], fields["fallback"]) == ("0", "0", "1")
