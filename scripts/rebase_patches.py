"""Port the patches onto a newer llama.cpp: three-way apply, build, tiny equivalence check, report.

    python -m scripts.rebase_patches ~/src/llama.cpp            # its HEAD
    python -m scripts.rebase_patches ~/src/llama.cpp --onto b7000
    python -m scripts.rebase_patches ~/src/llama.cpp --continue # after resolving conflicts

In the llama.cpp git checkout (which must be clean) this creates the branch
``vcache-patches-<commit>`` at the target commit and applies llama_patches/*.patch with
``git am --3way``, so upstream's history resolves whatever merges cleanly. A conflict stops
there: the report names the files (the hooks in them are listed in llama_patches/README.md),
you resolve them and run ``git am --continue`` in the checkout, then this script with
``--continue``. Once every patch is in, the series is exported with ``git format-patch`` into
a scratch folder, the target commit is built with it (through the same path as
``vcache build-server --source``, so outside the proven range it must pass the tiny
equivalence check) and without it, the patched-server tests (scripts.compat.SERVER_TESTS) run
against the two builds, and the report says what to copy into llama_patches/ (``--write``
copies it: the new series replaces the top-level one; move the old one under
llama_patches/ranges/ first if its trees must stay supported).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from scripts.compat import PATCH_DIR, run_server_tests, server_tests
from vision_cache.llama.server_build import BuildRequest, build_server
from vision_cache.llama.server_build.errors import BuildError
from vision_cache.llama.server_build.patches import patch_set

log = logging.getLogger("vcache.rebase")
BRANCH_PREFIX = "vcache-patches-"


class RebaseStopped(Exception):
    """The procedure cannot go on; the message says what to do."""


def git(checkout: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RebaseStopped(f"git {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done


def start(checkout: Path, onto: str) -> tuple[str, str]:
    """Create the branch and apply the series; (branch, base commit)."""
    if git(checkout, "status", "--porcelain", "--untracked-files=no").stdout.strip():
        raise RebaseStopped(f"{checkout} has uncommitted changes: commit or stash them first")
    base = git(checkout, "rev-parse", "--short=9", f"{onto}^{{commit}}").stdout.strip()
    branch = BRANCH_PREFIX + base
    git(checkout, "checkout", "-q", "-B", branch, base)
    patches = [str(p) for p in patch_set(PATCH_DIR).patches]
    log.info("applying %d patches onto %s (branch %s) with git am --3way", len(patches), base,
             branch)  # fmt: skip
    done = git(checkout, "am", "--3way", "--quiet", *patches, check=False)
    if done.returncode != 0:
        conflicted = git(checkout, "diff", "--name-only", "--diff-filter=U").stdout.split()
        raise RebaseStopped(
            "a patch does not merge by itself:\n"
            + (done.stdout + done.stderr).strip()
            + "\n\nconflicts in: " + (", ".join(conflicted) or "(see above)")
            + "\nthe hooks in those files are listed in llama_patches/README.md ('Where the "
            "patches touch llama.cpp'). Resolve them in the checkout, `git add` them, run "
            "`git am --continue` there, then this script again with --continue."
        )  # fmt: skip
    return branch, base


def resume(checkout: Path) -> tuple[str, str]:
    """After conflicts were resolved and `git am --continue` finished."""
    branch = git(checkout, "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    if not branch.startswith(BRANCH_PREFIX):
        raise RebaseStopped(f"{checkout} is not on a {BRANCH_PREFIX}<commit> branch")
    if (checkout / ".git" / "rebase-apply").exists():
        raise RebaseStopped("git am is still in progress: finish it with `git am --continue`")
    return branch, branch.removeprefix(BRANCH_PREFIX)


def export(checkout: Path, base: str, out: Path) -> Path:
    """The branch's commits as patches, plus the shared data files, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    git(checkout, "format-patch", "--quiet", "--zero-commit", "--no-signature", "-o", str(out),
        f"{base}..HEAD")  # fmt: skip
    for data in patch_set(PATCH_DIR).inputs:
        if data.suffix != ".patch":
            shutil.copy2(data, out / data.name)
    return out


def build_and_check(checkout: Path, base: str, patches: Path, jobs: int) -> tuple[Path, Path]:
    """Build the base commit with the exported patches, checked like `--source`, and without
    them (the stock server the tests compare with); (patched, stock)."""
    with tempfile.TemporaryDirectory(prefix="vcache-rebase-") as scratch:
        tree = Path(scratch) / "llama.cpp"
        git(checkout, "worktree", "add", "--detach", "-q", str(tree), base)
        try:
            binary = build_server(BuildRequest(backend="cpu", source=tree, jobs=jobs,
                                               patch_dir=patches))  # fmt: skip
            stock = build_server(BuildRequest(variant="stock", backend="cpu", source=tree,
                                              jobs=jobs))  # fmt: skip
        finally:
            git(checkout, "worktree", "remove", "--force", str(tree), check=False)
    manifest = binary.parent.parent / "build.json"
    if '"variant": "stock"' in manifest.read_text():
        raise RebaseStopped(
            f"the ported patches did not pass (see the log above); nothing to copy. Build: {binary}"
        )
    return binary, stock


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="a llama.cpp git checkout")
    p.add_argument("--onto", default="HEAD", help="the llama.cpp commit to port onto")
    p.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="go on after conflicts were resolved and `git am --continue` ran",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--write",
        action="store_true",
        help="copy the new series over the top-level patches in llama_patches/",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[rebase %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    args = parse_args(argv)
    checkout = args.checkout.expanduser().resolve()
    try:
        branch, base = resume(checkout) if args.resume else start(checkout, args.onto)
        patches = export(checkout, base, Path(tempfile.mkdtemp(prefix="vcache-patches-")))
        binary, stock = build_and_check(checkout, base, patches, args.jobs)
        ok, summary = run_server_tests(binary, stock)
        if not ok:
            raise RebaseStopped(f"{', '.join(server_tests())} failed on {binary}: {summary}")
    except (RebaseStopped, BuildError) as e:
        print(f"rebase report: STOPPED\n{e}", file=sys.stderr)
        return 1
    if args.write:
        for old in PATCH_DIR.glob("*.patch"):
            old.unlink()
        for new in patches.glob("*.patch"):
            shutil.copy2(new, PATCH_DIR / new.name)
    where = (
        "copied into llama_patches/"
        if args.write
        else f"to use them: cp {patches}/*.patch llama_patches/ (or rerun with --write), "
        "then `make compat` to record the range"
    )
    print(
        f"rebase report: llama.cpp {base}: the patches apply (three-way), build, and pass the "
        f"tiny equivalence check and {', '.join(server_tests())} ({summary}).\n"
        f"  branch in the checkout: {branch}\n  binary: {binary}\n  patches: {patches}\n"
        f"  {where}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
