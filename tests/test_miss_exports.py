"""A miss goes upstream once: the image as sent, its package exported by the server as it encodes.

Against the real patched llama-server (tiny gemma3). The proof that no second encode happens is
the server's own log: it names every medium it exports ("exporting image <id>"), and a request
carrying a package decodes it without encoding (`media_encoded_n` 0). The answers are compared
token for token with the same request sent straight to a server with the raw image.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from proxy.lookup.admission import Admission, Declined, HitCost
from proxy.lookup.exports import (
    ExportBatch,
    export_name,
    exported_names,
    read_export,
    shares_dir,
    sweep_exports,
)
from proxy.upstream.client import Capabilities, EmbeddingDir
from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import Reply, chat, chat_body, image_part, reply
from vision_cache.data_uri import data_uri
from vision_cache.errors import PackageError
from vision_cache.keys import Namespace
from vision_cache.synthetic.models import ModelFiles


def picture(seed: int) -> tuple[str, str]:
    """A PNG no other test sends (random colour blocks): its data URI and SHA-256."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((320, 240), Image.Resampling.NEAREST).save(buf, "PNG")
    png = buf.getvalue()
    return data_uri(png, "image/png"), hashlib.sha256(png).hexdigest()


def exports_logged(server_log: str, image_digest: str) -> int:
    return server_log.count(f"exporting image {image_digest}")


def cache(r: Reply) -> dict[str, int]:
    fields = dict(kv.split("=") for kv in r.headers["x-vcache"].split())
    return {k: int(float(v)) for k, v in fields.items()}


def left_in(directory: Path) -> list[str]:
    """Export files left under `directory`/encoded (the server's token file aside)."""
    encoded = directory / "encoded"
    return sorted(p.name for p in encoded.iterdir() if not p.name.startswith("server-"))


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tiny_model: Callable[[str], ModelFiles]) -> ModelFiles:
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def direct(
    patched_bin: Path, gemma: ModelFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A patched server that exports into a directory of its own (no proxy shares it)."""
    tmp = tmp_path_factory.mktemp("direct")
    args = server_args(gemma, "--image-embedding-dir", str(tmp / "dir"))
    (tmp / "dir").mkdir()
    with LlamaServer(patched_bin, args, tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def managed(
    patched_bin: Path, gemma: ModelFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """vcache managing a patched server: the server's directory is the store's."""
    tmp = tmp_path_factory.mktemp("managed")
    args = ["--llama-server", str(patched_bin), "--store", str(tmp / "store"), "--"]
    with ProxyProcess([*args, *server_args(gemma)], tmp / "vcache.log") as proxy:
        yield proxy


def health(proxy: ProxyProcess) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{proxy.base_url}/vcache/health", timeout=30).json()
    return answer


def managed_log(proxy: ProxyProcess) -> str:
    return (proxy.log_path.parent / "store" / "llama-server.log").read_text(errors="replace")


# --- through the real server -----------------------------------------------------------------


@pytest.mark.server
def test_a_miss_is_encoded_once_for_its_own_request(
    managed: ProxyProcess, direct: LlamaServer
) -> None:
    """The miss's answer is the raw image's, the server exported the package while encoding it
    (one encode, logged once), and the next request decodes that package."""
    image, sha = picture(1)
    expected = chat(direct.base_url, [image_part(image)], "Describe it.")
    miss = chat(managed.base_url, [image_part(image)], "Describe it.")
    hit = chat(managed.base_url, [image_part(image)], "Describe it.")
    assert (cache(miss)["misses"], cache(hit)["hits"]) == (1, 1)
    assert miss.tokens == expected.tokens == hit.tokens
    assert miss.timings["media_encoded_n"] == 0  # exported media are decoded, not re-encoded
    assert hit.timings["media_embedding_n"] > 0
    assert exports_logged(managed_log(managed), sha) == 1
    assert "x-image-embedding-exported" not in miss.headers  # the proxy's business only
    assert left_in(managed.log_path.parent / "store" / "segments") == []  # adopted, deleted
    state = health(managed)
    assert (state["transport"], state["exports"]) == ("file", True)


@pytest.mark.server
def test_concurrent_requests_for_a_new_image_encode_it_once(
    managed: ProxyProcess, direct: LlamaServer
) -> None:
    image, sha = picture(2)
    texts = [f"Question {i}: what is this?" for i in range(6)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{managed.base_url}/v1/chat/completions",
                        json=chat_body([image_part(image)], t),
                    )
                    for t in texts
                )
            )

    replies = [reply(r) for r in asyncio.run(send_all())]
    assert sum(cache(r)["misses"] for r in replies) == 1
    assert sum(cache(r)["hits"] for r in replies) == len(texts) - 1
    assert exports_logged(managed_log(managed), sha) == 1
    assert replies[-1].tokens == chat(direct.base_url, [image_part(image)], texts[-1]).tokens


@pytest.mark.server
def test_requests_wanting_each_others_new_images_both_finish(
    managed: ProxyProcess, direct: LlamaServer
) -> None:
    """Each request may lead the export of one image and want the other's: a request that
    leads an export never waits for another's, so neither waits for the other."""
    (a, _), (b, _) = picture(3), picture(4)
    bodies = [
        chat_body([image_part(a), image_part(b)], "AB"),
        chat_body([image_part(b), image_part(a)], "BA"),
    ]

    async def send_both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"{managed.base_url}/v1/chat/completions", json=b) for b in bodies)
            )

    got = [reply(r) for r in asyncio.run(send_both())]
    assert got[0].tokens == chat(direct.base_url, [image_part(a), image_part(b)], "AB").tokens
    assert got[1].tokens == chat(direct.base_url, [image_part(b), image_part(a)], "BA").tokens
    again = chat(managed.base_url, [image_part(b), image_part(a)], "Both again.")
    assert cache(again)["hits"] == 2


