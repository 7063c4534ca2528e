"""Soak: many clients on loopback, a steady mixed load through vcache, for a bounded time.

Starts a patched llama-server with the tiny generated gemma3 model (vision_cache.synthetic)
and `vcache serve` in front of it, warms a few reference images, then runs CLIENTS concurrent
clients for MINUTES. Each request is, at random by weight:

* hit: a chat request with one of the warmed images (varying text);
* miss: a chat request with an image never seen before (the encoder runs);
* text: a chat request without an image;
* stream: a streamed chat request with a warmed image, read to its ``[DONE]``.

It samples the proxy's own view of itself (``GET /vcache/health``: asyncio tasks, open file
descriptors, resident memory) every SAMPLE seconds, and reports throughput, latency
percentiles per kind, errors (any answer other than a complete 200), and how RSS and open
files moved after the warm-up (the first WARMUP share of the run): docs/plots/soak.png and a
JSON summary.

    # the figures in docs/reliability.md (llama-server's RAM prompt cache off: with it, the
    # server itself slows down as it fills, and that is not what a soak of the proxy measures)
    python -m scripts.soak --minutes 30 --server-arg=--cache-ram --server-arg=0
    python -m scripts.soak --minutes 1 --clients 4       # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from tests.support.llama_server import LlamaServer, built_binary
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic.models import generate

ROOT = Path(__file__).resolve().parent.parent

KINDS = {"hit": 0.4, "miss": 0.15, "text": 0.25, "stream": 0.2}
MAX_TOKENS = 8
CHAT = "/v1/chat/completions"


@dataclasses.dataclass
class Outcome:
    kind: str
    started: float
    seconds: float
    error: str | None


@dataclasses.dataclass
class Sample:
    at: float
    tasks: int
    open_fds: int
    rss_mib: float


def image_url(n: int) -> str:
    rng = random.Random(n)
    buf = io.BytesIO()
    size = (rng.randrange(64, 320), rng.randrange(64, 320))
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, image: str | None, stream: bool = False) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


class Load:
    """The clients, the sampler, and what they saw."""

    def __init__(self, base: str, warmed: list[str], seed: int) -> None:
        self.base = base
        self.warmed = warmed
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.fresh = 10_000_000  # image numbers for misses, never repeated

    async def client(self, session: aiohttp.ClientSession, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            started = time.monotonic()
            error = await self.one(session, kind)
            self.outcomes.append(Outcome(kind, started, time.monotonic() - started, error))

    async def one(self, session: aiohttp.ClientSession, kind: str) -> str | None:
        text = f"Say something about this, take {self.rng.randrange(10**9)}."
        if kind == "miss":
            self.fresh += 1
            body = chat(text, await asyncio.to_thread(image_url, self.fresh))
        else:
            body = chat(
                text,
                self.rng.choice(self.warmed) if kind != "text" else None,
                stream=kind == "stream",
            )
        try:
            async with session.post(CHAT, json=body) as r:
                payload = await r.read()
                if r.status != 200:
                    return f"HTTP {r.status}: {payload[:120]!r}"
                if kind == "stream" and b"data: [DONE]" not in payload:
                    return "stream ended without [DONE]"
                if kind == "stream" and b'"error"' in payload:
                    return "error event in the stream"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    async def sampler(self, session: aiohttp.ClientSession, deadline: float, every: float) -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                async with session.get("/vcache/health") as r:
                    answer = await r.json()
                process = answer["process"]
                self.samples.append(
                    Sample(
                        began - start,
                        process["tasks"],
                        process["open_fds"],
                        process["rss_bytes"] / 2**20,
                    )
                )
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as e:
                # a proxy in trouble answers its health check badly too: that is an error
                self.outcomes.append(
                    Outcome("health", began, time.monotonic() - began, f"{type(e).__name__}: {e}")
                )
            await asyncio.sleep(every)


async def run_load(
    base: str, minutes: float, clients: int, every: float, seed: int
) -> tuple[Load, float]:
    warmed = [image_url(n) for n in range(8)]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        base, timeout=timeout, connector=aiohttp.TCPConnector(limit=clients + 2)
    ) as s:
        for url in warmed:  # encoded once, then every hit request is a hit
            async with s.post("/vcache/warm", json={"image": url}) as r:
                r.raise_for_status()
        load = Load(base, warmed, seed)
        started = time.monotonic()
        deadline = started + minutes * 60
        await asyncio.gather(
            load.sampler(s, deadline, every), *(load.client(s, deadline) for _ in range(clients))
        )
    return load, started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return statistics.linear_regression(xs, ys).slope * 3600


def summary(load: Load, started: float, minutes: float, warmup: float) -> dict[str, Any]:
    outcomes, samples = load.outcomes, load.samples
    after = [s for s in samples if s.at >= warmup * minutes * 60]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            key = f"{o.kind}: {o.error[:80]}"
            errors[key] = errors.get(key, 0) + 1
    kinds = {k: [o.seconds * 1000 for o in outcomes if o.kind == k and not o.error] for k in KINDS}
    return {
        "minutes": minutes,
        "requests": len(outcomes),
        "throughput_rps": len(outcomes) / (minutes * 60),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "latency_ms": {
            k: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for k, v in kinds.items()
        },
        "rss_last_half": _level(load.samples, minutes),
        "all_p50_ms": percentile([o.seconds * 1000 for o in outcomes], 0.5),
        "all_p99_ms": percentile([o.seconds * 1000 for o in outcomes], 0.99),
        "after_warmup": {
            "rss_mib": [min(s.rss_mib for s in after), max(s.rss_mib for s in after)],
            "rss_mib_per_hour": slope_per_hour([(s.at, s.rss_mib) for s in after]),
            "open_fds": [min(s.open_fds for s in after), max(s.open_fds for s in after)],
            "open_fds_per_hour": slope_per_hour([(s.at, s.open_fds) for s in after]),
            "tasks": [min(s.tasks for s in after), max(s.tasks for s in after)],
        }
        if after
        else {},
        "load_average": os.getloadavg(),
    }


def _level(samples: list[Any], minutes: float) -> dict[str, float]:
    """RSS over the run's second half (its last hour on a two-hour run): lowest, highest, and
    the spread between them as a share of the lowest. A leak keeps climbing there; a bounded
    cache filling up has levelled off (spread within 5 %)."""
    if not samples:
        return {}
    start = samples[0].at + minutes * 30
    late = [s.rss_mib for s in samples if s.at >= start] or [samples[-1].rss_mib]
    low, high = min(late), max(late)
    return {"min_mib": low, "max_mib": high, "spread": (high - low) / low if low else 0.0}


def plot(load: Load, minutes: float, out: Path, figures: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    t = [s.at / 60 for s in load.samples]
    series = [
        ([s.rss_mib for s in load.samples], "proxy RSS (MiB)"),
        ([s.open_fds for s in load.samples], "open file descriptors"),
        ([s.tasks for s in load.samples], "asyncio tasks"),
    ]
    for ax, (values, label) in zip(axes, series, strict=False):
        ax.plot(t, values)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    per_minute: dict[int, int] = {}
    start = min((o.started for o in load.outcomes), default=0.0)
    for o in load.outcomes:
        minute = int((o.started - start) // 60)
        per_minute[minute] = per_minute.get(minute, 0) + 1
    axes[3].bar([m + 0.5 for m in per_minute], [n / 60 for n in per_minute.values()], width=0.9)
    axes[3].set_ylabel("requests / s")
    axes[3].set_xlabel("minutes")
    fig.suptitle(
        f"vcache soak: {minutes:g} min, {figures['requests']} requests, "
        f"{figures['errors']} errors, p50 {figures['all_p50_ms']:.0f} ms, "
        f"p99 {figures['all_p99_ms']:.0f} ms"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "plots" / "soak.png")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more llama-server argument (repeat: --server-arg=--cache-ram --server-arg=0)",
    )
    args = parser.parse_args()
    models = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    files = generate("gemma3", "tiny", 0, models)
    with tempfile.TemporaryDirectory(prefix="vcache-soak-") as tmp:
        server_args = [
            "-m",
            str(files.model),
            "--mmproj",
            str(files.mmproj),
            "-t",
            "2",
            "-c",
            "8192",
            "-np",
            "4",
            "--no-warmup",
            "--image-embedding",
            *args.server_arg,
        ]
        with (
            LlamaServer(built_binary("patched"), server_args, Path(tmp) / "llama.log") as server,
            ProxyProcess(
                [
                    "--upstream",
                    server.base_url,
                    "--store",
                    f"{tmp}/store",
                    "--log-level",
                    "warning",
                ],
                Path(tmp) / "proxy.log",
            ) as proxy,
        ):
            load, started = asyncio.run(
                run_load(proxy.base_url, args.minutes, args.clients, args.sample_s, args.seed)
            )
    figures = summary(load, started, args.minutes, args.warmup)
    plot(load, args.minutes, args.plot, figures)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
