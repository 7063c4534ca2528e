"""Nearest references by cosine similarity: exact while that is instant, HNSW past it.

Stage 1 of a comparison asks one question per request: which `k` of these N references are
closest to the candidate? Up to `EXACT_MAX` references the answer is one matrix-vector
product (numpy, exact: about 10 ms for 10,000 vectors of 1,024 floats on 2 cores, 0.1 s for
100,000). Past it, an HNSW graph (usearch) answers in milliseconds at a recall below 1; the
graph is built once per set of vectors and kept while the set is unchanged, since building
it costs far more than one exact search. The measurement behind the choice (and why usearch
rather than sqlite-vec, hnswlib or faiss) is in docs/benchmarks.md.

    vectors = VectorSet.from_rows(labels, matrix)        # rows need not be normalised
    top = vectors.nearest(query, k=5)                     # [(label, cosine), ...] best first
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
EXACT_MAX = 100_000


@dataclasses.dataclass(frozen=True)
class Neighbour:
    label: str
    similarity: float


class VectorSet:
    """A fixed set of labelled unit vectors, searched exactly or through an HNSW index."""

    def __init__(self, labels: Sequence[str], matrix: F32, *, ann_above: int = EXACT_MAX) -> None:
        if matrix.ndim != 2 or len(labels) != matrix.shape[0]:
            raise ValueError("one row per label")
        self.labels = list(labels)
        self.matrix = _normalised(matrix)
        self._ann = _Hnsw(self.matrix) if len(labels) > ann_above else None

    @property
    def method(self) -> str:
        return "hnsw (usearch)" if self._ann else "exact (numpy)"

    def nearest(self, query: F32, k: int) -> list[Neighbour]:
        q = _normalised(query.reshape(1, -1))[0]
        if q.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"query has {q.shape[0]} dimensions, the set {self.matrix.shape[1]}")
        k = min(k, len(self.labels))
        if k <= 0:
            return []
        rows, sims = self._ann.search(q, k) if self._ann else _exact(self.matrix, q, k)
        return [Neighbour(self.labels[r], float(s)) for r, s in zip(rows, sims, strict=True)]


def _exact(matrix: F32, q: F32, k: int) -> tuple[list[int], list[float]]:
    sims = matrix @ q
    top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
    # ties broken by row (then label order is the caller's): the same input, the same answer
    order = sorted(top.tolist(), key=lambda r: (-sims[r], r))
    return order, [float(sims[r]) for r in order]


class _Hnsw:
    def __init__(self, matrix: F32) -> None:
        from usearch.index import Index  # only sets this large pay for the import

        self._index = Index(
            ndim=matrix.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=16,
            expansion_add=128,
            expansion_search=128,
        )
        self._index.add(np.arange(matrix.shape[0], dtype=np.uint64), matrix)

    def search(self, q: F32, k: int) -> tuple[list[int], list[float]]:
        found = self._index.search(q, k)
        return [int(x) for x in found.keys], [1.0 - float(d) for d in found.distances]


def _normalised(matrix: F32) -> F32:
    m = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: F32 = m / norms
    return out
