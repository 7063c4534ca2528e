#!/usr/bin/env python3
"""`make demo`: the same image asked about three times, through vcache, miss then hits.

Starts the patched llama-server behind `vcache serve` (managed mode) on a fresh cache, sends one
reference image with three different questions, and prints for each whether the cache missed or
hit and the time to first token, then the speedup. With no model given, it generates a Gemma 3
test VLM with random weights whose vision tower has SigLIP-so400m's width at 896 px (fewer layers
than the real 27, so the demo stays short); answers are gibberish, timings are real.

The patched llama-server comes from `vcache build-server` (built once, then cached; for CUDA
when an NVIDIA GPU is present), or from $LLAMA_SERVER.

    python scripts/demo.py                                  # generated model
    MODEL=model.gguf MMPROJ=mmproj.gguf python scripts/demo.py
    IMAGE=photo.jpg python scripts/demo.py
    python scripts/demo.py --source ~/src/llama.cpp --jobs 8
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = ("What is in this picture?", "Which colours dominate it?", "Is there any text in it?")


@dataclass(frozen=True)
class Turn:
    question: str
    cache: str
    ttft_ms: float
    total_ms: float
    text: str


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def model_files() -> tuple[Path, Path, str]:
    if os.environ.get("MODEL") and os.environ.get("MMPROJ"):
        return Path(os.environ["MODEL"]), Path(os.environ["MMPROJ"]), "your model"
    from vision_cache.synthetic.models import generate

    out = Path(os.environ.get("VCACHE_MODELS_DIR", ROOT / ".build" / "models"))
    say("generating the demo VLM (random weights, SigLIP-so400m-wide vision tower), once")
    files = generate("gemma3", "demo", 0, out)
    return files.model, files.mmproj, "generated Gemma 3 test VLM (random weights)"


def image_url() -> tuple[str, str]:
    path = os.environ.get("IMAGE")
    if path:
        mime = mimetypes.guess_type(path)[0] or "image/jpeg"
        data = base64.b64encode(Path(path).read_bytes()).decode()
        return f"data:{mime};base64,{data}", Path(path).name
    from vision_cache.synthetic.images import sample_image

    return sample_image("gradient_text_800x600").data_url("PNG"), "generated 800x600 PNG"


def llama_server(args: argparse.Namespace) -> Path:
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    say("vcache build-server: the patched llama-server (built once, then reused)")
    cmd = [sys.executable, "-m", "proxy", "build-server", "--jobs", str(args.jobs)]
    if args.source:
        cmd += ["--source", args.source]
    # progress and errors reach the terminal on stderr; stdout is the binary's path
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit("[demo] the llama-server build failed (see above)")
    return Path(out.stdout.strip())


@contextmanager
def proxy(binary: Path, model: Path, mmproj: Path, store: Path) -> Iterator[str]:
    threads = str(os.cpu_count() or 2)
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--port",
        "0",
        "--store",
        str(store),
        "--llama-server",
        str(binary),
        "--log-level",
        "warning",
        "--",
        "-m",
        str(model),
        "--mmproj",
        str(mmproj),
        "-t",
        threads,
        "-c",
        "4096",
        "--no-warmup",
    ]
    log = store.parent / "vcache.log"
    say(f"starting llama-server behind vcache (loading the model; log: {log})")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield _wait_url(proc, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vcache exited:\n{log.read_text(errors='replace')[-3000:]}")
        m = re.search(r"vcache: serving on (http://\S+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise SystemExit("vcache did not start within 15 minutes")


def ask(base: str, url: str, question: str) -> Turn:
    body = {
        "model": "demo",
        "stream": True,
        "temperature": 0,
        "max_tokens": 12,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }
    started = time.perf_counter()
    first: float | None = None
    text = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        cache = _cache_outcome(r.headers.get("x-vcache", ""))
        for line in r.iter_lines():
            delta = _delta(line)
            if delta is not None:
                first = first or time.perf_counter()
                text.append(delta)
    end = time.perf_counter()
    ttft = ((first or end) - started) * 1000
    return Turn(question, cache, ttft, (end - started) * 1000, "".join(text).strip())


def _cache_outcome(header: str) -> str:
    fields = dict(item.split("=", 1) for item in header.split() if "=" in item)
    if fields.get("hits", "0") != "0":
        return "hit"
    if fields.get("misses", "0") != "0":
        return "miss"
    return "fallback"


def _delta(line: str) -> str | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    choices = json.loads(line[6:]).get("choices") or [{}]
    content = choices[0].get("delta", {}).get("content")
    return content if content else None


def report(turns: list[Turn], model_label: str, image_label: str) -> None:
    print()
    print(f"  model: {model_label}")
    print(f"  image: {image_label}, sent in full with each question")
    print()
    print(f"  {'#':<3}{'question':<30}{'cache':<8}{'first token':>12}{'total':>10}")
    for i, t in enumerate(turns, 1):
        print(f"  {i:<3}{t.question:<30}{t.cache:<8}{_ms(t.ttft_ms):>12}{_ms(t.total_ms):>10}")
    misses = [t.ttft_ms for t in turns if t.cache == "miss"]
    hits = [t.ttft_ms for t in turns if t.cache == "hit"]
    print()
    if misses and hits:
        speedup = statistics.median(misses) / statistics.median(hits)
        print(
            f"  repeated image: time to first token {speedup:.0f}x faster "
            f"({_ms(statistics.median(misses))} -> {_ms(statistics.median(hits))})"
        )
    else:
        print("  no miss/hit pair: is the upstream a patched llama-server?")


def _ms(ms: float) -> str:
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile jobs")
    p.add_argument("--source", help="a llama.cpp checkout to build instead of the pinned one")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    binary = llama_server(args)
    model, mmproj, model_label = model_files()
    url, image_label = image_url()
    with (
        tempfile.TemporaryDirectory(prefix="vcache-demo-") as tmp,
        proxy(binary, model, mmproj, Path(tmp) / "store") as base,
    ):
        say(f"vcache is up at {base}; asking about the same image three times")
        turns = []
        for q in QUESTIONS:
            turn = ask(base, url, q)
            say(f"{q!r}: {turn.cache}, first token after {_ms(turn.ttft_ms)}")
            turns.append(turn)
    report(turns, model_label, image_label)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\n[demo] interrupted; everything stopped", file=sys.stderr)
        sys.exit(130)
