#!/usr/bin/env python3
"""Text-only latency while other clients send big images: does anyone wait for another's image?

One process tree: the fault upstream playing a patched llama-server (it answers at once, so
what is measured is the proxy, not a model), one vcache in front of it, N sender processes
each posting an 8 MB PNG to vcache in a loop (cache hits after the first), and a prober that
sends text-only chat requests alternately straight to the upstream ("direct") and through
vcache, one at a time. Reported per N: text p50 and p99 both ways, the difference, and the
images per second the senders got through. N = 0 is the idle baseline.

    python -m scripts.bench_load                      # N = 0, 4, 16; 20 s each (make bench)
    python -m scripts.bench_load --clients 4 --seconds 5 --no-write
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.bench_doc import write_section
from tests.support.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent

TEXT_BODY = json.dumps(
    {"max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "Say one word."}]}
).encode()


def big_png(megabytes: float = 8.0) -> bytes:
    """An incompressible PNG of about `megabytes` MB (stored, not deflated)."""
    side = int((megabytes * 1e6 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def image_body(png: bytes) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps(
        {
            "max_tokens": 1,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        }
    ).encode()


class Connection:
    """One keep-alive HTTP/1.1 connection; `post` returns status and elapsed milliseconds."""

    def __init__(self, base_url: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)

    def post(self, path: str, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        self._conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = self._conn.getresponse()
        resp.read()
        return resp.status, (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self._conn.close()


def sender(base_url: str, body_path: str, until: float, counts: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """A client that posts the same big image body until `until` (time.time())."""
    body = Path(body_path).read_bytes()
    conn, sent, failed = Connection(base_url), 0, 0
    while time.time() < until:
        status, _ = conn.post("/v1/chat/completions", body)
        sent, failed = sent + 1, failed + (status != 200)
    conn.close()
    counts.put((sent, failed))


@dataclasses.dataclass(frozen=True)
class LoadResult:
    clients: int
    seconds: float
    direct: list[float]
    vcache: list[float]
    images: int
    image_errors: int
    load: tuple[float, float]  # 1-minute load average at the start and the end

    def pct(self, side: list[float], q: float) -> float:
        return float(np.percentile(side, q))


def probe(direct: str, vcache: str, seconds: float) -> tuple[list[float], list[float]]:
    """Text-only requests, alternating sides, one at a time, with a short pause between."""
    d, v = Connection(direct), Connection(vcache)
    times: tuple[list[float], list[float]] = ([], [])
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for conn, out in ((d, times[0]), (v, times[1])):
                status, ms = conn.post("/v1/chat/completions", TEXT_BODY)
                if status != 200:
                    raise RuntimeError(f"text request answered {status}")
                out.append(ms)
            time.sleep(0.002)
    finally:
        d.close()
        v.close()
    return times


def run_load(direct: str, vcache: str, body_path: Path, clients: int, seconds: float) -> LoadResult:
    ctx = multiprocessing.get_context("spawn")
    counts: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    warm = Connection(vcache)
    status, _ = warm.post("/v1/chat/completions", body_path.read_bytes())  # the one miss
    warm.close()
    if status != 200:
        raise RuntimeError(f"the image request answered {status}")
    load0 = os.getloadavg()[0]
    until = time.time() + seconds + 1.5
    procs = [
        ctx.Process(target=sender, args=(vcache, str(body_path), until, counts))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every sender under way
    direct_ms, vcache_ms = probe(direct, vcache, seconds)
    results = [counts.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return LoadResult(
        clients,
        seconds,
        direct_ms,
        vcache_ms,
        sum(r[0] for r in results),
        sum(r[1] for r in results),
        (load0, os.getloadavg()[0]),
    )


@contextmanager
def fake_upstream(tmp: Path) -> Iterator[str]:
    """The fault upstream as a patched server, in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fault_upstream", "--packages"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("the fault upstream did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


TARGET_P99_MS = 2.0  # vcache's text p99 within this of direct's, under the same load


def table(results: list[LoadResult]) -> list[str]:
    lines = [
        "| image clients | images/s | text n | direct p50 / p99 | vcache p50 / p99 | "
        "vcache / direct, p50 / p99 | p99 within 2 ms of direct's | load (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        dp50, dp99, vp50, vp99 = (
            r.pct(r.direct, 50),
            r.pct(r.direct, 99),
            r.pct(r.vcache, 50),
            r.pct(r.vcache, 99),
        )
        met = "met" if vp99 - dp99 <= TARGET_P99_MS else f"**missed** (+{vp99 - dp99:.2f} ms)"
        lines.append(
            f"| {r.clients} | {r.images / r.seconds:.1f} | {len(r.direct)} | "
            f"{dp50:.2f} / {dp99:.2f} ms | {vp50:.2f} / {vp99:.2f} ms | "
            f"{vp50 / dp50:.2f} / {vp99 / dp99:.2f} | {met} | "
            f"{r.load[0]:.1f} to {r.load[1]:.1f} |"
        )
    return lines


def section(results: list[LoadResult], commit: str, image_mb: float) -> str:
    return "\n".join(
        [
            "## Text requests while others send big images",
            "",
            f"`python -m scripts.bench_load` at {commit}, {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPU cores. vcache in front of the fault upstream playing a patched "
            "llama-server (it answers at once: what is measured is the proxy); N sender processes "
            f"each post a {image_mb:g} MB PNG through vcache in a loop (cache hits after the "
            "first), while one client sends text-only chat requests, one at a time, alternately "
            "straight to the upstream and through vcache. Everything shares the machine's cores, "
            "so the senders slow both sides alike.",
            "",
            *table(results),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--clients",
        type=int,
        action="append",
        help="image clients (repeatable; default 0, 4 and 16)",
    )
    p.add_argument("--seconds", type=float, default=20.0, help="probing time per N")
    p.add_argument("--image-mb", type=float, default=8.0)
    p.add_argument("--no-write", action="store_true", help="print, leave docs alone")
    args = p.parse_args(argv)
    clients = args.clients or [0, 4, 16]
    commit = (
        subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        ).stdout.strip()
        or "unknown"
    )
    with tempfile.TemporaryDirectory(prefix="vcache-load-") as tmp_, ExitStack() as stack:
        tmp = Path(tmp_)
        body_path = tmp / "image.json"
        body_path.write_bytes(image_body(big_png(args.image_mb)))
        direct = stack.enter_context(fake_upstream(tmp))
        proxy = stack.enter_context(
            ProxyProcess(
                ["--upstream", direct, "--store", str(tmp / "store"), "--log-level", "warning"],
                tmp / "proxy.log",
            )
        )
        results = []
        for n in clients:
            results.append(run_load(direct, proxy.base_url, body_path, n, args.seconds))
            print("\n".join(table(results)[-1:]), flush=True)
    text = section(results, commit, args.image_mb)
    print(text)
    if not args.no_write:
        write_section("bench_load", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
