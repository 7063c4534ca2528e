"""Shared fixtures: the llama-server builds, the generated test VLMs, real servers on free ports.

A pytest plugin (tests/conftest.py loads it): its fixtures reach every test module. Everything
is real: the servers are built from source by `vcache build-server` (make test builds them
first; a fixture that finds none builds it), and the models are random-weight VLMs
written by vision_cache.synthetic. Set VCACHE_LLAMA_SERVER_PATCHED/_STOCK to test other
binaries, VCACHE_MODELS_DIR to keep models elsewhere.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.llama_server import LlamaServer, built_binary
from tests.support.redis_server import RedisServer
from vision_cache.synthetic.models import ModelFiles, generate

ROOT = Path(__file__).resolve().parents[2]

ARCHS = ("gemma3", "qwen2vl")
SERVER_THREADS = "2"


@pytest.fixture(scope="session")
def patched_bin() -> Path:
    return built_binary("patched")


@pytest.fixture(scope="session")
def stock_bin() -> Path:
    return built_binary("stock")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Callable[[str], ModelFiles]:
    """tiny_model(arch) -> the generated tiny model's files (generated once)."""
    cache: dict[str, ModelFiles] = {}

    def get(arch: str) -> ModelFiles:
        if arch not in cache:
            cache[arch] = generate(arch, "tiny", 0, models_dir)
        return cache[arch]

    return get


def server_args(files: ModelFiles, *extra: str) -> list[str]:
    """llama-server's arguments for the test servers; $VCACHE_TEST_SERVER_ARGS adds more
    (scripts/gpu_check.sh puts model and mmproj on the GPU with ``-ngl all``)."""
    more = shlex.split(os.environ.get("VCACHE_TEST_SERVER_ARGS", ""))
    return [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        SERVER_THREADS,
        "-c",
        "4096",
        "-np",
        "2",
        "--no-warmup",
        *more,
        *extra,
    ]


@pytest.fixture(scope="session")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedding-dir")


@pytest.fixture(scope="session", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def patched_server(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    arch: str,
    embedding_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """A patched llama-server for `arch`, packages enabled, file references into embedding_dir."""
    log = tmp_path_factory.mktemp("logs") / f"patched-{arch}.log"
    args = server_args(tiny_model(arch), "--image-embedding-dir", str(embedding_dir))
    with LlamaServer(patched_bin, args, log) as server:
        yield server


@pytest.fixture(scope="session")
def patched_gemma(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """A patched gemma3 server, for tests where one architecture is enough (inline packages)."""
    log = tmp_path_factory.mktemp("logs") / "patched-gemma3-single.log"
    with LlamaServer(
        patched_bin, server_args(tiny_model("gemma3"), "--image-embedding"), log
    ) as server:
        yield server


@pytest.fixture(scope="session")
def stock_server(
    stock_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    arch: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / f"stock-{arch}.log"
    with LlamaServer(stock_bin, server_args(tiny_model(arch)), log) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
