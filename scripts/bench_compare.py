"""Comparison benchmark: a candidate judged with a shortlist (top_k) against judging every
reference, and a result-cache hit against a regenerated answer. Tiny generated models.

One run: a generated VLM (gemma3, judge) and a generated embedding VLM (qwen2vl-embed, mean
pooling) each behind its own llama-server, vcache in front of the VLM with the embedding server
as --embedding-upstream. N distinct references are warmed and tagged (a one-time cost, shown
apart), then:

  A. compare, top_k K, first run: every reference's vector is computed (once)
  B. compare, top_k K, another rubric: vectors read back, only the K judge calls remain
  C. compare, top_k N: the VLM judges every reference (what comparing without a shortlist is)

Time and model calls of each, and the ratio C / B. Then R judge questions through the proxy
with the result cache on, each asked twice: the first answer is generated, the second
replayed; medians of both.

    python -m scripts.bench_compare                    # 1,000 references: long (C judges all)
    python -m scripts.bench_compare --refs 50 --quick  # a check that the script works
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from proxy.cli.config import ServeSettings
from proxy.serve import running_proxy
from scripts.bench_doc import write_section
from tests.support.llama_server import LlamaServer, built_binary
from vision_cache.judging import Rubric, judge_request
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent
MARK = "bench_compare"
RUBRIC_A = "short fur; triangular ears; green eyes"
RUBRIC_B = "long tail; striped coat; sitting"


def reference_image(i: int) -> str:
    """A small PNG, different for every i (random blocks of colour)."""
    rng = np.random.default_rng(10_000 + i)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((64, 64), Image.Resampling.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def binary() -> Path:
    return built_binary("patched")


def servers(stack: ExitStack, tmp: Path, threads: str) -> tuple[LlamaServer, LlamaServer]:
    models = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    vlm, emb = generate("gemma3", "tiny", 0, models), generate("qwen2vl-embed", "tiny", 0, models)
    common = ["-t", threads, "-c", "4096", "--no-warmup", "--metrics"]
    judge = LlamaServer(
        binary(),
        [
            "-m",
            str(vlm.model),
            "--mmproj",
            str(vlm.mmproj),
            "--image-embedding",
            "-np",
            "2",
            *common,
        ],
        tmp / "vlm.log",
    )
    embedder = LlamaServer(
        binary(),
        [
            "-m",
            str(emb.model),
            "--mmproj",
            str(emb.mmproj),
            "--embeddings",
            "-b",
            "2048",
            "-ub",
            "2048",
            "-np",
            "2",
            *common,
        ],
        tmp / "embedder.log",
    )
    return stack.enter_context(judge), stack.enter_context(embedder)


async def warm(c: httpx.AsyncClient, n: int) -> float:
    started = time.perf_counter()
    sem = asyncio.Semaphore(2)

    async def one(i: int) -> None:
        async with sem:
            r = await c.post("/vcache/warm", json={"image": reference_image(i), "tags": ["bench"]})
            r.raise_for_status()

    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started


async def compare(c: httpx.AsyncClient, rubric: str, top_k: int) -> dict[str, Any]:
    started = time.perf_counter()
    r = await c.post(
        "/vcache/compare",
        json={
            "candidate": reference_image(-1),
            "rubric": rubric,
            "references": {"tag": "bench"},
            "top_k": top_k,
            "parallel": 2,
        },
    )
    r.raise_for_status()
    reply = dict(r.json())
    reply["wall_s"] = time.perf_counter() - started
    return reply


async def result_cache(c: httpx.AsyncClient, n: int) -> tuple[list[float], list[float]]:
    """(generated ms, replayed ms) for n different judge questions, each asked twice."""
    rubric, candidate = Rubric.parse(RUBRIC_A), "vcache://sha256:" + await _digest(c, -1)
    fresh: list[float] = []
    replayed: list[float] = []
    for i in range(n):
        ref = "vcache://sha256:" + await _digest(c, i)
        body = judge_request(rubric, reference=ref, candidate=candidate, seed=1000 + i)
        for times in (fresh, replayed):
            started = time.perf_counter()
            r = await c.post(
                "/v1/chat/completions", json=body, headers={"X-Vcache-Result-Cache": "on"}
            )
            r.raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    return fresh, replayed


async def _digest(c: httpx.AsyncClient, i: int) -> str:
    r = await c.post("/vcache/warm", json={"image": reference_image(i), "pin": False})
    r.raise_for_status()
    return str(r.json()["digest"])


async def run(n: int, top_k: int, n_result: int, tmp: Path, threads: str) -> dict[str, Any]:
    with ExitStack() as stack:
        vlm, embedder = servers(stack, tmp, threads)
        settings = ServeSettings(
            upstream=vlm.base_url,
            embedding_upstream=embedder.base_url,
            store=tmp / "store",
            port=0,
            log_level="warning",
        )
        async with (
            running_proxy(settings) as (url, _),
            httpx.AsyncClient(base_url=url, timeout=None) as c,
        ):
            out: dict[str, Any] = {"warm_s": await warm(c, n)}
            out["A"] = await compare(c, RUBRIC_A, top_k)
            out["B"] = await compare(c, RUBRIC_B, top_k)
            out["C"] = await compare(c, RUBRIC_A, n)
            out["fresh"], out["replayed"] = await result_cache(c, n_result)
    return out


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def row(label: str, reply: dict[str, Any]) -> str:
    s = reply["stages"]
    embed, judge = s["shortlist"], s["judge"]
    return (
        f"| {label} | {reply['wall_s']:.1f} s | {embed['ms'] / 1000:.1f} s | "
        f"{judge['ms'] / 1000:.1f} s | {embed['model_calls']} ({embed['detail']['computed']}"
        f" vectors) | {judge['model_calls']} | {reply['model_calls']} |"
    )


def section(r: dict[str, Any], n: int, top_k: int, started: str, ended: str) -> str:
    a, b, c = r["A"], r["B"], r["C"]
    fresh, replayed = statistics.median(r["fresh"]), statistics.median(r["replayed"])
    return "\n".join(
        [
            "## Comparing against many references (`scripts/bench_compare.py`)",
            "",
            f"{n} generated references (distinct 64x64 PNGs), tiny generated models: gemma3 judges "
            f"(-np 2, comparisons judge 2 at a time), qwen2vl-embed (mean pooling) embeds. "
            f"Warm-up (encode, pin, tag, keep {n} references): {r['warm_s']:.1f} s, once. "
            f"Load average at start {started}, at end {ended} (2 cores).",
            "",
            "| run | wall | shortlist | judge | embedding calls | judge calls | model calls |",
            "|---|---|---|---|---|---|---|",
            row(f"A. top_k {top_k}, first run (vectors computed)", a),
            row(f"B. top_k {top_k}, new rubric (vectors cached)", b),
            row(f"C. top_k {n}: judge every reference", c),
            "",
            f"Judging every reference (C) against the shortlist (B): "
            f"**{c['wall_s'] / b['wall_s']:.0f}x the time** and "
            f"**{c['model_calls'] / max(1, b['model_calls']):.0f}x the model calls** "
            f"({c['model_calls']} against {b['model_calls']}). The first run (A) pays for every "
            f"vector once ({a['stages']['shortlist']['detail']['computed']} images in "
            f"{a['stages']['shortlist']['model_calls']} embedding requests); later runs under the "
            "same instruction read them back and call no embedding model: stage 1 (reading "
            f"{n + 1} vectors back, then the search, "
            f"{b['stages']['shortlist']['detail']['search']}) took "
            f"{b['stages']['shortlist']['ms']:.0f} ms in all.",
            "",
            f"Result cache, {len(r['fresh'])} judge questions each asked twice: generated "
            f"{fresh:.0f} ms (median), replayed {replayed:.1f} ms: "
            f"**{fresh / replayed:.0f}x faster**, and no model call.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refs", type=int, default=1000, help="references (default 1000)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--result-questions", type=int, default=10)
    p.add_argument("--threads", default=str(max(1, (os.cpu_count() or 2) - 1)))
    p.add_argument("--quick", action="store_true", help="print, do not write docs")
    args = p.parse_args(argv)
    started = load()
    with tempfile.TemporaryDirectory(prefix="vcache-bench-compare-") as tmp:
        results = asyncio.run(
            run(args.refs, args.top_k, args.result_questions, Path(tmp), args.threads)
        )
    text = section(results, args.refs, args.top_k, started, load())
    print(text)
    if not args.quick:
        write_section(MARK, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