@pytest.mark.server
def test_the_same_new_image_twice_in_one_request_is_exported_once(
    managed: ProxyProcess, direct: LlamaServer
) -> None:
    image, sha = picture(5)
    twice = [image_part(image), image_part(image)]
    got = chat(managed.base_url, twice, "Twice.")
    assert got.tokens == chat(direct.base_url, twice, "Twice.").tokens
    assert exports_logged(managed_log(managed), sha) == 1
    assert cache(chat(managed.base_url, twice, "Twice again."))["hits"] == 2


@pytest.mark.server
def test_without_the_directory_the_export_comes_over_http(
    direct: LlamaServer, tmp_path: Path
) -> None:
    """A proxy that cannot read the server's directory takes the export over HTTP (the server
    deletes it then), and hands packages over inline."""
    image, _ = picture(6)
    expected = chat(direct.base_url, [image_part(image)], "Inline?")
    args = ["--upstream", direct.base_url, "--store", str(tmp_path / "store")]
    with ProxyProcess(args, tmp_path / "vcache.log") as proxy:
        miss = chat(proxy.base_url, [image_part(image)], "Inline?")
        hit = chat(proxy.base_url, [image_part(image)], "Inline?")
        state = health(proxy)
    assert (cache(miss)["misses"], cache(hit)["hits"]) == (1, 1)
    assert miss.tokens == expected.tokens == hit.tokens
    assert hit.timings["media_encoded_n"] == 0
    assert (state["transport"], state["exports"]) == ("inline", True)
    assert left_in(Path(direct.args[direct.args.index("--image-embedding-dir") + 1])) == []


@pytest.mark.server
def test_a_server_started_on_the_store_directory_gets_file_references(
    patched_bin: Path, gemma: ModelFiles, tmp_path: Path
) -> None:
    """Not managed, yet sharing the directory: the token the server wrote is found there."""
    segments = tmp_path / "store" / "segments"
    segments.mkdir(parents=True)
    image, _ = picture(7)
    args = server_args(gemma, "--image-embedding-dir", str(segments))
    with (
        LlamaServer(patched_bin, args, tmp_path / "server.log") as server,
        ProxyProcess(
            ["--upstream", server.base_url, "--store", str(tmp_path / "store")],
            tmp_path / "vcache.log",
        ) as proxy,
    ):
        assert health(proxy)["transport"] == "file"
        miss = chat(proxy.base_url, [image_part(image)], "File?")
        hit = chat(proxy.base_url, [image_part(image)], "File?")
        assert hit.tokens == chat(server.base_url, [image_part(image)], "File?").tokens
    assert (cache(miss)["misses"], cache(hit)["hits"]) == (1, 1)
    assert left_in(segments) == []


