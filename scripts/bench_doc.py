"""The benchmarks' one way into docs/benchmarks.md: each owns a section between two markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(mark: str, text: str, doc: Path = DOC) -> None:
    """Put `text` between `<!-- mark:start -->` and `<!-- mark:end -->`, replacing what a
    previous run left there (appended at the end the first time); the rest stays as it is."""
    start, end = f"<!-- {mark}:start -->", f"<!-- {mark}:end -->"
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in current and end in current:
        current = current[: current.index(start)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    doc.write_text(current)
