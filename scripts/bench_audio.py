#!/usr/bin/env python3
"""Audio benchmark: time to first token for a 30 s clip, stock llama-server against vcache.

Arms, each request with text never sent before (so llama-server's prompt cache cannot skip the
clip):

  stock  the raw clip straight to the stock llama-server (its encoder runs every time)
  miss   through vcache in front of the patched server, a new clip each time (encode, store)
  hit    through vcache, the first miss's clip again (its package is decoded; no encoder)

The clip is 29.9 s of 16 kHz audio: one Whisper window. (llama.cpp pads a clip with 30 s of
silence and keeps whole 3,000-frame windows, so a clip of exactly 30.0 s already makes two.)

Fairness: both servers run the same build flags and arguments, and each gets one untimed
text-only request before timing starts (first-request costs: page-ins, buffer allocation;
each encoder's first run is timed alike, in the first stock request and the first miss). The
arms are interleaved (a stock request, a miss, a few hits, then again), so a change of machine
load during the run falls on every arm alike rather than on whichever arm ran then. Besides
the wall-clock time to first token, each request records the CPU time llama-server spent on
it (from /proc): on a shared machine that is the figure load does not inflate.

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

from scripts.bench_doc import write_section
from tests.support.llama_server import LlamaServer, built_binary
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic.audio import SampleClip, window_clip
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent

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
    prompt_ms: float | None  # llama-server's own prompt time (the encoder's included, if it ran)
    cpu_s: float | None  # CPU time llama-server spent on the request, all its threads


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None where unavailable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_stream(
    client: httpx.Client, base: str, payload: dict[str, object], pid: int | None
) -> Sample:
    """One streamed request: milliseconds to the first content chunk, X-Vcache, the server's
    prompt time and the CPU time of the llama-server process `pid` over the request."""
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    first: float | None = None
    prompt_ms: float | None = None
    # llama-server closes the connection after a stream: one connection per stream
    with client.stream(
        "POST", f"{base}/v1/chat/completions", json=payload, headers={"Connection": "close"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or [{}]
            if first is None and choices[0].get("delta", {}).get("content"):
                first = time.perf_counter()
            if "timings" in chunk:
                prompt_ms = float(chunk["timings"].get("prompt_ms", 0.0))
        cache = r.headers.get("x-vcache", "")
    cpu_after = cpu_seconds(pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Sample(((first or time.perf_counter()) - started) * 1000, cache, prompt_ms, cpu)


def body(text: str, clip: SampleClip | None) -> dict[str, object]:
    content: list[dict[str, object]] = [{"type": "text", "text": text}]
    if clip is not None:
        content.append(
            {"type": "input_audio", "input_audio": {"data": clip.base64(), "format": "wav"}}
        )
    return {
        "stream": True,
        "temperature": 0,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": content}],
        "stream_options": {"include_usage": True},
    }


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    base: str  # where the requests go
    pid: int | None  # the llama-server doing the work, for its CPU time
    clip: Callable[[int], SampleClip]


def schedule(plan: Plan) -> list[tuple[str, int]]:
    """Interleaved order: each round one stock request, one miss and its share of the hits."""
    hits = iter(range(plan.fast))
    per_round = -(-plan.fast // plan.slow)
    order: list[tuple[str, int]] = []
    for r in range(plan.slow):
        order += [("stock", r), ("miss", r)]
        order += [("hit", i) for i in itertools.islice(hits, per_round)]
    return order + [("hit", i) for i in hits]


def run_arms(arms: dict[str, Arm], order: list[tuple[str, int]]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {name: [] for name in arms}
    with httpx.Client(timeout=3600) as client:
        for name, i in order:
            arm = arms[name]
            sample = timed_stream(client, arm.base, body(question(i), arm.clip(i)), arm.pid)
            out[name].append(sample)
            cpu = f"{sample.cpu_s:,.1f} s" if sample.cpu_s is not None else "-"
            print(
                f"  {name} {i + 1}: ttft {sample.ttft_ms:,.0f} ms  server cpu {cpu}  "
                f"load {os.getloadavg()[0]:.1f}  {sample.cache}",
                flush=True,
            )
    return out


def warm_up(arms: list[Arm]) -> None:
    """Untimed, a text-only request through each arm: the first request's costs (page-ins,
    buffer allocation) stay out of the figures. No clip: each encoder's first run is timed
    alike (the first stock request and the first miss)."""
    with httpx.Client(timeout=3600) as client:
        for arm in arms:
            sample = timed_stream(client, arm.base, body(question(0), None), arm.pid)
            print(f"  warm-up {arm.name}: {sample.ttft_ms:,.0f} ms", flush=True)


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


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def section(
    plan: Plan,
    arms: dict[str, list[Sample]],
    threads: int,
    nbytes: int,
    enc: float,
    load: tuple[str, str],
    commit: str,
) -> str:
    med = {k: statistics.median(s.ttft_ms for s in v) for k, v in arms.items()}
    cpu = {k: _median([s.cpu_s for s in v]) for k, v in arms.items()}
    prompt = {k: _median([s.prompt_ms for s in v]) for k, v in arms.items()}

    def num(x: float | None, fmt: str = ",.0f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = [
        f"| {k} | {len(v)} | {med[k]:,.0f} | {min(s.ttft_ms for s in v):,.0f} | "
        f"{max(s.ttft_ms for s in v):,.0f} | {num(prompt[k])} | {num(cpu[k], ',.1f')} |"
        for k, v in arms.items()
    ]
    cpu_ratio = ""
    if cpu["stock"] and cpu["hit"]:
        cpu_ratio = (
            f" In llama-server CPU time per request: stock {cpu['stock']:,.1f} s, "
            f"hit {cpu['hit']:,.1f} s (**{cpu['stock'] / cpu['hit']:.1f}x**)."
        )
    return "\n".join(
        [
            f"### Audio: a 29.9 s clip, {FAMILY} {plan.size} (Whisper window of 750 tokens)",
            "",
            f"Commit {commit}; llama-server `-t {threads}`, arms interleaved. "
            f"Load average (1/5/15 min) before the run: {load[0]}, after: {load[1]}. "
            f"One encode of the clip: {enc:,.0f} ms. Package: {nbytes:,} bytes (f32).",
            "",
            "| arm | requests | median TTFT (ms) | min | max | server prompt ms (median) "
            "| llama-server CPU s (median) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Hit vs stock: **{med['stock'] / med['hit']:.1f}x** faster to first token "
            f"(miss vs stock: {med['stock'] / med['miss']:.2f}x).{cpu_ratio}",
        ]
    )


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
    stock_clip = window_clip(variant=0)
    hit_clip = window_clip(variant=1)  # the first miss stores it; the hits come after that
    with tempfile.TemporaryDirectory() as tmp, servers(plan.size, Path(tmp), args.threads) as s:
        arms = {
            "stock": Arm("stock", s.stock.base_url, s.stock.pid, lambda i: stock_clip),
            "miss": Arm(
                "miss", s.proxy.base_url, s.patched.pid, lambda i: window_clip(variant=i + 1)
            ),
            "hit": Arm("hit", s.proxy.base_url, s.patched.pid, lambda i: hit_clip),
        }
        warm_up([arms["stock"], arms["miss"]])
        samples = run_arms(arms, schedule(plan))
        nbytes, enc = encode_once(s.patched.base_url, hit_clip)
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = section(plan, samples, args.threads, nbytes, enc, (load, after), commit)
    print(text)
    if not args.no_write:
        write_section(f"bench_audio:{plan.size}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
