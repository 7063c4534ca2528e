"""`make compat`: apply, build and test the patches on the llama.cpp trees of the last five
llama-cpp-python sdists, and write down the range where everything passes.

For each sdist: fetch it with pip (once), unpack its vendored llama.cpp, read the llama.cpp
commit from its CHANGELOG, pick the patch series that applies (llama_patches/ or one of
llama_patches/ranges/, by what the tree contains), build the patched llama-server, and run the
tiny equivalence check (vision_cache.llama.server_build.equivalence) against it; then build the
same tree without the patches and run the patched-server test modules (SERVER_TESTS) against
the two, so "answers like stock" means like that tree's own stock server. The results go to
llama_patches/compat.json (which `vcache build-server --source` reads to say whether a tree is
in the proven range) and, as a table, into llama_patches/README.md.

    python -m scripts.compat                      # all five (an hour on two cores, cold ccache)
    python -m scripts.compat --versions 0.3.36    # one tree
    python -m scripts.compat --no-pytest          # the equivalence check alone (no stock builds)

Rerunnable: builds are cached by the same keys as every other build, so a second run after a
change to one series rebuilds only the trees that series applies to.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from vision_cache.llama.server_build import compat
from vision_cache.llama.server_build.builder import ensure_built
from vision_cache.llama.server_build.equivalence import check_equivalence
from vision_cache.llama.server_build.errors import BuildError, PatchError
from vision_cache.llama.server_build.patches import PatchSet, select_patch_series
from vision_cache.llama.server_build.plan import BASE_CMAKE_FLAGS, BuildPlan, default_cache_dir
from vision_cache.llama.server_build.source import (
    Source,
    extract_vendored_tree,
    fetch_sdist,
    tree_digest,
)

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "llama_patches"
README = PATCH_DIR / "README.md"
VERSIONS = ("0.3.32", "0.3.33", "0.3.34", "0.3.35", "0.3.36")
TABLE_BEGIN = "<!-- compat table: written by `make compat`, do not edit by hand -->"
TABLE_END = "<!-- end of compat table -->"
# run against each tree's patched and stock builds (those of them this checkout has)
SERVER_TESTS = ("tests/test_patched_server.py", "tests/test_export.py")

log = logging.getLogger("vcache.compat")


def changelog_commit(sdist: Path, version: str) -> str:
    """The llama.cpp commit a llama-cpp-python release vendors: the first "update llama.cpp"
    line of its section of CHANGELOG.md."""
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/CHANGELOG.md")
        if member is None:
            raise BuildError(f"{sdist.name} has no CHANGELOG.md")
        text = member.read().decode()
    section = text.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    m = re.search(r"update llama\.cpp to ggml-org/llama\.cpp@([0-9a-f]{7,40})", section, re.I)
    if not m:
        raise BuildError(f"CHANGELOG.md of {version} names no llama.cpp commit")
    return m.group(1)


def measure(version: str, cache: Path, jobs: int, pytest: bool) -> compat.TreeResult:
    """Apply, build and test the patches on one sdist's llama.cpp tree."""
    sdist = fetch_sdist(cache / "downloads", version)
    tree = extract_vendored_tree(sdist, cache / "compat-sources" / version)
    commit = changelog_commit(sdist, version)
    source = Source(tree, tree_digest(tree), f"llama-cpp-python {version} sdist", commit)
    log.info("== llama-cpp-python %s (llama.cpp %s)", version, commit)
    base = functools.partial(
        compat.TreeResult, llama_cpp_python=version, commit=commit, tree_digest=source.digest
    )
    try:
        label, series = select_patch_series(tree, PATCH_DIR)
    except PatchError as e:
        return base(series=None, applies=False, builds=None,
                    equivalence=None, detail=str(e))  # fmt: skip
    log.info("patch series %r applies", label)
    base = functools.partial(base, series_digest=compat.series_digests(PATCH_DIR)[label])
    plan = BuildPlan("patched", source, series, BASE_CMAKE_FLAGS, cache)
    cached = plan.manifest.exists() and plan.binary.exists()
    started = time.monotonic()
    try:
        binary = ensure_built(plan, jobs, {"series": label, "compat": version})
    except BuildError as e:
        return base(series=label, applies=True, builds=False,
                    equivalence=None, detail=str(e).splitlines()[0])  # fmt: skip
    build_s = None if cached else round(time.monotonic() - started)
    result = check_equivalence(binary, cache / "models")
    log.info("tiny equivalence check: %s", result.detail)
    done = functools.partial(base, series=label, applies=True, builds=True,
                             equivalence=result.passed, detail=result.detail,
                             build_s=build_s)  # fmt: skip
    if not (result.passed and pytest):
        return done()
    stock_plan = BuildPlan("stock", source, PatchSet(), BASE_CMAKE_FLAGS, cache)
    try:
        stock = ensure_built(stock_plan, jobs, {"compat": version})
    except BuildError as e:
        return done(tests=False, tests_summary="stock build failed: " + str(e).splitlines()[0])
    ok, summary = run_server_tests(binary, stock)
    log.info("%s: %s", ", ".join(server_tests()), summary)
    return done(tests=ok, tests_summary=summary)


