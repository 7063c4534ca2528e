"""Packages only for verified projector types (llama_patches/verified_projectors.txt).

The patched server names each loaded projector type in ``GET /props`` with its verdict, refuses
packages for a type that is not on the list (400, the server keeps serving), and takes them
anyway when the operator opts in with ``--image-embedding-unverified``, which it logs loudly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.vlm_client import chat, encode, image_part, package_part
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles
from vision_cache.synthetic.registry import vision_family, vision_family_names

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
VERIFIED_LIST = ROOT / "llama_patches" / "verified_projectors.txt"
PROJECTOR_TYPES = {"gemma3": "gemma3", "qwen2vl": "qwen2vl_merger"}


def verified_types() -> set[str]:
    """The first word of every line of the verified list that is not a comment."""
    lines = (line.split("#", 1)[0].split() for line in VERIFIED_LIST.read_text().splitlines())
    return {words[0] for words in lines if words}


def capability(server: LlamaServer) -> dict[str, Any]:
    props: dict[str, Any] = httpx.get(f"{server.base_url}/props", timeout=30).json()
    return dict(props["image_embedding"])


def _url(name: str = "shapes_640x480") -> str:
    return sample_image(name).data_url("PNG")


def _post_package(base: str, pkg: Any) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"messages": [{"role": "user", "content": [package_part(pkg)]}], "max_tokens": 4},
    )


def test_verified_list_names_the_tested_architectures() -> None:
    assert set(PROJECTOR_TYPES.values()) <= verified_types()
    for type_ in verified_types():
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", type_), type_


def test_props_name_the_projector_and_its_verdict(patched_server: LlamaServer, arch: str) -> None:
    emb = capability(patched_server)
    assert emb["projectors"] == {"image": {"type": PROJECTOR_TYPES[arch], "verified": True}}
    assert emb["modalities"] == ["image"]
    assert emb["enabled"] is True
    assert emb["allow_unverified"] is False
    assert "reason" not in emb


@pytest.fixture(scope="module")
def server_without_flag(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "patched-no-flag.log"
    with LlamaServer(patched_bin, server_args(tiny_model("gemma3")), log) as server:
        yield server


def test_without_the_flag_packages_are_off_and_props_say_why(
    server_without_flag: LlamaServer, patched_gemma: LlamaServer
) -> None:
    emb = capability(server_without_flag)
    assert emb["enabled"] is False
    assert emb["modalities"] == []
    assert emb["projectors"]["image"] == {"type": "gemma3", "verified": True}
    assert "--image-embedding" in emb["reason"]
    assert "mmproj" not in emb  # nothing to key a cache on while packages are off
    base = server_without_flag.base_url
    pkg = encode(patched_gemma.base_url, _url())["image_embedding"]
    r = _post_package(base, pkg)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "image_embedding: " + emb["reason"]
    r = httpx.post(f"{base}/vision/embedding", json={"image_url": {"url": _url()}}, timeout=60)
    assert r.status_code == 400
    assert len(chat(base, [image_part(_url())]).tokens) >= 16


# --- a projector type nobody has verified ------------------------------------------------------


@pytest.fixture(scope="module")
def unverified_model(tiny_model: Callable[[str], ModelFiles]) -> tuple[ModelFiles, str]:
    """A generated tiny model whose projector type is not on the verified list."""
    for family, type_ in unverified_candidates():
        if type_ not in verified_types():
            return tiny_model(family), type_
    pytest.skip("every generated model family is verified: no unverified projector type to load")


def unverified_candidates() -> list[tuple[str, str]]:
    """(family, image projector type) of the generated vision families, LLaVA's `mlp` first."""
    names = sorted(vision_family_names(), key=lambda name: name != "llava")
    return [(name, vision_family(name).projector_type) for name in names]


@pytest.fixture(scope="module")
def unverified_server(
    patched_bin: Path,
    unverified_model: tuple[ModelFiles, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "patched-unverified.log"
    args = server_args(unverified_model[0], "--image-embedding")
    with LlamaServer(patched_bin, args, log) as server:
        yield server


@pytest.fixture(scope="module")
def opted_in_server(
    patched_bin: Path,
    unverified_model: tuple[ModelFiles, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("logs") / "patched-opted-in.log"
    args = server_args(unverified_model[0], "--image-embedding-unverified")
    with LlamaServer(patched_bin, args, log) as server:
        yield server


def test_unverified_type_is_refused_and_the_server_keeps_serving(
    unverified_server: LlamaServer,
    opted_in_server: LlamaServer,
    unverified_model: tuple[ModelFiles, str],
) -> None:
    type_ = unverified_model[1]
    emb = capability(unverified_server)
    assert emb["projectors"]["image"] == {"type": type_, "verified": False}
    assert emb["enabled"] is False
    assert emb["modalities"] == []
    assert f"'{type_}'" in emb["reason"]
    assert "--image-embedding-unverified" in emb["reason"]

    base = unverified_server.base_url
    raw = chat(base, [image_part(_url())])
    # a package of this very mmproj, made where the operator opted in
    pkg = encode(opted_in_server.base_url, _url())["image_embedding"]
    for response in (
        _post_package(base, pkg),
        httpx.post(f"{base}/vision/embedding", json={"image_url": {"url": _url()}}, timeout=60),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"] == "image_embedding: " + emb["reason"]
    assert chat(base, [image_part(_url())]).tokens == raw.tokens


def test_opting_in_takes_packages_and_says_so_loudly(
    opted_in_server: LlamaServer, unverified_model: tuple[ModelFiles, str]
) -> None:
    type_ = unverified_model[1]
    emb = capability(opted_in_server)
    assert emb["projectors"]["image"] == {"type": type_, "verified": False}
    assert emb["enabled"] is True
    assert emb["modalities"] == ["image"]
    assert emb["allow_unverified"] is True
    assert "reason" not in emb
    log = opted_in_server.log_text()
    assert f"UNVERIFIED projector type '{type_}'" in log
    assert "!!!!!!!!" in log

    base = opted_in_server.base_url
    pkg = encode(base, _url())["image_embedding"]
    reply = chat(base, [package_part(pkg)])
    assert reply.timings["media_embedding_n"] > 0
    assert reply.timings["media_encoded_n"] == 0
