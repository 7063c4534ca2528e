"""Comparing a candidate image with many references: shortlist by embeddings, then judge.

`service` runs one comparison in stages (prefilter on descriptions, shortlist by vector
similarity, the VLM judging the finalists); `vectors` is the embedding cache the shortlist
reads, `index` the nearest-neighbour search over it, `sidecars` the descriptions warm-up
stores, and `internal` the requests the proxy makes to its own upstream through its cache.
"""
