"""Where things live inside a store directory.

    DIR/index.sqlite       SQLite index (WAL): keys, meta, file references
    DIR/segments/          append-only segment files seg-NNNNNNNN.vseg
    DIR/quarantine/        copies of bad payloads and damaged index files
    DIR/open.lock          serialises opening, migration and index recovery

Every path below DIR is built from integers or fixed names only; no key,
namespace component or reference name ever reaches this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SEGMENT_SUFFIX = ".vseg"
_SEGMENT_NAME = re.compile(r"seg-(\d{8,19})\.vseg")


def segment_name(segment_id: int) -> str:
    """`seg-00000001.vseg` for 1; the only way a segment file is ever named."""
    if type(segment_id) is not int or segment_id <= 0:
        raise ValueError(f"segment id must be a positive int, got {segment_id!r}")
    return f"seg-{segment_id:08d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The segment id of a file name written by `segment_name`, else None."""
    match = _SEGMENT_NAME.fullmatch(name)
    if match is None:
        return None
    segment_id = int(match.group(1))
    return segment_id if segment_name(segment_id) == name else None


@dataclass(frozen=True, slots=True)
class StoreLayout:
    root: Path

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite"

    @property
    def segments_dir(self) -> Path:
        return self.root / "segments"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def lock_path(self) -> Path:
        return self.root / "open.lock"

    @property
    def suspect_marker(self) -> Path:
        """Present when some process saw SQLite report corruption."""
        return self.root / "index.suspect"

    def segment_path(self, segment_id: int) -> Path:
        return self.segments_dir / segment_name(segment_id)

    def exists(self) -> bool:
        return self.index_path.is_file()

    def create_dirs(self) -> None:
        for directory in (self.root, self.segments_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
