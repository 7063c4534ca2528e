"""Many clients sending huge bodies at once: the proxy's memory stays bounded.

The suite's small run of scripts/body_flood.py (docs/reliability.md reports 50 x 100 MB).
Without the body budget (proxy/budget.py) these 8 bodies would be held at once: about twelve
times the limit; with it, one at a time, about twice (the bytes, then the decoded text and
the parsed string) plus a fixed overhead that weighs more on small bodies than on 100 MB ones.
"""

from __future__ import annotations

import pytest

from scripts.body_flood import flood


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_parallel_huge_bodies_keep_memory_bounded(chunked: bool) -> None:
    result = await flood(clients=8, size_mb=6, limit_mib=8, chunked=chunked, upstream="patched")
    assert result.statuses == {"400": 8}  # each image refused as too large, none dropped
    assert result.growth_over_limit < 3, result
