"""End-to-end benchmark: stock llama-server against every vcache path, all in one run.

Each request carries the same reference image with different text before it, so llama-server's
own prompt cache cannot hide the encoder. Arms:

  0. direct to the patched llama-server, raw image (reports its encoder time: the floor)
  1. direct to stock llama-server
  2. through vcache, stock upstream (fallback)
  3. through vcache, patched upstream, miss (a new image each time)
  4. hit, package inline in the JSON
  5. hit, package by file reference (upstream maps the cache's segment files)

plus text-only requests direct vs through vcache (the proxy's overhead), and the delay between
streamed chunks direct vs through vcache. Writes its section of docs/benchmarks.md and PNG plots.

    python -m scripts.bench_e2e --size tiny         # make bench-quick
    python -m scripts.bench_e2e --size realistic    # make bench (the encoder dominates: slow)
    python -m scripts.bench_e2e --size realistic --label gpu --server-arg=-ngl --server-arg=all

``--label`` names the section (and plots) written, so a GPU run sits beside the CPU ones;
$VCACHE_LLAMA_SERVER_PATCHED / _STOCK pick the binaries (scripts/gpu_check.sh passes CUDA builds).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
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
import numpy as np
from PIL import Image

from scripts.bench_doc import DOC, write_section
from tests.support.llama_server import LlamaServer, built_binary
from tests.support.proxy_process import ProxyProcess
from vision_cache.data_uri import data_uri
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Sample:
    ttft_ms: float
    total_ms: float
    encode_ms: float = 0.0
    cache: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    size: str
    slow: int  # requests per arm that encode
    fast: int  # requests per arm that hit
    text: int  # text-only requests per side
    threads: int = 0  # llama-server's -t (0: default_threads())
    server_args: tuple[str, ...] = ()  # more llama-server arguments (-ngl all)
    label: str = ""  # the section's name in docs/benchmarks.md (default: the size)
    note: str = ""  # a line for the section's header (the GPU, say)
    measure_workload: bool = False  # measure the image-reuse curve (else: from the medians)


PLANS = {
    "tiny": Plan("tiny", 30, 60, 200, measure_workload=True),
    "realistic": Plan("realistic", 3, 30, 200),
}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- requests --------------------------------------------------------------------------------


def chat_body(text: str, image_url: str | None, max_tokens: int = 8) -> dict[str, object]:
    content: list[dict[str, object]] = [{"type": "text", "text": text}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
        "stream_options": {"include_usage": True},
        "timings_per_token": False,
    }


def timed_stream(
    client: httpx.Client, base: str, body: dict[str, object]
) -> tuple[Sample, list[float]]:
    """One streamed request: TTFT, total, encoder time, cache outcome, and chunk arrival times."""
    started = time.perf_counter()
    first: float | None = None
    arrivals: list[float] = []
    encode_ms = 0.0
    # llama-server closes the connection after a stream while announcing keep-alive: a pooled
    # connection could be reused just before it goes, so each stream gets its own, on every arm
    with client.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"Connection": "close"}
    ) as r:
        r.raise_for_status()
        cache = r.headers.get("x-vcache", "")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                first = first or now
                arrivals.append(now)
            timings = event.get("timings")
            if isinstance(timings, dict):
                encode_ms = float(timings.get("media_encode_ms", 0.0))
    end = time.perf_counter()
    ttft = ((first or end) - started) * 1000
    return Sample(ttft, (end - started) * 1000, encode_ms, _outcome(cache)), arrivals


def _outcome(header: str) -> str:
    fields = dict(kv.split("=") for kv in header.split() if "=" in kv)
    for key in ("hits", "misses", "fallback"):
        if fields.get(key, "0") != "0":
            return key
    return ""


VERBS = ("describe", "summarise", "list what you see in", "name the colours of")


_ASKED = itertools.count()


def varying_text(i: int) -> str:
    """Text never sent before in this run, of one length: llama-server keeps earlier prompts
    (its slots and its RAM prompt cache), and a repeated prefix ending at the image would let
    it skip the image, encoder and all, on any arm."""
    return f"Question {next(_ASKED):06d}: {VERBS[i % len(VERBS)]} this image."


def fresh_image(i: int, size: tuple[int, int]) -> str:
    """A new image each time (a guaranteed miss) of the reference's size."""
    rng = np.random.default_rng(10_000 + i)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return data_uri(buf.getvalue(), "image/png")


# --- arms ------------------------------------------------------------------------------------


def run_arm(base: str, n: int, image: Callable[[int], str], label: str) -> list[Sample]:
    samples = []
    with httpx.Client(timeout=1800) as client:
        for i in range(n):
            sample, _ = timed_stream(client, base, chat_body(varying_text(i), image(i)))
            samples.append(sample)
            print(
                f"  {label}: {i + 1}/{n} ttft {sample.ttft_ms:.1f} ms "
                f"total {sample.total_ms:.1f} ms {sample.cache}",
                flush=True,
            )
    return samples


