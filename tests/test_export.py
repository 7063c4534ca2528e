"""Exports: a request hands over the packages of the media it sends, encoded once, for itself.

With `X-Image-Embedding-Export: f32|f16`, the patched server writes the package of every raw
medium of the request under `<--image-embedding-dir>/encoded/` as it encodes it for the request,
and names the files in `X-Image-Embedding-Exported`. What it writes must be what
`POST /media/embedding` would answer for the same media, byte for byte, and the answer must be
the answer the request gets without the header (and from stock llama-server), token for token.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.vlm_client import Reply, chat_body, image_part, package_part, reply
from vision_cache.synthetic import audio as clips
from vision_cache.synthetic import models
from vision_cache.synthetic.images import sample_image

pytestmark = pytest.mark.server

EXPORT = "X-Image-Embedding-Export"
EXPORTED = "X-Image-Embedding-Exported"
LOGPROB_TOLERANCE = 1e-5


def _png(name: str) -> bytes:
    return sample_image(name).encode("PNG")


def _url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat(base: str, parts: list[dict[str, Any]], export: str | None = None) -> httpx.Response:
    headers = {EXPORT: export} if export is not None else {}
    return httpx.post(
        f"{base}/v1/chat/completions", json=chat_body(parts), headers=headers, timeout=300
    )


def _exported(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    value = r.headers[EXPORTED]
    return [] if value == "none" else value.split(" ")


def _media_embedding(base: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}/media/embedding", json=body, timeout=300)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def _without(pkg: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in pkg.items() if k != key}


def _props(base: str) -> dict[str, Any]:
    props: dict[str, Any] = httpx.get(f"{base}/props").json()["image_embedding"]
    return props


def _files(directory: Path) -> set[str]:
    encoded = directory / "encoded"
    return {p.name for p in encoded.iterdir()} if encoded.exists() else set()


def test_export_writes_what_media_embedding_answers(
    patched_server: LlamaServer, stock_server: LlamaServer, embedding_dir: Path
) -> None:
    base = patched_server.base_url
    png = _png("shapes_640x480")
    part = image_part(_url(png))
    plain = reply(_chat(base, [part]))
    exporting = _chat(base, [part], export="f32")
    (rel,) = _exported(exporting)

    # the request's own answer: as without the header, and as stock llama-server's
    answer = reply(exporting)
    stock = reply(_chat(stock_server.base_url, [part]))
    assert len(answer.tokens) >= 16
    assert answer.tokens == plain.tokens == stock.tokens
    assert answer.max_logprob_diff(stock) <= LOGPROB_TOLERANCE
    # encoded once, on the way in: the slot decoded the embeddings the export holds
    doc = json.loads((embedding_dir / rel).read_text())
    assert answer.timings["media_encoded_n"] == 0
    assert answer.timings["media_embedding_n"] == doc["n_tokens"]
    assert doc["timings"]["encode_ms"] > 0

    digest = hashlib.sha256(png).hexdigest()
    props = _props(base)
    assert rel == f"encoded/{digest}-{props['encoder_id']}.json"
    assert doc["object"] == "media_embedding"
    exported = doc["media_embedding"]
    inline = _media_embedding(base, {"image_url": {"url": _url(png)}})
    by_file = _media_embedding(base, {"image_url": {"url": _url(png)}, "output": "file"})
    assert _without(exported, "file") == _without(inline["media_embedding"], "data")
    assert exported["file"] == by_file["media_embedding"]["file"]
    assert exported["id"] == digest
    assert doc["n_tokens"] == inline["n_tokens"]
    payload = (embedding_dir / exported["file"]["path"]).read_bytes()
    assert payload == base64.b64decode(inline["media_embedding"]["data"])


def test_the_exported_package_answers_like_the_image(
    patched_server: LlamaServer, embedding_dir: Path
) -> None:
    base = patched_server.base_url
    part = image_part(_url(_png("stripes_300x900")))
    first = _chat(base, [part], export="f32")
    (rel,) = _exported(first)
    pkg = json.loads((embedding_dir / rel).read_text())["media_embedding"]
    again = reply(_chat(base, [package_part(pkg)]))
    raw = reply(_chat(base, [part]))
    assert again.tokens == raw.tokens == reply(first).tokens
    assert again.max_logprob_diff(raw) <= LOGPROB_TOLERANCE
    assert again.timings["media_embedding_n"] > 0
    # negative control: another image exports another package and answers otherwise
    other = _chat(base, [image_part(_url(_png("noise_512x512")))], export="f32")
    (other_rel,) = _exported(other)
    assert other_rel != rel
    assert reply(other).tokens != raw.tokens


def test_f16_exports_match_f16_encodes(patched_server: LlamaServer, embedding_dir: Path) -> None:
    base = patched_server.base_url
    url = _url(_png("checkers_1024x256"))
    r = _chat(base, [image_part(url)], export="f16")
    (rel,) = _exported(r)
    exported = json.loads((embedding_dir / rel).read_text())["media_embedding"]
    encoded = _media_embedding(base, {"image_url": {"url": url}, "dtype": "f16"})["media_embedding"]
    assert exported["dtype"] == "f16"
    assert exported["file"]["path"].endswith(".f16")
    payload = (embedding_dir / exported["file"]["path"]).read_bytes()
    assert payload == base64.b64decode(encoded["data"])


def test_every_raw_medium_once_and_packages_left_alone(
    patched_server: LlamaServer, embedding_dir: Path
) -> None:
    """Two images, one of them twice, beside a package: each raw image exported once."""
    base = patched_server.base_url
    a, b, c = _png("shapes_640x480"), _png("noise_512x512"), _png("stripes_300x900")
    pkg = _media_embedding(base, {"image_url": {"url": _url(c)}})["media_embedding"]
    parts = [image_part(_url(a)), image_part(_url(b)), image_part(_url(a))]
    raw = reply(_chat(base, [*parts, image_part(_url(c))]))
    r = _chat(base, [*parts, package_part(pkg)], export="f32")
    written = _exported(r)
    ids = sorted(
        json.loads((embedding_dir / rel).read_text())["media_embedding"]["id"] for rel in written
    )
    assert ids == sorted(hashlib.sha256(x).hexdigest() for x in (a, b))
    answer = reply(r)
    assert answer.tokens == raw.tokens
    assert answer.max_logprob_diff(raw) <= LOGPROB_TOLERANCE


def test_native_and_streamed_requests_export(patched_server: LlamaServer) -> None:
    base = patched_server.base_url
    png = _png("shapes_640x480")
    digest = hashlib.sha256(png).hexdigest()
    marker = httpx.get(f"{base}/props").json()["media_marker"]
    body = {
        "prompt": {
            "prompt_string": f"Image: {marker}\nIt shows",
            "multimodal_data": [base64.b64encode(png).decode()],
        },
        "temperature": 0,
        "n_predict": 8,
        "cache_prompt": False,
    }
    plain = httpx.post(f"{base}/completion", json=body, timeout=300)
    native = httpx.post(f"{base}/completion", json=body, headers={EXPORT: "f32"}, timeout=300)
    assert [Path(p).name.split("-")[0] for p in _exported(native)] == [digest]
    assert native.json()["content"] == plain.json()["content"]

    stream_body = chat_body([image_part(_url(png))], stream=True)
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json=stream_body,
        headers={EXPORT: "f32"},
        timeout=300,
    ) as s:
        events = s.read().decode()
        assert [Path(p).name.split("-")[0] for p in _exported(s)] == [digest]
    assert "data: [DONE]" in events


def test_requests_without_media_export_nothing(patched_server: LlamaServer) -> None:
    r = _chat(patched_server.base_url, [], export="f32")
    assert _exported(r) == []


@pytest.mark.parametrize("value", ["yes", "F32", "", "f64", "../../etc/passwd", "f32, f16"])
def test_bad_export_requests_are_refused(
    patched_server: LlamaServer, embedding_dir: Path, value: str
) -> None:
    base = patched_server.base_url
    png = _png("checkers_1024x256")
    before = _files(embedding_dir)
    r = _chat(base, [image_part(_url(_png("noise_512x512")))], export=value)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert EXPORT in error["message"]
    assert EXPORTED not in r.headers
    assert _files(embedding_dir) == before
    # and the server keeps serving
    assert _exported(_chat(base, [image_part(_url(png))], export="f32"))


def test_a_server_without_a_directory_refuses_exports(patched_gemma: LlamaServer) -> None:
    base = patched_gemma.base_url
    props = _props(base)
    assert props["export"] is False
    assert "--image-embedding-dir" in props["export_reason"]
    assert "dir" not in props
    r = _chat(base, [image_part(_url(_png("shapes_640x480")))], export="f32")
    assert r.status_code == 400
    assert props["export_reason"] in r.json()["error"]["message"]
    assert _chat(base, [image_part(_url(_png("shapes_640x480")))]).status_code == 200


def test_props_name_the_directory_and_this_process(
    patched_bin: Path, tiny_model: Callable[[str], models.ModelFiles], tmp_path: Path
) -> None:
    """The directory as the server resolved it, and a token file only this process wrote."""
    target = tmp_path / "store"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    args = server_args(tiny_model("gemma3"), "--image-embedding-dir", str(tmp_path / "link"))
    with LlamaServer(patched_bin, args, tmp_path / "server.log") as server:
        props = _props(server.base_url)
        assert props["export"] is True
        directory = props["dir"]
        assert directory["path"] == str(target.resolve()) + "/"
        token_file = target / directory["token_file"]
        assert token_file.read_text().strip() == directory["token"]
        assert len(directory["token"]) == 32
        assert directory["token_file"] == f"encoded/server-{directory['token']}.id"
    assert not token_file.exists()  # removed at exit


@pytest.fixture(scope="module")
def audio_server(
    patched_bin: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LlamaServer, Path]]:
    files = models.generate("qwen2audio", "tiny", 0, models_dir)
    tmp = tmp_path_factory.mktemp("export-audio")
    directory = tmp / "dir"
    directory.mkdir()
    args = server_args(files, "--image-embedding-dir", str(directory))
    with LlamaServer(patched_bin, args, tmp / "server.log") as server:
        yield server, directory


def _audio_part(wav: bytes) -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
    }


def test_audio_clips_export_too(audio_server: tuple[LlamaServer, Path]) -> None:
    server, directory = audio_server
    base = server.base_url
    if "audio" not in _props(base)["modalities"]:
        pytest.skip("this patched llama-server takes no audio packages")
    wav = clips.sample_clips()[1].wav()
    plain = reply(_chat(base, [_audio_part(wav)]))
    r = _chat(base, [_audio_part(wav)], export="f32")
    (rel,) = _exported(r)
    answer: Reply = reply(r)
    assert answer.tokens == plain.tokens
    assert answer.max_logprob_diff(plain) <= LOGPROB_TOLERANCE
    exported = json.loads((directory / rel).read_text())["media_embedding"]
    encoded = _media_embedding(base, {"input_audio": {"data": base64.b64encode(wav).decode()}})
    assert exported["modality"] == "audio"
    assert exported["id"] == hashlib.sha256(wav).hexdigest()
    assert _without(exported, "file") == _without(encoded["media_embedding"], "data")
    payload = (directory / exported["file"]["path"]).read_bytes()
    assert payload == base64.b64decode(encoded["media_embedding"]["data"])


def test_exports_are_handed_over_without_encoding(
    patched_server: LlamaServer, embedding_dir: Path
) -> None:
    """For a client that cannot read the directory: the export by name, inline, not re-encoded."""
    base = patched_server.base_url
    url = _url(_png("shapes_640x480"))
    (rel,) = _exported(_chat(base, [image_part(url)], export="f32"))
    doc = json.loads((embedding_dir / rel).read_text())
    fetched = _media_embedding(base, {"exported": rel})
    encoded = _media_embedding(base, {"image_url": {"url": url}})
    assert fetched["timings"] == doc["timings"]  # the export's own: nothing ran again
    assert fetched["media_embedding"] == encoded["media_embedding"]
    as_file = _media_embedding(base, {"exported": rel, "output": "file"})
    assert as_file["media_embedding"] == doc["media_embedding"]

    payload = embedding_dir / doc["media_embedding"]["file"]["path"]
    taken = _media_embedding(base, {"exported": rel, "remove": True})
    assert taken["media_embedding"] == encoded["media_embedding"]
    assert not (embedding_dir / rel).exists()
    assert not payload.exists()
    gone = httpx.post(f"{base}/media/embedding", json={"exported": rel}, timeout=60)
    assert gone.status_code == 400
    assert "not found" in gone.json()["error"]["message"]


@pytest.mark.parametrize(
    "name",
    [
        "../encoded/x.json",
        "encoded/server-0123.id",
        "/etc/passwd",
        "encoded/" + "a" * 64 + "-" + "b" * 16 + ".f32",
        "encoded/" + "A" * 64 + "-" + "b" * 16 + ".json",
        "encoded/../../" + "a" * 58 + "-" + "b" * 16 + ".json",
    ],
)
def test_only_exports_can_be_handed_over(patched_server: LlamaServer, name: str) -> None:
    r = httpx.post(
        f"{patched_server.base_url}/media/embedding", json={"exported": name}, timeout=60
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
