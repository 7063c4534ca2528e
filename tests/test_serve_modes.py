"""`vcache serve --encoder local` and `--backend llama-cpp-python`, through the real command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.cli.config import ServeSettings
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import chat, image_part
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server


def test_local_encoder_serves_misses_without_upstream_encoding(
    patched_gemma: LlamaServer,
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path: Path,
) -> None:
    files = tiny_model("gemma3")
    args = [
        "--upstream",
        patched_gemma.base_url,
        "--store",
        str(tmp_path / "s"),
        "--encoder",
        "local",
        "--model",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "--llama-lib-dir",
        str(patched_bin.parent),
    ]
    url = sample_image("checkers_1024x256").data_url()
    direct = chat(patched_gemma.base_url, [image_part(url)], "Local encoder, please.")
    with ProxyProcess(args, tmp_path / "p.log") as proxy:
        miss = chat(proxy.base_url, [image_part(url)], "Local encoder, please.")
        hit = chat(proxy.base_url, [image_part(url)], "Once more.")
    assert "misses=1" in miss.headers["x-vcache"]
    assert "hits=1" in hit.headers["x-vcache"]
    # the server decoded a package on the miss too: the worker encoded it
    assert miss.timings["media_encoded_n"] == 0
    assert miss.timings["media_embedding_n"] > 0
    assert miss.tokens == direct.tokens
    other = chat(
        patched_gemma.base_url,
        [image_part(sample_image("noise_512x512").data_url())],
        "Local encoder, please.",
    )
    assert other.tokens != direct.tokens


def test_llama_cpp_python_backend_through_the_command(
    tiny_model: Callable[[str], ModelFiles], patched_bin: Path, tmp_path: Path
) -> None:
    files = tiny_model("gemma3")
    args = [
        "--backend",
        "llama-cpp-python",
        "--model",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "--store",
        str(tmp_path / "s"),
        "--llama-lib-dir",
        str(patched_bin.parent),
    ]
    url = sample_image("shapes_640x480").data_url()
    with ProxyProcess(args, tmp_path / "p.log", health_path="/health") as proxy:
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "What is it?"}, image_part(url)],
                }
            ],
            "temperature": 0,
            "max_tokens": 12,
        }
        first = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120)
        second = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "llama-cpp-python"], "needs --model and --mmproj"),
        (["--upstream", "http://127.0.0.1:1", "--encoder", "local"], "--encoder local needs"),
        (
            [
                "--backend",
                "llama-cpp-python",
                "--model",
                "m",
                "--mmproj",
                "p",
                "--upstream",
                "http://u",
            ],
            "runs the model itself",
        ),
    ],
)
def test_inconsistent_modes_are_refused(args: list[str], message: str) -> None:
    from proxy.cli.config import load_settings, settings_error

    flags = {a[2:].replace("-", "_"): b for a, b in zip(args[::2], args[1::2], strict=True)}
    with pytest.raises(ValueError) as err:
        load_settings(flags)
    assert message in settings_error(err.value)


def test_managed_mode_takes_encoder_files_from_llama_args() -> None:
    s = ServeSettings(
        llama_server=Path("/bin/true"),
        encoder="local",
        llama_args=["-m", "model.gguf", "--mmproj=mmproj.gguf", "-t", "2"],
    )
    assert s.encoder_model == Path("model.gguf")
    assert s.encoder_mmproj == Path("mmproj.gguf")
    assert s.lib_dir == Path("/bin")


@pytest.mark.parametrize(("encoder", "expected"), [(None, "server"), ("local", "local")])
def test_managed_mode_has_the_server_encode_misses_unless_told_otherwise(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path: Path,
    encoder: str | None,
    expected: str,
) -> None:
    """By default the server encodes a miss once, for its own request, and exports the package
    (no encode round trip); `--encoder local` encodes it in vcache's workers (llama-cpp-python,
    which make test installs), taking model and mmproj from the server's arguments. Startup
    says which."""
    files = tiny_model("gemma3")
    args = [
        "--store",
        str(tmp_path / "s"),
        *(["--encoder", encoder] if encoder else []),
        "--llama-server",
        str(patched_bin),
        "--",
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        "1",
        "-np",
        "1",
    ]
    url = sample_image("stripes_300x900").data_url()
    with ProxyProcess(args, tmp_path / "p.log") as proxy:
        health = httpx.get(f"{proxy.base_url}/vcache/health", timeout=10).json()
        miss = chat(proxy.base_url, [image_part(url)], "Who encoded this?")
        log = proxy.log()
    assert health["encoder"] == expected
    assert f"encoder: {'llama-server' if expected == 'server' else '1 local worker'}" in log
    assert "misses=1" in miss.headers["x-vcache"]
    # the server decodes embeddings either way (an exported encode counts as a package) ...
    assert miss.timings["media_embedding_n"] > 0
    assert miss.timings["media_encoded_n"] == 0
    server_log = (tmp_path / "s" / "llama-server.log").read_text(errors="replace")
    # ... and encodes the image itself only by default, within the request, never in a
    # round trip of its own (/media/embedding)
    assert ("image_embedding: exporting image" in server_log) == (expected == "server")
    assert "image_embedding: encoded image" not in server_log