@pytest.mark.server
def test_packages_cheaper_than_a_hit_are_not_kept(direct: LlamaServer, tmp_path: Path) -> None:
    """Admission: under the threshold, the image goes as sent every time, and its export is
    asked for once (then remembered as not worth keeping)."""
    image, sha = picture(8)
    args = ["--upstream", direct.base_url, "--store", str(tmp_path / "s")]
    with ProxyProcess([*args, "--admit-min-encode-ms", "1e9"], tmp_path / "v.log") as proxy:
        first = chat(proxy.base_url, [image_part(image)], "Not kept.")
        second = chat(proxy.base_url, [image_part(image)], "Still not kept.")
        metrics = httpx.get(f"{proxy.base_url}/vcache/metrics", timeout=30).text
    assert (cache(first)["misses"], cache(second)["misses"]) == (1, 1)
    assert exports_logged(direct.log_text(), sha) == 1
    assert second.timings["media_embedding_n"] == 0  # encoded by the server, as without vcache
    assert "vcache_not_admitted_total 1.0" in metrics


@pytest.mark.server
def test_exports_nobody_asked_for_are_deleted_where_they_lie(
    direct: LlamaServer, tmp_path: Path
) -> None:
    """Images declined earlier go as sent beside a new one that leads an export: upstream
    exports them too, and the proxy deletes what it did not ask for, over HTTP when it does
    not share upstream's directory (even with --transport file)."""
    (a, _), (b, _), (c, _) = picture(9), picture(10), picture(11)
    args = ["--upstream", direct.base_url, "--store", str(tmp_path / "s"), "--transport", "file"]
    directory = Path(direct.args[direct.args.index("--image-embedding-dir") + 1])
    with ProxyProcess([*args, "--admit-min-encode-ms", "1e9"], tmp_path / "v.log") as proxy:
        chat(proxy.base_url, [image_part(a), image_part(b)], "Two.")  # exported, declined
        got = chat(proxy.base_url, [image_part(a), image_part(b), image_part(c)], "Three.")
        deadline = time.monotonic() + 10
        while left_in(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert cache(got)["misses"] == 3
    assert left_in(directory) == []


# --- the parts, without servers --------------------------------------------------------------


def test_export_names_are_read_from_the_header_and_nothing_else() -> None:
    a, b = "a" * 64, "b" * 64
    value = f"encoded/{a}-0123456789abcdef.json ../etc/passwd encoded/{b}-0123456789abcdef.json"
    assert exported_names(value) == {
        a: f"encoded/{a}-0123456789abcdef.json",
        b: f"encoded/{b}-0123456789abcdef.json",
    }
    assert exported_names("none") == exported_names(None) == {}
    assert export_name(a, "0123456789abcdef") == f"encoded/{a}-0123456789abcdef.json"


def test_the_directory_is_shared_only_where_the_token_is_found(tmp_path: Path) -> None:
    token = "f" * 32
    name = f"encoded/server-{token}.id"
    theirs = EmbeddingDir("/elsewhere/", token, name)
    assert not shares_dir(tmp_path, theirs)  # no token file: another machine's directory
    (tmp_path / "encoded").mkdir()
    (tmp_path / name).write_text(token + "\n")
    assert shares_dir(tmp_path, theirs)
    assert not shares_dir(tmp_path, EmbeddingDir("/x/", "e" * 32, name))  # another token
    assert not shares_dir(tmp_path, EmbeddingDir("/x/", token, "../" + name))  # not its shape
    assert not shares_dir(tmp_path, EmbeddingDir("/x/"))  # upstream could not write there
    assert not shares_dir(tmp_path, None)


def _export(directory: Path, payload: bytes, *, xxh3: str | None = None) -> str:
    import base64

    import orjson
    import xxhash

    sha = "c" * 64
    name = export_name(sha, "0123456789abcdef")
    (directory / "encoded").mkdir(exist_ok=True)
    payload_name = name.replace(".json", ".f32")
    (directory / payload_name).write_bytes(payload)
    package = {
        "version": 1,
        "mmproj": "xxh3-128:00000000000000000000000000000000:1",
        "n_embd": 4,
        "dtype": "f32",
        "id": sha,
        "image": {"nx": 8, "ny": 8},
        "chunks": [{"n_tokens": 2, "meta": base64.b64encode(b"meta").decode()}],
        "file": {
            "path": payload_name,
            "offset": 0,
            "length": 32,
            "xxh3": xxh3 or xxhash.xxh3_64_hexdigest(payload[:32]),
        },
    }
    doc = {"media_embedding": package, "timings": {"encode_ms": 12.5}}
    (directory / name).write_bytes(orjson.dumps(doc))
    return name


def test_an_export_is_read_with_its_checksum_checked(tmp_path: Path) -> None:
    name = _export(tmp_path, bytes(range(32)))
    encoded = read_export(tmp_path, name)
    assert (encoded.payload, encoded.encode_ms, encoded.header.n_tokens) == (
        bytes(range(32)),
        12.5,
        2,
    )
    name = _export(tmp_path, bytes(range(32)), xxh3="0" * 16)
    with pytest.raises(PackageError, match="checksum"):
        read_export(tmp_path, name)
    name = _export(tmp_path, bytes(16))  # short payload
    with pytest.raises(PackageError):
        read_export(tmp_path, name)
    with pytest.raises(PackageError, match="not an export name"):
        read_export(tmp_path, "encoded/../../x.json")


def test_stale_exports_are_swept_and_fresh_ones_kept(tmp_path: Path) -> None:
    import os

    name = _export(tmp_path, bytes(32))
    token = tmp_path / "encoded" / ("server-" + "f" * 32 + ".id")
    token.write_text("token")
    old = tmp_path / "encoded" / ("d" * 64 + "-0123456789abcdef.f32")
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert sweep_exports(tmp_path, older_than_s=3600) == 1
    assert not old.exists() and token.exists() and (tmp_path / name).exists()


def test_admission_by_encode_time_and_size() -> None:
    auto = Admission()
    assert auto.admits(encode_ms=0.0, nbytes=10**9, by_file=False)  # not measured: kept
    assert not auto.admits(encode_ms=1.0, nbytes=18_600_000, by_file=False)
    assert auto.admits(encode_ms=1000.0, nbytes=18_600_000, by_file=False)
    assert auto.threshold_ms(18_600_000, by_file=True) < auto.threshold_ms(18_600_000, False)
    assert Admission(min_encode_ms=0.0).admits(0.001, 10**9, by_file=False)
    assert not Admission(min_encode_ms=50.0).admits(49.0, 1, by_file=True)
    assert HitCost(1.0, 2.0).ms(3_000_000) == 7.0
    declined = Declined(size=2)
    for key in ("a", "b", "c"):
        declined.add(key)
    assert "a" not in declined and "c" in declined and len(declined) == 2


def test_a_request_that_leads_an_export_never_waits_for_another() -> None:
    caps = Capabilities(packages=True, export=True, encoder_id="0" * 16)
    namespace = Namespace.for_encoder(model="", mmproj="m", build="b", format_version=1, encoder={})

    async def run() -> tuple[bool, bool, bool]:
        leads, follows = ExportBatch(2), ExportBatch(1)
        ticket = leads.ticket(namespace.key("a" * 64), namespace, "image", caps)
        assert ticket is not None
        assert leads.ticket(namespace.key("a" * 64), namespace, "image", caps) is None
        ticket.leading = True
        leads.classified()
        leads.classified()
        follows.classified()
        leads.settle(
            "encoded/"
            + "a" * 64
            + "-"
            + "0" * 16
            + ".json encoded/"
            + "b" * 64
            + "-"
            + "0" * 16
            + ".json"
        )
        return (
            await leads.may_wait(),
            await follows.may_wait(),
            ticket.exported.result() is not None,
        )

    assert asyncio.run(run()) == (False, True, True)