def server_tests() -> list[str]:
    return [t for t in SERVER_TESTS if (ROOT / t).exists()]


def run_server_tests(patched: Path, stock: Path) -> tuple[bool, str]:
    """SERVER_TESTS against a tree's patched and stock builds."""
    env = dict(
        os.environ, VCACHE_LLAMA_SERVER_PATCHED=str(patched), VCACHE_LLAMA_SERVER_STOCK=str(stock)
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *server_tests()]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return done.returncode == 0, pytest_summary(done.stdout) or f"exit {done.returncode}"


def pytest_summary(output: str) -> str:
    """pytest -q's counts without the deselected and the time: "24 passed, 1 failed"."""
    lines = output.strip().splitlines()
    if not lines:
        return ""
    last = lines[-1].strip("= ").split(" in ")[0]
    return ", ".join(part for part in last.split(", ") if "deselected" not in part)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "cached"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def table(record: compat.CompatRecord, took_s: float, measured: Sequence[str]) -> str:
    proven = compat.proven_range(record)
    rows = [
        "| llama-cpp-python | llama.cpp | patch series | applies | builds | tiny equivalence "
        "| server tests | build |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mark = {True: "yes", False: "**no**", None: "-"}
    for t in record.trees:
        build = _duration(t.build_s) if t.builds else "-"
        tests = t.tests_summary if t.tests is not None else "-"
        if t.tests is False:
            tests = f"**{tests}**"
        rows.append(f"| {t.llama_cpp_python} | `{t.commit}` | {t.series or '-'} | "
                    f"{mark[t.applies]} | {mark[t.builds]} | {mark[t.equivalence]} | "
                    f"{tests} | {build} |")  # fmt: skip
    failures = [f"- {t.llama_cpp_python}: {t.detail}" for t in record.trees if not t.proven]
    return "\n".join([
        TABLE_BEGIN, "", *rows, "",
        f"Proven range: {compat.describe(proven)}. Measured {record.measured_at} by `make compat`: "
        f"this run measured {', '.join(measured)} in {took_s / 60:.0f} min on two cores. Server "
        f"tests: {', '.join(server_tests())} against the tree's patched and stock builds; build: "
        "the patched llama-server's compile in that run (`cached`: already built with these "
        "patches).",
        *(["", "Why the others fail:", *failures] if failures else []),
        "", TABLE_END,
    ])  # fmt: skip


def write_table(text: str) -> None:
    readme = README.read_text()
    if TABLE_BEGIN in readme:
        head, rest = readme.split(TABLE_BEGIN, 1)
        readme = head + text + rest.split(TABLE_END, 1)[1]
    else:
        readme = readme.rstrip("\n") + "\n\n## Supported llama.cpp versions\n\n" + text + "\n"
    README.write_text(readme)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", nargs="+", default=list(VERSIONS), metavar="V")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--no-pytest",
        dest="pytest",
        action="store_false",
        help="run only the equivalence check, not tests/test_patched_server.py",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[compat %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    args = parse_args(argv)
    cache = default_cache_dir().expanduser().resolve()
    started = time.monotonic()
    old = compat.load_record(PATCH_DIR)
    current = compat.series_digests(PATCH_DIR)
    results = {}
    if old is not None:  # trees not rerun keep their results while these still hold
        results = {t.llama_cpp_python: t for t in old.trees if old.still_valid(t, current)}
    for version in args.versions:
        results[version] = measure(version, cache, args.jobs, args.pytest)
        log.info(
            "%s: %s", version, "proven" if results[version].proven else results[version].detail
        )
    trees = tuple(results[v] for v in sorted(results, key=lambda v: tuple(map(int, v.split(".")))))
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    record = compat.CompatRecord(stamp, current, trees)
    compat.write_record(record, PATCH_DIR)
    took = time.monotonic() - started
    write_table(table(record, took, args.versions))
    log.info(
        "done in %.0f min; proven range: %s",
        took / 60,
        compat.describe(compat.proven_range(record)),
    )
    return 0 if all(t.proven for t in trees if t.llama_cpp_python in args.versions) else 1


if __name__ == "__main__":
    sys.exit(main())
