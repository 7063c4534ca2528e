"""The local encoder worker (proxy.lookup.local_encoder): packages identical to the patched
server's own.

Every equivalence carries a negative control: another image, a perturbed package, so a worker
that returned the same embeddings for everything, or a server that ignored packages, fails.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from proxy.lookup.local_encoder import (
    LocalEncoder,
    LocalEncoderConfig,
    LocalEncoderRejected,
    LocalEncoderTimeout,
)
from proxy.upstream.client import Capabilities
from tests.support.llama_cpp_fixtures import IMAGES, OTHER_IMAGE, data_url, png
from tests.support.llama_server import LlamaServer
from tests.support.vlm_client import chat, encode, image_part, package_part, perturbed
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server


def test_packages_are_byte_identical_to_the_servers(
    patched_server: LlamaServer, local_encoder: LocalEncoder, runner: asyncio.Runner
) -> None:
    """Same mmproj, build and settings: same header and payload, byte for byte (1 worker
    thread against the server's 2), and therefore the same cache namespace."""
    base = patched_server.base_url
    for name in IMAGES:
        image = png(name)
        theirs = encode(base, data_url(image))["image_embedding"]
        ours = runner.run(local_encoder.encode(image, "image/png"))
        assert ours.header.inline(ours.payload) == theirs, name
        assert ours.encode_ms > 0
    props = httpx.get(f"{base}/props").json()
    assert local_encoder.namespace() == Capabilities.from_props(props, "").namespace
    # negative control: another image is another package
    other = runner.run(local_encoder.encode(png(OTHER_IMAGE)))
    assert other.payload != ours.payload


def test_worker_packages_decode_like_the_raw_image(
    patched_server: LlamaServer, local_encoder: LocalEncoder, runner: asyncio.Runner
) -> None:
    base = patched_server.base_url
    image = png("shapes_640x480")
    encoded = runner.run(local_encoder.encode(image))
    package = encoded.header.inline(encoded.payload)

    raw = chat(base, [image_part(data_url(image))])
    via_package = chat(base, [package_part(package)])

    assert len(raw.tokens) >= 16
    assert via_package.tokens == raw.tokens
    assert via_package.timings["media_encoded_n"] == 0
    assert via_package.timings["media_embedding_n"] == encoded.header.n_tokens
    # negative controls: another image, and the same package with one value changed
    assert chat(base, [image_part(data_url(png(OTHER_IMAGE)))]).tokens != raw.tokens
    tampered = chat(base, [package_part(perturbed(package))])
    assert tampered.tokens != raw.tokens or tampered.max_logprob_diff(raw) > 1e-3


def test_non_images_are_rejected_and_the_worker_keeps_serving(
    local_encoder: LocalEncoder, runner: asyncio.Runner
) -> None:
    with pytest.raises(LocalEncoderRejected, match="failed to load image"):
        runner.run(local_encoder.encode(b"definitely not an image"))
    with pytest.raises(LocalEncoderRejected):
        runner.run(local_encoder.encode(png("shapes_640x480")[:200]))  # a truncated PNG
    assert runner.run(local_encoder.encode(png("shapes_640x480"))).header.n_tokens > 0


def _kill_workers(encoder: LocalEncoder) -> None:
    workers = [psutil.Process(pid) for pid in encoder.worker_pids()]
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    # wait for the zombies, never reap them: multiprocessing must see its children exit
    # (reaped behind its back, a child looks alive to it forever)
    deadline = time.monotonic() + 10
    while not all(_exited(w) for w in workers):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _exited(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True  # already reaped by multiprocessing


def test_a_worker_that_dies_while_idle_is_replaced_unnoticed(
    local_encoder: LocalEncoder, runner: asyncio.Runner
) -> None:
    _kill_workers(local_encoder)
    assert runner.run(local_encoder.encode(png("stripes_300x900"))).header.n_tokens > 0


def test_a_worker_that_dies_mid_encode_is_replaced_and_the_encodes_retried(
    local_encoder: LocalEncoder, runner: asyncio.Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash inside libmtmd kills a worker process, never the proxy: the encodes it held
    run again on a fresh worker, and give the same packages."""
    names = IMAGES * 3

    async def burst() -> list[bytes]:
        tasks = [asyncio.ensure_future(local_encoder.encode(png(name))) for name in names]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        _kill_workers(local_encoder)
        return [encoded.payload for encoded in await asyncio.gather(*tasks)]

    payloads = runner.run(burst())
    assert "retrying on a fresh one" in caplog.text
    expected = {name: runner.run(local_encoder.encode(png(name))).payload for name in IMAGES}
    assert payloads == [expected[name] for name in names]


def test_encoded_packages_are_f32_with_the_image_id(
    local_encoder: LocalEncoder, runner: asyncio.Runner
) -> None:
    import hashlib

    image = png("checkers_1024x256")
    encoded = runner.run(local_encoder.encode(image))
    wire = encoded.header.inline(encoded.payload)
    assert wire["id"] == hashlib.sha256(image).hexdigest()
    assert wire["dtype"] == "f32"
    assert len(base64.b64decode(wire["data"])) == encoded.header.payload_size
    assert local_encoder.namespace_components()["encoder"]["n_embd"] == encoded.header.n_embd


def test_an_encode_past_the_time_limit_ends_its_worker(
    lib_dir: Path, tiny_model: Callable[[str], ModelFiles], runner: asyncio.Runner
) -> None:
    """A native encode cannot be interrupted: past the limit its process is killed."""
    files = tiny_model("qwen2vl")
    config = LocalEncoderConfig(
        mmproj=files.mmproj, text_model=files.model, lib_dir=lib_dir, timeout_s=0.05
    )  # loading alone takes longer
    encoder = LocalEncoder(config)
    with pytest.raises(LocalEncoderTimeout, match="ran past"):
        runner.run(encoder.start())
    pids = encoder.worker_pids()
    runner.run(encoder.aclose())
    assert pids and not any(psutil.pid_exists(pid) for pid in pids)
