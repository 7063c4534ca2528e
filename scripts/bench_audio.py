#!/usr/bin/env python3
"""Audio benchmark: time to first token for a 30 s clip, stock llama-server against vcache.

Arms, each request with text never sent before (so llama-server's prompt cache cannot skip the
clip):

  stock  the raw clip straight to the stock llama-server (its encoder runs every time)
  miss   through vcache in front of the patched server, a new clip each time (encode, store)
  hit    through vcache, the same clip again (its package is decoded; no encoder)

The clip is 29.9 s of 16 kHz audio: one Whisper window. (llama.cpp pads a clip with 30 s of
silence and keeps whole 3,000-frame windows, so a clip of exactly 30.0 s already makes two.)
Writes its section of docs/benchmarks.md::

    python -m scripts.bench_audio --size tiny         # make bench-quick
    python -m scripts.bench_audio --size realistic    # make bench: Whisper-large encoder
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.support.llama_server import LlamaServer, built_binary
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic.audio import SampleClip, window_clip
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "benchmarks.md"
FAMILY = "qwen2audio"


@dataclasses.dataclass(frozen=True)
class Plan:
    size: str
    slow: int  # requests per arm that encode
    fast: int  # hits


PLANS = {"tiny": Plan("tiny", 5, 10), "realistic": Plan("realistic", 3, 10)}


def binary(variant: str) -> Path:
    """VCACHE_LLAMA_SERVER_<VARIANT> if set (another build), else this repository's."""
    return built_binary(variant)


_ASKED = itertools.count()
VERBS = ("describe", "summarise", "transcribe", "name the instruments in")


def question(i: int) -> str:
    """Text never sent before in this run, of one length: a repeated prefix ending at the clip
    would let llama-server's prompt cache skip the clip, encoder and all, on any arm."""
    return f"Question {next(_ASKED):06d}: {VERBS[i % len(VERBS)]} this recording."


def default_threads() -> int:
    """All cores but one: the client and the proxy need one too (see bench_e2e.py)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclasses.dataclass(frozen=True)
class Sample:
    ttft_ms: float
    cache: str


def timed_stream(client: httpx.Client, base: str, payload: dict[str, object]) -> Sample:
    """One streamed request: milliseconds to the first content chunk, and X-Vcache."""
    started = time.perf_counter()
    first: float | None = None
    # llama-server closes the connection after a stream: one connection per stream
    with client.stream(
        "POST", f"{base}/v1/chat/completions", json=payload, headers={"Connection": "close"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter()
        cache = r.headers.get("x-vcache", "")
    return Sample(((first or time.perf_counter()) - started) * 1000, cache)


def body(text: str, clip: SampleClip) -> dict[str, object]:
    part = {"type": "input_audio", "input_audio": {"data": clip.base64(), "format": "wav"}}
    return {
        "stream": True,
        "temperature": 0,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, part]}],
        "stream_options": {"include_usage": True},
    }


def run_arm(base: str, n: int, clip: Callable[[int], SampleClip], label: str) -> list[Sample]:
    out = []
    with httpx.Client(timeout=1800) as client:
        for i in range(n):
            sample = timed_stream(client, base, body(question(i), clip(i)))
            out.append(sample)
            print(
                f"  {label} {i + 1}/{n}: ttft {sample.ttft_ms:,.0f} ms  {sample.cache}", flush=True
            )
    return out


@dataclasses.dataclass
class Servers:
    stock: LlamaServer
    patched: LlamaServer
    proxy: ProxyProcess


@contextmanager
def servers(size: str, tmp: Path, threads: int) -> Iterator[Servers]:
    models = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    files = generate(FAMILY, size, 0, models)  # type: ignore[arg-type]
    common = [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        str(threads),
        "-c",
        "8192",
        "-np",
        "1",
        "--no-warmup",
    ]
    with ExitStack() as stack:
        stock = stack.enter_context(
            LlamaServer(binary("stock"), common, tmp / "stock.log", startup_timeout=900)
        )
        patched = stack.enter_context(
            LlamaServer(
                binary("patched"),
                [*common, "--image-embedding"],
                tmp / "patched.log",
                startup_timeout=900,
            )
        )
        proxy = stack.enter_context(
            ProxyProcess(
                [
                    "--upstream",
                    patched.base_url,
                    "--store",
                    str(tmp / "store"),
                    "--transport",
                    "inline",
                    "--log-level",
                    "warning",
                ],
                tmp / "proxy.log",
            )
        )
        yield Servers(stock, patched, proxy)


def encode_once(base: str, clip: SampleClip) -> tuple[int, float]:
    """The clip's package size (f32) and encoder time, from the patched server's encode."""
    r = httpx.post(
        f"{base}/media/embedding", json={"input_audio": {"data": clip.base64()}}, timeout=1800
    )
    r.raise_for_status()
    answer = r.json()
    return (
        len(base64.b64decode(answer["media_embedding"]["data"])),
        float(answer["timings"]["encode_ms"]),
    )


def section(
    plan: Plan, arms: dict[str, list[Sample]], nbytes: int, enc: float, load: str, commit: str
) -> str:
    med = {k: statistics.median(s.ttft_ms for s in v) for k, v in arms.items()}
    rows = [
        f"| {k} | {len(v)} | {med[k]:,.0f} | {min(s.ttft_ms for s in v):,.0f} | "
        f"{max(s.ttft_ms for s in v):,.0f} |"
        for k, v in arms.items()
    ]
    return "\n".join(
        [
            f"### Audio: a 29.9 s clip, {FAMILY} {plan.size} (Whisper window of 750 tokens)",
            "",
            f"Commit {commit}; load average before the run: {load}. "
            f"One encode of the clip: {enc:,.0f} ms. Package: {nbytes:,} bytes (f32).",
            "",
            "| arm | requests | median TTFT (ms) | min | max |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Hit vs stock: **{med['stock'] / med['hit']:.1f}x** faster to first token "
            f"(miss vs stock: {med['stock'] / med['miss']:.2f}x).",
        ]
    )


def write_section(text: str, size: str) -> None:
    start, end = f"<!-- bench_audio:{size}:start -->", f"<!-- bench_audio:{size}:end -->"
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size", choices=sorted(PLANS), default="tiny")
    p.add_argument("--slow", type=int, help="requests per encoding arm")
    p.add_argument("--fast", type=int, help="hits")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--no-write", action="store_true", help="print, do not touch the docs")
    args = p.parse_args(argv)
    plan = PLANS[args.size]
    plan = dataclasses.replace(plan, slow=args.slow or plan.slow, fast=args.fast or plan.fast)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
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
    same = window_clip(variant=0)
    with tempfile.TemporaryDirectory() as tmp, servers(plan.size, Path(tmp), args.threads) as s:
        arms = {
            "stock": run_arm(s.stock.base_url, plan.slow, lambda i: same, "stock"),
            "miss": run_arm(
                s.proxy.base_url, plan.slow, lambda i: window_clip(variant=i + 1), "miss"
            ),
        }
        run_arm(s.proxy.base_url, 1, lambda i: same, "warm")
        t0 = time.perf_counter()
        arms["hit"] = run_arm(s.proxy.base_url, plan.fast, lambda i: same, "hit")
        print(f"hits took {time.perf_counter() - t0:.1f} s", flush=True)
        nbytes, enc = encode_once(s.patched.base_url, same)
    text = section(plan, arms, nbytes, enc, load, commit)
    print(text)
    if not args.no_write:
        write_section(text, plan.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