def text_overhead(direct: str, proxy: str, n: int) -> tuple[list[float], list[float]]:
    """Non-streamed text-only requests, alternating sides so drift hits both equally."""
    body = {
        "temperature": 0,
        "max_tokens": 1,
        "cache_prompt": True,
        "messages": [{"role": "user", "content": "Say one word."}],
    }
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    with httpx.Client(timeout=60) as client:
        for _ in range(5):  # warm both paths
            client.post(f"{direct}/v1/chat/completions", json=body)
            client.post(f"{proxy}/v1/chat/completions", json=body)
        for _ in range(n):
            for side, base in (("direct", direct), ("proxy", proxy)):
                t0 = time.perf_counter()
                client.post(f"{base}/v1/chat/completions", json=body).raise_for_status()
                times[side].append((time.perf_counter() - t0) * 1000)
    return times["direct"], times["proxy"]


def chunk_delays(base: str, runs: int = 3) -> list[float]:
    gaps: list[float] = []
    with httpx.Client(timeout=600) as client:
        for i in range(runs):
            body = chat_body(varying_text(i), None, max_tokens=200)
            body["ignore_eos"] = True
            _, arrivals = timed_stream(client, base, body)
            gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return gaps


# --- the setup -------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    stock: LlamaServer
    patched: LlamaServer
    fallback: ProxyProcess
    inline: ProxyProcess
    by_file: ProxyProcess


def default_threads() -> int:
    """One core left to the client and the proxy. llama-server's threads spin at each step's
    barrier: on 2 cores with -t 2, a third busy process (the proxy relaying chunks) slowed
    generation from 0.45 to 2.7 ms per token in our runs, a cost of the shared cores, not of
    the proxy, that would show on the proxy's arms only."""
    return max(1, (os.cpu_count() or 2) - 1)


@contextmanager
def setup(plan: Plan, tmp: Path) -> Iterator[Setup]:
    models = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    files = generate("gemma3", plan.size, 0, models)  # type: ignore[arg-type]
    common = [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        str(plan.threads),
        "-c",
        "8192",
        "-np",
        "1",
        "--no-warmup",
        *plan.server_args,
    ]
    file_store = tmp / "store-file"
    (file_store / "segments").mkdir(parents=True)
    with ExitStack() as stack:
        stock = stack.enter_context(
            LlamaServer(built_binary("stock"), common, tmp / "stock.log", startup_timeout=900)
        )
        patched = stack.enter_context(
            LlamaServer(
                built_binary("patched"),
                [*common, "--image-embedding-dir", str(file_store / "segments")],
                tmp / "patched.log",
                startup_timeout=900,
            )
        )

        def proxy(upstream: str, store: Path, *extra: str) -> ProxyProcess:
            args = ["--upstream", upstream, "--store", str(store), "--log-level", "warning", *extra]
            return stack.enter_context(ProxyProcess(args, tmp / f"{store.name}.log"))

        yield Setup(
            stock,
            patched,
            proxy(stock.base_url, tmp / "store-fallback"),
            proxy(patched.base_url, tmp / "store-inline", "--transport", "inline"),
            proxy(patched.base_url, file_store, "--transport", "file"),
        )


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    plan: Plan
    commit: str  # git describe --dirty at the start, before this run writes its plots
    arms: dict[str, list[Sample]]
    text_direct: list[float]
    text_proxy: list[float]
    gaps_direct: list[float]
    gaps_proxy: list[float]
    workload: dict[int, tuple[float, float]]
    workload_measured: bool


def run(plan: Plan) -> Results:
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
    ref = sample_image("gradient_text_800x600")
    ref_url = ref.data_url("PNG")

    def same(i: int) -> str:
        return ref_url

    def new(i: int) -> str:
        return fresh_image(i, ref.size)

    with tempfile.TemporaryDirectory(prefix="vcache-bench-") as tmp, setup(plan, Path(tmp)) as s:
        slow, fast = plan.slow, plan.fast
        arms: dict[str, list[Sample]] = {}
        arms[ARMS[0]] = run_arm(s.patched.base_url, slow, same, "floor")
        arms[ARMS[1]] = run_arm(s.stock.base_url, slow, same, "stock")
        arms[ARMS[2]] = run_arm(s.fallback.base_url, slow, same, "fallback")
        arms[ARMS[3]] = run_arm(s.inline.base_url, slow, new, "miss")
        run_arm(s.inline.base_url, 1, same, "warm inline")
        arms[ARMS[4]] = run_arm(s.inline.base_url, fast, same, "hit inline")
        run_arm(s.by_file.base_url, 1, same, "warm file")
        arms[ARMS[5]] = run_arm(s.by_file.base_url, fast, same, "hit file")
        text_d, text_p = text_overhead(s.patched.base_url, s.inline.base_url, plan.text)
        gaps_d, gaps_p = chunk_delays(s.patched.base_url), chunk_delays(s.inline.base_url)
        measured = plan.measure_workload
        workload = measure_workload(s) if measured else model_workload(arms)
    return Results(plan, commit, arms, text_d, text_p, gaps_d, gaps_p, workload, measured)


