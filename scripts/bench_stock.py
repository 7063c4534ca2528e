#!/usr/bin/env python3
"""vcache against stock llama-server at its best, and where its prompt cache cannot help.

llama-server keeps recent prompts (its slots, and with ``--cache-ram`` a RAM prompt cache), and
reuses an image that sits in an unchanged prefix on models whose image tokens are causal. So
some workloads need no cache in front of it, and some do. Each arm below replays one workload
twice, against a stock llama-server and through vcache (managed mode, the patched build, the
same arguments), and compares the time to first token of the requests that matter (the first
sight of each image is a miss for both and is reported apart):

  same-prefix      image first, a new question after it, a causal model: stock reuses the image
  text-before      new text before the same image: stock encodes it every time
  gemma3           the same-prefix workload on Gemma 3 (bidirectional image attention)
  order            two images, then the same two in the other order
  between-np1      another conversation (another image) between two turns, -np 1
  between-np4      the same with -np 4
  restart          the same image after both servers restarted
  mixed            four conversations about four images, turns interleaved, -np 4
  reference        a rubric, a reference image, then each candidate: every candidate against
                   every reference (the reference-comparison batch)

Writes its section of docs/benchmarks.md.

    python -m scripts.bench_stock --size tiny           # make bench-quick
    python -m scripts.bench_stock --size realistic      # make bench (an encode costs a minute)
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from PIL import Image

from scripts.bench_doc import write_section
from tests.support.llama_server import LlamaServer, built_binary
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent

CAUSAL = "qwen2vl"  # image tokens attend causally: stock's prompt cache can reuse them
IMAGE_SIZE = (640, 480)

Part = tuple[Literal["text", "image"], str]


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    family: str
    parallel: int
    stock_can: str  # what llama-server's own prompt cache does here
    turns: tuple[tuple[Part, ...], ...]
    restart_before: int | None = None  # both servers restart before this turn
    # "repeats": the median over turns whose images were all seen before in the arm (first
    # sights are a miss for both, reported apart); "all": the mean over the whole workload
    score: Literal["repeats", "all"] = "repeats"

    def first_sights(self) -> list[bool]:
        seen: set[str] = set()
        out = []
        for turn in self.turns:
            names = {value for kind, value in turn if kind == "image"}
            out.append(not names <= seen)
            seen |= names
        return out


@dataclasses.dataclass(frozen=True)
class Sample:
    ttft_ms: float
    cache_n: int  # prompt tokens llama-server took from its cache
    encode_ms: float  # the patched server's encoder time (0 on stock: it does not say)
    outcome: str  # X-Vcache: hits / misses / fallback / ""


_ASKED = itertools.count()


def question() -> Part:
    """Text never sent before in this run: only what an arm means to repeat is repeated."""
    return ("text", f"Question {next(_ASKED):06d}: what do you see?")


def image(name: str) -> Part:
    return ("image", name)


def arms() -> list[Arm]:
    """The workloads; image names are unique per arm so no arm reuses another's cache."""
    rubric: Part = ("text", "Rubric: judge sharpness, colour and layout, one line each.")
    refs = [image(f"reference-{i}") for i in range(2)]
    cands = [image(f"candidate-{i}") for i in range(3)]
    users = [image(f"user-{u}") for u in range(4)]
    return [
        Arm(
            "same-prefix",
            CAUSAL,
            1,
            "reuses the image (same prefix)",
            tuple((image("sp"), question()) for _ in range(4)),
        ),
        Arm(
            "text-before",
            CAUSAL,
            1,
            "re-encodes: new text before the image",
            tuple((question(), image("tb")) for _ in range(4)),
        ),
        Arm(
            "gemma3",
            "gemma3",
            1,
            "re-encodes: bidirectional image attention",
            tuple((image("g3"), question()) for _ in range(4)),
        ),
        Arm(
            "order",
            CAUSAL,
            1,
            "re-encodes: the images' order changed",
            (
                (image("oa"), image("ob"), question()),
                *(
                    ((image("ob"), image("oa")) if i % 2 == 0 else (image("oa"), image("ob")))
                    + (question(),)
                    for i in range(3)
                ),
            ),
        ),
        *(
            Arm(
                f"between-np{np_}",
                CAUSAL,
                np_,
                "another conversation came between",
                (
                    (image(f"b{np_}x"), question()),
                    *itertools.chain.from_iterable(
                        ((image(f"b{np_}y{i}"), question()), (image(f"b{np_}x"), question()))
                        for i in range(3)
                    ),
                ),
            )
            for np_ in (1, 4)
        ),
        Arm(
            "restart",
            CAUSAL,
            1,
            "starts empty after a restart",
            tuple((image("rs"), question()) for _ in range(3)),
            restart_before=1,
        ),
        Arm(
            "mixed",
            CAUSAL,
            4,
            "keeps 4 conversations in 4 slots",
            tuple((u, question()) for _ in range(3) for u in users),
            score="all",
        ),
        Arm(
            "reference",
            CAUSAL,
            1,
            "reuses rubric + reference while they repeat",
            tuple((rubric, r, c, question()) for c in cands for r in refs),
            score="all",
        ),
    ]


