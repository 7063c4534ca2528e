#!/usr/bin/env python3
"""Build llama-server from llama.cpp source, with vcache's patches or without.

Variants: ``patched`` (llama_patches/ applied) and ``stock`` (the same source, untouched).

The default source is the llama.cpp tree vendored in the llama-cpp-python sdist pinned below
(pip fetches it from the package index pip is configured with); ``--source PATH`` builds a
llama.cpp checkout of your own instead. Builds are cached under ``--out`` by a key made of the
source hash, the patches' hash, the variant and the CMake flags, so a second run with the same
inputs builds nothing. Both variants are compiled with ccache when it is installed, which lets
the second build reuse every object the patches do not touch.

Usage::

    python scripts/build_llama_server.py                    # patched and stock, CPU
    python scripts/build_llama_server.py --variant patched --cuda
    python scripts/build_llama_server.py --source ~/src/llama.cpp --variant patched
    python scripts/build_llama_server.py --print-path patched   # the binary, built if needed

Only the standard library is used, so this runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# llama.cpp commit vendored in that sdist; its .git is a dangling gitlink, so record it here
PINNED_COMMIT = "0c1e57098"
SCRIPT_VERSION = "3"  # bump when a change here must invalidate cached builds

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "llama_patches"
# the projector types packages are verified for; compiled into the patched server
VERIFIED_LIST = PATCH_DIR / "verified_projectors.txt"
VERIFIED_INCLUDE = Path("tools/server/server-image-embedding-verified.inc")
VARIANTS = ("patched", "stock")

BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # shared libraries: llama-cpp-python can load this very build (LLAMA_CPP_LIB_PATH)
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # the prebuilt web UI is downloaded at build time; builds here must work offline
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # $ORIGIN: the binary finds its libraries beside it once bin/ is copied out of the tree
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)


class BuildError(Exception):
    """A build step failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A llama.cpp source tree and what identifies it."""

    tree: Path
    digest: str
    description: str
    commit: str


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    variant: str
    source: Source
    patches: tuple[Path, ...]
    cmake_flags: tuple[str, ...]
    out: Path

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for part in (SCRIPT_VERSION, self.variant, self.source.digest, *self.cmake_flags):
            h.update(part.encode() + b"\0")
        for path in self.inputs:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()[:16]

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Files from llama_patches/ that go into the build: the patches and the verified list."""
        return (*self.patches, VERIFIED_LIST) if self.patches else ()

    @property
    def dir(self) -> Path:
        return self.out / f"{self.variant}-{self.key}"

    @property
    def binary(self) -> Path:
        return self.dir / "bin" / "llama-server"


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- sources ---------------------------------------------------------------------------------


def fetch_sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist, downloaded once into the cache."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    target = cache / name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (77 MB)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(cache),
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
    ]
    if subprocess.run(cmd, check=False).returncode != 0 or not target.exists():
        raise BuildError(
            "could not download the llama-cpp-python sdist with pip; "
            "pass --source PATH to build a llama.cpp checkout instead"
        )
    return target


def extract_vendored_tree(sdist: Path, dest: Path) -> Path:
    """Unpack vendor/llama.cpp from the sdist into dest (once)."""
    tree = dest / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    log("unpacking vendor/llama.cpp from the sdist")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(staging, members=[m for m in members if m.name], filter="data")
    # the vendored .git is a gitlink to a repository the sdist does not contain
    (staging / ".git").unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    staging.rename(tree)
    return tree


