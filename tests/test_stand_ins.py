"""The stand-ins for the models llama.cpp's own server tests download (`make conformance`):
each loads in a real llama-server and answers the endpoints those tests use it for."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.llama_server import LlamaServer
from vision_cache.synthetic.stand_ins import N_EMBD, write_all

pytestmark = pytest.mark.server

COMMON = ["-t", "2", "-c", "512", "-np", "1", "--no-warmup"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("stand-ins"))


def _server(binary: Path, model: Path, log: Path, *extra: str) -> LlamaServer:
    return LlamaServer(binary, ["-m", str(model), *COMMON, *extra], log)


@pytest.fixture(scope="module")
def llama(
    stock_bin: Path, stand_ins: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "llama.log"
    with _server(stock_bin, stand_ins["llama"], log) as server:
        yield server


def test_they_are_the_same_file_on_every_run(stand_ins: dict[str, Path], tmp_path: Path) -> None:
    again = write_all(tmp_path)
    for name, path in stand_ins.items():
        assert hashlib.sha256(path.read_bytes()).digest() == (
            hashlib.sha256(again[name].read_bytes()).digest()
        ), name


def test_the_text_model_completes_whole_words(llama: LlamaServer) -> None:
    r = httpx.post(
        f"{llama.base_url}/completion",
        json={"prompt": "Once upon a time", "n_predict": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # only whole words are ever likely: no early end, and text that decodes
    assert body["tokens_predicted"] == 8
    assert body["content"].strip()


def test_the_text_model_takes_infill(llama: LlamaServer) -> None:
    r = httpx.post(
        f"{llama.base_url}/infill",
        json={"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens_predicted"] > 0


def test_the_embedding_model_answers_vectors(
    stock_bin: Path, stand_ins: dict[str, Path], tmp_path: Path
) -> None:
    with _server(stock_bin, stand_ins["bert"], tmp_path / "bert.log", "--embedding") as server:
        r = httpx.post(
            f"{server.base_url}/v1/embeddings",
            json={"input": ["a cat", "a dog on a hill"]},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    vectors = [d["embedding"] for d in r.json()["data"]]
    assert [len(v) for v in vectors] == [N_EMBD, N_EMBD]
    assert vectors[0] != vectors[1]


def test_the_reranker_scores_every_document(
    stock_bin: Path, stand_ins: dict[str, Path], tmp_path: Path
) -> None:
    log = tmp_path / "rerank.log"
    with _server(stock_bin, stand_ins["rerank"], log, "--reranking") as server:
        r = httpx.post(
            f"{server.base_url}/rerank",
            json={"query": "a cat", "documents": ["a cat on a mat", "the stock market"]},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == [0, 1]
    assert all(isinstance(x["relevance_score"], float) for x in results)
