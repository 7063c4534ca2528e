#!/usr/bin/env python3
"""Judge a new image against a folder of references, under a rubric you change each run.

The references are warmed once (encoded, pinned, their images kept); every later run
encodes only the candidate, shortlists the `top_k` references closest to it by their cached
embeddings, and has the VLM judge just those, answering in JSON (a score and a mark per
criterion). `vcache compare` is the same from the shell.

    python scripts/compare_references.py --proxy http://127.0.0.1:8081 \\
        refs/ candidate.jpg --rubric "short fur; triangular ears" --top-k 5
"""

from __future__ import annotations

import argparse
import sys

import vision_cache
from vision_cache.client.admin_api import DEFAULT_PROXY


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("references", help="folder of reference images")
    p.add_argument("candidate", help="the image to judge")
    p.add_argument("--rubric", required=True, help='criteria, e.g. "short fur; green eyes"')
    p.add_argument("--top-k", type=int, default=5, help="finalists the VLM judges")
    p.add_argument("--proxy", default=DEFAULT_PROXY, help="the running vcache proxy")
    args = p.parse_args(argv)

    # once per folder: later runs skip what is cached without uploading it
    vision_cache.warm([args.references], proxy=args.proxy)
    reply = vision_cache.compare(
        args.candidate,
        rubric=args.rubric,
        top_k=args.top_k,
        references=vision_cache.references_in(args.references),
        proxy=args.proxy,
    )
    for f in reply.ranking:
        marks = ", ".join(f"{c}: {m}" for c, m in f.criteria.items())
        print(f"{f.rank}. {f.reference}  score {f.score}  ({marks})  similarity {f.similarity:.3f}")
    print(
        f"shortlist by {reply.recall}; {reply.model_calls} model call(s) in "
        f"{reply.total_ms / 1000:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
