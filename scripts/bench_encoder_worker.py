"""Does a text-only request still wait behind an image encode? With and without the encoder worker.

One patched llama-server (packages on) and, beside it, vcache's local encoder worker
(proxy.lookup.local_encoder) on the same mmproj. Measured in one run:

* idle: a short text-only chat request with nothing else running (median of a few);
* worker: the same request sent while the worker encodes an image (the server only serves);
* server: the same request sent while the server itself encodes an image (a raw-image chat
  request), the situation the worker removes;
* the encode times, and the time the server takes for a request carrying the worker's package.

On a CPU the worker and the server share the cores, so "worker" shows what contention remains.

    python -m scripts.bench_encoder_worker                       # realistic gemma3, 2 threads each
    python -m scripts.bench_encoder_worker --size tiny           # quick sanity run
    python -m scripts.bench_encoder_worker --json out.json --encoder-threads 1

Prints a Markdown table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from proxy.lookup.local_encoder import LocalEncoder, LocalEncoderConfig
from tests.support.llama_server import LlamaServer, built_binary
from vision_cache.data_uri import data_uri
from vision_cache.llama.mtmd import EncoderSettings
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles, generate

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
TEXT_PROMPT = "Name three colours."


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("gemma3", "qwen2vl"), default="gemma3")
    p.add_argument("--size", choices=("tiny", "realistic"), default="realistic")
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models")),
    )
    p.add_argument("--server", type=Path, help="patched llama-server (default: build it)")
    p.add_argument("--server-threads", type=int, default=2)
    p.add_argument("--encoder-threads", type=int, default=2)
    p.add_argument("--idle-runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args()


def patched_server(arg: Path | None) -> Path:
    return arg if arg is not None else built_binary("patched")


async def timed(aw: Awaitable[T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = await aw
    return result, (time.perf_counter() - t0) * 1000.0


async def chat(client: httpx.AsyncClient, parts: list[dict[str, Any]], max_tokens: int) -> Any:
    body = {
        "messages": [{"role": "user", "content": parts}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "cache_prompt": False,
    }
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


def text_part() -> list[dict[str, Any]]:
    return [{"type": "text", "text": TEXT_PROMPT}]


async def text_while(
    client: httpx.AsyncClient, busy: Awaitable[T], max_tokens: int, head_start_s: float
) -> tuple[float, T, float]:
    """Latency of a text request sent `head_start_s` into `busy`; `busy`'s result and time."""
    busy_task = asyncio.ensure_future(timed(busy))
    await asyncio.sleep(head_start_s)
    assert not busy_task.done(), "the encode finished before the text request was sent"
    _, text_ms = await timed(chat(client, text_part(), max_tokens))
    result, busy_ms = await busy_task
    return text_ms, result, busy_ms


async def bench(args: argparse.Namespace, files: ModelFiles, server_bin: Path) -> dict[str, Any]:
    png = sample_image("shapes_640x480").encode("PNG")
    url = data_uri(png, "image/png")
    log = Path(tempfile.mkdtemp(prefix="vcache-bench-")) / "llama-server.log"
    server_args = [
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        str(args.server_threads),
        "-c",
        "4096",
        "-np",
        "2",
        "--no-warmup",
        "--image-embedding",
    ]
    config = LocalEncoderConfig(
        mmproj=files.mmproj,
        text_model=files.model,
        lib_dir=server_bin.parent,
        settings=EncoderSettings(n_threads=args.encoder_threads),
    )
    with LlamaServer(server_bin, server_args, log, startup_timeout=600) as server:
        async with (
            LocalEncoder(config) as encoder,
            httpx.AsyncClient(base_url=server.base_url, timeout=3600) as client,
        ):
            await chat(client, text_part(), args.max_tokens)  # warm the text path
            idle = [
                (await timed(chat(client, text_part(), args.max_tokens)))[1]
                for _ in range(args.idle_runs)
            ]
            first_ms = (await timed(encoder.encode(png)))[1]  # the worker's first encode
            head_start = min(2.0, first_ms / 4000.0)
            with_worker, encoded, worker_ms = await text_while(
                client, encoder.encode(png), args.max_tokens, head_start
            )
            package = {
                "type": "image_embedding",
                "image_embedding": encoded.header.inline(encoded.payload),
            }
            pkg_reply, pkg_ms = await timed(chat(client, [*text_part(), package], args.max_tokens))
            image = {"type": "image_url", "image_url": {"url": url}}
            with_server, _, server_ms = await text_while(
                client,
                chat(client, [*text_part(), image], args.max_tokens),
                args.max_tokens,
                head_start,
            )
    return {
        "model": f"{args.arch}-{args.size}",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "server_threads": args.server_threads,
        "encoder_threads": args.encoder_threads,
        "max_tokens": args.max_tokens,
        "text_idle_ms": statistics.median(idle),
        "text_idle_runs_ms": idle,
        "text_during_worker_encode_ms": with_worker,
        "worker_first_encode_request_ms": first_ms,
        "worker_encode_request_ms": worker_ms,
        "worker_encode_ms": encoded.encode_ms,
        "request_with_package_ms": pkg_ms,
        "package_media_encode_ms": pkg_reply.get("timings", {}).get("media_encode_ms"),
        "text_during_server_encode_ms": with_server,
        "server_image_request_ms": server_ms,
        "image_tokens": encoded.header.n_tokens,
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        ("text-only request, idle (median)", r["text_idle_ms"]),
        ("text-only request while the encoder worker encodes", r["text_during_worker_encode_ms"]),
        ("text-only request while llama-server encodes", r["text_during_server_encode_ms"]),
        ("worker encode (one image)", r["worker_encode_ms"]),
        ("request carrying the worker's package", r["request_with_package_ms"]),
        ("raw-image request (server encodes)", r["server_image_request_ms"]),
    ]
    lines = [
        f"{r['model']}, {r['image_tokens']} image tokens, {r['cpus']} cores "
        f"(load average {r['load_average'][0]:.1f} at the end), server -t "
        f"{r['server_threads']}, worker threads {r['encoder_threads']}",
        "",
        "| measurement | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:,.0f} |" for name, ms in rows]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    files = generate(args.arch, args.size, 0, args.models_dir)  # reused when up to date
    result = asyncio.run(bench(args, files, patched_server(args.server)))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
