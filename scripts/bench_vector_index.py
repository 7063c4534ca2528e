"""Stage 1's search: exact (numpy) against an HNSW graph (usearch), by reference count.

One query per comparison: the question is where one exact matrix-vector product stops being
instant, and what an HNSW graph costs to build and how much it recalls there. Vectors are
clustered (100 per cluster, as near-duplicates among references are), unit length.

    python -m scripts.bench_vector_index                      # 1k, 10k, 100k vectors of 1024
    python -m scripts.bench_vector_index --sizes 1000 10000 --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from proxy.compare.index import VectorSet
from scripts.bench_doc import write_section

MARK = "bench_vector_index"
K = 5


def median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(n: int, dim: int) -> str:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(8, n // 100), dim)).astype(np.float32)
    matrix = centers[rng.integers(0, len(centers), n)]
    matrix += 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    queries = matrix[rng.integers(0, n, 20)] + 0.1 * rng.standard_normal((20, dim)).astype(
        np.float32
    )
    labels = [str(i) for i in range(n)]
    exact = VectorSet(labels, matrix)
    started = time.perf_counter()
    hnsw = VectorSet(labels, matrix, ann_above=0)
    build_s = time.perf_counter() - started
    exact_ms = median_ms(lambda: [exact.nearest(q, K) for q in queries], 5) / len(queries)
    hnsw_ms = median_ms(lambda: [hnsw.nearest(q, K) for q in queries], 5) / len(queries)
    recall = np.mean(
        [
            len({x.label for x in hnsw.nearest(q, K)} & {x.label for x in exact.nearest(q, K)}) / K
            for q in queries
        ]
    )
    return f"| {n:,} | {exact_ms:.2f} ms | {build_s:.1f} s | {hnsw_ms:.2f} ms | {recall:.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="print, do not write docs")
    args = p.parse_args(argv)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = [measure(n, args.dim) for n in args.sizes]
    text = "\n".join(
        [
            "## Stage 1's search: exact or HNSW (`scripts/bench_vector_index.py`)",
            "",
            f"Unit vectors of {args.dim} floats, clustered; one query, top {K}; median of 20 "
            f"queries. Load average at start {load} (2 cores).",
            "",
            "| references | exact (numpy) | HNSW build (usearch) | HNSW query | HNSW recall@5 |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    if not args.quick:
        write_section(MARK, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
