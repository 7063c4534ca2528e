"""Warm-up, named references and reference packs (issue: warm-up and named references)."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import vision_cache
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import chat, image_part
from vision_cache.store import Store
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


def distinct_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` small, clearly different PNGs (random blocks of colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize((64, 64), Image.Resampling.NEAREST)
        path = folder / f"img-{i:03d}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


@pytest.fixture
def managed_proxy(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path: Path,
) -> Iterator[Callable[..., ProxyProcess]]:
    """managed_proxy(*extra args) -> a started proxy managing a patched gemma3 server."""
    started: list[ProxyProcess] = []

    def start(*extra: str, store: Path | None = None) -> ProxyProcess:
        files = tiny_model("gemma3")
        store = store or tmp_path / f"store-{len(started)}"
        args = [
            "--store",
            str(store),
            *extra,
            "--llama-server",
            str(patched_bin),
            "--",
            "-m",
            str(files.model),
            "--mmproj",
            str(files.mmproj),
            "-t",
            "2",
            "-c",
            "4096",
            "--no-warmup",
        ]
        p = ProxyProcess(args, tmp_path / f"proxy-{len(started)}.log")
        p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _warm_cli(proxy: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "warm", "--proxy", proxy, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_warm_100_images_then_skip_them(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proxy = managed_proxy()
    distinct_images(tmp_path / "refs", 100)
    first = _warm_cli(proxy.base_url, str(tmp_path / "refs"))
    assert first.returncode == 0, first.stderr
    assert "100/100" in first.stderr
    assert "img/s" in first.stderr
    started = time.monotonic()
    second = vision_cache.warm([tmp_path / "refs"], proxy=proxy.base_url)
    elapsed = time.monotonic() - started
    assert second.count("skipped") == 100
    assert second.count("encoded") == 0
    assert elapsed < 2.0, f"second run took {elapsed:.2f} s"
    with Store.open(tmp_path / "store-0") as store:
        entries = list(store.iter_entries())
    assert len(entries) == 100
    assert all(e.pinned for e in entries)


def test_interrupted_warm_resumes_without_reencoding(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proxy = managed_proxy()
    # Enough images that the interrupt always lands mid-run: a tiny-model encode takes a few
    # milliseconds, and 40 once finished between seeing 5 done and the signal arriving.
    total = 200
    distinct_images(tmp_path / "refs", total, seed=1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "warm",
            "--proxy",
            proxy.base_url,
            "--jobs",
            "1",
            str(tmp_path / "refs"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 60
    while _misses(proxy) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    time.sleep(0.5)  # let an encode in flight at the interrupt land, or be dropped
    done = _stored(tmp_path / "store-0")
    print(f"interrupted after {done} of {total}")
    assert 5 <= done < total
    report = vision_cache.warm([tmp_path / "refs"], proxy=proxy.base_url)
    # what finished is never encoded again; only the rest is
    assert report.count("skipped") == done
    assert report.count("encoded") == total - done
    assert _stored(tmp_path / "store-0") == total
    # at most the one encode cut short by the interrupt was spent twice
    assert _misses(proxy) <= total + 1


def _default_sigint() -> None:
    # Ignoring and blocking both survive exec: a suite started in the background (`make test &`,
    # nohup) has SIGINT ignored, and its child then never sees the Ctrl-C this test sends (a
    # background run once saw the warm-up finish all 200 images).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stored(store_dir: Path) -> int:
    with Store.open(store_dir) as store:
        return sum(1 for _ in store.iter_entries())


def _misses(proxy: ProxyProcess) -> int:
    text = httpx.get(f"{proxy.base_url}/vcache/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("vcache_encode_seconds_count"):
            return int(float(line.split()[1]))
    return 0


def test_named_reference_is_token_identical_to_the_bytes(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proxy = managed_proxy()
    # the managed llama-server itself, for the direct answer
    upstream = httpx.get(f"{proxy.base_url}/vcache/health", timeout=10).json()["upstream"]
    png = tmp_path / "cat.png"
    png.write_bytes(sample_image("shapes_640x480").encode("PNG"))
    report = vision_cache.warm([], proxy=proxy.base_url, names={"cat": png})
    assert report.refs == {"cat": "vcache://cat"}
    via_name = chat(proxy.base_url, [image_part("vcache://cat")], "Describe the cat.")
    direct = chat(
        upstream, [image_part(sample_image("shapes_640x480").data_url("PNG"))], "Describe the cat."
    )
    assert via_name.tokens == direct.tokens
    other = chat(
        proxy.base_url, [image_part(sample_image("noise_512x512").data_url())], "Describe the cat."
    )
    assert other.tokens != direct.tokens
    r = httpx.post(
        f"{proxy.base_url}/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": [image_part("vcache://dog")]}]},
    )
    assert r.status_code == 400
    assert "vcache://dog" in r.json()["error"]["message"]


def test_pinned_references_survive_a_flood(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    # tiny gemma3 packages are 32 KiB: a 1 MiB disk tier holds 32 of them
    proxy = managed_proxy("--disk-gb", str(1 / 1024), "--hot-mb", "0")
    refs = distinct_images(tmp_path / "refs", 5, seed=2)
    vision_cache.warm(refs, proxy=proxy.base_url)
    flood = distinct_images(tmp_path / "flood", 320, seed=3)  # 10x the budget
    report = vision_cache.warm(flood, proxy=proxy.base_url, pin=False, jobs=2)
    assert report.count("failed") == 0
    again = vision_cache.warm(refs, proxy=proxy.base_url)
    assert again.count("skipped") == 5, [i.status for i in again.items]
    with Store.open(tmp_path / "store-0") as store:
        entries = list(store.iter_entries())
    assert sum(e.pinned for e in entries) == 5
    assert len(entries) < 60


def test_export_import_then_requests_hit(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    a = managed_proxy()
    refs = distinct_images(tmp_path / "refs", 3, seed=4)
    vision_cache.warm([], proxy=a.base_url, names={"first": refs[0]})
    vision_cache.warm(refs[1:], proxy=a.base_url)
    pack = tmp_path / "refs.vcpack"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "export", str(pack), "--store", str(tmp_path / "store-0")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    b = managed_proxy(store=tmp_path / "store-b")
    imp = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "import",
            str(pack),
            "--proxy",
            b.base_url,
            "--store",
            str(tmp_path / "store-b"),
        ],
        capture_output=True,
        text=True,
    )
    assert imp.returncode == 0, imp.stdout + imp.stderr
    assert "imported 3 entries" in imp.stdout
    url = "data:image/png;base64," + base64.b64encode(refs[1].read_bytes()).decode()
    r = chat(b.base_url, [image_part(url)], "What is it?")
    assert "hits=1" in r.headers["x-vcache"]
    named = chat(b.base_url, [image_part("vcache://first")], "What is it?")
    assert "hits=1" in named.headers["x-vcache"]


def test_import_refuses_a_foreign_namespace(
    managed_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proxy = managed_proxy()
    store_dir = tmp_path / "other"
    from vision_cache.client.pack import export_pack
    from vision_cache.keys import Namespace

    ns = Namespace.for_encoder(
        model="", mmproj="xxh3-128:" + "1" * 32 + ":1", build="b", format_version=1, encoder={}
    )
    with Store.open(store_dir) as store:
        store.register_namespace(ns)
        assert store.put(ns.key("a" * 64), b"{}", b"\0" * 64, pin=True) is not None
        export_pack(store, tmp_path / "foreign.vcpack")
    imp = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "import",
            str(tmp_path / "foreign.vcpack"),
            "--proxy",
            proxy.base_url,
            "--store",
            str(tmp_path / "store-0"),
        ],
        capture_output=True,
        text=True,
    )
    assert imp.returncode == 1
    assert "do not match" in imp.stderr