# --- requests --------------------------------------------------------------------------------


def picture(name: str, size: tuple[int, int] = IMAGE_SIZE) -> str:
    """A data URI of a PNG that only this name makes (blocks of random colour)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    blocks = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(parts: tuple[Part, ...], images: dict[str, str]) -> dict[str, object]:
    content = [
        {"type": "text", "text": v}
        if k == "text"
        else {"type": "image_url", "image_url": {"url": images[v]}}
        for k, v in parts
    ]
    return {
        "stream": True,
        "temperature": 0,
        "max_tokens": 4,
        "timings_per_token": False,
        "messages": [{"role": "user", "content": content}],
    }


def send(client: httpx.Client, base: str, body: dict[str, object]) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    timings: dict[str, float] = {}
    # llama-server closes the connection after a stream: one connection per stream
    with client.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"Connection": "close"}
    ) as r:
        r.raise_for_status()
        outcome = _outcome(r.headers.get("x-vcache", ""))
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices"):
                delta = event["choices"][0].get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    first = time.perf_counter()
            if isinstance(event.get("timings"), dict):
                timings = event["timings"]
    ttft = ((first or time.perf_counter()) - started) * 1000
    return Sample(
        ttft, int(timings.get("cache_n", 0)), float(timings.get("media_encode_ms", 0.0)), outcome
    )


def _outcome(header: str) -> str:
    fields = dict(kv.split("=", 1) for kv in header.split() if "=" in kv)
    return " ".join(
        f"{k}={fields[k]}" for k in ("hits", "misses", "fallback") if fields.get(k, "0") != "0"
    )


# --- servers ---------------------------------------------------------------------------------


def binary(variant: str) -> Path:
    return built_binary(variant)


def server_args(family: str, size: str, parallel: int, threads: int) -> list[str]:
    models = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    files = generate(family, size, 0, models)  # type: ignore[arg-type]
    # default --cache-ram: stock at its best
    return [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        str(threads),
        "-c",
        str(8192 * parallel),
        "-np",
        str(parallel),
        "--no-warmup",
    ]


class Side:
    """One way of serving an arm: a stock llama-server, or vcache managing a patched one."""

    def __init__(self, label: str, stack: ExitStack, tmp: Path, args: list[str]) -> None:
        self.label = label
        self._stack, self._tmp, self._args = stack, tmp, args
        self.base_url = ""

    def restart(self) -> None:
        raise NotImplementedError


class Stock(Side):
    def __init__(self, stack: ExitStack, tmp: Path, args: list[str]) -> None:
        super().__init__("stock", stack, tmp, args)
        self._server = stack.enter_context(
            LlamaServer(binary("stock"), args, tmp / "stock.log", startup_timeout=900)
        )
        self.base_url = self._server.base_url

    def restart(self) -> None:
        self._server.stop()
        self._server.start()
        self.base_url = self._server.base_url


class Vcache(Side):
    def __init__(self, stack: ExitStack, tmp: Path, args: list[str]) -> None:
        super().__init__("vcache", stack, tmp, args)
        self._proxy = stack.enter_context(
            ProxyProcess(
                [
                    "--llama-server",
                    str(binary("patched")),
                    "--store",
                    str(tmp / "store"),
                    "--log-level",
                    "warning",
                    "--",
                    *args,
                ],
                tmp / "vcache.log",
                startup_timeout=900,
            )
        )
        self.base_url = self._proxy.base_url

    def restart(self) -> None:
        """Kill the managed llama-server; vcache starts a new one (its store stays)."""
        managed = self._health()["managed"]
        os.kill(int(managed["pid"]), 9)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            now = self._health().get("managed", {})
            if now.get("restarts", 0) > managed["restarts"] and now.get("healthy"):
                return
            time.sleep(0.2)
        raise TimeoutError("the managed llama-server did not come back")

    def _health(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = httpx.get(
            f"{self.base_url}/vcache/health", timeout=10
        ).json()
        return out


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ArmResult:
    arm: Arm
    stock: list[Sample]
    vcache: list[Sample]

    def _scored(self, side: list[Sample]) -> list[float]:
        if self.arm.score == "all":
            return [s.ttft_ms for s in side]
        firsts = self.arm.first_sights()
        return [s.ttft_ms for s, first in zip(side, firsts, strict=True) if not first]

    def score(self, side: list[Sample]) -> float:
        values = self._scored(side)
        return statistics.mean(values) if self.arm.score == "all" else statistics.median(values)

    def firsts(self, side: list[Sample]) -> list[float]:
        if self.arm.score == "all":
            return []
        return [s.ttft_ms for s, first in zip(side, self.arm.first_sights(), strict=True) if first]


def play(side: Side, arm: Arm, images: dict[str, str]) -> list[Sample]:
    samples = []
    with httpx.Client(timeout=3600) as client:
        for i, parts in enumerate(arm.turns):
            if i == arm.restart_before:
                side.restart()
            sample = send(client, side.base_url, chat_body(parts, images))
            print(
                f"  {arm.name} {side.label} {i + 1}/{len(arm.turns)}: ttft "
                f"{sample.ttft_ms:.1f} ms cache_n {sample.cache_n} {sample.outcome}",
                flush=True,
            )
            samples.append(sample)
    return samples


def run_arm(arm: Arm, size: str, threads: int) -> ArmResult:
    names = {v for turn in arm.turns for k, v in turn if k == "image"}
    images = {n: picture(f"{arm.name}/{n}") for n in names}
    args = server_args(arm.family, size, arm.parallel, threads)
    results = {}
    for kind in (Stock, Vcache):
        with tempfile.TemporaryDirectory(prefix="vcache-stock-") as tmp, ExitStack() as stack:
            side = kind(stack, Path(tmp), args)
            results[side.label] = play(side, arm, images)
    return ArmResult(arm, results["stock"], results["vcache"])


# --- the report ------------------------------------------------------------------------------

TIE_MS = 2.0  # within this, or 5 %, the two are the same


def verdict(stock: float, vcache: float) -> str:
    if abs(vcache - stock) <= max(TIE_MS, 0.05 * stock):
        return "tie"
    return f"**vcache ahead** ({stock / vcache:.1f}x)" if vcache < stock else "**vcache slower**"


def table(results: list[ArmResult]) -> list[str]:
    lines = [
        "| arm | stock llama-server here | scored | stock TTFT | vcache TTFT | "
        "vcache / stock | verdict | stock cache_n |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        stock, vcache = r.score(r.stock), r.score(r.vcache)
        how = "mean of all" if r.arm.score == "all" else "median of repeats"
        n = len(r._scored(r.stock))
        cache_n = statistics.median(s.cache_n for s in r.stock)
        lines.append(
            f"| {r.arm.name} (`-np {r.arm.parallel}`, {r.arm.family}) | "
            f"{r.arm.stock_can} | {how}, n={n} | {stock:.1f} ms | {vcache:.1f} ms | "
            f"{vcache / stock:.3f} | {verdict(stock, vcache)} | {cache_n:.0f} |"
        )
    return lines


def first_sight_line(results: list[ArmResult]) -> str:
    stock = [t for r in results for t in r.firsts(r.stock)]
    vcache = [t for r in results for t in r.firsts(r.vcache)]
    if not stock:
        return ""
    s, v = statistics.median(stock), statistics.median(vcache)
    return (
        f"First sight of an image (a miss for both, {len(stock)} requests over the "
        f"arms): stock {s:.1f} ms, vcache {v:.1f} ms median, **{v - s:+.1f} ms**."
    )


def section(results: list[ArmResult], size: str, threads: int, commit: str) -> str:
    ahead = [r.arm.name for r in results if "ahead" in verdict(r.score(r.stock), r.score(r.vcache))]
    slower = [
        r.arm.name for r in results if "slower" in verdict(r.score(r.stock), r.score(r.vcache))
    ]
    summary = f"vcache is ahead on {', '.join(ahead) or 'no arm'}; it ties on the rest" + (
        f"; **slower on {', '.join(slower)}**." if slower else ", and is slower on none."
    )
    return "\n".join(
        [
            f"### Against stock llama-server, {size} models",
            "",
            f"`python -m scripts.bench_stock --size {size}` at {commit}, "
            f"{time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPU cores, llama-server `-t {threads}`, default `--cache-ram`, "
            f"load average {os.getloadavg()[0]:.1f} at the end; vcache in managed mode with its "
            "defaults. TTFT of streamed chat requests, 4 tokens each.",
            "",
            *table(results),
            "",
            first_sight_line(results),
            "",
            summary,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "realistic"), default="tiny")
    p.add_argument("--arm", action="append", help="run only these arms (repeatable)")
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="llama-server threads (default: all cores but one)",
    )
    p.add_argument("--no-write", action="store_true", help="print, leave docs alone")
    args = p.parse_args(argv)
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
    chosen = [a for a in arms() if not args.arm or a.name in args.arm]
    results = [run_arm(a, args.size, args.threads) for a in chosen]
    text = section(results, args.size, args.threads, commit)
    print(text)
    if not args.no_write:
        write_section(f"bench_stock:{args.size}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
