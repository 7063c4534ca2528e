"""`Store.check()`: verify the index against itself and the segment files.

Problems are things that could make the store serve wrong or missing data
for an indexed key: SQLite damage, totals that disagree with rows, rows that
fail their row check, point at a missing file, past its end or at bytes
whose checksum differs. Dead and orphaned bytes are not problems, only
reclaimable space (`gc()` returns it). With `fix=True` every bad entry is
quarantined and removed, and totals are recomputed.

Another process may move or delete an entry while we look at it, so a
finding is only reported after re-reading the row and seeing it unchanged.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from vision_cache.errors import PayloadCorruptError, PayloadError
from vision_cache.store.index import Index, IndexRow
from vision_cache.store.layout import StoreLayout, parse_segment_name
from vision_cache.store.quarantine import Quarantine, Reason
from vision_cache.store.segments import ALIGNMENT, HEADER_SIZE, map_payload, read_header

# (done, total) as a long operation advances: total is None while unknown
Progress = Callable[[int, int | None], None]


class ProblemKind(enum.StrEnum):
    INTEGRITY = "integrity"
    TOTALS = "totals"
    ROW = "row"
    MISSING = "missing"
    BOUNDS = "bounds"
    CHECKSUM = "checksum"


_QUARANTINE_REASON = {
    ProblemKind.ROW: Reason.ROW,
    ProblemKind.MISSING: Reason.MISSING,
    ProblemKind.BOUNDS: Reason.BOUNDS,
    ProblemKind.CHECKSUM: Reason.CHECKSUM,
}


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    detail: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class CheckReport:
    entries_checked: int
    bytes_verified: int
    problems: tuple[Problem, ...]
    orphan_files: int
    # Orphan files plus dead bytes (deleted, orphaned, padding) in known
    # segments: what gc() could give back, not a problem.
    reclaimable_bytes: int
    unknown_files: int
    dangling_names: int
    fixed: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    @classmethod
    def index_unreadable(cls, detail: str) -> CheckReport:
        return cls(0, 0, (Problem(ProblemKind.INTEGRITY, detail),), 0, 0, 0, 0, fixed=False)


@dataclass(frozen=True, slots=True)
class _SegmentFile:
    size: int
    header_id: int | None


@dataclass(slots=True)
class _Scan:
    checked: int = 0
    verified: int = 0
    problems: list[Problem] = field(default_factory=list)


class Checker:
    def __init__(self, index: Index, layout: StoreLayout, quarantine: Quarantine) -> None:
        self._index = index
        self._layout = layout
        self._quarantine = quarantine

    def run(self, *, fix: bool, deep: bool, progress: Progress | None = None) -> CheckReport:
        integrity = self._index.integrity_errors(quick=not deep)
        if integrity:
            problems = [Problem(ProblemKind.INTEGRITY, message) for message in integrity[:20]]
            return CheckReport(0, 0, tuple(problems), 0, 0, 0, 0, fixed=False)
        files = self._segment_files()
        scan = _Scan()
        total = self._index.totals().entries if progress else None
        for row in self._index.iter_rows():
            self._check_row(row, files, deep, fix, scan)
            if progress is not None:
                progress(scan.checked, total)
        # Recount after the row pass, so that fixes made there are counted.
        totals = [Problem(ProblemKind.TOTALS, text) for text in self._index.recount(fix=fix)]
        orphans = self._orphans(files)
        return CheckReport(
            scan.checked,
            scan.verified,
            tuple(scan.problems + totals),
            len(orphans),
            sum(files[segment_id].size for segment_id in orphans) + self._dead_bytes(files),
            self._unknown_files(),
            self._index.dangling_names(),
            fixed=fix,
        )

    def _check_row(
        self, row: IndexRow, files: dict[int, _SegmentFile], deep: bool, fix: bool, scan: _Scan
    ) -> None:
        scan.checked += 1
        finding = self._inspect(row, files.get(row.segment), deep)
        if finding is None:
            scan.verified += row.length if deep else 0
            return
        kind, detail = finding
        if not self._still_there(row):
            return  # moved or deleted by another process while we looked
        scan.problems.append(Problem(kind, detail, row.key.text))
        if fix:
            self._quarantine.record(_QUARANTINE_REASON[kind], row.id, row, None, detail)
            # A damaged row's columns cannot be trusted for a compare-and-swap.
            if row.intact():
                self._index.delete_row(row)
            else:
                self._index.delete_id(row.id)

    def _inspect(
        self, row: IndexRow, file: _SegmentFile | None, deep: bool
    ) -> tuple[ProblemKind, str] | None:
        if not row.intact():
            return ProblemKind.ROW, f"row {row.id} fails its row check"
        if file is None:
            return ProblemKind.MISSING, f"segment {row.segment} has no file"
        if file.header_id != row.segment:
            return ProblemKind.BOUNDS, f"segment {row.segment} header names {file.header_id}"
        aligned = row.offset >= HEADER_SIZE and row.offset % ALIGNMENT == 0
        if not aligned or row.offset + row.length > file.size:
            return ProblemKind.BOUNDS, f"{row.offset}+{row.length} outside {file.size} bytes"
        return self._verify(row) if deep else None

    def _verify(self, row: IndexRow) -> tuple[ProblemKind, str] | None:
        try:
            mapping = map_payload(self._layout.segment_path(row.segment), row.offset, row.length)
        except PayloadCorruptError as exc:
            return ProblemKind.BOUNDS, str(exc)
        except PayloadError as exc:
            return ProblemKind.MISSING, str(exc)
        with mapping, memoryview(mapping) as view:
            actual = xxhash.xxh3_64_hexdigest(view)
        if actual != row.checksum:
            return ProblemKind.CHECKSUM, f"checksum {actual} != {row.checksum}"
        return None

    def _still_there(self, row: IndexRow) -> bool:
        if not row.intact():
            return True  # a damaged row cannot be looked up by its key
        current = self._index.lookup(row.key)
        return current is not None and (current.id, current.segment, current.offset) == (
            row.id,
            row.segment,
            row.offset,
        )

    def _segment_files(self) -> dict[int, _SegmentFile]:
        files: dict[int, _SegmentFile] = {}
        for entry in os.scandir(self._layout.segments_dir):
            segment_id = parse_segment_name(entry.name)
            if segment_id is not None and entry.is_file():
                path = self._layout.segment_path(segment_id)
                files[segment_id] = _SegmentFile(entry.stat().st_size, read_header(path))
        return files

    def _orphans(self, files: dict[int, _SegmentFile]) -> list[int]:
        known = {segment.id for segment in self._index.segments()}
        return [segment_id for segment_id in files if segment_id not in known]

    def _dead_bytes(self, files: dict[int, _SegmentFile]) -> int:
        dead = 0
        for segment in self._index.segments():
            file = files.get(segment.id)
            if file is not None:
                dead += max(0, file.size - HEADER_SIZE - segment.live_bytes)
        return dead

    def _unknown_files(self) -> int:
        return sum(
            1
            for entry in os.scandir(self._layout.segments_dir)
            if parse_segment_name(entry.name) is None
        )
