"""Proxies SIGKILLed while their cache writes are in flight leave a sound store.

The suite's small run of scripts/crash_proxy.py (docs/reliability.md reports the 200-seed one):
after every kill the store checks clean, SQLite's integrity_check passes, every entry is
byte-exact, the restarted proxy serves only intact packages, and gc reclaims the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.crash_proxy import run


@pytest.mark.slow
async def test_a_proxy_killed_mid_writes_leaves_a_sound_store(tmp_path: Path) -> None:
    tally = await run(seeds=3, writes=300, rehits=50, workdir=tmp_path)
    assert tally.seeds == 3 and tally.entries_checked > 0
    assert tally.corrupt_entries == tally.corrupt_served == 0
    assert tally.check_failures == tally.integrity_failures == 0
    assert tally.rehit_errors == 0 and tally.rehits_as_hits > 0  # the restart served them
    assert tally.intact_served == tally.rehits_as_hits  # each hit: an intact package
    assert tally.orphan_files_left == 0
    assert tally.dead_bytes_after_gc <= tally.padding_bound