ARMS = (
    "0 direct, patched server, raw image",
    "1 direct, stock llama-server",
    "2 vcache, stock upstream (fallback)",
    "3 vcache, miss",
    "4 vcache, hit, inline package",
    "5 vcache, hit, file reference",
)


WORKLOAD_REQUESTS = 50
POOLS = (1, 5, 10, 20, 35, 50)


def workload_images(pool: int) -> list[int]:
    """80 % of requests reuse `pool` images, the rest are one-offs (after Dynamo's benchmark)."""
    rng = np.random.default_rng(pool)
    reuse = int(WORKLOAD_REQUESTS * 0.8)
    picks = [int(x) for x in rng.integers(0, pool, size=reuse)]
    picks += list(range(1000, 1000 + WORKLOAD_REQUESTS - reuse))
    rng.shuffle(picks)
    return picks


def measure_workload(s: Setup) -> dict[int, tuple[float, float]]:
    out = {}
    for pool in POOLS:
        ids, base = workload_images(pool), 50_000 * pool

        def image(i: int, ids: list[int] = ids, base: int = base) -> str:
            return fresh_image(base + ids[i], (320, 240))

        direct = run_arm(s.stock.base_url, len(ids), image, f"workload {pool} direct")
        cached = run_arm(s.inline.base_url, len(ids), image, f"workload {pool} vcache")
        out[pool] = (
            statistics.mean(x.ttft_ms for x in direct),
            statistics.mean(x.ttft_ms for x in cached),
        )
    return out


def model_workload(arms: dict[str, list[Sample]]) -> dict[int, tuple[float, float]]:
    """From this run's medians: each image's first sight costs a miss, every later one a hit."""
    stock = statistics.median(x.ttft_ms for x in arms[ARMS[1]])
    miss = statistics.median(x.ttft_ms for x in arms[ARMS[3]])
    hit = statistics.median(x.ttft_ms for x in arms[ARMS[5]])
    out = {}
    for pool in POOLS:
        ids = workload_images(pool)
        distinct = len(set(ids))
        out[pool] = (stock, (distinct * miss + (len(ids) - distinct) * hit) / len(ids))
    return out


# --- the report ------------------------------------------------------------------------------


def floor_ms(arms: dict[str, list[Sample]]) -> float:
    raw = arms[ARMS[0]]
    return statistics.median(s.ttft_ms - s.encode_ms for s in raw)


