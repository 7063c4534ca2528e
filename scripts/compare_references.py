#!/usr/bin/env python3
"""Judge a new image against a folder of reference images, under a rubric you change each run.

The references are warmed once (encoded, pinned and named after their files), so every later
run encodes only the candidate: each question sends the reference by name (``vcache://NAME``)
and the candidate by its bytes, which are cached on the first question and hit on the others.

    python scripts/compare_references.py --proxy http://127.0.0.1:8081 \\
        refs/ candidate.jpg --rubric "short fur, triangular ears"
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

import vision_cache
from vision_cache.client.admin_api import DEFAULT_PROXY
from vision_cache.client.warmup import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Verdict:
    reference: str
    answer: str
    seconds: float
    hits: int
    misses: int
    saved_ms: float


def reference_name(path: Path) -> str:
    """A valid reference name from a file name: `ref-` + its stem, other characters as '-'."""
    return "ref-" + re.sub(r"[^A-Za-z0-9._-]", "-", path.stem)[:120]


def warm_references(proxy: str, folder: Path, model: str) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images in {folder}")
    report = vision_cache.warm(
        [], proxy=proxy, model=model, names={reference_name(p): p for p in files}
    )
    for item in report.failed:
        print(f"warm-up failed for {item.source.location}: {item.error}", file=sys.stderr)
    return {name: ref for name, ref in sorted(report.refs.items())}


def judge(client: httpx.Client, model: str, ref: str, candidate_url: str, rubric: str) -> Verdict:
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 32,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Rubric: {rubric}\nReference image:"},
                    {"type": "image_url", "image_url": {"url": ref}},
                    {"type": "text", "text": "Candidate image:"},
                    {"type": "image_url", "image_url": {"url": candidate_url}},
                    {
                        "type": "text",
                        "text": "Does the candidate match the reference under the rubric? "
                        "Answer yes or no, then why.",
                    },
                ],
            }
        ],
    }
    started = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    r.raise_for_status()
    fields = dict(kv.split("=") for kv in r.headers.get("x-vcache", "").split() if "=" in kv)
    answer = r.json()["choices"][0]["message"]["content"].strip().replace("\n", " ")
    return Verdict(
        ref,
        answer,
        seconds,
        int(fields.get("hits", 0)),
        int(fields.get("misses", 0)),
        float(fields.get("encode_ms_saved", 0)),
    )


def data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def report(verdicts: list[Verdict], rubric: str) -> None:
    table = Table(title=f"rubric: {rubric}")
    for col in ("reference", "answer", "time", "cache"):
        table.add_column(col)
    for v in verdicts:
        table.add_row(
            v.reference,
            v.answer[:60],
            f"{v.seconds:.2f} s",
            f"{v.hits} hit(s), {v.misses} miss(es)",
        )
    console = Console()
    console.print(table)
    misses = sum(v.misses for v in verdicts)
    saved = sum(v.saved_ms for v in verdicts) / 1000
    console.print(
        f"images encoded this run: {misses} (the candidate, if new); "
        f"encoder time saved by the cache: {saved:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("references", type=Path, help="folder of reference images")
    p.add_argument("candidate", type=Path, help="the image to judge")
    p.add_argument("--rubric", required=True, help='criteria, e.g. "short fur, triangular ears"')
    p.add_argument("--proxy", default=DEFAULT_PROXY, help="the running vcache proxy")
    p.add_argument("--model", default="", help="model name (router mode)")
    args = p.parse_args(argv)
    refs = warm_references(args.proxy, args.references, args.model)
    candidate = data_url(args.candidate)
    with httpx.Client(base_url=args.proxy, timeout=900) as client:
        verdicts = [judge(client, args.model, ref, candidate, args.rubric) for ref in refs.values()]
    report(verdicts, args.rubric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
