"""Per-family timings for docs/models.md: what a cache hit saves on real-width models.

For each family given, on its realistic model (the real tower's width, depth, patch and image
size; a shallow text model of the real width) and one reference photo-sized image:

- encode ms: the patched server's vision encoder for that image (POST /vision/embedding)
- miss ms: time to first token with the raw image (encoder + prompt), direct to the server
- hit ms: time to first token with the image's package (no encoder)
- package bytes: what the cache stores for the image (f32)
- identical: the answer with the package equals the answer with the raw image (greedy tokens
  and logprobs, prompt cache off), on the real-width model

Models are generated first (a few GB each at realistic size) and deleted afterwards unless
``--keep-models``.

The timed requests are the ones compared: run i sends the raw image and then the package
after the same text, streamed, with the prompt cache off (so neither reuses the other's work
and the answers must match). Medians of ``--runs``; ``--runs 1`` costs two encoder passes per
family (the package's and the raw request's). Prints a table and writes JSON::

    python -m scripts.bench_families --families llava,qwen25vl --runs 3 --out families.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tests.support.llama_server import LlamaServer
from vision_cache.synthetic.images import shapes
from vision_cache.synthetic.models import generate
from vision_cache.synthetic.registry import vision_family, vision_family_names
from vision_cache.synthetic.spec import SIZES, Size

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = (1024, 768)  # a typical photo's size after a client's own downscaling


@dataclass(frozen=True)
class FamilyTiming:
    family: str
    projector: str
    image_tokens: int
    n_embd_inp: int
    package_bytes: int
    encode_ms: float
    miss_ms: float
    hit_ms: float
    identical: bool
    load: float  # 1-minute load average when the family's run started


def _binary() -> Path:
    env = os.environ.get("VCACHE_LLAMA_SERVER_PATCHED")
    if env:
        return Path(env)
    from tests.support.llama_server import built_binary

    return built_binary("patched")


def _image_url() -> str:
    buf = io.BytesIO()
    shapes(*IMAGE_SIZE).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Answer:
    ttft_ms: float
    tokens: list[str]
    logprobs: list[float]


def _ask(client: httpx.Client, part: dict[str, object], i: int) -> Answer:
    """One streamed greedy request: time to its first token, and its tokens and logprobs.

    The raw image's request i and the package's request i carry the same text, so their
    answers must be identical; the prompt cache is off, so neither reuses the other's work."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Question {i}: what is in this picture?"},
                    part,
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0,
        "cache_prompt": False,
        "logprobs": True,
        "stream": True,
    }
    tokens: list[str] = []
    logprobs: list[float] = []
    first: float | None = None
    start = time.perf_counter()
    # llama-server closes the connection after a stream: one connection per stream
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Connection": "close"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            steps = (choice.get("logprobs") or {}).get("content") or []
            if steps and first is None:
                first = time.perf_counter()
            tokens += [s["token"] for s in steps]
            logprobs += [s["logprob"] for s in steps]
    return Answer(((first or time.perf_counter()) - start) * 1000, tokens, logprobs)


def bench(family: str, size: Size, runs: int, threads: int, out: Path, keep: bool) -> FamilyTiming:
    fam = vision_family(family)
    spec = fam.spec(size)
    files = generate(family, size, 0, out)
    load = os.getloadavg()[0]
    args = [
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
        "--image-embedding",
        *fam.server_args,
    ]
    url = _image_url()
    with (
        tempfile.TemporaryDirectory() as tmp,
        LlamaServer(_binary(), args, Path(tmp) / "server.log") as server,
        httpx.Client(base_url=server.base_url, timeout=3600) as client,
    ):
        encodes, packages = [], []
        for _ in range(runs):
            r = client.post("/vision/embedding", json={"image_url": {"url": url}})
            r.raise_for_status()
            encodes.append(float(r.json()["timings"]["encode_ms"]))
            packages.append(r.json())
        answer = packages[-1]
        pkg = answer["image_embedding"]
        raw = [
            _ask(client, {"type": "image_url", "image_url": {"url": url}}, i) for i in range(runs)
        ]
        hit = [
            _ask(client, {"type": "image_embedding", "image_embedding": pkg}, i)
            for i in range(runs)
        ]
    if not keep and size != "tiny":
        shutil.rmtree(files.directory)
    n_tokens = int(answer["n_tokens"])
    return FamilyTiming(
        family=family,
        projector=fam.projector_type,
        image_tokens=n_tokens,
        n_embd_inp=spec.text.n_embd_inp,
        package_bytes=n_tokens * spec.text.n_embd_inp * 4,
        encode_ms=statistics.median(encodes),
        miss_ms=statistics.median(a.ttft_ms for a in raw),
        hit_ms=statistics.median(a.ttft_ms for a in hit),
        identical=all(
            (r.tokens, r.logprobs) == (h.tokens, h.logprobs) and r.tokens
            for r, h in zip(raw, hit, strict=True)
        ),
        load=load,
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--families",
        default=",".join(vision_family_names()),
        help="comma-separated families (default: all)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="realistic",
        help="model size (tiny: a quick check of this script)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--models", type=Path, default=ROOT / ".build" / "models")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the generated models (default: delete each after its run)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    results = []
    failed = []
    for family in args.families.split(","):
        try:
            t = bench(family, args.size, args.runs, args.threads, args.models, args.keep_models)
        except (httpx.HTTPError, OSError, RuntimeError) as e:
            # one family's failure must not cost the others' figures (a run takes hours)
            print(f"{family:10s} FAILED: {type(e).__name__}: {e}", flush=True)
            failed.append(family)
            continue
        results.append(t)
        print(
            f"{t.family:10s} {t.image_tokens:5d} tok {t.package_bytes / 2**20:7.1f} MiB  "
            f"encode {t.encode_ms:9.0f} ms  miss {t.miss_ms:9.0f} ms  "
            f"hit {t.hit_ms:7.0f} ms  identical {t.identical}  load {t.load:.1f}",
            flush=True,
        )
        if args.out:  # after every family, so an interrupted run keeps what it measured
            args.out.write_text(json.dumps([asdict(t) for t in results], indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