def table(r: Results) -> list[str]:
    base = statistics.median(s.ttft_ms for s in r.arms[ARMS[1]])
    floor = floor_ms(r.arms)
    lines = [
        "| arm | n | TTFT median | TTFT p90 | total median | TTFT vs arm 1 | encoder ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, samples in r.arms.items():
        ttft = [s.ttft_ms for s in samples]
        med = statistics.median(ttft)
        lines.append(
            f"| {name} | {len(samples)} | {med:.1f} ms | {pct(ttft, 90):.1f} ms | "
            f"{statistics.median(s.total_ms for s in samples):.1f} ms | "
            f"{med / base:.4f} | {statistics.median(s.encode_ms for s in samples):.1f} |"
        )
    lines.append(
        f"\nFloor (direct TTFT minus the encoder time the server reports, median): "
        f"**{floor:.1f} ms**."
    )
    return lines


def targets(r: Results) -> list[str]:
    floor = floor_ms(r.arms)
    hit = statistics.median(s.ttft_ms for s in r.arms[ARMS[5]])
    hit_inline = statistics.median(s.ttft_ms for s in r.arms[ARMS[4]])
    t_proxy, t_direct = statistics.median(r.text_proxy), statistics.median(r.text_direct)
    g_proxy, g_direct = statistics.median(r.gaps_proxy), statistics.median(r.gaps_direct)
    bound = floor * 1.05 + 2

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    return [
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| hit TTFT <= floor x 1.05 + 2 ms ({bound:.1f} ms) | file {hit:.1f} ms, "
        f"inline {hit_inline:.1f} ms | file {verdict(hit <= bound)}, "
        f"inline {verdict(hit_inline <= bound)} |",
        f"| text-only overhead <= 1 ms p50 | {t_proxy:.2f} - {t_direct:.2f} = "
        f"{t_proxy - t_direct:.2f} ms (n={len(r.text_direct)} each) | "
        f"{verdict(t_proxy - t_direct <= 1.0)} |",
        f"| streaming chunk delay <= 1 ms p50 | {g_proxy:.3f} vs {g_direct:.3f} ms between "
        f"chunks, +{g_proxy - g_direct:.3f} ms | {verdict(g_proxy - g_direct <= 1.0)} |",
    ]


def plots(r: Results, plots_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine may lack it: the tables are the results
        print("matplotlib is not installed: no plots", flush=True)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = r.plan.label or r.plan.size
    plots_dir.mkdir(parents=True, exist_ok=True)
    names = list(r.arms)
    meds = [statistics.median(s.ttft_ms for s in r.arms[n]) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = ["#999"] * 3 + ["#d62", "#2a6", "#2a6"]
    ax.barh([n.split(" ", 1)[1] for n in names], meds, color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, median (ms, log scale)")
    ax.set_title(f"vcache vs llama-server, {r.plan.size} model, {label}")
    ax.invert_yaxis()
    fig.tight_layout()
    arms_png = plots_dir / f"ttft-arms-{label}.png"
    fig.savefig(arms_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pools = sorted(r.workload)
    ax.plot(pools, [r.workload[p][0] for p in pools], "o-", label="llama-server direct")
    ax.plot(pools, [r.workload[p][1] for p in pools], "o-", label="through vcache")
    ax.set_xlabel(f"distinct reused images (80 % of {WORKLOAD_REQUESTS} requests reuse them)")
    ax.set_ylabel("mean time to first token (ms)")
    ax.set_yscale("log")
    how = "measured" if r.workload_measured else "from this run's medians"
    ax.set_title(f"TTFT with image reuse, {r.plan.size} model, {label} ({how})")
    ax.legend()
    fig.tight_layout()
    work_png = plots_dir / f"ttft-reuse-{label}.png"
    fig.savefig(work_png, dpi=110)
    plt.close(fig)
    return [arms_png, work_png]


def section(r: Results, pngs: list[Path]) -> str:
    plan = r.plan
    how = (
        "measured in this run"
        if r.workload_measured
        else "computed from this run's "
        "medians: each image's first use costs a miss, later uses a hit"
    )
    title = f"### End to end, {plan.size} model" + (f", {plan.label}" if plan.label else "")
    command = " ".join(
        [
            "python -m scripts.bench_e2e",
            f"--size {plan.size}",
            *([f"--label {plan.label}"] if plan.label else []),
            *(f"--server-arg={a}" for a in plan.server_args),
        ]
    )
    lines = [
        title,
        "",
        f"`{command}` at {r.commit}, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPU cores, llama-server `-t {plan.threads}`, Gemma 3 test VLM "
        f"({plan.size}), one run, medians and p90." + (f" {plan.note}" if plan.note else ""),
        "",
        *table(r),
        "",
        *targets(r),
        "",
        f"Image reuse ({how}):",
        "",
        "| distinct reused images | direct mean TTFT | vcache mean TTFT |",
        "|---:|---:|---:|",
        *[
            f"| {p} | {r.workload[p][0]:.1f} ms | {r.workload[p][1]:.1f} ms |"
            for p in sorted(r.workload)
        ],
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in pngs],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(PLANS), default="tiny")
    p.add_argument("--slow", type=int, help="requests per encoding arm (default by size)")
    p.add_argument("--fast", type=int, help="requests per hit arm (default by size)")
    p.add_argument("--text", type=int, help="text-only requests per side (default by size)")
    p.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="llama-server threads (default: all cores but one)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="more llama-server arguments, repeatable (--server-arg=-ngl)",
    )
    p.add_argument("--label", default="", help="section name in the doc (default: the size)")
    p.add_argument("--note", default="", help="a sentence for the section's header")
    p.add_argument(
        "--workload",
        choices=("measure", "model"),
        help="measure the image-reuse curve, or compute it from the medians "
        "(default: measured on tiny, computed on realistic)",
    )
    p.add_argument("--doc", type=Path, default=DOC, help="the file to write (plots beside it)")
    args = p.parse_args(argv)
    plan = PLANS[args.size]
    measure = plan.measure_workload if args.workload is None else args.workload == "measure"
    plan = dataclasses.replace(
        plan,
        slow=args.slow or plan.slow,
        fast=args.fast or plan.fast,
        text=args.text or plan.text,
        threads=args.threads,
        server_args=tuple(args.server_arg),
        label=args.label,
        note=args.note,
        measure_workload=measure,
    )
    results = run(plan)
    pngs = plots(results, args.doc.parent / "plots")
    write_section(f"bench_e2e:{plan.label or plan.size}", section(results, pngs), args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
