"""Comparing a candidate with references, against real llama-servers: a generated VLM judges,
a generated embedding VLM (mean pooling) shortlists.

The proofs: images in embedding requests are cached and give the vectors a direct request
gives; a second comparison under the same instruction computes no vector (the embedding
server does no work); with `top_k` covering every reference, the ranking is the one judging
every reference straight at llama-server gives; descriptions stored at warm-up filter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from proxy.compare.service import rank_key
from tests.support.fixtures import server_args
from tests.support.inprocess_proxy import png, proxy_in_front
from tests.support.llama_server import LlamaServer
from vision_cache.client.compare_api import Finalist
from vision_cache.judging import Rubric, judge_request, message_content, parse_verdict
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server

RUBRIC = "short fur; triangular ears; green eyes"
N_REFS = 4


@pytest.fixture(scope="module")
def vlm(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    # one slot: answers do not depend on which requests happen to share a batch
    log = tmp_path_factory.mktemp("logs") / "compare-vlm.log"
    args = [*server_args(tiny_model("gemma3"), "--image-embedding"), "-np", "1"]
    with LlamaServer(patched_bin, args, log) as server:
        yield server


@pytest.fixture(scope="module")
def embedder(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "compare-embedder.log"
    args = [
        *server_args(tiny_model("qwen2vl"), "--image-embedding"),
        "--embeddings",
        "--pooling",
        "mean",
        "-b",
        "2048",
        "-ub",
        "2048",
        "--metrics",
    ]
    with LlamaServer(patched_bin, args, log) as server:
        yield server


@pytest.fixture
async def proxy(
    vlm: LlamaServer, embedder: LlamaServer, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        proxy_in_front(
            vlm.base_url, tmp_path, upstream_idle_s=300, embedding_upstream=embedder.base_url
        ) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=300) as c,
    ):
        yield c


def images(n: int, first: int = 10) -> list[str]:
    return [png(first + 7 * i) for i in range(n)]


async def warm(client: httpx.AsyncClient, refs: list[str], **extra: Any) -> list[dict[str, Any]]:
    out = []
    for i, image in enumerate(refs):
        r = await client.post(
            "/vcache/warm", json={"image": image, "name": f"ref-{i}", "tags": ["cats"], **extra}
        )
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


async def compare(client: httpx.AsyncClient, candidate: str, **extra: Any) -> dict[str, Any]:
    body = {
        "candidate": candidate,
        "rubric": RUBRIC,
        "references": {"tag": "cats"},
        "top_k": N_REFS,
        **extra,
    }
    r = await client.post("/vcache/compare", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def tokens_processed(server: LlamaServer) -> int:
    async with httpx.AsyncClient(base_url=server.base_url) as c:
        text = (await c.get("/metrics")).text
    m = re.search(r"^llamacpp:prompt_tokens_total (\S+)$", text, re.M)
    assert m
    return int(float(m.group(1)))


def vector(body: Any) -> np.ndarray[Any, Any]:
    return np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")


async def test_images_in_embedding_requests_hit_and_match_direct(
    embedder: LlamaServer, tmp_path: Path
) -> None:
    image = png(3)
    body = {
        "input": [
            {
                "content": [
                    {"type": "text", "text": "Represent this image."},
                    {"type": "image_url", "image_url": {"url": image}},
                ]
            }
        ],
        "encoding_format": "base64",
    }
    async with (
        proxy_in_front(embedder.base_url, tmp_path) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=120) as c,
        httpx.AsyncClient(base_url=embedder.base_url, timeout=120) as direct,
    ):
        expected = vector((await direct.post("/v1/embeddings", json=body)).json())
        first = await c.post("/v1/embeddings", json=body)
        second = await c.post("/v1/embeddings", json=body)
        other = await c.post(
            "/v1/embeddings",
            json={
                **body,
                "input": [
                    {
                        "content": [
                            {"type": "text", "text": "Represent this image."},
                            {"type": "image_url", "image_url": {"url": png(4)}},
                        ]
                    }
                ],
            },
        )
        native = await c.post(
            "/embeddings",
            json={
                "content": {
                    "prompt_string": "Represent this image."
                    + (await direct.get("/props")).json()["media_marker"],
                    "multimodal_data": [image.split(",", 1)[1]],
                }
            },
        )
    assert "misses=1" in first.headers["x-vcache"]
    assert "hits=1" in second.headers["x-vcache"] and "hits=1" in native.headers["x-vcache"]
    assert np.array_equal(vector(first.json()), expected)
    assert np.array_equal(vector(second.json()), expected)
    assert not np.array_equal(vector(other.json()), expected)  # the image matters
    assert native.status_code == 200


async def test_top_k_covering_all_ranks_like_judging_every_reference(
    proxy: httpx.AsyncClient, vlm: LlamaServer
) -> None:
    refs, candidate = images(N_REFS), png(99)
    await warm(proxy, refs)
    reply = await compare(proxy, candidate)
    assert reply["recall"] == "embedding-model"
    assert [f["reference"] for f in reply["ranking"]] != []
    assert len(reply["ranking"]) == N_REFS
    # the same question, every reference, straight at llama-server with the raw images
    rubric = Rubric.parse(RUBRIC)
    direct = {}
    async with httpx.AsyncClient(base_url=vlm.base_url, timeout=300) as c:
        for i, image in enumerate(refs):
            r = await c.post(
                "/v1/chat/completions",
                json=judge_request(rubric, reference=image, candidate=candidate),
            )
            direct[f"ref-{i}"] = parse_verdict(message_content(r.json()), rubric)
    got = {f["reference"]: f for f in reply["ranking"]}
    for name, verdict in direct.items():
        assert (got[name]["score"], got[name]["criteria"]) == (verdict.score, verdict.criteria)
    # the order is the documented one (ties broken by similarity, then name)
    similarity = {f["reference"]: f["similarity"] for f in reply["ranking"]}
    expected = sorted(
        (
            Finalist(
                rank=0,
                reference=n,
                digest="0" * 64,
                similarity=similarity[n],
                score=v.score,
                criteria=dict(v.criteria),
            )
            for n, v in direct.items()
        ),
        key=rank_key,
    )
    assert [f["reference"] for f in reply["ranking"]] == [f.reference for f in expected]
    assert reply["stages"]["judge"]["model_calls"] == N_REFS


async def test_a_second_run_computes_no_vector(
    proxy: httpx.AsyncClient, embedder: LlamaServer
) -> None:
    refs, candidate = images(N_REFS, first=40), png(98)
    await warm(proxy, refs)
    first = await compare(proxy, candidate, top_k=2)
    shortlist = first["stages"]["shortlist"]
    assert shortlist["detail"]["computed"] == N_REFS + 1 and shortlist["model_calls"] >= 1
    before = await tokens_processed(embedder)
    second = await compare(proxy, candidate, top_k=2, rubric="long fur")
    assert second["stages"]["shortlist"]["model_calls"] == 0
    assert second["stages"]["shortlist"]["cached"] == N_REFS + 1
    assert await tokens_processed(embedder) == before  # no model ran
    assert [f["reference"] for f in first["ranking"]] != [] and len(second["ranking"]) == 2
    assert {f["reference"] for f in second["ranking"]} == {f["reference"] for f in first["ranking"]}
    # a new instruction is new vectors
    third = await compare(proxy, candidate, top_k=2, instruction="Find the same animal.")
    assert third["stages"]["shortlist"]["detail"]["computed"] == N_REFS + 1


async def test_shortlist_keeps_the_most_similar(proxy: httpx.AsyncClient) -> None:
    refs = images(N_REFS, first=70)
    await warm(proxy, refs)
    everyone = await compare(proxy, refs[2], top_k=N_REFS)
    best = max(everyone["ranking"], key=lambda f: f["similarity"])
    assert best["reference"] == "ref-2" and best["similarity"] == pytest.approx(1.0, abs=1e-5)
    one = await compare(proxy, refs[2], top_k=1)
    assert [f["reference"] for f in one["ranking"]] == ["ref-2"]
    assert one["stages"]["judge"]["model_calls"] == 1


async def test_without_an_embedding_upstream_packages_are_pooled(
    vlm: LlamaServer, tmp_path: Path
) -> None:
    refs = images(3, first=90)
    async with (
        proxy_in_front(vlm.base_url, tmp_path, upstream_idle_s=300) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=300) as c,
    ):
        await warm(c, refs)
        reply = await compare(c, refs[1], top_k=1)
    assert reply["recall"] == "pooled-packages"
    assert [f["reference"] for f in reply["ranking"]] == ["ref-1"]


async def test_bad_requests_say_why(proxy: httpx.AsyncClient) -> None:
    r = await proxy.post(
        "/vcache/compare",
        json={"candidate": png(1), "rubric": "x", "references": {"names": ["never-warmed"]}},
    )
    assert r.status_code == 400 and "never-warmed" in r.json()["error"]["message"]
    r = await proxy.post(
        "/vcache/compare",
        json={"candidate": png(1), "rubric": "x", "references": {"tag": "a", "names": ["b"]}},
    )
    assert r.status_code == 400 and "exactly one" in r.json()["error"]["message"]


DESCRIBE = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    },
    "required": ["colour", "legs"],
}


async def test_descriptions_are_stored_once_and_filter(
    proxy: httpx.AsyncClient, vlm: LlamaServer
) -> None:
    refs = images(N_REFS, first=120)
    first = await warm(proxy, refs, describe=DESCRIBE)
    assert all(w["described"] is False for w in first)
    docs = {f"ref-{i}": w["description"] for i, w in enumerate(first)}
    assert all(d["colour"] in ("red", "green", "blue") for d in docs.values())
    again = await warm(proxy, refs, describe=DESCRIBE)  # a result-cache hit each
    assert [w["described"] for w in again] == [True] * N_REFS
    assert [w["description"] for w in again] == [w["description"] for w in first]
    colour = docs["ref-0"]["colour"]
    reply = await compare(
        proxy, png(97), describe=DESCRIBE, where=[{"field": "colour", "value": colour}]
    )
    kept = {n for n, d in docs.items() if d["colour"] == colour}
    assert {f["reference"] for f in reply["ranking"]} == kept
    assert reply["stages"]["prefilter"]["model_calls"] == 0
    assert reply["stages"]["prefilter"]["items_out"] == len(kept)


async def test_the_command_line_warms_a_folder_and_compares(
    proxy: httpx.AsyncClient, tmp_path: Path
) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, image in enumerate(images(3, first=150)):
        (folder / f"cat-{i}.png").write_bytes(base64.b64decode(image.split(",", 1)[1]))
    url = str(proxy.base_url).rstrip("/")

    async def vcache(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *args,
            "--proxy",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    await vcache("warm", str(folder), "--tag", "cli")
    by_folder = json.loads(
        await vcache(
            "compare",
            str(folder / "cat-1.png"),
            "--folder",
            str(folder),
            "--rubric",
            RUBRIC,
            "--top-k",
            "1",
            "--json",
        )
    )
    assert [f["reference"] for f in by_folder["ranking"]] == ["cat-1.png"]
    table = await vcache(
        "compare", str(folder / "cat-2.png"), "--tag", "cli", "--rubric", RUBRIC, "--top-k", "2"
    )
    assert "rubric: " in table and "model call" in table