def tree_files(tree: Path) -> Iterator[Path]:
    """Files that make up a source tree, in a stable order, without VCS or build state."""
    skip = {".git", "build", ".github", ".devops", "models", "docs", "media", "examples"}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("build-"))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def tree_digest(tree: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    for path in tree_files(tree):
        if path.is_symlink() or not path.is_file():
            continue
        h.update(str(path.relative_to(tree)).encode() + b"\0")
        h.update(hashlib.blake2b(path.read_bytes(), digest_size=32).digest())
    return h.hexdigest()


def git_commit(tree: Path) -> str:
    res = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short=9", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def resolve_source(arg: str | None, cache: Path) -> Source:
    if arg is None:
        sdist = fetch_sdist(cache / "downloads")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        tree = extract_vendored_tree(sdist, cache / "sources" / digest[:16])
        return Source(
            tree, digest, f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist", PINNED_COMMIT
        )
    tree = Path(arg).expanduser().resolve()
    if not (tree / "tools" / "server").is_dir() or not (tree / "tools" / "mtmd").is_dir():
        raise BuildError(f"{tree} is not a llama.cpp tree (no tools/server, tools/mtmd)")
    log(f"hashing source tree {tree}")
    return Source(tree, tree_digest(tree), f"llama.cpp checkout {tree.name}", git_commit(tree))


# --- patches ---------------------------------------------------------------------------------


def patch_files() -> tuple[Path, ...]:
    return tuple(sorted(PATCH_DIR.glob("*.patch")))


def hunk_number(patch: Path, file: str, line: int) -> int | None:
    """Which hunk of `patch` touching `file` starts at old line `line` (git apply's report)."""
    current, n = None, 0
    for text in patch.read_text(errors="replace").splitlines():
        if text.startswith("+++ b/"):
            current, n = text[6:], 0
        elif text.startswith("@@") and current == file:
            n += 1
            m = re.match(r"@@ -(\d+)", text)
            if m and int(m.group(1)) == line:
                return n
    return None


def explain_patch_failure(patch: Path, stderr: str) -> str:
    m = re.search(r"patch failed: (.+?):(\d+)", stderr)
    if not m:
        return f"{patch.name} does not apply:\n{stderr.strip()}"
    file, line = m.group(1), int(m.group(2))
    hunk = hunk_number(patch, file, line)
    where = f"hunk #{hunk} " if hunk else ""
    return (
        f"{patch.name} does not apply to this llama.cpp tree: {where}in {file} "
        f"(at line {line} of the original file).\n"
        "The tree has diverged from the one the patches were written for; see "
        "llama_patches/README.md, 'Rebasing onto a newer llama.cpp'."
    )


def _git_apply(tree: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # the tree may sit inside another git work tree (this repository's .build/): run as a
    # plain directory, or git would apply the patch relative to that repository's root and
    # silently skip every path outside the current directory
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    return subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *flags, str(patch)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def apply_patches(tree: Path, patches: Sequence[Path]) -> None:
    for patch in patches:
        check = _git_apply(tree, patch, "--check")
        if check.returncode != 0:
            raise BuildError(explain_patch_failure(patch, check.stderr))
        if _git_apply(tree, patch).returncode != 0:
            raise BuildError(f"{patch.name} passed its check but did not apply")
        # proof that it is in: it must now apply in reverse
        if _git_apply(tree, patch, "--check", "--reverse").returncode != 0:
            raise BuildError(f"{patch.name} reported success but the tree does not contain it")
        log(f"applied {patch.name}")


def read_verified_projectors(path: Path = VERIFIED_LIST) -> list[str]:
    """The projector type names in the verified list: the first word of each line."""
    types = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", words[0]):
            raise BuildError(f"{path.name}:{n}: {words[0]!r} is not a projector type name")
        types.append(words[0])
    return types


def write_verified_include(tree: Path, types: Sequence[str]) -> None:
    """The verified list as C++, included by the patched server (see VERIFIED_INCLUDE)."""
    lines = [
        f"// generated from llama_patches/{VERIFIED_LIST.name} by the build; do not edit",
        "#define IMAGE_EMBEDDING_VERIFIED_PROJECTORS \\",
    ]
    lines += [f'    "{t}", \\' for t in types]
    lines.append("")
    (tree / VERIFIED_INCLUDE).write_text("\n".join(lines) + "\n")
    log(f"verified projector types: {', '.join(types) or 'none'}")


# --- building --------------------------------------------------------------------------------


def _skip_vcs_and_builds(directory: str, names: list[str]) -> set[str]:
    """Leave out .git and build directories (not files such as build-info.cpp.in)."""
    return {
        n
        for n in names
        if n == ".git" or ((n == "build" or n.startswith("build-")) and Path(directory, n).is_dir())
    }


def prepare_tree(plan: BuildPlan) -> Path:
    """A private copy of the source (never the user's checkout), patched for `patched`."""
    tree = plan.dir / "src"
    if tree.exists():
        shutil.rmtree(tree)
    log(f"copying source into {tree.relative_to(plan.out.parent)}")
    shutil.copytree(plan.source.tree, tree, symlinks=True, ignore=_skip_vcs_and_builds)
    apply_patches(tree, plan.patches)
    if plan.patches:
        write_verified_include(tree, read_verified_projectors())
    return tree


def build_env(plan: BuildPlan) -> dict[str, str]:
    env = dict(os.environ)
    # the copy lives inside this repository: keep llama.cpp's build-info from reporting our HEAD
    env["GIT_CEILING_DIRECTORIES"] = str(plan.dir)
    # relative paths below the build dir let ccache share objects between the two variants
    env.setdefault("CCACHE_BASEDIR", str(plan.dir))
    env.setdefault("CCACHE_DIR", str(plan.out / "ccache"))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    return env


def run_logged(cmd: Sequence[str], logfile: Path, env: dict[str, str]) -> None:
    """Run a build command, its output in logfile, progress lines echoed every ~10%."""
    last = -10
    with logfile.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = re.match(r"\[\s*(\d+)%\]", line)
            if m and int(m.group(1)) >= last + 10:
                last = int(m.group(1))
                log(f"  {last:3d}% {line.split(']', 1)[1].strip()[:90]}")
        if proc.wait() != 0:
            tail = logfile.read_text(errors="replace").splitlines()[-30:]
            raise BuildError(
                f"command failed: {' '.join(cmd)}\n" + "\n".join(tail) + f"\n(full log: {logfile})"
            )


def compile_tree(plan: BuildPlan, tree: Path, jobs: int) -> None:
    build = tree / "build"
    logfile = plan.dir / "build.log"
    env = build_env(plan)
    flags = list(plan.cmake_flags)
    if plan.variant == "patched":
        flags.append(f"-DVCACHE_BUILD_ID={plan.variant}-{plan.key}")
    log(f"configuring {plan.variant} ({plan.source.description})")
    run_logged(["cmake", "-S", str(tree), "-B", str(build), *flags], logfile, env)
    log(f"compiling {plan.variant} llama-server with {jobs} jobs (a few minutes on 2 cores)")
    run_logged(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], logfile, env
    )


def install(plan: BuildPlan, tree: Path) -> None:
    """Keep bin/ (the binary and its shared libraries) and a manifest; drop the rest."""
    built = tree / "build" / "bin"
    bindir = plan.dir / "bin"
    if bindir.exists():
        shutil.rmtree(bindir)
    shutil.copytree(built, bindir, symlinks=True)
    manifest = {
        "variant": plan.variant,
        "key": plan.key,
        "source": plan.source.description,
        "source_digest": plan.source.digest,
        "llama_cpp_commit": plan.source.commit,
        "patches": [p.name for p in plan.patches],
        "verified_projectors": read_verified_projectors() if plan.patches else [],
        "cmake_flags": list(plan.cmake_flags),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _smoke_test(bindir / "llama-server", patched=bool(plan.patches))
    tmp = plan.dir / "build.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(plan.dir / "build.json")  # written last: its presence marks a finished build
    shutil.rmtree(tree)


def _smoke_test(binary: Path, patched: bool) -> None:
    """The installed binary must start (finds its libraries), and know the patches' flags."""
    res = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BuildError(f"{binary} does not run: {(res.stderr or res.stdout).strip()[-500:]}")
    if patched != ("--image-embedding-dir" in res.stdout):
        state = "lacks" if patched else "has"
        raise BuildError(f"{binary} {state} the patches' --image-embedding-dir flag")


def ensure_built(plan: BuildPlan, jobs: int) -> Path:
    if (plan.dir / "build.json").exists() and plan.binary.exists():
        log(f"{plan.variant}: up to date ({plan.binary})")
        return plan.binary
    plan.dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tree = prepare_tree(plan)
    compile_tree(plan, tree, jobs)
    install(plan, tree)
    log(f"{plan.variant}: built in {time.monotonic() - started:.0f} s -> {plan.binary}")
    return plan.binary


# --- command line ----------------------------------------------------------------------------


def cmake_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = list(BASE_CMAKE_FLAGS)
    if shutil.which("ccache"):
        flags.append("-DGGML_CCACHE=ON")
    if args.cuda:
        flags.append("-DGGML_CUDA=ON")
    if args.metal:
        flags.append("-DGGML_METAL=ON")
    flags.extend(args.cmake_arg)
    return tuple(flags)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="a llama.cpp checkout to build instead of the pinned sdist")
    p.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / ".build" / "llama",
        help="build cache directory (default: .build/llama)",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--cuda", action="store_true", help="build with CUDA (GGML_CUDA=ON)")
    p.add_argument("--metal", action="store_true", help="build with Metal (GGML_METAL=ON)")
    p.add_argument(
        "--cmake-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra CMake argument, repeatable (e.g. --cmake-arg=-DGGML_VULKAN=ON)",
    )
    p.add_argument(
        "--print-path",
        choices=VARIANTS,
        help="print the binary's path (building it if needed) and nothing else",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_path:
        # keep stdout for the path alone
        sys.stdout = sys.stderr
    out = args.out.resolve()
    try:
        source = resolve_source(args.source, out)
        flags = cmake_flags(args)
        wanted = (
            [args.print_path]
            if args.print_path
            else (list(VARIANTS) if args.variant == "both" else [args.variant])
        )
        paths = {}
        for variant in wanted:
            patches = patch_files() if variant == "patched" else ()
            plan = BuildPlan(variant, source, patches, flags, out)
            paths[variant] = ensure_built(plan, args.jobs)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.print_path:
        print(paths[args.print_path], file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
